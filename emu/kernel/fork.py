"""Forking the kernel model: save it, load a saved copy, and say what identifies its state.

The explorer forks the whole machine at each choice; this is the kernel model's part.
Services are copied by forking their activations (a script copies its position, a
Python generator is rebuilt by replaying its journal), so one saved state can be
loaded any number of times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from emu.kernel.objects import ObjectTable
from emu.kernel.thread import CallbackFrame, KThread, PendingChoice, ThreadServiceContext

if TYPE_CHECKING:
    from emu.kernel.core import Kernel

_T = TypeVar("_T")


# One per fork: no instance dict. Not frozen (a frozen dataclass sets each field through
# object.__setattr__, several times slower to build): nothing assigns a field after it is made.
@dataclass(slots=True)
class KernelState:
    """A saved kernel model: threads (callback stacks, waits), the current thread, a pending choice, objects."""

    threads: tuple[KThread, ...]  # in the kernel's order (a tuple: a third of a small dict's size)
    current: int | None
    max_depth: int
    pending_choice: PendingChoice | None
    objects: ObjectTable = field(default_factory=ObjectTable)  # an empty one may be shared: never handed over
    next_thread: int | None = None
    deadlock: Sequence[str] = ()  # a tuple when saved here (an empty one costs nothing)


def save_kernel(kernel: Kernel) -> KernelState:
    """Everything the kernel model knows, copied so the original may go on changing."""
    return KernelState(
        tuple([_copy_thread(t) for t in kernel.threads.values()]),
        None if kernel.current is None else kernel.current.tid,
        kernel.max_depth,
        _copy_pending(kernel.pending_choice),
        _save_objects(kernel.objects),
        None if kernel.next_thread is None else kernel.next_thread.tid,
        tuple(kernel.deadlock),
    )


def hand_over_kernel(kernel: Kernel) -> KernelState:
    """What :func:`save_kernel` saves, without copying: the kernel's own threads and pending choice
    go into the saved state. For a caller that loads a saved state (another, or this one: a copy
    unless it is the last use) before the kernel runs again, so nothing changes them meanwhile."""
    threads = tuple(kernel.threads.values())  # (their service contexts go along: a load keeps this kernel's)
    return KernelState(
        threads,
        None if kernel.current is None else kernel.current.tid,
        kernel.max_depth,
        kernel.pending_choice,
        _save_objects(kernel.objects),
        None if kernel.next_thread is None else kernel.next_thread.tid,
        tuple(kernel.deadlock),
    )


def load_kernel(kernel: Kernel, state: KernelState, last_use: bool = False) -> None:
    """Make ``state`` current in ``kernel`` (copied again, so one saved state can be loaded many
    times); ``last_use``: it is not loaded again, so its objects are handed over, not copied."""
    saved = state.objects
    if last_use:
        threads = {t.tid: t for t in state.threads}
        pending = state.pending_choice
        objects = saved if _holds_any(saved) else _copy_objects(saved)
    else:
        threads = {t.tid: _copy_thread(t) for t in state.threads}
        pending, objects = _copy_pending(state.pending_choice), _copy_objects(saved)
    deadlock = list(state.deadlock)
    for t in threads.values():
        # A service context holds only the kernel and the thread id: one of this kernel's is kept.
        ctx = t.service_ctx
        if ctx is None or ctx.kernel is not kernel or ctx.thread_id != t.tid:
            t.service_ctx = ThreadServiceContext(kernel, t)
    kernel.set_threads(threads)
    kernel.current = None if state.current is None else threads[state.current]
    kernel.max_depth = state.max_depth
    kernel.pending_choice = pending
    kernel.objects = objects
    kernel.next_thread = None if state.next_thread is None else threads[state.next_thread]
    kernel.deadlock = deadlock


def digest_key(kernel: Kernel, thread: KThread) -> tuple[object, ...]:
    """The kernel-model part of a state's identity: every thread's callback stack, wait and fate, and the objects."""
    threads = []
    for t in kernel.threads.values():
        cbs = t.callback_stack
        frames = (
            tuple([(f.api, f.user_frame, tuple(f.trap.ctx), f.activation.position(), f.message_id) for f in cbs])
            if cbs
            else ()
        )
        waiting = None if t.suspended is None else t.suspended.key()
        entry = None if t.started else tuple(t.entry_context)
        threads.append((t.tid, t.mode, t.started, t.terminated, t.exit_status, frames, waiting, entry, t.resuming))
    pending = None
    if kernel.pending_choice is not None:
        p = kernel.pending_choice
        pos = p.activation.position() if p.activation is not None else None
        pending = (p.tid, p.choice, pos, p.resumed, p.at_entry)
    nxt = None if kernel.next_thread is None else kernel.next_thread.tid
    o = kernel.objects
    objects = o.key() if o.objects or o.queues or o.waiters else _NO_OBJECTS
    return (thread.tid, tuple(threads), pending, objects, nxt)


_NO_OBJECTS: tuple[object, ...] = ((), (), ())  # ObjectTable.key() of an empty table


# Copies are shallow, field for field, through the instance dictionary: ``dataclasses.replace``
# walks the fields and calls ``__init__`` each time, several times slower on a path the
# explorer takes twice per fork (save, then load for every option). The fields not reset
# here are immutable (ints, strings, tuples, frozen trap frames and contexts).
def _shallow(obj: _T) -> _T:
    twin: _T = object.__new__(type(obj))
    twin.__dict__.update(obj.__dict__)
    return twin


def _holds_any(table: ObjectTable) -> bool:
    return bool(table.objects or table.queues or table.waiters)


def _copy_objects(table: ObjectTable) -> ObjectTable:
    if _holds_any(table):
        return table.copy()
    return ObjectTable({}, {}, {}, table.next_message)  # the common case, without the walk


# Saved empty object tables, one per next message number: most forks have no objects, and a
# saved empty table is only ever copied, never handed over (load_kernel), so forks share it.
_EMPTY_TABLES: dict[int, ObjectTable] = {}


def _save_objects(table: ObjectTable) -> ObjectTable:
    if _holds_any(table):
        return table.copy()
    saved = _EMPTY_TABLES.get(table.next_message)
    if saved is None:
        if len(_EMPTY_TABLES) >= 1024:
            _EMPTY_TABLES.clear()
        saved = _EMPTY_TABLES[table.next_message] = ObjectTable({}, {}, {}, table.next_message)
    return saved


def _copy_pending(p: PendingChoice | None) -> PendingChoice | None:
    if p is not None and p.activation is not None:
        twin = _shallow(p)
        object.__setattr__(twin, "activation", p.activation.fork())  # a frozen dataclass
        return twin
    return p


def _copy_frame(f: CallbackFrame) -> CallbackFrame:
    twin = _shallow(f)
    twin.activation = f.activation.fork()
    return twin


def _copy_thread(t: KThread) -> KThread:
    twin = _shallow(t)
    twin.callback_stack = [_copy_frame(f) for f in t.callback_stack] if t.callback_stack else []
    s = t.suspended
    if s is not None:
        s = _shallow(s)
        if s.activation is not None:
            s.activation = s.activation.fork()
        twin.suspended = s
    return twin
