"""A wall-clock budget for a machine: one thread that stops the CPU once a deadline passes."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emu.machine import Machine


class Watchdog:
    """Stops a machine once a deadline passes, across many short runs (one thread, not one per run).

    Once the deadline has passed it sets ``machine.watchdog_fired`` (``Machine.run`` then
    starts no more guest code) and stops the CPU again every ``REPEAT`` seconds until the
    block ends: a stop that lands while Python runs between two ``emu_start`` calls is lost.
    """

    REPEAT = 0.02

    def __init__(self, machine: Machine, seconds: float) -> None:
        self.machine = machine
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(seconds,), name="emu-watchdog", daemon=True)

    def _watch(self, seconds: float) -> None:
        if self._done.wait(seconds):
            return
        self.machine.watchdog_fired = True
        while True:
            self.machine.uc.emu_stop()
            if self._done.wait(self.REPEAT):
                return

    def __enter__(self) -> Watchdog:
        self.machine.watchdog_fired = False
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
