"""Modules you can call: ``emu.detect`` is both the module and its function.

The package's public functions ``emu.detect``, ``emu.score`` and ``emu.explore`` share
their names with modules (``import emu.detect as d; d.view_of(...)``). Python keeps one
attribute per name on the package, so the attribute is the module, and calling the
module calls the function of the same name inside it: ``emu.detect(view)`` is
``emu.detect.detect(view)``. Neither spelling hides the other.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class CallableModule(types.ModuleType):
    """A module whose call is its function named like the module's last component."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Make the (already imported) module callable as its function of the same name."""
    sys.modules[module_name].__class__ = CallableModule
