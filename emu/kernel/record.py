"""The kernel's recorder: one state and one transition into it per crossing.

The record layout is :class:`emu.trace.RawState` / :class:`emu.trace.RawTransition`
(appended as plain tuples in that field order: the hot path);
each kind of crossing has its own method here, so the kernel never spells a record out
field by field. Budgets on what a run records (states, captured stack bytes) are kept
here too, since recording is what they limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unicorn import UcError

from emu.context import UserContext
from emu.errors import BudgetExceeded
from emu.kernel.thread import CallbackFrame, KThread
from emu.machine import Machine
from emu.trace import S_CONTEXT, S_PENDING, S_STACK, Mode, Trace, TransitionKind

# No cap on the user stack kept per state: the whole live stack, RSP to the stack base (a
# thread's stack region is 256 KiB at most), so deep callback nesting is never cut short
# silently; the output_bytes budget bounds the total.
_UNLIMITED = 1 << 62  # one int compare on the hot path when a budget is off
_RIP, _RSP = UserContext._fields.index("rip"), UserContext._fields.index("rsp")
_SEEN = 64  # RSPs whose last captured stack bytes are kept for sharing


def _frames(cbs: list[CallbackFrame]) -> tuple[tuple[tuple[int, str], ...], int, int | None]:
    """The callback frames as a state records them, (api, service) from the bottom up (kept on
    the top frame and made again only when the stack under it changed), their depth, and the
    top frame's api."""
    if not cbs:
        return (), 0, None
    top = cbs[-1]
    frames = top.chain
    if frames is None or len(frames) != len(cbs):
        frames = top.chain = tuple([(f.api, f.activation.spec.name) for f in cbs])
    return frames, len(frames), top.api


class Recorder:
    """Appends a run's states and transitions to its :class:`Trace`, within budgets."""

    def __init__(
        self, trace: Trace, machine: Machine, state_budget: int | None = None, output_budget: int | None = None,
        observe: Callable[[int, KThread], None] | None = None,
    ) -> None:  # fmt: skip
        self.trace = trace
        self.machine = machine
        self.state_budget = state_budget
        self.output_budget = output_budget
        self._state_limit = _UNLIMITED if state_budget is None else state_budget
        self._output_limit = _UNLIMITED if output_budget is None else output_budget
        self.output_bytes = 0
        self.observe = observe
        self._threads: dict[int, KThread] = {}
        # Per stack base: the host buffer holding that stack and where it starts (empty: none).
        self._stacks: dict[int, tuple[()] | tuple[Any, int]] = {}
        self.wakes_pending = False  # some thread's wait was satisfied since the last transition
        self._seen: dict[int, bytes] = {}  # per RSP, the stack bytes last captured there

    def attach(self, threads: dict[int, KThread]) -> None:
        """The kernel's threads, to find the waits satisfied before each transition."""
        self._threads = threads
        self.wakes_pending = True  # a loaded (forked) kernel may carry a wake not yet recorded

    def _woken(self) -> tuple[int, ...]:
        self.wakes_pending = False
        out = []
        for t in self._threads.values():
            s = t.suspended
            if s is not None and s.woken and not s.announced:
                s.announced = True
                out.append(t.tid)
        return tuple(out)

    def stack_of(self, state_id: int) -> bytes:
        """The stack bytes a recorded state captured (a state with the same RSP may reuse them)."""
        stack: bytes = self.trace.raw_states[state_id][S_STACK]
        return stack

    def context_of(self, state_id: int) -> tuple[int, ...]:
        regs: tuple[int, ...] = self.trace.raw_states[state_id][S_CONTEXT]
        return regs

    def pending_at(self, state_id: int) -> bool:
        return bool(self.trace.raw_states[state_id][S_PENDING])

    def capture(self, thread: KThread, rsp: int) -> bytes:
        """The user stack from RSP to its base, as a debugger could read it.

        A stack the machine keeps in a host buffer (:meth:`Machine.allocate_stack`) is one
        slice of that buffer; any other goes through Unicorn.
        """
        base = thread.stack_base
        if not thread.stack_limit <= rsp < base:
            return b""
        view = self._stacks.get(base)
        if view is None:
            view = self._stacks[base] = self.machine.host_view(thread.stack_limit, base) or ()
        if view and rsp >= view[1]:
            stack: bytes = view[0][rsp - view[1] : base - view[1]]
            return stack
        try:  # the record's own copy, not a read the kernel model makes (no watch)
            return self.machine.read(rsp, base - rsp)
        except UcError:
            return b""

    def _kept(self, thread: KThread, rsp: int, rip: int) -> bytes:
        """The stack bytes a new state records: captured, one copy kept for equal bytes at the
        same RSP (a round trip passes the same RSP several times), counted against the
        output_bytes budget."""
        base = thread.stack_base
        view = self._stacks.get(base)
        if view and view[1] <= rsp < base:
            stack: bytes = view[0][rsp - view[1] : base - view[1]]  # capture(), inlined
        else:
            stack = self.capture(thread, rsp)
        seen = self._seen
        same = seen.get(rsp)
        if same is not None and same == stack:
            stack = same
        else:
            if len(seen) >= _SEEN:
                seen.clear()
            seen[rsp] = stack
        self._count(stack, rip)
        return stack

    def _count(self, stack: bytes, rip: int) -> None:
        """Count recorded stack bytes against the output_bytes budget."""
        self.output_bytes += len(stack)
        if self.output_bytes > self._output_limit and self.output_budget is not None:
            raise BudgetExceeded("output_bytes", self.output_budget, self.trace.symbolize(rip))

    # --- one method per kind of crossing ----------------------------------------------------
    def initial(self, thread: KThread) -> None:
        """A new thread's first state: not started, its entry context (no transition into it)."""
        ctx = thread.entry_context
        thread.state_id = len(self.trace.raw_states)
        self.trace.raw_states.append(
            (thread.state_id, thread.tid, "user", tuple(ctx), self.capture(thread, ctx.rsp), thread.stack_base, 0,
             None, None, False, ())
        )  # fmt: skip

    def restored(self, thread: KThread, mode: Mode, regs: tuple[int, ...], service: str | None, pending: bool) -> None:
        """A thread's first state in a run that starts from a dump: as the dump shows it (no transition into it)."""
        frames, depth, api = _frames(thread.callback_stack)
        thread.state_id = len(self.trace.raw_states)
        thread.mode = mode
        self.trace.raw_states.append(
            (thread.state_id, thread.tid, mode, regs, self.capture(thread, regs[_RSP]), thread.stack_base, depth,
             service, api, pending, frames)
        )  # fmt: skip

    def syscall(
        self, thread: KThread, regs: tuple[int, ...], name: str | None, ssn: int, service: str | None,
        pending: bool, detail: str,
    ) -> None:  # fmt: skip
        """User → kernel at a system call; ``pending``: the seed's state (NtCallbackReturn with a frame)."""
        self.add("syscall", thread, "kernel", regs, name, ssn, None, None, service, pending, detail, b"", None)

    def sysret(
        self, thread: KThread, regs: tuple[int, ...], service: str | None, ssn: int | None, status: int,
        note: str, stack: bytes | None = None,
    ) -> None:  # fmt: skip
        """Kernel → user with the service's status (``stack``: bytes known to be unchanged)."""
        self.add("sysret", thread, "user", regs, service, ssn, status, None, None, False, note, b"", stack)

    def syscall_sysret(self, thread: KThread, regs: tuple[int, ...], name: str, ssn: int, status: int) -> None:
        """A system call whose service returned ``status`` at once, with no observer: the
        records :meth:`syscall` then :meth:`sysret` (with the entry's stack bytes) would
        append, in one call (the hot path of a single-threaded run)."""
        trace = self.trace
        states, transitions = trace.raw_states, trace.raw_transitions
        sid = len(states)
        rip, rsp = regs[_RIP], regs[_RSP]
        if sid >= self._state_limit and self.state_budget is not None:
            raise BudgetExceeded("states", self.state_budget, trace.symbolize(rip))
        tid, base, step = thread.tid, thread.stack_base, len(transitions)
        stack = self._kept(thread, rsp, rip)
        cbs = thread.callback_stack
        frames, depth, api = _frames(cbs)
        service = cbs[-1].activation.spec.name if cbs else None
        woke = self._woken() if self.wakes_pending else ()
        states.append((sid, tid, "kernel", regs, stack, base, depth, name, api, False, frames))
        transitions.append((step, "syscall", tid, thread.state_id, sid, name, ssn, rip, rsp, depth, None, None, "",
                            b"", woke))  # fmt: skip
        thread.state_id = sid
        thread.mode = "kernel"
        if sid + 1 >= self._state_limit and self.state_budget is not None:
            raise BudgetExceeded("states", self.state_budget, trace.symbolize(rip))
        states.append((sid + 1, tid, "user", (status, *regs[1:]), stack, base, depth, service, api, False, frames))
        transitions.append((step + 1, "sysret", tid, sid, sid + 1, name, ssn, rip, rsp, depth, status, None, "",
                            b"", ()))  # fmt: skip
        thread.state_id = sid + 1
        thread.mode = "user"
        thread.resuming = None

    def callback_returned(
        self, thread: KThread, regs: tuple[int, ...], name: str, ssn: int, back: tuple[int, ...], status: int,
        detail: str, output: bytes, resuming: tuple[object, ...],
    ) -> bytes:  # fmt: skip
        """NtCallbackReturn completing the thread's top callback frame, one thread, no observer:
        the records :meth:`syscall` (the seed's state, the frame still on the stack) and
        :meth:`callback_return` (``back``: the service's trap frame) would append, with the frame
        popped and ``resuming`` set between them as the kernel does, in one call. Returns the
        second state's stack bytes: a sysret right after it, with no user write between, has them."""
        trace = self.trace
        states, transitions = trace.raw_states, trace.raw_transitions
        sid = len(states)
        rip, rsp = regs[_RIP], regs[_RSP]
        if sid >= self._state_limit and self.state_budget is not None:
            raise BudgetExceeded("states", self.state_budget, trace.symbolize(rip))
        cbs = thread.callback_stack
        frames, depth, api = _frames(cbs)
        service = cbs[-1].activation.spec.name
        base = thread.stack_base
        stack = self._kept(thread, rsp, rip)
        tid, step = thread.tid, len(transitions)
        states.append((sid, tid, "kernel", regs, stack, base, depth, service, api, True, frames))
        transitions.append((step, "syscall", tid, thread.state_id, sid, name, ssn, rip, rsp, depth, None, None, "",
                            b"", self._woken() if self.wakes_pending else ()))  # fmt: skip
        thread.state_id = sid
        thread.mode = "kernel"
        cbs.pop()
        thread.resuming = resuming
        # Back in the service that called back (its trap frame), one frame fewer.
        rip, rsp = back[_RIP], back[_RSP]
        if sid + 1 >= self._state_limit and self.state_budget is not None:
            raise BudgetExceeded("states", self.state_budget, trace.symbolize(rip))
        frames, depth, api_top = _frames(cbs)
        stack = self._kept(thread, rsp, rip)
        states.append((sid + 1, tid, "kernel", back, stack, base, depth, service, api_top, False, frames))
        transitions.append((step + 1, "callback_return", tid, sid, sid + 1, service, None, rip, rsp, depth, status,
                            api, detail, output, self._woken() if self.wakes_pending else ()))  # fmt: skip
        thread.state_id = sid + 1
        return stack

    def sysret_over(
        self, thread: KThread, regs: tuple[int, ...], service: str, ssn: int | None, status: int, stack: bytes
    ) -> None:
        """:meth:`sysret` where the stack at RSP is known to hold ``stack`` (the same object the
        capture would share), one thread, no observer: counted as a capture is."""
        trace = self.trace
        states, transitions = trace.raw_states, trace.raw_transitions
        sid = len(states)
        rip, rsp = regs[_RIP], regs[_RSP]
        if sid >= self._state_limit and self.state_budget is not None:
            raise BudgetExceeded("states", self.state_budget, trace.symbolize(rip))
        cbs = thread.callback_stack
        frames, depth, api_top = _frames(cbs)
        mine = cbs[-1].activation.spec.name if cbs else None
        self._count(stack, rip)
        tid = thread.tid
        states.append((sid, tid, "user", regs, stack, thread.stack_base, depth, mine, api_top, False, frames))
        transitions.append((len(transitions), "sysret", tid, thread.state_id, sid, service, ssn, rip, rsp, depth,
                            status, None, "", b"", self._woken() if self.wakes_pending else ()))  # fmt: skip
        thread.state_id = sid
        thread.mode = "user"
        thread.resuming = None

    def entered(
        self, kind: TransitionKind, thread: KThread, mode: Mode, regs: tuple[int, ...], name: str,
        ssn: int | None, api: int | None, detail: str,
    ) -> None:  # fmt: skip
        """The record :meth:`add` would append (and observe) for a ``"syscall"`` into a service
        other than NtCallbackReturn on a lone thread, or a ``"callback"`` whose frame is already on
        the thread's callback stack (``name``: the state's service), without its branches for
        other kinds: the syscall hook's path and the callout's."""
        trace = self.trace
        states = trace.raw_states
        sid = len(states)
        rip, rsp = regs[_RIP], regs[_RSP]
        if sid >= self._state_limit and self.state_budget is not None:
            raise BudgetExceeded("states", self.state_budget, trace.symbolize(rip))
        frames, depth, api_top = _frames(thread.callback_stack)
        base = thread.stack_base
        stack = self._kept(thread, rsp, rip)
        tid = thread.tid
        states.append((sid, tid, mode, regs, stack, base, depth, name, api_top, False, frames))
        transitions = trace.raw_transitions
        transitions.append((len(transitions), kind, tid, thread.state_id, sid, name, ssn, rip, rsp, depth, None, api,
                            detail, b"", self._woken() if self.wakes_pending else ()))  # fmt: skip
        thread.state_id = sid
        thread.mode = mode
        thread.resuming = None
        if self.observe is not None:
            self.observe(sid, thread)

    def callback(self, thread: KThread, regs: tuple[int, ...], service: str, api: int, note: str) -> None:
        """Kernel → user at KiUserCallbackDispatcher."""
        self.add("callback", thread, "user", regs, service, None, None, api, service, False, note, b"", None)

    def callback_return(
        self, thread: KThread, regs: tuple[int, ...], service: str, status: int, api: int, detail: str, output: bytes
    ) -> None:
        """NtCallbackReturn completed a frame: back in the kernel at the service that called back."""
        self.add("callback_return", thread, "kernel", regs, service, None, status, api, service, False, detail,
                  output, None)  # fmt: skip

    def block(self, thread: KThread, regs: tuple[int, ...], service: str, what: str) -> None:
        """The thread waits in the kernel."""
        self.add("block", thread, "kernel", regs, service, None, None, None, service, False, what, b"", None)

    def exit(self, thread: KThread, regs: tuple[int, ...], service: str, ssn: int | None, status: int) -> None:
        self.add("exit", thread, "exited", regs, service, ssn, status, None, None, False, "", b"", None)

    def exception(self, thread: KThread, regs: tuple[int, ...], code: int, detail: str, mode: Mode = "kernel") -> None:
        """A fault traps into the kernel (``mode`` "kernel": the context at the fault), or the kernel
        delivers an exception to KiUserExceptionDispatcher (``mode`` "user")."""
        self.add("exception", thread, mode, regs, None, None, code, None, None, False, detail, b"", None)

    def continue_(self, thread: KThread, regs: tuple[int, ...], detail: str) -> None:
        """NtContinue put a CONTEXT on the CPU: kernel → user at the context's RIP."""
        self.add("continue", thread, "user", regs, "NtContinue", None, None, None, None, False, detail, b"", None)

    def unwind(self, thread: KThread, regs: tuple[int, ...], detail: str) -> None:
        """RtlUnwindEx restored the target frame's context in user mode (user → user)."""
        self.add("unwind", thread, "user", regs, None, None, None, None, None, False, detail, b"", None)

    def terminate(self, thread: KThread, regs: tuple[int, ...], status: int, detail: str) -> None:
        """The process ended (an unhandled exception, NtTerminateProcess): the thread exits."""
        self.add("exit", thread, "exited", regs, None, None, status, None, None, False, detail, b"", None)

    def fault(self, thread: KThread, regs: tuple[int, ...], message: str) -> None:
        self.add("fault", thread, "exited", regs, None, None, None, None, None, False, message, b"", None)

    def add(
        self, kind: TransitionKind, thread: KThread, mode: Mode, regs: tuple[int, ...], name: str | None,
        ssn: int | None, status: int | None, api: int | None, service: str | None, pending: bool,
        detail: str, data: bytes, stack: bytes | None,
    ) -> None:  # fmt: skip
        """One state and the transition into it, every field given (the methods above name them;
        the kernel's hot paths call this directly, one Python frame fewer)."""
        trace = self.trace
        states = trace.raw_states
        sid = len(states)
        if sid >= self._state_limit and self.state_budget is not None:
            raise BudgetExceeded("states", self.state_budget, trace.symbolize(regs[_RIP]))
        cbs = thread.callback_stack
        if cbs:
            frames, depth, api_top = _frames(cbs)
            if service is None and mode == "user":
                service = cbs[-1].activation.spec.name
        else:
            frames, depth, api_top = (), 0, None
        rsp, base = regs[_RSP], thread.stack_base
        if stack is None:
            stack = self._kept(thread, rsp, regs[_RIP])
        tid = thread.tid
        # Plain tuples in the RawState / RawTransition field order (emu.trace names the fields).
        states.append((sid, tid, mode, regs, stack, base, depth, service, api_top, pending, frames))
        transitions = trace.raw_transitions
        transitions.append((
            len(transitions), kind, tid, thread.state_id, sid, name, ssn, regs[_RIP], rsp, depth, status, api,
            detail, data, self._woken() if self.wakes_pending else (),
        ))  # fmt: skip
        thread.state_id = sid
        thread.mode = mode
        if thread.resuming is not None and kind != "callback_return":
            thread.resuming = None
        if self.observe is not None:
            self.observe(sid, thread)
