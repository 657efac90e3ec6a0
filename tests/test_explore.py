"""Exploration: forks, merges, budgets, order-independent exports, explain."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from conftest import SCENARIOS, asm_scenario
from emu.api import run
from emu.cli.main import main
from emu.expect import check_exploration
from emu.exploration.explorer import Explorer, explore
from emu.scenario import parse_scenario

CHOICE_SCENARIOS = [p for p in SCENARIOS if 'kind = "choice"' in p.read_text()]


def test_there_are_choice_scenarios() -> None:
    assert {p.stem for p in CHOICE_SCENARIOS} >= {"choice_callback_or_not", "choice_nested_depth", "choice_status"}


@pytest.mark.parametrize("path", CHOICE_SCENARIOS, ids=lambda p: p.stem)
def test_choice_scenarios_explore_fully_and_meet_expectations(path: Path) -> None:
    exp = explore(path)
    assert exp.complete and exp.unexplored == 0
    outcomes = check_exploration(exp)
    assert {o.expectation.kind for o in outcomes} == {"explored_states", "explored_merges", "explored_pending"}
    assert all(o.passed for o in outcomes), [o.message for o in outcomes if not o.passed]


@pytest.mark.parametrize("path", CHOICE_SCENARIOS, ids=lambda p: p.stem)
def test_bfs_and_dfs_give_byte_identical_exports(path: Path) -> None:
    bfs, dfs = explore(path, "bfs").graph, explore(path, "dfs").graph
    assert bfs.to_graphml() == dfs.to_graphml()
    assert bfs.to_json() == dfs.to_json()
    assert bfs.to_dot() == dfs.to_dot()


SINGLE_PATH = [
    p
    for p in SCENARIOS
    if p not in CHOICE_SCENARIOS and "[[thread]]" not in p.read_text() and "symbolic =" not in p.read_text()
]


@pytest.mark.parametrize("path", SINGLE_PATH, ids=lambda p: p.stem)
def test_without_choices_exploration_is_the_run(path: Path) -> None:
    r = run(path)
    exp = explore(path)
    assert exp.forks == 0 and exp.paths == 1
    assert exp.states == len(r.trace.states)  # no state repeats in these runs
    assert len(exp.pending) == len([s for s in r.trace.states if s.pending])


def test_pending_ground_truth_is_on_the_nodes_and_matches_the_detector() -> None:
    from emu.detection.view import detect_callback_return_pending
    from emu.exploration.explorer import Explorer

    explorer = Explorer(
        parse_scenario((Path(__file__).parent.parent / "scenarios/choice_nested_depth.toml").read_text(), "n.toml")
    )
    exp = explorer.run()
    images = explorer.process.images

    class _R:  # view_of needs only images
        pass

    fake = _R()
    fake.images = images  # type: ignore[attr-defined]
    from emu.detection.view import view_of

    for node in exp.graph.nodes():
        state = exp.graph.state(node)
        assert exp.graph.nx.nodes[node]["pending"] == state.pending
        found = detect_callback_return_pending(view_of(fake, state))  # type: ignore[arg-type]
        assert (found is not None) == state.pending, node
    depths = sorted(exp.graph.state(n).depth for n in exp.pending)
    assert depths == [1, 2, 3]


def test_merge_joins_the_callback_and_no_callback_paths(root: Path) -> None:
    exp = explore(root / "scenarios/choice_callback_or_not.toml")
    g = exp.graph.nx
    merged = [n for n in g.nodes if g.in_degree(n) >= 2]
    assert len(merged) == 1
    kinds = sorted(d["kind"] for _, _, d in g.in_edges(merged[0], data=True))
    assert kinds == ["sysret", "sysret"]
    assert g.nodes[merged[0]]["mode"] == "user"


def test_states_budget_keeps_the_graph_and_reports(root: Path) -> None:
    text = (
        (root / "scenarios/choice_nested_depth.toml")
        .read_text()
        .replace('name = "choice_nested_depth"', 'name = "b"\n[budgets]\nstates = 6', 1)
    )
    text = text.replace("[budgets]\nstates = 6", "").replace("[scenario]", "[budgets]\nstates = 6\n\n[scenario]", 1)
    exp = explore(parse_scenario(text, "b.toml"))
    assert exp.stopped_by == "states"
    assert exp.unexplored >= 1
    assert 6 <= exp.states < 18
    assert not exp.complete


def test_choice_depth_budget(root: Path) -> None:
    text = (
        (root / "scenarios/choice_nested_depth.toml")
        .read_text()
        .replace("[scenario]", "[budgets]\nchoice_depth = 1\n\n[scenario]", 1)
    )
    exp = explore(parse_scenario(text, "d.toml"))
    assert exp.stopped_by == "choice_depth"
    assert exp.unexplored == 2  # the level-2 choice's two options, on the "deeper" path


def test_explore_cli_exit_codes_and_output(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.graphml"
    assert main(["explore", str(root / "scenarios/choice_nested_depth.toml"), "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("choice_nested_depth: 18 states, 20 transitions, 3 merges, 3 callback-return pending")
    assert out.read_text().startswith("<?xml")
    wrong = tmp_path / "w.toml"
    wrong.write_text(
        (root / "scenarios/choice_status.toml").read_text().replace("explored_states = 13", "explored_states = 12")
    )
    assert main(["explore", str(wrong), "--no-progress"]) == 1
    assert "expectation failed: expect[2].explored_states" in capsys.readouterr().err


def test_explain_shows_transitions_code_registers_and_callback_stack(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", str(root / "scenarios/choice_nested_depth.toml"), "pending"]) == 0
    text = capsys.readouterr().out
    assert "callback-return pending" in text.splitlines()[0]
    assert "syscall NtUserMessageCall" in text
    assert "=> ntdll!ZwCallbackReturn+0x14" in text
    assert "callback stack: api 2 (NtUserMessageCall)" in text
    assert "rax    0x" in text
    assert main(["explain", str(root / "scenarios/choice_nested_depth.toml"), "n999"]) == 2


def test_progress_line_and_memory_per_fork_with_a_64_mib_region() -> None:
    # 8 two-way choices; each path writes one page of a 64 MiB region.
    code = """
main:
    push rbx
    push rsi
    sub rsp, 0x28
    xor ebx, ebx
next:
    call NtYieldExecution         ; the kernel chooses the status: 0 or 1
    mov rsi, rbx
    shl rsi, 13                   ; two pages per round
    add rsi, rax
    shl rax, 12
    mov rcx, 0x10000000
    add rcx, rsi
    lea rdx, [rbx + 1]
    mov qword ptr [rcx + rax], rdx
    inc ebx
    cmp ebx, 8
    jb next
    xor eax, eax
    add rsp, 0x28
    pop rsi
    pop rbx
    ret
"""
    services = """
[services.NtYieldExecution]
steps = [{ kind = "choice", name = "bit", default = "zero", options = { zero = [{ kind = "return", status = 0 }], one = [{ kind = "return", status = 1 }] } }]
"""
    memory = '[[memory]]\nname = "big"\nstart = 0x10000000\nsize = 0x4000000\nperms = "rw"\n'
    scenario = parse_scenario(asm_scenario(code, services=services, extra=memory), "big.toml")
    stream = io.StringIO()
    exp = Explorer(scenario, "dfs", stream).run()
    assert exp.complete
    assert exp.forks == 255 and exp.paths == 256
    assert "exploring:" in stream.getvalue()
    # Each fork keeps only the pages written since its parent: a stack page and one page of the region.
    assert exp.snapshot_bytes / exp.forks <= 3 * 0x1000


def test_wall_time_budget_stops_a_runaway_exploration() -> None:
    services = """
[services.NtYieldExecution]
steps = [{ kind = "choice", name = "bit", options = { zero = [{ kind = "return", status = 0 }], one = [{ kind = "return", status = 1 }] } }]
"""
    code = "main:\n sub rsp, 0x28\n call NtYieldExecution\nspin:\n jmp spin"
    extra = "[budgets]\ninstructions = 1000000000000\nwall_time = 0.3\n"
    exp = explore(parse_scenario(asm_scenario(code, services=services, extra=extra), "spin.toml"))
    assert exp.stopped_by == "wall_time"
    assert not exp.complete  # how soon it stops: benchmarks/bench_budgets.py
