"""Scenario files: TOML in, frozen dataclasses out, or one line saying what is wrong.

A scenario is data only: it never executes host Python. Every error is a
:class:`ScenarioError` naming the file, the key path, the line where it can be
found, and what was expected.

The package: ``model`` (the dataclasses), ``reader`` (typed access and line finding),
``steps`` (service scripts and choices), ``refs`` (label references and the callback
table), ``parse`` (the file as a whole).
"""

from emu.scenario.model import (
    EXPECT_KINDS,
    EXPLORE_KINDS,
    Budgets,
    CallbackStep,
    ChoiceStep,
    Expectation,
    MemorySpec,
    ModuleSpec,
    ObjectSpec,
    ObjectStep,
    PeSpec,
    ReturnStep,
    Scenario,
    ServiceScript,
    Step,
    ThreadSpec,
)
from emu.scenario.parse import load_scenario, parse_scenario

__all__ = [
    "EXPECT_KINDS", "EXPLORE_KINDS", "Budgets", "CallbackStep", "ChoiceStep", "Expectation", "MemorySpec",
    "ModuleSpec", "ObjectSpec", "ObjectStep", "PeSpec", "ReturnStep", "Scenario", "ServiceScript", "Step", "ThreadSpec", "load_scenario", "parse_scenario",
]  # fmt: skip
