"""Scoring, by its short name: ``import emu.score as s`` gives the reports and their parts.

``emu.score(detector, scenarios)`` (the module called) is :func:`score`: a detector's
confusion matrix against the kernel model's ground truth. The code lives in
:mod:`emu.detection.score`.
"""

from __future__ import annotations

from emu.callable_module import make_callable
from emu.detection.score import (
    Confusion,
    Miss,
    ScenarioScore,
    ScoreReport,
    detector_name,
    score,
    score_exploration,
    score_run,
)

__all__ = [
    "Confusion", "Miss", "ScenarioScore", "ScoreReport", "detector_name", "score", "score_exploration", "score_run",
]  # fmt: skip

make_callable(__name__)
