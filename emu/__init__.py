"""emu: Windows x64 user/kernel mode transitions — syscalls, kernel-to-user callbacks
(KiUserCallbackDispatcher) and ZwCallbackReturn — on the Unicorn CPU emulator with a
Python kernel model.

The public API is small::

    import emu
    r = emu.run("scenarios/callback_roundtrip.toml")
    r.detections          # states where the thread is at ZwCallbackReturn (the seed's state)
    r.graph.to_graphml()  # the state graph
    emu.score(my_detector, "scenarios/")  # a detector's confusion matrix vs the ground truth
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
        UnimplementedService,
    )
    from emu.exploration.explorer import Exploration, explore
    from emu.graph import StateGraph
    from emu.scenario import Scenario, load_scenario

# Where each public name lives: imported on first use, so `import emu` (and the `emu` command,
# which needs few of them) does not load networkx, capstone or the dump writer up front.
_HOMES = {
    "Run": "emu.api", "run": "emu.api", "score": "emu.detection.score",
    "Detection": "emu.detection.view", "ThreadView": "emu.detection.view", "detect": "emu.detection.view",
    "BudgetExceeded": "emu.errors", "DumpError": "emu.errors", "EmuError": "emu.errors",
    "ImageError": "emu.errors", "KernelError": "emu.errors", "MachineFault": "emu.errors",
    "ModelBug": "emu.errors", "ScenarioError": "emu.errors", "UnimplementedService": "emu.errors",
    "Exploration": "emu.exploration.explorer", "explore": "emu.exploration.explorer",
    "StateGraph": "emu.graph", "Scenario": "emu.scenario", "load_scenario": "emu.scenario",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'emu' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

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
