"""Every shipped scenario runs and every one of its expectations holds."""

from __future__ import annotations

import pytest

from conftest import SCENARIOS
from emu.api import Run

REQUIRED = {
    "syscall_basic", "callback_roundtrip", "nested_callbacks", "callback_early_return",
    "no_callback_active", "callback_depth_overflow", "callback_large_output",
}  # fmt: skip


def test_the_issue_scenarios_ship() -> None:
    assert {p.stem for p in SCENARIOS} >= REQUIRED


@pytest.mark.parametrize("name", sorted(p.stem for p in SCENARIOS))
def test_shipped_scenario_meets_its_expectations(shipped_runs: dict[str, Run], name: str) -> None:
    r = shipped_runs[name]
    assert r.error is None, r.error
    assert r.scenario.expectations, "a shipped scenario must say what it expects"
    failed = [f"{o.where}: {o.message}" for o in r.outcomes if not o.passed]
    assert not failed, failed


@pytest.mark.parametrize("name", sorted(p.stem for p in SCENARIOS))
def test_detector_agrees_with_ground_truth_on_every_state(shipped_runs: dict[str, Run], name: str) -> None:
    r = shipped_runs[name]
    detected = {d.state for d in r.detections}
    truth = {s.id for s in r.trace.states if s.pending}
    assert detected == truth
