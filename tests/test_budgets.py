"""Every budget stops a run with a named BudgetExceeded and keeps what was recorded; outputs are safe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import asm_scenario
from emu.cli.main import main
from emu.engine import build, run
from emu.errors import BudgetExceeded
from emu.scenario import parse_scenario

LOOP = """
main:
    sub rsp, 0x28
again:
    call NtYieldExecution
    jmp again
"""
YIELD = '[services.NtYieldExecution]\nsteps = [{ kind = "return", status = 0 }]'


def test_states_budget_keeps_the_trace() -> None:
    r = run(parse_scenario(asm_scenario(LOOP, services=YIELD, extra="[budgets]\nstates = 50\n"), "s.toml"))
    assert isinstance(r.error, BudgetExceeded) and r.error.budget == "states" and r.error.limit == 50
    assert str(r.error).startswith("budget 'states' exceeded (limit 50) at ntdll!ZwYieldExecution+0x14")
    assert len(r.trace.states) == 50
    assert r.stop == "budget"


def test_output_bytes_budget() -> None:
    r = run(parse_scenario(asm_scenario(LOOP, services=YIELD, extra="[budgets]\noutput_bytes = 4096\n"), "o.toml"))
    assert isinstance(r.error, BudgetExceeded) and r.error.budget == "output_bytes"
    assert sum(len(s.stack) for s in r.trace.states) <= 4096 + 0x10000


def test_memory_budget_at_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = '[budgets]\nmemory = 0x1000000\n[[memory]]\nname = "big"\nstart = 0x10000000\nsize = 0x4000000\n'
    text = asm_scenario("main:\n ret", extra=extra)
    with pytest.raises(BudgetExceeded) as e:
        build(parse_scenario(text, "m.toml"))
    assert e.value.budget == "memory" and e.value.limit == 0x1000000
    p = tmp_path / "m.toml"
    p.write_text(text)
    assert main(["run", str(p)]) == 3
    assert capsys.readouterr().err.startswith(f"budget 'memory' exceeded (limit 16777216 bytes) at {p}: ")


def test_outputs_are_not_overwritten_without_force(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "g.json"
    scenario = str(root / "scenarios/callback_roundtrip.toml")
    assert main(["graph", scenario, "-o", str(out)]) == 0
    first = out.read_bytes()
    out.write_text("keep me")
    assert main(["graph", scenario, "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{out} exists: pass --force to overwrite it")
    assert out.read_text() == "keep me"
    assert main(["graph", scenario, "-o", str(out), "--force"]) == 0
    assert out.read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_run_reports_are_identical_across_hash_seeds(root: Path) -> None:
    outs = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run(
            [sys.executable, "-m", "emu.cli", "run", "--json", str(root / "scenarios/choice_nested_depth.toml")],
            capture_output=True, env=env, check=True,
        )  # fmt: skip
        outs.add(done.stdout)
    assert len(outs) == 1
