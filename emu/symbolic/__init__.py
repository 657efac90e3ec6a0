"""Symbolic kernel answers: values the kernel hands to user mode that a scenario declares
symbolic, followed through user code with z3, so an exploration finds which inputs reach which
states (:mod:`emu.symbolic.driver`)."""

from __future__ import annotations

from emu.scenario import CallbackStep, ChoiceStep, ReturnStep, Scenario, Step
from emu.symbolic.driver import Driver, Pick, witness_json

__all__ = ["Driver", "Pick", "has_symbolic", "witness_json"]


def has_symbolic(scenario: Scenario) -> bool:
    """Does any service step declare a symbolic status or input?"""

    def walk(steps: tuple[Step, ...]) -> bool:
        for st in steps:
            if isinstance(st, CallbackStep) and st.symbolic:
                return True
            if isinstance(st, ReturnStep) and st.symbolic is not None:
                return True
            if isinstance(st, ChoiceStep) and any(walk(o) for _, o in st.options):
                return True
        return False

    return any(walk(s.steps) for s in scenario.services.values())
