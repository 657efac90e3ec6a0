"""What a run records: typed state records and the transitions between them.

A :class:`State` is one moment of one thread as both sides know it: the user-mode
context a debugger would show (plus the stack bytes above RSP) and the kernel
model's truth (mode, active service, callback depth, whether a callback return is
pending). A :class:`Transition` is an edge between two states. Both are frozen.

The records say what the thread did, not how Windows would name its scheduling state:
:mod:`emu.observers` derives that (KTHREAD_STATE, the wait reason) and what each observer
can see from the transitions, so recording stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

from emu.context import KTrapFrame, UserContext
from emu.winnt import status_name

TransitionKind = Literal["syscall", "sysret", "callback", "callback_return", "fault", "exit", "block"]
Mode = Literal["user", "kernel", "exited"]

KINDS: tuple[str, ...] = ("syscall", "sysret", "callback", "callback_return", "fault", "exit", "block")


class State(NamedTuple):
    """One state of one thread.

    ``context`` is the user-mode context (in kernel mode: the trap frame's view, RIP
    just after the ``syscall``). ``stack`` holds the bytes from ``context.rsp`` up to
    ``stack_base``. ``depth`` is the number of callbacks in progress and ``api`` the
    api number of the innermost one (None at depth 0); ``service`` is the service in
    the kernel (kernel mode) or the one whose callback is running (user mode).
    ``pending`` is the ground truth for the seed's state: the thread is in kernel mode
    inside NtCallbackReturn with a callback frame to complete. That is not a wait: on
    Windows NtCallbackReturn switches back at once (WRK ke/amd64/callout.asm), so the
    state lasts a few dozen instructions with the thread Running, or Ready if preempted
    (``emu.observers``; a thread that waits inside a callback is blocked at a nested
    system call instead).
    """

    id: int
    thread: int
    mode: Mode
    context: UserContext
    stack: bytes
    stack_base: int
    depth: int
    service: str | None
    api: int | None
    pending: bool
    callbacks: tuple[tuple[int, str], ...] = ()  # the callback stack, outermost first: (api, service)

    @property
    def rip(self) -> int:
        return self.context.rip

    @property
    def rsp(self) -> int:
        return self.context.rsp

    def _repr_html_(self) -> str:
        from emu.viz_text import state_html  # display only; viz sits above the trace

        return state_html(self)

    def trap_frame(self) -> KTrapFrame | None:
        """In kernel mode: the trap frame saved on entry (the user context this state shows)."""
        return KTrapFrame(self.context) if self.mode == "kernel" else None

    def stack_word(self, address: int) -> int | None:
        off = address - self.context.rsp
        if off >= 0 and off + 8 <= len(self.stack):
            return int.from_bytes(self.stack[off : off + 8], "little")
        return None


class Transition(NamedTuple):
    """An edge: ``src`` → ``dst`` (state ids) of kind ``kind`` for ``thread``.

    ``rip``/``rsp`` are the user-mode RIP and RSP at the transition point, with their
    symbols; ``status`` is the NTSTATUS carried (sysret, callback_return, exit).
    """

    step: int
    kind: TransitionKind
    thread: int
    src: int
    dst: int
    service: str | None
    ssn: int | None
    rip: int
    rsp: int
    rip_symbol: str
    rsp_symbol: str
    depth: int
    status: int | None = None
    api: int | None = None
    detail: str = ""
    data: bytes = b""  # callback_return: the output the callback gave back

    @property
    def status_name(self) -> str:
        return "" if self.status is None else status_name(self.status)


class Trace:
    """The states and transitions of one run, in the order they happened.

    The kernel appends plain tuples to ``raw_states`` and ``raw_transitions`` (the hot
    path); :attr:`states` and :attr:`transitions` build the typed records on first
    access, with symbols resolved then.
    """

    def __init__(self, symbolize: Callable[[int], str]) -> None:
        self.symbolize = symbolize
        self.raw_states: list[tuple[Any, ...]] = []
        self.raw_transitions: list[tuple[Any, ...]] = []
        self.thread_starts: list[
            str
        ] = []  # per thread, how it started ("thread0: ntdll!RtlUserThreadStart -> app!main")
        self._states: list[State] = []
        self._transitions: list[Transition] = []

    @property
    def states(self) -> list[State]:
        done = len(self._states)
        if done < len(self.raw_states):
            self._states.extend(
                State(r[0], r[1], r[2], UserContext._make(r[3]), *r[4:]) for r in self.raw_states[done:]
            )
        return self._states

    @property
    def transitions(self) -> list[Transition]:
        done = len(self._transitions)
        if done < len(self.raw_transitions):
            sym = self.symbolize
            self._transitions.extend(
                Transition(*r[:9], sym(r[7]), sym(r[8]), *r[9:])  # type: ignore[call-arg]
                for r in self.raw_transitions[done:]
            )
        return self._transitions

    def __iter__(self) -> Iterator[Transition]:
        return iter(self.transitions)

    def __len__(self) -> int:
        return len(self.raw_transitions)

    def state(self, state_id: int) -> State:
        return self.states[state_id]

    def _repr_html_(self) -> str:
        from emu.viz_text import trace_html  # display only; viz sits above the trace

        return trace_html(self)

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.raw_transitions:
            counts[r[1]] = counts.get(r[1], 0) + 1
        return counts
