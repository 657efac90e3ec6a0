"""emu: Windows x64 user/kernel mode transitions — syscalls, kernel-to-user callbacks
(KiUserCallbackDispatcher) and ZwCallbackReturn — on the Unicorn CPU emulator with a
Python kernel model.

The public API is small::

    import emu
    r = emu.run("scenarios/callback_roundtrip.toml")
    r.detections          # states where the thread is at ZwCallbackReturn (the seed's state)
    r.graph.to_graphml()  # the state graph
    emu.score(my_detector, "scenarios/")  # a detector's confusion matrix vs the ground truth
    s = emu.open("scenarios/callback_roundtrip.toml")  # a Session: step, inspect, snapshot
    s.step(); s.regs.rip; s.finish()                    # ... and the same Run as emu.run

``emu.detect``, ``emu.score`` and ``emu.explore`` are modules you can call
(:mod:`emu.callable_module`): ``emu.detect(run)`` calls the function, ``import emu.detect
as d`` gives the module with the rest of its names (``d.view_of``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what a type checker sees; at run time each name is imported on first use
    from emu.api import Run, run
    from emu.detection.score import score
    from emu.detection.view import Detection, ThreadView, detect
    from emu.errors import (
        BudgetExceeded,
        DumpError,
        EmuError,
        ImageError,
        KernelError,
        MachineFault,
        ModelBug,
        ScenarioError,
        SnapshotError,
        UnimplementedService,
    )
    from emu.exploration.explorer import explore
    from emu.exploration.result import Exploration
    from emu.graph import StateGraph
    from emu.scenario import Scenario, load_scenario
    from emu.session import Session
    from emu.session_snapshot import Snapshot

# Where each public name lives: imported on first use, so `import emu` (and the `emu` command,
# which needs few of them) does not load networkx, capstone or the dump writer up front.
# "detect", "score" and "explore" are the callable modules themselves (emu.callable_module).
_HOMES = {
    "Run": "emu.api", "run": "emu.api",
    "Detection": "emu.detection.view", "ThreadView": "emu.detection.view",
    "BudgetExceeded": "emu.errors", "DumpError": "emu.errors", "EmuError": "emu.errors",
    "ImageError": "emu.errors", "KernelError": "emu.errors", "MachineFault": "emu.errors",
    "ModelBug": "emu.errors", "ScenarioError": "emu.errors", "SnapshotError": "emu.errors",
    "UnimplementedService": "emu.errors",
    "Exploration": "emu.exploration.result",
    "StateGraph": "emu.graph", "Scenario": "emu.scenario", "load_scenario": "emu.scenario",
    "Session": "emu.session", "Snapshot": "emu.session_snapshot",
}  # fmt: skip
_CALLABLE_MODULES = frozenset({"detect", "score", "explore"})


def __getattr__(name: str) -> Any:
    import importlib

    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"emu.{name}")  # importing it sets the attribute too
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'emu' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"


def open(scenario: Scenario | str | Path, **options: Any) -> Session:
    """Build a scenario (or a scenario file) into a :class:`Session`, ready to step; ``options``
    are the Session's own (``hooks``, ``services``, ``allow_python``).

    Not in ``__all__``: ``from emu import *`` leaves the builtin ``open`` alone.
    """
    from emu.session import Session

    return Session(scenario, **options)


__all__ = [
    "BudgetExceeded",
    "Detection",
    "DumpError",
    "EmuError",
    "Exploration",
    "ImageError",
    "KernelError",
    "MachineFault",
    "ModelBug",
    "Run",
    "Scenario",
    "ScenarioError",
    "Session",
    "Snapshot",
    "SnapshotError",
    "StateGraph",
    "ThreadView",
    "UnimplementedService",
    "__version__",
    "detect",
    "explore",
    "load_scenario",
    "run",
    "score",
]  # fmt: skip
