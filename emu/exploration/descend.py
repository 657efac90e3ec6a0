"""A parallel worker's way down an option path that crosses symbolic values.

An option path from the coordinator names, for each fork from the start, the option taken
there: a choice's option, or a symbolic value's :class:`~emu.symbolic.driver.Pick` (plain data:
the value, the whole witness, the decision to replay up to). A pick restarts from the fork where
its variable entered, and a work item found later may restart from any symbolic fork the path
went through; so the worker saves every fork on the way down as the coordinator did, and each
pick is renumbered to the worker's own copy of its fork. On the way down nothing is a merge and
no decision is looked at again (the coordinator asked the solver there already); the last
option is then followed exactly as the coordinator would have followed its work item.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from emu.exploration.forks import Fork
from emu.kernel.fork import save_kernel
from emu.kernel.symbolic import Symbolic

if TYPE_CHECKING:
    from emu.exploration.explorer import Explorer
    from emu.exploration.result import Exploration
    from emu.symbolic.driver import Pick


def descend_concrete(ex: Explorer, result: Exploration, root: Fork, prefix: tuple[str | Pick, ...]) -> None:
    """Replay ``prefix`` (one option per choice) from the start, then explore everything below."""
    ex._restore(root)
    mark = len(ex.trace.raw_states)
    first = ex.kernel.threads[0]  # the restored copy, not the process's original object
    # States on the way down are neither merges nor "explored": only their one branch is taken here.
    ex._replaying = True
    try:
        if not first.started:
            ex.kernel.continue_thread(first)
        ex._segment(result)
        for option in prefix:
            if ex.kernel.pending_choice is None:
                return  # the path ended before the prefix did: nothing below to explore here
            ex._segment_seen.clear()
            if not ex._resume(result, option, ex._last or ""):
                return
            ex._segment(result)
    finally:
        ex._replaying = False
        ex._segment_seen.clear()
    work: deque[tuple[Fork, str]] = deque()
    ex._after_segment(result, work, len(prefix), tuple(str(option) for option in prefix))
    ex.records.forget(mark)
    ex._walk(result, work)


def descend_symbolic(ex: Explorer, result: Exploration, root: Fork, prefix: tuple[str | Pick, ...]) -> None:
    """Replay ``prefix[:-1]`` from the start, saving its forks, then explore below its last option."""
    sym = ex.symbolic
    assert sym is not None and prefix
    ex._restore(root)
    mark = len(ex.trace.raw_states)
    first = ex.kernel.threads[0]
    fork: Fork | None = None
    ex._descending = True
    try:
        if not first.started:
            ex.kernel.continue_thread(first)
        ex._segment(result)
        for depth, option in enumerate(prefix):
            pending = ex.kernel.pending_choice
            if pending is None:
                return  # the path ended before the prefix did: nothing below to explore here
            symbolic = isinstance(pending.choice, Symbolic)
            last = depth == len(prefix) - 1
            if symbolic or last:  # a choice on the way down needs no fork: nothing restarts there
                fork = Fork(
                    ex._cpu.save(), ex.cow.take(), save_kernel(ex.kernel), depth, ex._last or "",
                    tuple(str(o) for o in prefix[:depth]), sym.save(), route=prefix[:depth],
                )  # fmt: skip
                ex.records.hold(fork.records)
                fork.left[0] = -1 if symbolic else 1  # a symbolic fork is kept: an input may restart there
                if symbolic:
                    sym.at_request(fork)
            if last:
                break
            ex._segment_seen.clear()
            if not ex._resume(result, _renumbered(option, sym), ex._last or ""):
                return
            ex._segment(result)
            sym.finish_segment()
            sym.queued.clear()  # none expected: the coordinator has this path's other sides
    finally:
        ex._descending = False
        ex._replaying = False
        ex._segment_seen.clear()
    if fork is None:
        return
    ex.records.forget(mark)
    ex._walk(result, deque([(fork, _renumbered(prefix[-1], sym))]))


def _renumbered(option: str | Pick, sym: Any) -> str | Pick:
    """A pick made in another process names its fork by that process's count: here it is the fork
    just saved (a pick resumes the fork it was queued with)."""
    return option if isinstance(option, str) else replace(option, fork=len(sym.forks) - 1)
