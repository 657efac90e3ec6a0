"""Running under the debugger changes nothing: the same trace, state for state, as ``emu run``.

Every shipped scenario, stepped one instruction at a time to its end, and run with a
breakpoint on every symbol of every image (the built-in ntdll's Python traps included),
records byte-identical states and transitions to the plain run's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SCENARIOS
from emu.api import Run, build
from emu.debug.target import DebugTarget


def _same(target: DebugTarget, ref: Run) -> None:
    got = target.result().trace
    assert got.raw_transitions == ref.trace.raw_transitions
    assert got.raw_states == ref.trace.raw_states


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_stepping_every_instruction_records_the_run_unchanged(path: Path, shipped_runs: dict[str, Run]) -> None:
    target = DebugTarget(build(path))
    steps = 0
    while target.ended is None and steps < 100_000:
        stop = target.resume(step=True)
        steps += 1
        assert target.ended is not None or stop.reason == "step"
    assert target.ended is not None and target.stop == shipped_runs[path.stem].stop
    _same(target, shipped_runs[path.stem])


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_breakpoints_on_every_symbol_leave_the_run_unchanged(path: Path, shipped_runs: dict[str, Run]) -> None:
    process = build(path)
    target = DebugTarget(process)
    for image in process.images:
        for address in image.symbols.values():
            target.add_breakpoint(address)
    hits = 0
    while target.ended is None:
        stop = target.resume()
        hits += stop.reason == "break"
        assert stop.reason == "break" or target.ended is not None
    assert hits >= 2  # at least the entry and a system-call stub
    _same(target, shipped_runs[path.stem])
