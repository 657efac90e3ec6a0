"""What each observer sees of a thread, in Windows' own terms, derived from a recorded trace.

The kernel model records transitions (syscall, block, exit, ...) and which thread made
each; this module reads them back as Windows would describe the threads, without touching
the kernel's hot path:

* **thread state** — KTHREAD_STATE (``Running``, ``Ready``, ``Waiting``, ``Terminated``;
  values as in the public KTHREAD_STATE enum: Initialized 0, Ready 1, Running 2, Standby 3,
  Terminated 4, Waiting 5, ...) and, for ``Waiting``, the KWAIT_REASON (MS docs, wdm.h
  ``KWAIT_REASON``). A state record carries the state the thread is in when it is made:
  ``Waiting`` after a block, ``Terminated`` after an exit or a fault, ``Ready`` when another
  thread runs before it does again (preempted at a system call's entry, or not started yet),
  ``Running`` otherwise. A wait ends when another thread's kernel work satisfies it (a set
  event, a released mutant, a reply): the waiter is ``Ready`` from then on (WRK
  ``ke/waitsup.c`` KiUnwaitThread readies it through KiReadyThread, ``ke/thredsup.c``), and
  the next transition records that (``Transition.woke``), so :func:`threads_at` shows it
  Ready from that moment, before it runs again.
* **observers** — ``kernel-debugger`` stops the whole machine anywhere and sees every
  state (today's view). ``user-context`` is what GetThreadContext, a suspend or a minidump
  writer gets: PspGetContext reads the thread's *base* trap frame (WRK
  ``ps/amd64/psctxamd64.c`` PspGetBaseTrapFrame: ``InitialStack - KTRAP_FRAME_LENGTH``),
  and such an observer can only stop a thread in user mode or off the CPU in the kernel
  (Waiting or Ready). KiCallUserMode moves InitialStack to the callback's kernel stack
  (WRK ``ke/amd64/callout.asm`` KiCallUserMode; ReactOS ``ntoskrnl/ke/amd64/usercall.c``
  KiCallUserMode), so inside a callback the base trap frame is the nested system call's.
  NtCallbackReturn never waits (``callout.asm`` NtCallbackReturn: ``cli``, restore the
  trap frame, callback stack and InitialStack, return into KeUserModeCallback): the
  seed's state is visible to a user-context observer only while the thread is preempted
  (Ready) between KiSystemCall64's ``sti`` and that ``cli``; afterwards every observer sees
  the original system call's site.
* **truths** — ``seed``: the instant the seed describes (user RIP after ZwCallbackReturn's
  ``syscall``, depth >= 1, before the kernel switches back: ``State.pending``).
  ``waiting-in-callback``: a thread blocked in the kernel at depth >= 1, at a nested system
  call, with KiUserCallbackDispatcher's frames above it on its user stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from emu.context import UserContext
from emu.errors import EmuError
from emu.records import record
from emu.vocabulary import KERNEL_DEBUGGER as KERNEL_DEBUGGER
from emu.vocabulary import OBSERVERS as OBSERVERS
from emu.vocabulary import SEED as SEED
from emu.vocabulary import TRUTHS as TRUTHS
from emu.vocabulary import USER_CONTEXT as USER_CONTEXT
from emu.vocabulary import WAITING_IN_CALLBACK as WAITING_IN_CALLBACK

if TYPE_CHECKING:
    from emu.detection.view import ThreadView
    from emu.engine import RunResult
    from emu.graph import StateGraph
    from emu.loader.image import Image
    from emu.trace import State, Trace

# KTHREAD_STATE values (public enum, e.g. as the Windows symbols give it; .NET's
# System.Diagnostics.ThreadState mirrors the first ones).
KTHREAD_STATE: dict[str, int] = {
    "Initialized": 0, "Ready": 1, "Running": 2, "Standby": 3, "Terminated": 4, "Waiting": 5,
    "Transition": 6, "DeferredReady": 7,
}  # fmt: skip
# KWAIT_REASON values (MS docs, wdm.h KWAIT_REASON) for the reasons the model produces.
KWAIT_REASON: dict[str, int] = {"Executive": 0, "Suspended": 5, "UserRequest": 6, "WrUserRequest": 13}


class ObserverError(EmuError):
    """An unknown observer or truth name; the message lists the valid ones."""


def check_observer(name: str) -> str:
    if name not in OBSERVERS:
        raise ObserverError(f"unknown observer {name!r} (valid: {', '.join(OBSERVERS)})")
    return name


def check_truth(name: str) -> str:
    if name not in TRUTHS:
        raise ObserverError(f"unknown truth {name!r} (valid: {', '.join(TRUTHS)})")
    return name


@record(frozen=True)
class ThreadStatus:
    """A thread's KTHREAD_STATE and, when Waiting, its KWAIT_REASON."""

    state: str
    wait_reason: str | None = None

    def __str__(self) -> str:
        return f"{self.state} ({self.wait_reason})" if self.wait_reason else self.state


RUNNING = ThreadStatus("Running")
READY = ThreadStatus("Ready")
TERMINATED = ThreadStatus("Terminated")


def wait_reason(service: str | None) -> str:
    """The KWAIT_REASON a service's wait carries in Windows.

    NtWaitForSingleObject/NtWaitForMultipleObjects wait with UserRequest (WRK
    ``ob/obwait.c``: KeWaitForSingleObject(..., UserRequest, PreviousMode, ...)); win32k
    waits for messages and for the reply to a sent message with WrUserRequest (its
    xxxSleepThread: KeWaitForSingleObject(pEventQueueServer, WrUserRequest, UserMode, ...));
    any other kernel wait is the generic Executive.
    """
    if service in ("NtWaitForSingleObject", "NtWaitForMultipleObjects"):
        return "UserRequest"
    if service is not None and service.startswith(("NtUser", "NtGdi")):
        return "WrUserRequest"
    return "Executive"


def _status(kind: str | None, service: str | None, preempted: bool) -> ThreadStatus:
    if kind == "block":
        return ThreadStatus("Waiting", wait_reason(service))
    if kind in ("exit", "fault"):
        return TERMINATED
    return READY if preempted else RUNNING


def statuses(trace: Trace) -> list[ThreadStatus]:
    """The thread state of every state record of a run, in state order (see the module notes)."""
    states = trace.states
    into: dict[int, tuple[str, str | None]] = {}
    next_of: dict[int, int] = {}  # record -> step of its thread's next transition
    first_step: dict[int, int] = {}  # record -> step at which it was made (-1: a thread's initial record)
    for t in trace.transitions:
        into[t.dst] = (t.kind, t.service)
        first_step[t.dst] = t.step
        next_of.setdefault(t.src, t.step)
    steps = len(trace.transitions)
    out = []
    for s in states:
        kind, service = into.get(s.id, (None, None))
        made = first_step.get(s.id, -1)
        # Every transition between this record and the thread's next one is another
        # thread's: if there is any, the thread was off the CPU (preempted, or not started).
        preempted = next_of.get(s.id, steps) > made + 1
        out.append(_status(kind, service, preempted))
    return out


def node_status(graph: StateGraph, node: str) -> ThreadStatus:
    """The thread state at a node of an explored graph: Ready when some successor is another thread's."""
    lean = graph.lean
    state = graph.state(node)
    preds = list(lean.in_edges(node, data=True))
    kind, service = (preds[0][2]["edge"].kind, preds[0][2]["edge"].service) if preds else (None, None)
    others = any(graph.state(v).thread != state.thread for _, v in lean.out_edges(node))
    return _status(kind, service, others)


# --- observers ------------------------------------------------------------------------
def visible(observer: str, state: State, status: ThreadStatus) -> bool:
    """Whether ``observer`` can stop the thread in this state (see the module notes)."""
    if check_observer(observer) == KERNEL_DEBUGGER:
        return True
    if status.state in ("Waiting", "Ready"):
        return state.mode != "exited"
    return status.state == "Running" and state.mode == "user"


def context_seen(observer: str, state: State, status: ThreadStatus) -> UserContext | None:
    """The user-mode context ``observer`` reads for the thread of ``state``, or None if it cannot stop it.

    In kernel mode the model keeps the trap frame of the innermost system call: with
    InitialStack moved per callback (KiCallUserMode) that is the base trap frame
    PspGetBaseTrapFrame finds, and after NtCallbackReturn the original system call's.
    """
    return state.context if visible(observer, state, status) else None


def view_for(observer: str, images: Sequence[Image], state: State, status: ThreadStatus) -> ThreadView | None:
    """The ThreadView ``observer`` gets of this state, or None when it cannot stop the thread there.

    A user-context observer is not told whether the thread is in kernel mode
    (``kernel_mode=None``, as in a user-mode dump).
    """
    from emu.detection.view import ThreadView, view_from

    if not visible(observer, state, status):
        return None
    view = view_from(images, state)
    if observer == USER_CONTEXT:
        return ThreadView(view.thread, view.context, view.memory, view.modules, None)
    return view


# --- ground truths --------------------------------------------------------------------
def is_true(truth: str, state: State, status: ThreadStatus) -> bool:
    """The kernel model's answer for ``truth`` at this state."""
    if check_truth(truth) == SEED:
        return state.pending
    return status.state == "Waiting" and state.mode == "kernel" and state.depth >= 1


# --- every thread at one state ----------------------------------------------------------
@record(frozen=True)
class ThreadAt:
    """One thread at one moment of a run: its latest state record, its KTHREAD_STATE and what each observer reads."""

    thread: int
    name: str
    record: int  # the id of the thread's latest state record
    status: ThreadStatus
    mode: str
    depth: int
    contexts: dict[str, UserContext | None]  # per observer; None: it cannot stop the thread now

    def __str__(self) -> str:
        return f"{self.name}: {self.status}, {self.mode}, depth {self.depth}, record s{self.record}"


def woken_at(trace: Trace) -> dict[int, list[int]]:
    """Per thread, the states at which a wait of it had been satisfied (the ``dst`` of each
    transition whose ``woke`` names it), in order."""
    out: dict[int, list[int]] = {}
    for t in trace.transitions:
        for tid in t.woke:
            out.setdefault(tid, []).append(t.dst)
    return out


def threads_at(run: RunResult, state_id: int) -> tuple[ThreadAt, ...]:
    """Every thread of a run as it is at state ``state_id``, in thread order.

    A thread whose latest record is a wait that another thread had satisfied by then is Ready.
    """
    trace = run.trace
    st = statuses(trace)
    woken = woken_at(trace)
    latest: dict[int, int] = {}
    for s in trace.states[: state_id + 1]:
        latest[s.thread] = s.id
    names = {t.tid: t.name for t in run.threads.values()}
    out = []
    for tid in sorted(latest):
        rec = trace.state(latest[tid])
        status = st[rec.id]
        if status.state == "Waiting" and any(rec.id < w <= state_id for w in woken.get(tid, ())):
            status = READY
        ctx = {o: context_seen(o, rec, status) for o in OBSERVERS}
        out.append(ThreadAt(tid, names.get(tid, f"thread{tid}"), rec.id, status, rec.mode, rec.depth, ctx))
    return tuple(out)
