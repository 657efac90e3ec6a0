"""Stopping the CPU where someone driving a process wants it, without disturbing the run.

Both ways of driving a process by hand, a :class:`~emu.session.Session` and the GDB
stub's :class:`~emu.debug.target.DebugTarget`, stop the CPU here:

- :func:`step` runs one instruction of the thread on the CPU: one run of the CPU with an
  instruction count of one. Unicorn counts an instruction before any other hook of it runs,
  so the CPU stops before the next instruction's hooks have done anything.
- :func:`drive_to` runs the process's own loop with breakpoints as Unicorn exits: the CPU
  stops at one before any hook of that instruction runs.

emu's Python traps (the built-in ntdll's ``Rtl*`` routines, :mod:`emu.kernel.rtl`) are code
hooks on their own ``ret``; a stop at a trap's address leaves it undone, and the next run
does it, once, as ``emu run`` does. A stop made from a code hook instead (``emu_stop`` at
the hooked instruction) would let the trap act and then act again on the way on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from unicorn import Uc

from emu.errors import BudgetExceeded
from emu.machine import NEVER
from emu.trap import Trap

if TYPE_CHECKING:
    from emu.engine import Process
    from emu.kernel import Kernel

__all__ = ["drive_to", "exits", "settle", "step"]


def _forget_all_code(uc: Uc) -> None:
    # Unicorn checks for exits when it translates an instruction: translate again.
    uc.ctl_flush_tb()  # type: ignore[attr-defined]  # unicorn >= 2.0.1; its stubs lack it


@contextmanager
def exits(uc: Uc, addresses: Collection[int]) -> Iterator[None]:
    """While inside, the CPU stops before it executes any of ``addresses`` (none: no change).

    With exits on, Unicorn ignores ``emu_start``'s ``until``: :data:`~emu.machine.NEVER`
    stays among them so that a run that reaches no breakpoint ends as before.
    """
    if not addresses:
        yield
        return
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([NEVER, *sorted(addresses)])
    _forget_all_code(uc)
    try:
        yield
    finally:
        uc.ctl_exits_enabled(False)
        _forget_all_code(uc)


def drive_to(
    process: Process, breakpoints: Collection[int], wall_time: float | None, stop: Callable[[], bool] | None = None
) -> str:
    """:meth:`Process.drive <emu.engine.Process.drive>` until it ends, ``stop`` holds, or the
    CPU is about to execute one of ``breakpoints``: then "break", RIP at the breakpoint.

    The CPU must not stand on a breakpoint (it would stop there at once): :func:`step` off it first.
    """
    machine = process.machine
    with exits(machine.uc, breakpoints):
        try:
            return process.drive(wall_time, stop)
        except BudgetExceeded as e:
            # The engine takes a stop nobody requested for the end of the instruction budget;
            # at an exit it is a breakpoint (a budget that ends on one exactly reads as one too).
            if e.budget == "instructions" and machine.regs.read(("rip",))[0] in breakpoints:
                return "break"
            raise


def step(process: Process) -> str:
    """One instruction of the thread on the CPU, served by the kernel model if it enters it;
    "stopped" when a thread can go on (the next one on the CPU), else how the run ended.

    A fault the kernel turns into an exception stops at the handler's first instruction.
    """
    how = settle(process.kernel)
    if how != "stopped":
        return how
    machine = process.machine
    deliver = machine.exception_handler

    def deliver_then_stop(trap: Trap) -> bool:
        went_on = deliver is not None and deliver(trap)
        if went_on:
            machine.request_stop()
        return went_on

    machine.exception_handler = deliver_then_stop
    try:
        machine.run(machine.regs.read(("rip",))[0], 1, None)
    finally:
        machine.exception_handler = deliver
    return settle(process.kernel)


def settle(kernel: Kernel) -> str:
    """Put a thread on the CPU if the one that ran cannot go on, as ``Process.drive`` does
    between two runs of the CPU: "stopped" when one can run, else how the run ended."""
    while True:
        t = kernel.current
        if t is not None and t.running:
            return "stopped"
        if kernel.deadlock:
            return "deadlock"
        nxt = kernel.next_thread
        if nxt is None:
            return "exit"
        kernel.continue_thread(nxt)
