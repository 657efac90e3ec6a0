"""Scenario files: TOML in, frozen dataclasses out, or one line saying what is wrong.

A scenario is data only: it never executes host Python. Every error is a
:class:`ScenarioError` naming the file, the key path, the line where it can be
found, and what was expected.

The package: ``model`` (the dataclasses), ``expectations`` (one dataclass per
``[[expect]]`` kind), ``keys`` (how a key is described: help text, bounds, JSON Schema),
``layout`` (every table of the file, declared once), ``reader`` (typed access and line
finding), ``steps`` (service scripts and choices), ``refs`` (label references and the
callback table), ``parse`` (the file as a whole), ``schema`` (the JSON Schema of the file).
"""

from emu.scenario.expectations import EXPLORE_KINDS, Expectation, expect_kinds
from emu.scenario.model import (
    Budgets,
    CallbackStep,
    ChoiceStep,
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
    WriteStep,
)
from emu.scenario.parse import load_scenario, parse_scenario

EXPECT_KINDS = expect_kinds()

__all__ = [
    "EXPECT_KINDS", "EXPLORE_KINDS", "Budgets", "CallbackStep", "ChoiceStep", "Expectation", "MemorySpec",
    "ModuleSpec", "ObjectSpec", "ObjectStep", "PeSpec", "ReturnStep", "Scenario", "ServiceScript", "Step", "ThreadSpec", "WriteStep", "load_scenario", "parse_scenario",
]  # fmt: skip
