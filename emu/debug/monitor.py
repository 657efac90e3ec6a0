"""``monitor`` commands: what GDB cannot see by itself (symbols, the kernel model, the trace).

GDB passes ``monitor WORDS`` to the stub (``qRcmd``) and prints what comes back. The
commands read the kernel model behind the CPU: its threads and callback stacks, the
transitions recorded so far, and the loaded images' symbols.
"""

from __future__ import annotations

from emu.debug.target import DebugTarget
from emu.loader.image import find_symbol
from emu.trace import Transition
from emu.winnt import status_name

HELP = """\
monitor commands (emu):
  threads          every thread: name, state, callback depth
  callbacks        the current thread's callback stack, innermost first
  trace [N]        the last N transitions the kernel model recorded (10)
  sym NAME         the address of a symbol (app!on_message, ZwCallbackReturn)
  where [ADDR]     an address (RIP by default) as module!symbol+offset
  regions          the mapped memory regions
  status CODE      an NTSTATUS by name (0xc0000008 -> STATUS_INVALID_HANDLE)
"""


def transition_line(t: Transition) -> str:
    """One recorded transition as a line of GDB console output."""
    status = f", status {t.status_name}" if t.status is not None else ""
    api = f", api {t.api}" if t.api is not None else ""
    service = f" {t.service}" if t.service else ""
    return f"emu: step {t.step}: thread {t.thread} {t.kind}{service} at {t.rip_symbol}, depth {t.depth}{api}{status}"


def run(target: DebugTarget, command: str) -> str:
    """The output of one monitor command (ends with a newline)."""
    words = command.split()
    if not words or words[0] == "help":
        return HELP
    name, args = words[0], words[1:]
    sym = target.process.trace.symbolize
    if name == "threads":
        return "".join(f"{'*' if t.tid == target.current else ' '} {t.tid + 1}: {target.describe_thread(t.tid)}\n"
                       for t in target.threads())  # fmt: skip
    if name == "callbacks":
        t = target.kernel.threads[target.current]
        if not t.callback_stack:
            return f"{t.name}: no callback in progress\n"
        return "".join(
            f"  depth {i + 1}: api {f.api} for {f.activation.spec.name}, UCALLOUT_FRAME at {f.user_frame:#x}, "
            f"returns to {sym(f.trap.ctx.rip)}\n"
            for i, f in reversed(list(enumerate(t.callback_stack)))
        )  # fmt: skip
    if name == "trace":
        count = int(args[0]) if args and args[0].isdigit() else 10
        rows = target.process.trace.transitions[-count:] if count else []
        return "".join(transition_line(t) + "\n" for t in rows) or "no transitions yet\n"
    if name == "sym" and len(args) == 1:
        found = find_symbol(target.process.images, args[0])
        return f"{args[0]} = {found:#x}\n" if found is not None else f"{args[0]}: no such symbol\n"
    if name == "where":
        try:
            address = int(args[0], 0) if args else target.rip()
        except ValueError:
            return f"where: {args[0]!r} is not an address\n"
        return f"{address:#x} = {sym(address)}\n"
    if name == "regions":
        return "".join(
            f"  {r.start:#014x}-{r.end:#014x} {r.perms or '-':<3} {r.label}\n" for r in target.machine.regions
        )
    if name == "status" and len(args) == 1:
        try:
            return f"{status_name(int(args[0], 0))}\n"
        except ValueError:
            return f"status: {args[0]!r} is not a number\n"
    return f"unknown monitor command {command.strip()!r}\n" + HELP
