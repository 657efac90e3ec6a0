"""What a debugger needs from a built process: registers, memory, breakpoints, run and step.

:class:`DebugTarget` sits over a :class:`~emu.engine.Process` (its machine, kernel and run
loop) and knows nothing of GDB's wire format. Running goes through the process's own loop
(:meth:`Process.drive`), so the kernel model serves every ``syscall`` as in ``emu run``:
stepping over a ``syscall`` lands where the model sends the thread (after the instruction
with RAX = the status, in ``KiUserCallbackDispatcher`` for a callback, on another thread
after a switch), and the transitions it records are reported with the stop.

A single step is one run of the CPU with an instruction count of one; breakpoints are
Unicorn exits (the CPU stops at one before the instruction runs). Neither lets a hook of the
next instruction run before the stop, so emu's own Python traps act once, as in ``emu run``,
and no ``int3`` byte is written into the code: memory reads show the real bytes.

The target drives a :class:`~emu.engine.Process`; anything with the same machine, kernel,
trace and ``drive`` (a stepping session over one) can stand in for it.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from typing import Literal

from unicorn import UC_HOOK_MEM_READ, UcError
from unicorn import x86_const as x86

from emu.context import REGISTER_NAMES
from emu.debug.control import drive_to, step
from emu.debug.registers import REGISTERS, Reg
from emu.engine import Process, RunResult
from emu.errors import BudgetExceeded, EmuError, KernelError, MachineFault, UnimplementedImport
from emu.kernel import KThread
from emu.trace import Transition
from emu.winnt import status_name

# Signals GDB shows for a stop (GDB's own numbering, include/gdb/signals.def, equal to Linux's).
SIGINT, SIGTRAP, SIGABRT, SIGSEGV, SIGXCPU = (
    int(signal.SIGINT), int(signal.SIGTRAP), int(signal.SIGABRT), int(signal.SIGSEGV), int(signal.SIGXCPU),
)  # fmt: skip

_UC: dict[str, int] = {
    **{n: getattr(x86, f"UC_X86_REG_{n.upper()}") for n in REGISTER_NAMES if n != "rflags"},
    "eflags": x86.UC_X86_REG_EFLAGS,
    **{n: getattr(x86, f"UC_X86_REG_{n.upper()}") for n in ("cs", "ss", "ds", "es", "fs", "gs", "mxcsr")},
    **{f"st{i}": getattr(x86, f"UC_X86_REG_FP{i}") for i in range(8)},
    **{f"xmm{i}": getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(16)},
    "fctrl": x86.UC_X86_REG_FPCW, "fstat": x86.UC_X86_REG_FPSW, "ftag": x86.UC_X86_REG_FPTAG,
    "fioff": x86.UC_X86_REG_FIP, "fop": x86.UC_X86_REG_FOP,
    "fs_base": x86.UC_X86_REG_FS_BASE, "gs_base": x86.UC_X86_REG_GS_BASE,
}  # fmt: skip
# What a debugger may change on the CPU: the integer, vector and segment-base registers.
_WRITABLE = frozenset((*REGISTER_NAMES, "eflags", "mxcsr", "fs_base", "gs_base", *(f"xmm{i}" for i in range(16))))
_CONTEXT = {n: i for i, n in enumerate(REGISTER_NAMES)} | {"eflags": REGISTER_NAMES.index("rflags")}
_MEMORY_CHUNK = 0x1000


@dataclass(frozen=True)
class Stop:
    """Why the target stopped: the thread stopped with a signal, or the process ended.

    ``kind`` "signal": thread ``tid`` stopped (``reason`` "break", "step", "interrupt",
    "fault", "budget"); "exited": every thread ended, ``code`` is thread 0's exit status;
    "terminated": the run ended by a fault, a budget or a deadlock (``signal``).
    ``message`` says it in one line; ``transitions`` are those recorded on the way.
    """

    kind: Literal["signal", "exited", "terminated"]
    signal: int = SIGTRAP
    tid: int = 0
    reason: str = ""
    code: int = 0
    message: str = ""
    transitions: tuple[Transition, ...] = ()
    watch: tuple[str, int] | None = None  # ("watch" | "rwatch" | "awatch", address) for a watchpoint


class DebugTarget:
    """A process under a debugger: stopped until :meth:`resume` runs it.

    ``process`` must be freshly built (not run); thread 0 is put on the CPU at its start.
    """

    def __init__(self, process: Process) -> None:
        self.process = process
        self.machine = process.machine
        self.kernel = process.kernel
        self.uc = process.machine.uc
        self.breakpoints: set[int] = set()
        self.watchpoints: set[tuple[str, int, int]] = set()  # (kind, address, length)
        self._watch_hit: tuple[str, int] | None = None
        self.ended: Stop | None = None  # set once the run is over; every later resume reports it
        self.error: EmuError | None = None
        self.stop = "stopped"  # like RunResult.stop once the run ends: "exit", "fault", "budget", "deadlock"
        self._reason: str | None = None
        self._interrupt = threading.Event()
        self._start()

    def _start(self) -> None:
        """Thread 0 on the CPU; a run from a dump starts as ``emu run`` starts it (emu.dump.start)."""
        from emu.dump.start import DumpProcess

        if not isinstance(self.process, DumpProcess):
            self.kernel.continue_thread(self.process.thread)
            return
        ended = self.process.start()
        if ended is None:
            return
        if ended.error is not None:  # a dump of a fault: the process is over, GDB hears it terminated
            self.error, self.stop = ended.error, ended.stop
            self.ended = Stop("terminated", SIGSEGV, self.current, ended.stop, message=str(ended.error))
        else:
            self._end(ended.stop)

    # --- threads ------------------------------------------------------------------------
    def threads(self) -> list[KThread]:
        return [self.kernel.threads[t] for t in sorted(self.kernel.threads)]

    @property
    def current(self) -> int:
        """The thread on the CPU (the last one that ran once the process ended)."""
        t = self.kernel.current
        return t.tid if t is not None else 0

    def describe_thread(self, tid: int) -> str:
        """A thread's name and state, for GDB's ``info threads``."""
        t = self.kernel.threads.get(tid)
        if t is None:
            return ""
        if t.terminated:
            state = "terminated" if t.exit_status is None else f"exited {t.exit_status:#x}"
        elif t.suspended is not None:
            state = "waiting" if t.suspended.kind == "blocked" else "ready (at a system call)"
        elif tid == self.current:
            state = "on the CPU"
        else:
            state = "ready" if t.started else "not started"
        depth = len(t.callback_stack)
        return f"{t.name}, {state}" + (f", {depth} callback(s) deep" if depth else "")

    def rip(self) -> int:
        """RIP of the thread on the CPU."""
        return int(self.uc.reg_read(x86.UC_X86_REG_RIP))

    def alive(self, tid: int) -> bool:
        t = self.kernel.threads.get(tid)
        return t is not None and not t.terminated

    # --- registers ----------------------------------------------------------------------
    def _on_cpu(self, tid: int) -> bool:
        return tid == self.current and self.ended is None

    def register(self, tid: int, number: int) -> bytes | None:
        """A register's bytes (little-endian) for a thread; None where its value is not known
        (the x87 and vector registers of a thread that is off the CPU)."""
        if not 0 <= number < len(REGISTERS):
            return None
        reg = REGISTERS[number]
        if self._on_cpu(tid):
            return _encode(reg, self.uc.reg_read(_UC[reg.name]) if reg.name in _UC else 0)
        t = self.kernel.threads.get(tid)
        if t is None:
            return None
        if reg.name in _CONTEXT:
            return _encode(reg, self._saved_context(t)[_CONTEXT[reg.name]])
        if reg.name == "gs_base":
            return _encode(reg, t.teb)  # GS holds the TEB in user mode (MS docs, "x64 architecture")
        if reg.name in ("cs", "ss", "ds", "es", "fs", "gs", "fs_base"):
            return _encode(reg, self.uc.reg_read(_UC[reg.name]))  # the same for every user thread
        return None

    def _saved_context(self, t: KThread) -> tuple[int, ...]:
        """The user context of a thread that is off the CPU, as the kernel model keeps it."""
        if t.suspended is not None:
            return tuple(t.suspended.trap.ctx)
        if not t.started:
            return tuple(t.entry_context)
        return self.kernel.recorder.context_of(t.state_id)

    def write_register(self, tid: int, number: int, data: bytes) -> bool:
        """Set a register of the thread on the CPU; False for another thread or a read-only one."""
        if not self._on_cpu(tid) or not 0 <= number < len(REGISTERS):
            return False
        reg = REGISTERS[number]
        if reg.name not in _WRITABLE or len(data) != reg.size:
            return False
        self.uc.reg_write(_UC[reg.name], int.from_bytes(data, "little"))
        return True

    # --- memory -------------------------------------------------------------------------
    def read_memory(self, address: int, size: int) -> bytes:
        """As many bytes from ``address`` on as are mapped (empty if the first one is not)."""
        out = bytearray()
        while len(out) < size:
            at = address + len(out)
            n = min(size - len(out), _MEMORY_CHUNK - at % _MEMORY_CHUNK)
            try:
                out += self.machine.read(at, n)
            except (UcError, OverflowError):
                break
        return bytes(out)

    def write_memory(self, address: int, data: bytes) -> bool:
        """Write guest memory (read-only pages too, as a debugger may); False if any of it is unmapped."""
        if not data:
            return True
        try:
            self.machine.write(address, data)
        except (UcError, OverflowError):
            return False
        self._forget_code(address, address + len(data))  # translated code from the old bytes
        return True

    # --- breakpoints --------------------------------------------------------------------
    def add_breakpoint(self, address: int) -> bool:
        if not 0 <= address < 1 << 64:
            return False
        self.breakpoints.add(address)
        return True

    def remove_breakpoint(self, address: int) -> bool:
        self.breakpoints.discard(address)
        return True

    def add_watchpoint(self, kind: str, address: int, length: int) -> bool:
        """Stop after an instruction that writes (``watch``: the bytes changed, by the CPU or by
        the kernel model), reads (``rwatch``) or touches (``awatch``) the range."""
        if kind not in ("watch", "rwatch", "awatch") or not 0 < length <= 0x1000 or not 0 <= address < 1 << 64:
            return False
        self.watchpoints.add((kind, address, length))
        return True

    def remove_watchpoint(self, kind: str, address: int, length: int) -> bool:
        self.watchpoints.discard((kind, address, length))
        return True

    def _forget_code(self, begin: int, end: int) -> None:
        # Unicorn translates code once: drop what it translated from bytes that changed.
        self.uc.ctl_remove_cache(begin, end)

    # --- running ------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Stop a resume in progress (from another thread: a client's Ctrl-C)."""
        self._interrupt.set()
        self.machine.request_stop()

    def _stopped(self) -> bool:
        if self._interrupt.is_set():
            self._reason = self._reason or "interrupt"
        return self._reason is not None

    def finish(self) -> Stop:
        """Run to the end without the debugger (it detached): no breakpoints, no watchpoints,
        and the scenario's wall-time budget, as ``emu run`` has it."""
        self.breakpoints.clear()
        self.watchpoints.clear()
        return self.resume(wall_time=self.process.scenario.budgets.wall_time)

    def resume(self, step: bool = False, wall_time: float | None = None) -> Stop:
        """Run the process until a breakpoint, the next instruction (``step``), an interrupt,
        or its end. Threads switch as the kernel model schedules them. ``wall_time``: seconds
        before the run stops on its budget (None: no limit while a debugger waits)."""
        if self.ended is not None:
            return self.ended
        self._reason = None
        self._interrupt.clear()
        before = len(self.process.trace)
        outcome: Stop
        try:
            how = self._run(step, wall_time)
            if how == "stopped":
                reason = self._reason or "interrupt"
                sig = SIGINT if reason == "interrupt" else SIGTRAP
                outcome = Stop(
                    "signal", sig, self.current, reason, watch=self._watch_hit if reason == "watch" else None
                )
            else:
                outcome = self._end(how)
        except (MachineFault, UnimplementedImport) as e:
            self.kernel.record_fault(self.kernel.current or self.process.thread, e)
            outcome = self._fail(e, "fault", SIGSEGV)
        except BudgetExceeded as e:
            outcome = self._fail(e, "budget", SIGXCPU)
        except KernelError as e:
            outcome = self._fail(e, "fault", SIGABRT)
        new = tuple(self.process.trace.transitions[before:])
        o = outcome
        return Stop(o.kind, o.signal, o.tid, o.reason, o.code, o.message, new, o.watch)

    def _run(self, step: bool, wall_time: float | None) -> str:
        """ "stopped" (``_reason`` says why), or how the run ended ("exit", "deadlock")."""
        if step or self.rip() in self.breakpoints:
            how = self._step()  # off the breakpoint first: the CPU would stop on it at once
            if step or how != "stopped":
                return how
            if self.rip() in self.breakpoints:
                self._reason = "break"
                return how
            if self._interrupt.is_set():
                self._reason = "interrupt"
                return how
            self._reason = None
        return self._watch() if self.watchpoints else self._continue(wall_time)

    def _step(self) -> str:
        """One instruction (:func:`emu.debug.control.step`): "stopped" or how the run ended."""
        how = step(self.process)
        self._reason = "step"
        return how

    def _watch(self) -> str:
        """Continue one instruction at a time while watchpoints are set: reads by the CPU come
        from Unicorn's memory hooks, writes from comparing the bytes after each instruction
        (so a write the kernel model makes while it serves a system call is seen too)."""
        hooks = []
        for kind, address, length in self.watchpoints:
            if kind in ("rwatch", "awatch"):
                hooks.append(self.uc.hook_add(UC_HOOK_MEM_READ, self._on_read, kind, address, address + length - 1))
        writes = [(kind, address, length) for kind, address, length in self.watchpoints if kind != "rwatch"]
        try:
            while True:
                before = [self.read_memory(address, length) for _, address, length in writes]
                self._watch_hit = None
                how = self._step()
                if how != "stopped":
                    return how
                for (kind, address, length), old in zip(writes, before):
                    if self._watch_hit is None and self.read_memory(address, length) != old:
                        self._watch_hit = (kind, address)
                if self._watch_hit is not None:
                    self._reason = "watch"
                elif self.rip() in self.breakpoints:
                    self._reason = "break"
                elif self._interrupt.is_set():
                    self._reason = "interrupt"
                else:
                    continue
                return how
        finally:
            for h in hooks:
                self.uc.hook_del(h)

    def _on_read(self, uc: object, access: int, address: int, size: int, value: int, kind: str) -> None:
        if self._watch_hit is None:
            hit = next(
                (a for k, a, n in self.watchpoints if k == kind and a < address + size and address < a + n), address
            )
            self._watch_hit = (kind, hit)

    def _continue(self, wall_time: float | None) -> str:
        """Run until a breakpoint, an interrupt or the end (:func:`emu.debug.control.drive_to`)."""
        how = drive_to(self.process, self.breakpoints, wall_time, stop=self._stopped)
        if how == "break":
            self._reason = "break"
            return "stopped"
        return how

    def _fail(self, error: EmuError, stop: str, sig: int) -> Stop:
        """The run stopped on an error: GDB sees the thread stop with a signal now, and the
        process terminated with it on the next resume."""
        self.error, self.stop = error, stop
        self.ended = Stop("terminated", sig, self.current, stop, message=str(error))
        return Stop("signal", sig, self.current, stop, message=str(error))

    def _end(self, how: str) -> Stop:
        self.stop = how
        if how == "deadlock":
            chains = "; ".join(self.kernel.deadlock)
            self.ended = Stop("terminated", SIGABRT, self.current, how, message=f"deadlock: {chains}")
        else:
            status = self.kernel.threads[0].exit_status if 0 in self.kernel.threads else None
            said = "" if status is None else f"; {self.kernel.threads[0].name} exited with {status_name(status)}"
            self.ended = Stop(
                "exited", code=status or 0, tid=self.current, reason=how, message=f"every thread ended{said}"
            )
        return self.ended

    def result(self) -> RunResult:
        """What ran so far, as ``emu run`` reports it."""
        p, k = self.process, self.kernel
        return RunResult(
            scenario=p.scenario, trace=p.trace, images=p.images, threads=dict(k.threads), error=self.error,
            max_depth=k.max_depth, stop=self.stop if self.ended is not None else "stopped",
            notes=list(p.notes), deadlock=list(k.deadlock), details=list(p.details), system=p.describe(),
        )  # fmt: skip


def _encode(reg: Reg, value: object) -> bytes:
    if isinstance(value, tuple):  # an x87 register: (64-bit mantissa, 16-bit sign and exponent)
        mantissa, exponent = value
        return int(mantissa).to_bytes(8, "little") + (int(exponent) & 0xFFFF).to_bytes(2, "little")
    number = value if isinstance(value, int) else 0
    return (number & ((1 << reg.bits) - 1)).to_bytes(reg.size, "little")
