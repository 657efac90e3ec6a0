"""An explorer's trace records, kept only while something can still read them.

The recorder appends a record per state and per transition; the explorer digests each as
it is appended and keeps its own nodes and edges. The kernel model reads back only the
record each thread's ``state_id`` names (its stack and registers when it resumes), so a
record is kept while a live thread or a saved fork names it, and dropped (its slot set to
an empty tuple: state ids stay list indexes) after that. Transition records are not read back at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from emu.kernel.core import Kernel
from emu.trace import Trace

_GONE: tuple[Any, ...] = ()  # a dropped record (one shared empty tuple)


class RecordKeeper:
    """Counts, per state id, the saved forks naming it; drops records nobody names."""

    def __init__(self, trace: Trace, kernel: Kernel) -> None:
        self.trace = trace
        self.kernel = kernel
        self.held: dict[int, int] = {}  # state id -> saved forks naming it

    def _live(self) -> set[int]:
        return {t.state_id for t in self.kernel.threads.values()}

    def forget(self, since: int) -> None:
        """Drop the records of states recorded since ``since`` that no thread names now (a fork
        made at this point holds the ones that do), and every transition record."""
        states = self.trace.raw_states
        live = self._live()
        for sid in range(since, len(states)):
            if sid not in live and sid not in self.held:
                states[sid] = _GONE
        self.trace.raw_transitions.clear()  # the explorer took the edges as they were recorded

    def hold(self, sids: Iterable[int]) -> None:
        """A saved fork names these records."""
        for sid in sids:
            self.held[sid] = self.held.get(sid, 0) + 1

    def release(self, sids: Iterable[int]) -> None:
        """A saved fork is done with these records: dropped unless another fork or a live thread names them."""
        held = self.held
        live = self._live()
        for sid in sids:
            n = held.get(sid, 0) - 1
            if n > 0:
                held[sid] = n
                continue
            held.pop(sid, None)
            if sid not in live:
                self.trace.raw_states[sid] = _GONE

    def replaced(self, sids: Iterable[int]) -> None:
        """The threads that named these records were replaced (a fork was loaded): drop the unheld ones."""
        live = self._live()
        for sid in sids:
            if sid not in self.held and sid not in live:
                self.trace.raw_states[sid] = _GONE
