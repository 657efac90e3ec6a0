"""The public run: what the engine recorded, with the views of it composed on top.

The engine (:mod:`emu.engine`) produces a :class:`~emu.engine.RunResult` — the trace and
the final state of the threads — and knows nothing of graphs, detectors or
expectations. :class:`Run` adds them here, one layer above all three, each computed on
first use: ``emu.run`` and the ``emu`` command both go through :func:`run`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from emu.engine import Process, RunResult
from emu.engine import build as build_from_modules
from emu.hooks import Hooks
from emu.kernel import KernelHooks
from emu.records import record
from emu.scenario import Scenario, load_scenario
from emu.services import Services

if TYPE_CHECKING:  # imported where used: a run that needs no graph loads no networkx
    from emu.detection.view import Detection
    from emu.expect import Outcome
    from emu.graph import StateGraph

__all__ = ["Run", "run"]


@record
class Run(RunResult):
    """The outcome of running one scenario: the recorded run, its state graph, the
    built-in detector's findings and the verdicts of the scenario's ``[[expect]]``."""

    @classmethod
    def of(cls, result: RunResult) -> Run:
        """The public run over a result the engine produced (``build(...).run()``)."""
        return cls(**{f.name: getattr(result, f.name) for f in fields(result)})

    @cached_property
    def graph(self) -> StateGraph:
        from emu.graph import StateGraph

        return StateGraph.from_trace(self.trace)

    @cached_property
    def detections(self) -> list[Detection]:
        from emu.detection.view import detect_run

        return detect_run(self)

    @cached_property
    def outcomes(self) -> list[Outcome]:
        from emu.expect import check

        return check(self, self.detections)

    @property
    def ok(self) -> bool:
        return all(o.passed for o in self.outcomes)


def run(
    scenario: Scenario | str | Path, *, hooks: Hooks | None = None, services: Services | None = None,
    allow_python: bool = False,
) -> Run:  # fmt: skip
    """Load (if given a path), build and run a scenario.

    ``hooks`` (:class:`emu.hooks.Hooks`) watch the run; ``services`` (:mod:`emu.services`: a
    ServiceRegistry or ``"package.module:name"``) add Python system services;
    ``allow_python`` lets the scenario's own ``[python]`` table load Python.

    Example (from the repository root)::

        r = run("scenarios/callback_roundtrip.toml")
        [d.rip for d in r.detections]   # ['ntdll!ZwCallbackReturn+0x14']
    """
    return Run.of(build(scenario, hooks=hooks, services=services, allow_python=allow_python).run())


def build(
    scenario: Scenario | str | Path, hooks: Hooks | KernelHooks | None = None, *,
    services: Services | None = None, allow_python: bool = False,
) -> Process:  # fmt: skip
    """Build the process for a scenario (a Scenario or a path) without running it: from its
    ``[start] dump`` when it names one (:mod:`emu.dump.start`), else from its modules and threads.

    ``hooks`` is either emu-level :class:`~emu.hooks.Hooks` (attached to the built process)
    or the kernel's :class:`~emu.kernel.KernelHooks` (who answers choices, who watches states).
    """
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario, allow_python=allow_python)
    elif allow_python and not scenario.allow_python:
        scenario = dataclasses.replace(scenario, allow_python=True)
    steer = hooks if isinstance(hooks, KernelHooks) else None
    process: Process
    if scenario.start_dump is not None:
        from emu.dump.start import DumpProcess

        process = DumpProcess(scenario, scenario.start_dump, steer, services)
    else:
        process = build_from_modules(scenario, steer, services)
    if isinstance(hooks, Hooks) and len(hooks):
        hooks.attach(process)
    return process
