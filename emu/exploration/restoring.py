"""Putting the machine back in a fork's state, to follow another of its options.

A restore writes the saved CPU context, memory pages and kernel model back. Right after
a fork is saved, the machine is still in its state, so following its first option needs
no restore at all (:func:`stay`); the kernel model's own objects were handed over to the
fork then (:func:`emu.kernel.fork.hand_over_kernel`), so the machine goes on with a copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.kernel.fork import load_kernel

if TYPE_CHECKING:
    from emu.exploration.explorer import Explorer
    from emu.exploration.forks import Fork


def restore(ex: Explorer, fork: Fork) -> None:
    """Make the machine (CPU, memory, kernel model, symbolic store) what it was at ``fork``."""
    ex._cpu.restore(fork.cpu)
    ex.cow.restore(fork.memory)
    named = [t.state_id for t in ex.kernel.threads.values()]
    # Its last option: nothing restores it again (-1: a symbolic value's sides to come; 0: prefixes' start).
    load_kernel(ex.kernel, fork.kernel, last_use=fork.left[0] == 1)
    if ex.symbolic is not None:
        ex.symbolic.load(fork.symbolic)
    ex.records.replaced(named)
    # The saved context holds GS base: write it only if the restored current thread's TEB differs
    # (a register write through the binding costs more than the batched read).
    rsp, gs = ex._rsp_gs()
    current = ex.kernel.current
    if current is not None and gs != current.teb:
        ex.machine.set_gs_base(current.teb)
    # The next segment will almost surely push onto the stack: open its page now
    # rather than taking a copy-on-write fault and restarting the CPU for it (a hot page is open).
    cow = ex.cow
    if (rsp - 0x100) & ~0xFFF not in cow.hot or (rsp - 1) & ~0xFFF not in cow.hot:
        cow.prefault(rsp - 0x100, 0x100)
    # The trace only grows: the restored threads' state ids still name their states.
    _at(ex, fork)
    if ex.hooks is not None:
        ex.hooks.restored(fork)


def stay(ex: Explorer, fork: Fork) -> None:
    """What :func:`restore` does when the machine is still in ``fork``'s state (saved, nothing
    run since): the CPU and memory already equal it, so only the rest is done."""
    # The kernel model was handed over to the fork: the machine goes on with a copy (or, at
    # its last use, with the saved objects themselves).
    load_kernel(ex.kernel, fork.kernel, last_use=fork.left[0] == 1)
    ex.cow.prefault(ex._rsp_gs()[0] - 0x100, 0x100)
    _at(ex, fork)


def owns_threads(ex: Explorer) -> bool:
    """Whether the kernel's threads are copies of its own, not the process's first objects (which
    the process still names, so they are never handed over to a fork)."""
    first = ex.process.thread
    return ex.kernel.threads.get(first.tid) is not first


def _at(ex: Explorer, fork: Fork) -> None:
    """The walk goes on from ``fork``'s state: no merge yet on this segment."""
    ex._last = fork.node
    ex._merged_at = None
    ex._segment_seen.clear()
