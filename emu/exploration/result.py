"""What an exploration found (:class:`Exploration`), and the process memory it is measured by."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from emu.graph import StateGraph
from emu.scenario import Scenario

Strategy = Literal["bfs", "dfs"]
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """The process's resident memory (RSS) now; its peak where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class Exploration:
    """What an exploration found, and whether it finished."""

    scenario: Scenario
    strategy: Strategy
    graph: StateGraph
    forks: int = 0
    paths: int = 0
    stopped_by: str | None = None  # a budget's name when exploration did not finish
    unexplored: int = 0  # options left on the work list when a budget stopped it
    faults: list[tuple[str, str]] = field(default_factory=list)  # (node, message)
    deadlocks: list[str] = field(default_factory=list)  # nodes where no thread can run but some wait
    elapsed: float = 0.0
    forked_states: int = 0  # states recorded after a fork (each came from a restored copy)
    snapshot_bytes: int = 0  # memory held by page snapshots (dirty pages only)
    symbolic: dict[str, object] | None = None  # conditions, witnesses, incomplete reports (emu.symbolic)
    hook_stops: list[tuple[str, str]] = field(default_factory=list)  # (node, reason): paths a hook ended

    @property
    def states(self) -> int:
        return len(self.graph)

    @property
    def merges(self) -> int:
        """States reached along more than one distinct edge."""
        return len(self.graph.merges())

    @property
    def pending(self) -> list[str]:
        return self.graph.pending()

    @property
    def complete(self) -> bool:
        return self.stopped_by is None

    def summary(self) -> dict[str, object]:
        return {
            "scenario": self.scenario.name,
            "strategy": self.strategy,
            "states": self.states,
            "transitions": self.graph.lean.number_of_edges(),
            "merges": self.merges,
            "pending": len(self.pending),
            "forks": self.forks,
            "paths": self.paths,
            "complete": self.complete,
            "stopped_by": self.stopped_by,
            "unexplored": self.unexplored,
            "deadlocks": len(self.deadlocks),
            "faults": [{"node": n, "message": m} for n, m in self.faults],
            **({} if self.symbolic is None else {"symbolic": self.symbolic}),
            **({"hook_stops": [{"node": n, "reason": r} for n, r in self.hook_stops]} if self.hook_stops else {}),
        }
