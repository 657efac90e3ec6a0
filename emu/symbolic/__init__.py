"""Symbolic kernel answers: values the kernel hands to user mode that a scenario declares
symbolic, followed through user code with z3, so an exploration finds which inputs reach which
states (:mod:`emu.symbolic.driver`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emu.errors import ScenarioError
from emu.scenario import CallbackStep, ChoiceStep, ReturnStep, Scenario, Step, WriteStep

if TYPE_CHECKING:
    from emu.symbolic.driver import Driver

__all__ = ["has_symbolic", "make_driver"]


def make_driver(explorer: Any, scenario: Scenario) -> Driver:
    """The explorer's symbolic side (z3 is imported here: an optional dependency, ``emu[symbolic]``)."""
    try:
        from emu.symbolic.driver import Driver
    except ImportError as e:
        raise ScenarioError(
            scenario.path, "services", f"symbolic values need the z3 solver ({e}): pip install 'emu[symbolic]'"
        ) from None
    return Driver(explorer, scenario.budgets.solver_time)


def has_symbolic(scenario: Scenario) -> bool:
    """Does any service step declare a symbolic status, input or write?"""

    def walk(steps: tuple[Step, ...]) -> bool:
        for st in steps:
            if isinstance(st, (CallbackStep, WriteStep)) and st.symbolic:
                return True
            if isinstance(st, ReturnStep) and st.symbolic is not None:
                return True
            if isinstance(st, ChoiceStep) and any(walk(o) for _, o in st.options):
                return True
        return False

    return any(walk(s.steps) for s in scenario.services.values())
