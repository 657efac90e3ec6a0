"""Three signals for the seed's state, each with a verdict and its evidence, and their combination.

"If a thread is waiting for a kernel-mode callback to complete, the user-mode side of the
thread will delay at a call to the ZwCallbackReturn function." (MS DevNotes, *Detecting
Kernel-Mode Callbacks*.) What a tool sees of such a thread, and the signal that reads it:

* **symbol** — RIP is just after the ``syscall`` (or ``int 2Eh``) of ntdll's
  ZwCallbackReturn/NtCallbackReturn export. Alone, this is the naive detector.
* **code** — the two bytes before RIP are ``0F 05`` (or ``CD 2E``) and the stub around them,
  read back from code, loads the SSN that ntdll's own NtCallbackReturn stub loads. Needs no
  symbol but that one export, and sees private copies of the stub ("direct syscalls").
* **stack** — unwinding the user stack (:mod:`emu.detection.unwind`) finds KiUserCallbackDispatcher
  frames: a callback is in progress, how deep, and for which api numbers.

:func:`combined` decides: pending iff (code or symbol) and the stack shows at least one
dispatcher frame and the view is not known to be in user mode. Without a dispatcher frame
NtCallbackReturn fails at once with STATUS_NO_CALLBACK_ACTIVE (ReactOS, Wine).
"""

from __future__ import annotations

from typing import Literal

from emu.detection.prologue import stub_containing
from emu.detection.unwind import StackWalk, walk
from emu.detection.view import (
    CALLBACK_RETURN_NAMES,
    Detection,
    DispatcherFrame,
    ThreadView,
    dispatcher_frames,
    syscall_sites,
)
from emu.loader.stubs import STUB_WINDOW, Stub, stub_at
from emu.records import record

Value = Literal["yes", "no", "unknown"]
_SITES = {b"\x0f\x05": "syscall", b"\xcd\x2e": "int 2Eh"}  # the two encodings that enter the kernel here


@record(frozen=True)
class Verdict:
    """One signal's answer (``yes``/``no``/``unknown``) with the evidence for it; truthy when ``yes``."""

    signal: str
    value: Value
    evidence: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.value == "yes"

    def __str__(self) -> str:
        return f"{self.signal}: {self.value} ({'; '.join(self.evidence)})"


@record(frozen=True)
class StackVerdict(Verdict):
    """The stack signal's verdict, with the dispatcher frames it found (innermost first)."""

    frames: tuple[DispatcherFrame, ...] = ()
    walk: StackWalk | None = None

    @property
    def depth(self) -> int:
        return len(self.frames)

    @property
    def apis(self) -> tuple[int, ...]:
        return tuple(f.api for f in self.frames)


def symbol_signal(view: ThreadView) -> Verdict:
    """(a) RIP is just after the ``syscall``/``int 2Eh`` of ntdll's ZwCallbackReturn/NtCallbackReturn export."""
    ntdll = view.module("ntdll")
    if ntdll is None:
        return Verdict("symbol", "unknown", ("no module named ntdll in the view",))
    name = next((n for n in CALLBACK_RETURN_NAMES if n in ntdll.exports), None)
    if name is None:
        return Verdict("symbol", "unknown", ("ntdll exports neither ZwCallbackReturn nor NtCallbackReturn",))
    stub = ntdll.exports[name]
    rip = view.context.rip
    key = ("sites", stub)
    if key not in ntdll.memo:
        ntdll.memo[key] = syscall_sites(view, stub, min(ntdll.function_end(stub), stub + STUB_WINDOW))
    sites: list[int] = ntdll.memo[key]  # type: ignore[assignment]
    where = view.symbol(rip)
    if rip in sites:
        return Verdict("symbol", "yes", (f"RIP {where} is just after the system call instruction of ntdll!{name}",))
    shown = ", ".join(f"+{s - stub:#x}" for s in sites) or "none found"
    return Verdict("symbol", "no", (f"RIP {where} is not just after ntdll!{name}'s system call ({shown})",))


def callback_return_ssn(view: ThreadView) -> tuple[int | None, str]:
    """NtCallbackReturn's SSN as the loaded ntdll's own stub loads it (read from code), and why not if None."""
    ntdll = view.module("ntdll")
    if ntdll is None:
        return None, "no module named ntdll in the view"
    name = next((n for n in reversed(CALLBACK_RETURN_NAMES) if n in ntdll.exports), None)
    if name is None:
        return None, "ntdll exports no NtCallbackReturn/ZwCallbackReturn stub to read the SSN from"
    if ("stub", name) not in ntdll.memo:
        ntdll.memo[("stub", name)] = stub_at(ntdll.image, name)
    stub: Stub = ntdll.memo[("stub", name)]  # type: ignore[assignment]
    if stub.ssn is None:
        return None, f"ntdll!{name} is not a syscall stub emu can read"
    return stub.ssn, f"ntdll!{name} loads SSN {stub.ssn:#x}"


def code_signal(view: ThreadView) -> Verdict:
    """(b) ``0F 05``/``CD 2E`` right before RIP, in a stub whose SSN is NtCallbackReturn's."""
    rip = view.context.rip
    before = view.read(rip - 2, 2)
    if before is None:
        return Verdict("code", "unknown", (f"the two bytes before RIP {rip:#x} are not readable",))
    insn = _SITES.get(before)
    if insn is None:
        return Verdict("code", "no", (f"the bytes before RIP are {before.hex(' ')}, not a syscall or int 2Eh",))
    want, why = callback_return_ssn(view)
    if want is None:
        return Verdict("code", "unknown", (f"{insn} before RIP", why))
    module = view.module_at(rip)
    stub = stub_containing(module, rip) if module is not None else None
    if stub is None:
        return Verdict("code", "no", (f"{insn} before RIP {view.symbol(rip)}, but no syscall stub ends there", why))
    loads = "no SSN" if stub.ssn is None else f"SSN {stub.ssn:#x}"
    found = f"{insn} before RIP, in a {stub.shape} stub at {view.symbol(stub.address)} loading {loads}"
    return Verdict("code", "yes" if stub.ssn == want else "no", (found, why))


def stack_signal(view: ThreadView) -> StackVerdict:
    """(c) KiUserCallbackDispatcher frames found by unwinding the user stack; ``unknown`` when it cannot be walked."""
    w = walk(view)
    frames = w.dispatchers
    evidence = [
        f"KiUserCallbackDispatcher frame {i + 1}: UCALLOUT_FRAME at {f.frame:#x}, ApiNumber {f.api}, "
        f"Buffer {f.buffer:#x}, Length {f.length:#x}"
        for i, f in enumerate(frames)
    ]
    how = sorted({f.how for f in w.frames[1:]})
    walked = f"unwound {len(w.frames) - 1} frame(s) ({', '.join(how) or 'none'})"
    if w.complete:
        walked += " to the thread's first frame (return address 0)"
    else:
        walked += f"; stopped: {w.problem}"
    evidence.append(walked)
    stale = _off_walk(view, w)
    if stale:
        evidence.append(
            "a stack scan also finds UCALLOUT_FRAME-like data the unwind does not pass through (stale or forged) "
            "at " + ", ".join(f"{s:#x}" for s in stale)
        )
    if frames:
        evidence.insert(0, f"callback depth {len(frames)}, api(s) {', '.join(str(f.api) for f in frames)}")
        return StackVerdict("stack", "yes", tuple(evidence), frames, w)
    return StackVerdict("stack", "no" if w.complete else "unknown", tuple(evidence), (), w)


def _off_walk(view: ThreadView, w: StackWalk) -> list[int]:
    if w.problem is not None and not w.frames[1:]:
        return []  # nothing walked: the scan has nothing to be compared with
    on_walk = {f.frame for f in w.dispatchers}
    return [f.frame for f in dispatcher_frames(view) if f.frame not in on_walk]


@record(frozen=True)
class CombinedVerdict:
    """All three signals, where they disagree, and the decision; truthy when pending."""

    pending: bool
    symbol: Verdict
    code: Verdict
    stack: StackVerdict
    mode: str  # "kernel", "user" or "unknown" (a view that cannot tell)
    reason: str
    disagreements: tuple[str, ...]
    detection: Detection | None

    def __bool__(self) -> bool:
        return self.pending

    @property
    def evidence(self) -> tuple[str, ...]:
        return (self.reason, *self.disagreements, *(str(v) for v in (self.symbol, self.code, self.stack)))

    def __str__(self) -> str:
        head = f"{'PENDING' if self.pending else 'not pending'}: {self.reason}"
        lines = [head, *(f"  disagree: {d}" for d in self.disagreements)]
        for v in (self.symbol, self.code, self.stack):
            lines.append(f"  {v.signal}: {v.value}")
            lines.extend(f"    {e}" for e in v.evidence)
        return "\n".join(lines)


def combined(view: ThreadView) -> CombinedVerdict:
    """Pending iff (code or symbol) and the stack shows a dispatcher frame and the view is not in user mode."""
    sym, code, stack = symbol_signal(view), code_signal(view), stack_signal(view)
    mode = {True: "kernel", False: "user", None: "unknown"}[view.kernel_mode]
    at_return = bool(sym) or bool(code)
    pending = at_return and stack.depth > 0 and view.kernel_mode is not False
    if pending:
        reason = f"at NtCallbackReturn's system call with {stack.depth} callback(s) on the stack"
    elif not at_return:
        reason = "RIP is not just after NtCallbackReturn's system call"
    elif view.kernel_mode is False:
        reason = "the thread is in user mode: the system call has returned"
    elif stack.value == "unknown":
        reason = "at NtCallbackReturn's system call, but the stack cannot be walked to confirm a callback"
    else:
        reason = (
            "at NtCallbackReturn's system call with no callback on the stack: it fails with STATUS_NO_CALLBACK_ACTIVE"
        )
    detection = None
    if pending:
        ret = view.u64(view.context.rsp)
        rip = view.context.rip
        detection = Detection(
            None, view.thread, view.symbol(rip), view.symbol(ret) if ret is not None else "?",
            stack.depth, stack.frames[0].api, rip, ret,
        )  # fmt: skip
    return CombinedVerdict(pending, sym, code, stack, mode, reason, _disagreements(sym, code, stack), detection)


def _disagreements(sym: Verdict, code: Verdict, stack: StackVerdict) -> tuple[str, ...]:
    out = []
    if {sym.value, code.value} == {"yes", "no"}:
        if sym:
            out.append("symbol says NtCallbackReturn, code says the stub there loads another SSN")
        else:
            out.append("code finds an NtCallbackReturn stub where ntdll's export is not (a private copy of the stub)")
    if (sym or code) and stack.value != "yes":
        out.append(f"RIP is at NtCallbackReturn's system call but the stack shows no callback ({stack.value})")
    if stack and sym.value == "no" and code.value == "no":
        out.append(f"the stack shows {stack.depth} callback(s) in progress but RIP is elsewhere (a nested call)")
    return tuple(out)


def naive_detector(view: ThreadView) -> Verdict:
    """The deliberately naive detector: signal (a) alone (RIP just after ZwCallbackReturn's syscall)."""
    return symbol_signal(view)


def combined_detector(view: ThreadView) -> CombinedVerdict:
    """The built-in detector as a scoring callable (``emu score --detector emu.detection.signals:combined_detector``)."""
    return combined(view)


def nested_call_detector(view: ThreadView) -> Verdict:
    """For the ``waiting-in-callback`` truth: a system call's site that is not NtCallbackReturn's, inside a callback.

    Yes when the two bytes before RIP are ``0F 05``/``CD 2E`` (a system call was entered
    there), neither the symbol nor the code signal places RIP at NtCallbackReturn, the stack
    shows at least one KiUserCallbackDispatcher frame, and the view is not known to be in
    user mode. A view that cannot tell the mode (``user-context``) also says yes right after
    such a nested call has returned: the context is the same.
    """
    rip = view.context.rip
    site = _SITES.get(view.read(rip - 2, 2) or b"")
    if site is None:
        return Verdict("nested call", "no", (f"no syscall or int 2Eh right before RIP {view.symbol(rip)}",))
    if view.kernel_mode is False:
        return Verdict("nested call", "no", ("the thread is in user mode: the system call has returned",))
    if symbol_signal(view) or code_signal(view):
        return Verdict("nested call", "no", ("RIP is at NtCallbackReturn's system call: the callback is returning",))
    stack = stack_signal(view)
    if not stack:
        return Verdict("nested call", "no", (f"{site} before RIP but no callback on the stack ({stack.value})",))
    where = f"{site} before RIP {view.symbol(rip)}, {stack.depth} callback(s) on the stack"
    return Verdict("nested call", "yes", (where, *stack.evidence[:1]))
