"""``emu explore --workers N`` with symbolic values: the graph, its path conditions and witnesses,
and the summary are the single process's, byte for byte.

A worker is handed option paths whose symbolic steps are the coordinator's picks (a value and
the whole witness); it saves every fork on its way down, because a later input may restart from
any of them. The scenarios below are chosen so that work is really handed out (checked).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emu.cli.main import main
from emu.exploration.explorer import Explorer, explore
from emu.exploration.parallel import explore_parallel
from emu.scenario import Scenario, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent

# Two symbolic statuses, and a branch on both (`cmp eax, ebx`): an input for its other side
# changes the first status, so it restarts from the first fork, which the worker must have saved.
TWO_STATUSES = '''
[scenario]
name = "two_statuses"

[[module]]
name = "app"
code = """
main:
    push rbx
    sub rsp, 0x20
    mov rcx, 0x44
    call NtClose
    mov ebx, eax               ; the first status, kept
    test eax, eax
    js first_failed
    mov rcx, 0x48
    call NtClose
    cmp eax, ebx               ; the second status equal to the first?
    je same
    cmp eax, 0x10
    jb small
    mov eax, 3
    jmp done
small:
    mov eax, 4
    jmp done
same:
    mov eax, 2
    jmp done
first_failed:
    mov rcx, 0x4c
    call NtClose
    test eax, eax
    js both_failed
    mov eax, 5
    jmp done
both_failed:
    mov eax, 6
done:
    add rsp, 0x20
    pop rbx
    ret
"""

[thread]
entry = "app!main"

[services.NtClose]
steps = [{ kind = "return", status = { symbolic = "st" } }]
'''


def _scenario(name: str) -> Scenario:
    if name == "two_statuses":
        return parse_scenario(TWO_STATUSES, "two_statuses.toml")
    return load_scenario(ROOT / "scenarios" / f"{name}.toml")


@pytest.mark.parametrize("name", ["symbolic_window_procedure", "symbolic_deadlock", "two_statuses"])
def test_workers_give_the_single_process_exports_with_conditions_and_witnesses(name: str) -> None:
    scenario = _scenario(name)
    head = Explorer(scenario)
    head.run(split=2, graph=False)
    assert head.frontier, "the coordinator handed no work out: the test would prove nothing"
    one = explore(scenario)
    par = explore_parallel(scenario, workers=2, split_factor=1)  # split at 2 waiting options
    assert par.graph.to_graphml() == one.graph.to_graphml()
    assert par.graph.to_json() == one.graph.to_json()
    assert json.dumps(par.summary()) == json.dumps(one.summary())
    assert "path_condition" in par.graph.to_graphml() and "witness" in par.graph.to_graphml()


def test_a_handed_out_path_crosses_two_symbolic_values() -> None:
    head = Explorer(_scenario("two_statuses"))
    head.run(split=2, graph=False)
    paths = [[str(option) for option in path] for path in head.frontier]
    assert ["st=0x0", "st#2=0x0"] in paths  # both statuses' picks: replayed by the worker
    one = explore(_scenario("two_statuses"))
    assert one.paths == 5 and one.complete  # st < 0 twice; st >= 0 and st#2 == st, < 0x10, other


def test_explore_cli_with_workers_on_a_symbolic_scenario(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = str(ROOT / "scenarios" / "symbolic_window_procedure.toml")
    assert main(["explore", path, "--json", "-o", str(tmp_path / "one.graphml")]) == 0
    single = capsys.readouterr().out
    assert main(["explore", path, "--json", "--workers", "2", "-o", str(tmp_path / "two.graphml")]) == 0
    assert capsys.readouterr().out == single
    assert (tmp_path / "two.graphml").read_bytes() == (tmp_path / "one.graphml").read_bytes()
    assert '"witness"' in single
