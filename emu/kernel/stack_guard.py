"""A thread stack's guard page, as MmAccessFault hands it to MiCheckForUserStackOverflow
(WRK ``base/ntos/mm/acceschk.c``).

A stack is reserved from TEB.DeallocationStack up to StackBase; from StackLimit up it is
committed, and the page right below StackLimit is the guard page (read/write | PAGE_GUARD).
emu maps the committed pages, maps the guard page without access and leaves the rest of the
reservation unmapped ([machine] stack_reserve says how much there is below the guard).

When user code touches the guard page, MiAccessCheck clears its guard bit and
MiCheckForUserStackOverflow looks at the page below (NextPage):

- room for another guard page (NextPage - PAGE_SIZE above DeallocationStack): NextPage is
  committed as the new guard page, StackLimit moves down to the touched page, and the access
  is retried (STATUS_PAGE_FAULT_GUARD_PAGE): the stack grew, no exception;
- no room: the page just above the last one (DeallocationStack + PAGE_SIZE) is committed
  read/write without a guard, StackLimit moves down to it, and the fault becomes
  STATUS_STACK_OVERFLOW. The last page stays reserved, so the next overflow of that stack is
  an access violation there, with no room left for an exception frame: the process ends
  (KiDispatchException's second chance, WRK ke/amd64/exceptn.c), as on Windows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.loader.image import PAGE
from emu.winnt import TEB_DEALLOCATION_STACK, TEB_STACK_LIMIT

if TYPE_CHECKING:
    from emu.kernel.core import Kernel
    from emu.kernel.thread import KThread

GUARD_SUFFIX = " guard"


def is_guard(kernel: Kernel, page: int) -> bool:
    """Whether ``page`` is a stack guard page (mapped without access, named so)."""
    region = kernel.machine.region_at(page)
    return region is not None and not region.perms and region.label.endswith(GUARD_SUFFIX)


def deallocation_stack(kernel: Kernel, thread: KThread) -> int:
    """TEB.DeallocationStack; a TEB without it (a dump from elsewhere) reads as one reserved page."""
    m = kernel.machine
    value = m.read_u64(thread.teb + TEB_DEALLOCATION_STACK) if m.readable(thread.teb + TEB_DEALLOCATION_STACK, 8) else 0
    return value & ~(PAGE - 1) if value else thread.stack_limit - 2 * PAGE


def touch_guard(kernel: Kernel, thread: KThread, guard: int) -> bool:
    """MiCheckForUserStackOverflow for a touch of the guard page at ``guard``: True when the
    stack grew (retry the access), False when it overflowed (raise STATUS_STACK_OVERFLOW)."""
    m = kernel.machine
    region = m.region_at(guard)
    label = region.label.removesuffix(GUARD_SUFFIX) if region is not None else f"thread {thread.tid} stack"
    bottom = deallocation_stack(kernel, thread)
    next_page = guard - PAGE
    m.protect(guard, PAGE, "rw", f"{label} (was its guard page)")  # MiAccessCheck: the guard bit goes
    if next_page - PAGE <= bottom:
        # No room for another guard page: commit DeallocationStack + PAGE_SIZE, StackLimit there.
        limit = bottom + PAGE
        if limit < guard and m.region_at(limit) is None:
            m.map(limit, PAGE, "rw", f"{label} (its last committed page)")
        _set_limit(kernel, thread, min(limit, guard))
        return False
    m.map(next_page, PAGE, "", f"{label}{GUARD_SUFFIX}")  # the new guard page (PAGE_READWRITE | PAGE_GUARD)
    _set_limit(kernel, thread, guard)
    return True


def _set_limit(kernel: Kernel, thread: KThread, limit: int) -> None:
    thread.stack_limit = limit
    kernel.machine.write_u64(thread.teb + TEB_STACK_LIMIT, limit)
