"""Symbolic kernel answers: declarations, the explorer finding inputs, path conditions, witnesses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import SCENARIOS, asm_scenario
from emu.api import Run, build
from emu.errors import ScenarioError
from emu.expect import check_exploration
from emu.exploration.explorer import Explorer, explore
from emu.exploration.result import Exploration
from emu.scenario import parse_scenario
from emu.symbolic.witness import witness_hooks

SYMBOLIC = [p for p in SCENARIOS if p.stem.startswith("symbolic_")]
ROOT = Path(__file__).resolve().parents[1]


def _explore(text: str, strategy: str = "bfs") -> Exploration:
    return Explorer(parse_scenario(text, "t.toml"), "dfs" if strategy == "dfs" else "bfs").run()


def _run_with(path: Path | str, witness: dict[str, str]) -> Run:
    scenario = parse_scenario(Path(path).read_text(), str(path)) if isinstance(path, Path) else path
    hooks, answer = witness_hooks(witness)
    r = Run.of(build(scenario, hooks).run())
    assert not answer.errors and not answer.unused(), (answer.errors, answer.unused())
    return r


def _sym(exp: Exploration) -> dict[str, Any]:
    assert exp.symbolic is not None
    return exp.symbolic


def test_the_symbolic_scenarios_ship() -> None:
    assert {p.stem for p in SYMBOLIC} >= {
        "symbolic_status",
        "symbolic_window_procedure",
        "symbolic_deadlock",
        "symbolic_query_output",
    }


@pytest.mark.parametrize("path", SYMBOLIC, ids=lambda p: p.stem)
def test_symbolic_scenarios_explore_completely_and_meet_expectations(path: Path) -> None:
    exp = explore(path)
    assert exp.complete and exp.unexplored == 0
    assert _sym(exp)["incomplete"] == 0, _sym(exp)["reports"]
    outcomes = check_exploration(exp)
    assert outcomes and all(o.passed for o in outcomes), [o.message for o in outcomes if not o.passed]


@pytest.mark.parametrize("path", SYMBOLIC, ids=lambda p: p.stem)
def test_bfs_and_dfs_give_byte_identical_exports_with_conditions(path: Path) -> None:
    bfs, dfs = explore(path, "bfs"), explore(path, "dfs")
    assert bfs.graph.to_graphml() == dfs.graph.to_graphml()
    assert bfs.graph.to_json() == dfs.graph.to_json()
    assert _sym(bfs) == _sym(dfs)
    assert "path_condition" in bfs.graph.to_graphml()


def _key(s: Any) -> tuple[object, ...]:
    return (s.thread, s.mode, s.rip, s.depth, s.api, s.pending, s.callbacks)


@pytest.mark.parametrize("path", SYMBOLIC, ids=lambda p: p.stem)
def test_every_witness_reaches_its_state_when_run_concretely(path: Path) -> None:
    """Re-running the scenario with a pending (or deadlocked) state's witness reaches that state."""
    exp = explore(path)
    sym = _sym(exp)
    listed = sym["pending"] + sym["deadlocks"]
    assert listed
    for entry in listed:
        target = exp.graph.state(entry["state"])
        r = _run_with(path, entry["witness"])
        reached = {_key(s) for s in r.trace.states}
        assert _key(target) in reached, (entry, target)
        if entry in sym["deadlocks"]:
            assert r.stop == "deadlock", entry


def test_nt_success_splits_on_the_sign_of_the_status() -> None:
    """ntdef.h: NT_SUCCESS(Status) is ((NTSTATUS)(Status) >= 0); the code tests it with `test; jns`."""
    exp = explore(ROOT / "scenarios" / "symbolic_status.toml")
    (pending,) = _sym(exp)["pending"]
    assert pending["reached_when"] == "st < 0"
    assert int(pending["witness"]["st"], 16) >> 31 == 1  # a failure status: the high bit set
    conditions = {a.get("path_condition") for _, a in exp.graph.lean.nodes(data=True)}
    assert {"st >= 0", "st < 0"} <= conditions
    # The default run (STATUS_SUCCESS) never reaches the callback; the witness does.
    default = _run_with(ROOT / "scenarios" / "symbolic_status.toml", {})
    assert not [s for s in default.trace.states if s.pending]


def test_the_window_procedure_cases_are_found_from_the_code() -> None:
    """The message numbers the solver finds are the four compared in the code (winuser.h
    WM_PAINT 0x0F, WM_CLOSE 0x10, WM_DESTROY 0x02, WM_QUIT 0x12), each one way."""
    exp = explore(ROOT / "scenarios" / "symbolic_window_procedure.toml")
    sym = _sym(exp)
    messages = set()
    for entry in sym["pending"] + sym["deadlocks"] + sym["faults"]:
        messages.add(int.from_bytes(bytes.fromhex(entry["witness"]["Buffer"])[:4], "little"))
    assert {0x0F, 0x10, 0x02, 0x12} <= messages
    depth2 = [e for e in sym["pending"] if exp.graph.state(e["state"]).depth == 2]
    assert [e["reached_when"] for e in depth2] == ["Buffer[0:4] == 0x0000000f"]
    (fault,) = sym["faults"]
    assert "Buffer[0:4] == 0x00000012" in fault["reached_when"]
    assert exp.paths == 5


def test_a_symbolic_table_index_forks_at_each_feasible_entry() -> None:
    text = asm_scenario(
        """
main:
    sub rsp, 0x28
    call NtUserMessageCall
    add rsp, 0x28
    ret
pick:                            ; api 2: jump through a four-entry table by Buffer[0] & 3
    movzx eax, byte ptr [rcx]
    and eax, 3
    lea rdx, [rip + table]
    jmp qword ptr [rdx + rax*8]
case0:
    mov eax, 0x100
    ret
case1:
    mov eax, 0x101
    ret
case2:
    mov eax, 0x102
    ret
case3:
    mov eax, 0x103
    ret
table:
    .quad case0
    .quad case1
    .quad case2
    .quad case3
""",
        table='[kernel_callback_table]\n2 = "app!pick"',
        services='[services.NtUserMessageCall]\nsteps = [{ kind = "callback", api = 2, data = { symbolic = 1, name = "b" } }, '
        '{ kind = "return", status = "callback" }]',
    )
    exp = _explore(text)
    sym = _sym(exp)
    assert exp.complete and sym["incomplete"] == 0
    statuses = set()
    for entry in sym["pending"]:
        s = exp.graph.state(entry["state"])
        statuses.add(s.context.r8 & 0xFFFFFFFF)  # NtCallbackReturn's Status (R8D)
        assert int(entry["witness"]["b"], 16) & 3 == (s.context.r8 & 3)
    assert statuses == {0x100, 0x101, 0x102, 0x103}


def test_an_unsupported_instruction_is_reported_and_its_operand_fixed() -> None:
    """popcnt is outside the executor's subset: its symbolic input is fixed to the run's value
    (the path condition says so), the path is counted incomplete, and no other value is tried."""
    text = asm_scenario(
        """
main:
    sub rsp, 0x28
    call NtClose
    popcnt eax, eax
    cmp eax, 3
    je three
    xor eax, eax
three:
    add rsp, 0x28
    ret
""",
        services='[services.NtClose]\nsteps = [{ kind = "return", status = { symbolic = "st", default = 7 } }]',
    )
    exp = _explore(text)
    sym = _sym(exp)
    assert sym["incomplete"] == 1
    (report,) = sym["reports"]
    assert "popcnt" in report["message"] and "fixed" in report["message"]
    assert exp.paths == 1
    conditions = {a.get("path_condition") for _, a in exp.graph.lean.nodes(data=True)} - {None}
    assert "st == 0x00000007" in conditions


def test_a_spent_solver_budget_is_reported_not_guessed() -> None:
    path = ROOT / "scenarios" / "symbolic_window_procedure.toml"
    text = path.read_text() + "\n[budgets]\nsolver_time = 0.000001\n"
    exp = _explore(text)
    sym = _sym(exp)
    assert sym["incomplete"] >= 1
    assert all("solver" in r["message"] for r in sym["reports"])
    assert exp.paths < 5


def test_a_symbolic_status_domain_limits_the_values() -> None:
    """With a two-value domain the solver may only answer with those values."""
    text = asm_scenario(
        """
main:
    sub rsp, 0x28
    call NtClose
    cmp eax, 0xC0000008
    je invalid
    xor eax, eax
invalid:
    add rsp, 0x28
    ret
""",
        services='[services.NtClose]\nsteps = [{ kind = "return", status = { symbolic = "st", '
        'domain = ["STATUS_SUCCESS", "STATUS_INVALID_HANDLE"] } }]',
    )
    exp = _explore(text)
    witnesses = {a.get("witness") for _, a in exp.graph.lean.nodes(data=True)} - {None, ""}
    assert witnesses == {"st=0x00000000", "st=0xc0000008"}  # STATUS_INVALID_HANDLE (ntstatus.h)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ('{ symbolic = "st", domain = [] }', "non-empty array"),
        ('{ symbolic = "9x" }', "a name for the symbolic value"),
        ('{ symbolic = "st", domain = ["STATUS_SUCCESS"], default = "STATUS_INVALID_HANDLE" }', "not in the domain"),
        ('{ symbolic = "st", domain = "anything" }', '"ntstatus" or an array'),
        ('{ symbolic = "st", size = 4 }', "unknown key 'size'"),
    ],
)
def test_bad_symbolic_status_declarations_name_the_place(status: str, message: str) -> None:
    text = asm_scenario(
        "main:\n    ret",
        services=f'[services.NtClose]\nsteps = [{{ kind = "return", status = {status} }}]',
    )
    with pytest.raises(ScenarioError) as e:
        parse_scenario(text, "t.toml")
    assert message in str(e.value) and "services.NtClose.steps[0].status" in str(e.value)


def test_bad_symbolic_input_declaration_names_the_place() -> None:
    text = asm_scenario(
        "main:\n    ret",
        table='[kernel_callback_table]\n2 = "app!main"',
        services='[services.NtUserMessageCall]\nsteps = [{ kind = "callback", api = 2, data = { symbolic = 4, '
        'default = "00" } }, { kind = "return", status = 0 }]',
    )
    with pytest.raises(ScenarioError) as e:
        parse_scenario(text, "t.toml")
    assert "expected 4 bytes, got 1" in str(e.value)


def test_run_with_a_witness_from_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from emu.cli.main import main

    path = str(ROOT / "scenarios" / "symbolic_status.toml")
    assert main(["run", path, "--json", "--witness", "st=0xc0000008"]) != 0  # the default run's expectations fail
    out = capsys.readouterr().out
    assert "ZwCallbackReturn" in out
    assert main(["run", path, "--witness", "st=nope"]) == 2
    assert "witness st: expected a status" in capsys.readouterr().err
    assert main(["run", path, "--witness", "other=1"]) == 2
    assert "no value named other" in capsys.readouterr().err


def test_explain_prints_the_path_condition(capsys: pytest.CaptureFixture[str]) -> None:
    from emu.cli.main import main

    assert main(["explain", str(ROOT / "scenarios" / "symbolic_status.toml"), "pending"]) == 0
    out = capsys.readouterr().out
    assert "reached when st < 0" in out and "witness: st=0x" in out


def test_scenarios_without_symbolic_values_install_no_symbolic_side() -> None:
    exp = explore(ROOT / "scenarios" / "choice_status.toml")
    assert exp.symbolic is None
    assert "path_condition" not in exp.graph.to_graphml()


def test_symbolic_registers_at_an_exception_are_fixed_and_reported() -> None:
    """KiDispatchException copies the registers into a CONTEXT record as plain bytes: a symbolic
    register live there is fixed to the run's value, and the report names the faulting instruction."""
    text = asm_scenario(
        """
main:
    push rbx
    sub rsp, 0x20
    call NtClose
    mov ebx, eax
    xor ecx, ecx
    mov dword ptr [rcx], eax
    add rsp, 0x20
    pop rbx
    ret
""",
        services='[services.NtClose]\nsteps = [{ kind = "return", status = { symbolic = "st" } }]',
    )
    exp = _explore(text)
    (report,) = _sym(exp)["reports"]
    assert "exception dispatch" in report["message"] and "app!main+0xf" in report["message"]
    assert exp.paths == 1
