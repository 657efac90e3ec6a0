"""Exploration over worker processes and over a local Ray instance gives the same graph, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from emu.cli import main
from emu.explore import explore
from emu.parallel import explore_parallel

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "threads_deadlock_sometimes.toml"


@pytest.fixture(scope="module")
def single() -> str:
    return explore(SCENARIO).graph.to_graphml()


def test_worker_processes_give_the_single_process_graph(single: str) -> None:
    exp = explore_parallel(SCENARIO, workers=2)
    assert exp.graph.to_graphml() == single
    assert len(exp.deadlocks) == 2 and exp.complete


def test_a_local_ray_instance_gives_the_same_graph(single: str) -> None:
    import ray  # the test extra installs it

    try:
        exp = explore_parallel(SCENARIO, workers=2, backend="ray")
    finally:
        ray.shutdown()
    assert exp.graph.to_graphml() == single


def test_explore_cli_with_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str], single: str) -> None:
    out = tmp_path / "g.graphml"
    assert main(["explore", str(SCENARIO), "--workers", "2", "-o", str(out)]) == 0
    assert out.read_text() == single
    assert "2 deadlock" not in capsys.readouterr().err
