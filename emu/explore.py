"""Exploration, by its short name: ``import emu.explore as x`` gives the explorer and its result.

``emu.explore(scenario)`` (the module called) is :func:`explore`: every option of every
kernel choice, as a state graph. The code lives in :mod:`emu.exploration`.
"""

from __future__ import annotations

from emu.callable_module import make_callable
from emu.exploration.explorer import Explorer, explore
from emu.exploration.result import Exploration

__all__ = ["Exploration", "Explorer", "explore"]

make_callable(__name__)
