"""Exploration over worker processes and over a local Ray instance gives the same graph, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from emu.cli.main import main
from emu.exploration.explorer import explore
from emu.exploration.parallel import explore_parallel
from emu.exploration.result import Exploration

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "threads_deadlock_sometimes.toml"


@pytest.fixture(scope="module")
def one() -> Exploration:
    return explore(SCENARIO)


@pytest.fixture(scope="module")
def single(one: Exploration) -> str:
    return one.graph.to_graphml()


def test_worker_processes_give_the_single_process_graph(single: str, one: Exploration) -> None:
    exp = explore_parallel(SCENARIO, workers=2)
    assert exp.graph.to_graphml() == single
    assert len(exp.deadlocks) == 2 and exp.complete
    # The workers share the states they fork at: each is forked once, as in one process.
    assert exp.forks == one.forks


def test_a_local_ray_instance_gives_the_same_graph(single: str, one: Exploration) -> None:
    import ray  # the test extra installs it

    try:
        exp = explore_parallel(SCENARIO, workers=2, backend="ray")
    finally:
        ray.shutdown()
    assert exp.graph.to_graphml() == single
    assert exp.forks == one.forks


def test_explore_cli_with_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str], single: str) -> None:
    out = tmp_path / "g.graphml"
    assert main(["explore", str(SCENARIO), "--workers", "2", "-o", str(out)]) == 0
    assert out.read_text() == single
    assert "2 deadlock" not in capsys.readouterr().err


FAULT_ON_ONE_PATH = """
[scenario]
name = "fault_on_one_path"

[machine]
exceptions = "stop"            # the path that reads address 0 ends there (no exception delivered)

[[module]]
name = "app"
code = '''
main:
    push rbx
    push rsi
    sub rsp, 0x28
    xor ebx, ebx
    mov esi, 4
again:
    mov rcx, 0x44
    call NtClose
    test eax, eax
    setnz al
    movzx eax, al
    lea rbx, [rbx*2 + rax]
    dec esi
    jnz again
    cmp ebx, 5                 ; one of the 16 answer sequences reads address 0
    jne fine
    mov rax, qword ptr [0]
fine:
    mov eax, ebx
    add rsp, 0x28
    pop rsi
    pop rbx
    ret
'''

[thread]
entry = "app!main"

[services.NtClose]
steps = [
    { kind = "choice", name = "result", default = "success", options = { success = [{ kind = "return", status = "STATUS_SUCCESS" }], failure = [{ kind = "return", status = "STATUS_INVALID_HANDLE" }] } },
]
"""


def test_parallel_faults_are_named_like_the_single_process_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from emu.exploration.explorer import explore
    from emu.scenario import parse_scenario

    scenario = parse_scenario(FAULT_ON_ONE_PATH, str(tmp_path / "f.toml"))
    single = explore(scenario)
    assert len(single.faults) == 1 and "read of 8 byte(s) at 0x0" in single.faults[0][1]
    parallel = explore_parallel(scenario, workers=2, split_factor=1)
    assert parallel.faults == single.faults
    node = single.faults[0][0]
    assert single.graph.lean.nodes[node]["digest"] == parallel.graph.lean.nodes[node]["digest"]


def test_a_workers_packed_states_unpack_equal_to_what_it_found() -> None:
    from emu.context import UserContext
    from emu.exploration import parallel
    from emu.scenario import load_scenario
    from emu.trace import State

    part = parallel.explore_prefixes(load_scenario(SCENARIO), "bfs", [()])
    found = parallel._last[0]  # the worker's explorer, kept until its next job
    nodes, edges = parallel.unpack(part.found)
    assert nodes == found.nodes and list(nodes) == list(found.nodes)  # same states, same order
    assert edges == list(found.edges)
    assert all(type(s) is State and type(s.context) is UserContext for s in nodes.values())
    assert part.cpu > 0 and part.wall > 0 and part.claim_wait == 0  # no shared seen-set here
