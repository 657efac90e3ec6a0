"""What a run records: typed state records and the transitions between them.

A :class:`State` is one moment of one thread as both sides know it: the user-mode
context a debugger would show (plus the stack bytes above RSP) and the kernel
model's truth (mode, active service, callback depth, whether a callback return is
pending). A :class:`Transition` is an edge between two states. Both are frozen.

The records say what the thread did, not how Windows would name its scheduling state:
:mod:`emu.detection.observers` derives that (KTHREAD_STATE, the wait reason) and what each observer
can see from the transitions, so recording stays cheap. A transition also names the
threads whose wait the kernel work before it satisfied (``woke``): in Windows a thread is
Ready from the moment its wait is satisfied, not from when it next runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

from emu.context import REGISTER_NAMES, KTrapFrame, UserContext
from emu.vocabulary import KINDS as KINDS
from emu.vocabulary import TransitionKind as TransitionKind
from emu.winnt import status_name

Mode = Literal["user", "kernel", "exited"]


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
    (``emu.detection.observers``; a thread that waits inside a callback is blocked at a nested
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
    woke: tuple[int, ...] = ()  # threads whose wait was satisfied on the way to this transition

    @property
    def status_name(self) -> str:
        return "" if self.status is None else status_name(self.status)


class RawState(NamedTuple):
    """What the kernel appends for a state on the hot path: :class:`State`'s fields, in its
    order, with the context as plain register values (``UserContext`` order)."""

    id: int
    thread: int
    mode: Mode
    context: tuple[int, ...]
    stack: bytes
    stack_base: int
    depth: int
    service: str | None
    api: int | None
    pending: bool
    callbacks: tuple[tuple[int, str], ...]

    def kernel_view(self) -> tuple[object, ...]:
        """The kernel model's part of the record: depth, service, api, pending, callbacks."""
        return (self.depth, self.service, self.api, self.pending, self.callbacks)

    def typed(self) -> State:
        return State(
            self.id, self.thread, self.mode, UserContext._make(self.context), self.stack, self.stack_base,
            self.depth, self.service, self.api, self.pending, self.callbacks,
        )  # fmt: skip


class RawTransition(NamedTuple):
    """What the kernel appends for a transition: :class:`Transition`'s fields without the
    two symbols (resolved when the typed record is first built)."""

    step: int
    kind: TransitionKind
    thread: int
    src: int
    dst: int
    service: str | None
    ssn: int | None
    rip: int
    rsp: int
    depth: int
    status: int | None
    api: int | None
    detail: str
    data: bytes
    woke: tuple[int, ...]

    def typed(self, symbolize: Callable[[int], str]) -> Transition:
        return Transition(
            self.step, self.kind, self.thread, self.src, self.dst, self.service, self.ssn, self.rip, self.rsp,
            symbolize(self.rip), symbolize(self.rsp), self.depth, self.status, self.api, self.detail, self.data,
            self.woke,
        )  # fmt: skip


# Index of the fields read straight from raw tuples on the hot path (named once, above).
S_CONTEXT, S_STACK, S_PENDING = (RawState._fields.index(f) for f in ("context", "stack", "pending"))
T_KIND = RawTransition._fields.index("kind")

# The raw records carry the typed ones' fields, in their order (a layout edit must touch both).
if RawState._fields != State._fields or RawTransition._fields != tuple(
    f for f in Transition._fields if f not in ("rip_symbol", "rsp_symbol")
):  # pragma: no cover
    raise ImportError("emu.trace: RawState/RawTransition no longer match State/Transition")


class TraceNote(NamedTuple):
    """A line a hook (:mod:`emu.hooks`) wrote into the trace: after ``after`` transitions,
    on ``thread`` (None before any thread runs), at user RIP ``rip``; ``by`` names the hook."""

    after: int
    thread: int | None
    rip: int
    by: str
    text: str


class Trace:
    """The states and transitions of one run, in the order they happened.

    The kernel's recorder (``emu.kernel.record``) appends plain tuples laid out as
    :class:`RawState` and :class:`RawTransition` (the hot path; read one with
    :meth:`raw_state` or ``RawState._make``); :attr:`states` and :attr:`transitions`
    build the typed records on first access, with symbols resolved then.
    """

    def __init__(self, symbolize: Callable[[int], str]) -> None:
        self.symbolize = symbolize
        self.raw_states: list[tuple[Any, ...]] = []  # RawState layout
        self.raw_transitions: list[tuple[Any, ...]] = []  # RawTransition layout
        self.thread_starts: list[
            str
        ] = []  # per thread, how it started ("thread0: ntdll!RtlUserThreadStart -> app!main")
        self._states: list[State] = []
        self._transitions: list[Transition] = []
        self.notes: list[TraceNote] = []  # what hooks recorded, in order (emu.hooks)

    @property
    def states(self) -> list[State]:
        done = len(self._states)
        if done < len(self.raw_states):
            self._states.extend(RawState._make(r).typed() for r in self.raw_states[done:])
        return self._states

    @property
    def transitions(self) -> list[Transition]:
        done = len(self._transitions)
        if done < len(self.raw_transitions):
            sym = self.symbolize
            self._transitions.extend(RawTransition._make(r).typed(sym) for r in self.raw_transitions[done:])
        return self._transitions

    def raw_state(self, state_id: int) -> RawState:
        return RawState._make(self.raw_states[state_id])

    def raw_transition(self, step: int) -> RawTransition:
        return RawTransition._make(self.raw_transitions[step])

    def __iter__(self) -> Iterator[Transition]:
        return iter(self.transitions)

    def __len__(self) -> int:
        return len(self.raw_transitions)

    def state(self, state_id: int) -> State:
        return self.states[state_id]

    def _repr_html_(self) -> str:
        return trace_html(self)

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.raw_transitions:
            counts[r[T_KIND]] = counts.get(r[T_KIND], 0) + 1
        return counts


# --- rich display (Jupyter's _repr_html_) -------------------------------------------------
_PENDING_STYLE = ' style="background:#ffe0a8"'


def state_html(state: State, symbolize: Callable[[int], str] | None = None) -> str:
    """An HTML card for one state (for ``State._repr_html_``): mode, depth, service, registers."""
    import html  # here: only notebooks render states as HTML

    sym = symbolize if symbolize is not None else (lambda a: f"{a:#x}")
    pending = " · <b>callback-return pending</b>" if state.pending else ""
    api = "" if state.api is None else f" · api {state.api}"
    title = (
        f"<b>s{state.id}</b> · thread {state.thread} · {state.mode} · depth {state.depth}"
        f"{' · ' + html.escape(state.service) if state.service else ''}{api}{pending}"
    )
    cells = []
    for name, value in zip(REGISTER_NAMES, state.context):
        note = sym(value) if name in ("rip", "rsp") else ""
        extra = f" <small>{html.escape(note)}</small>" if note and note != f"{value:#x}" else ""
        cells.append(f"<td><code>{name}</code></td><td><code>{value:#018x}</code>{extra}</td>")
    rows = "".join(f"<tr>{''.join(cells[i : i + 3])}</tr>" for i in range(0, len(cells), 3))
    style = _PENDING_STYLE if state.pending else ""
    return f'<div class="emu-state"{style}><div>{title}</div><table>{rows}</table></div>'


def trace_html(trace: Trace) -> str:
    """An HTML table of a trace's transitions (for ``Trace._repr_html_``), pending states highlighted."""
    import html

    head = (
        "<tr><th>step</th><th>kind</th><th>from → to</th><th>service</th><th>api</th>"
        "<th>user rip</th><th>depth</th><th>status</th><th></th></tr>"
    )
    rows = []
    for t in trace.transitions:
        src, dst = trace.state(t.src), trace.state(t.dst)
        mark = "callback-return pending" if dst.pending else ""
        style = _PENDING_STYLE if dst.pending else ""
        cells = (
            t.step, t.kind, f"{src.mode} → {dst.mode}", t.service or "", "" if t.api is None else t.api,
            t.rip_symbol, t.depth, t.status_name, mark,
        )  # fmt: skip
        rows.append(f"<tr{style}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f'<table class="emu-trace">{head}{"".join(rows)}</table>'
