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
