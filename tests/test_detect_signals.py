"""The three signals and their combination, against the kernel model's ground truth.

The combined detector must agree with ``State.pending`` on every state of every shipped
scenario (the hard cases included), on every node of every explored graph, and on the PE
scenarios; each signal must say what it saw; none may raise on a garbage view.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from pe_fixtures import pe_fixtures_or_fail

from conftest import ROOT, SCENARIOS, asm_scenario
from emu.api import Run, run
from emu.detection.score import score
from emu.detection.signals import code_signal, combined, naive_detector, stack_signal, symbol_signal
from emu.detection.view import (
    ModuleInfo,
    ThreadView,
    detect_callback_return_pending,
    dispatcher_frames,
    view_from,
    view_of,
)
from emu.exploration.explorer import Explorer
from emu.scenario import load_scenario, parse_scenario

HARD = sorted(p for p in SCENARIOS if p.stem.startswith("hard_"))
PE_SCENARIOS = sorted((ROOT / "scenarios" / "pe").glob("*.toml"))


@pytest.fixture(scope="module")
def pe_bin() -> Path:
    """The DLLs the PE scenarios name, copied into scenarios/pe/bin/ (as tests/test_pe_scenarios.py does)."""
    built = pe_fixtures_or_fail()
    out = ROOT / "scenarios" / "pe" / "bin"
    out.mkdir(exist_ok=True)
    for dll in built.dlls:
        shutil.copyfile(dll, out / Path(dll).name)
    return out


def _state(r: Run, pending: bool = True, index: int = 0):  # type: ignore[no-untyped-def]
    return [s for s in r.trace.states if s.pending == pending][index]


def test_the_hard_cases_ship() -> None:
    names = {p.stem for p in HARD}
    assert names >= {
        "hard_no_callback_forged_frame", "hard_nested_syscall", "hard_after_callback_return", "hard_int2e",
        "hard_corrupt_rsp", "hard_direct_syscall_return", "hard_early_return_deep",
    }  # fmt: skip


# --- 100 % against ground truth ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in SCENARIOS))
def test_combined_matches_ground_truth_on_every_state(shipped_runs: dict[str, Run], name: str) -> None:
    r = shipped_runs[name]
    for s in r.trace.states:
        v = combined(view_of(r, s))
        assert v.pending == s.pending, f"s{s.id}: {v}"
        assert (detect_callback_return_pending(view_of(r, s)) is not None) == s.pending, s.id
        if v.stack.value != "unknown":
            # The stack signal's callbacks are the kernel's callback stack, innermost first.
            assert v.stack.apis == tuple(api for api, _ in reversed(s.callbacks)), f"s{s.id}: {v.stack}"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_combined_matches_ground_truth_on_every_explored_node(path: Path) -> None:
    explorer = Explorer(load_scenario(path))
    graph = explorer.run().graph
    for node in graph.nodes():
        state = graph.state(node)
        v = combined(view_from(explorer.process.images, state))
        assert v.pending == state.pending, f"{node}: {v}"


@pytest.mark.parametrize("path", PE_SCENARIOS, ids=lambda p: p.stem)
def test_combined_matches_ground_truth_on_pe_scenarios(pe_bin: Path, path: Path) -> None:
    report = score(combined, path)
    assert report.perfect, str(report)
    r = run(path)
    for s in r.trace.states:
        v = stack_signal(view_of(r, s))
        assert v.value in ("yes", "no") and v.apis == tuple(api for api, _ in reversed(s.callbacks)), s.id


def test_stack_depth_is_the_kernels_depth_where_the_stack_is_readable(shipped_runs: dict[str, Run]) -> None:
    unknown = []
    for name, r in shipped_runs.items():
        for s in r.trace.states:
            v = stack_signal(view_of(r, s))
            if v.value == "unknown":
                unknown.append((name, s.id))
            else:
                assert v.depth == s.depth or s.mode == "exited", (name, s.id)
    # Only the states whose RSP the scenario corrupts on purpose cannot be walked, and the two
    # states of exception_stack_overflow taken in the middle of its recursion (about 4,000 frames
    # of app!recurse, more than the walk's 4096-frame limit, emu.detection.unwind.MAX_FRAMES).
    assert {n for n, _ in unknown} == {"hard_corrupt_rsp", "exception_stack_overflow"}
    assert len([u for u in unknown if u[0] == "hard_corrupt_rsp"]) == 8
    assert sorted(i for n, i in unknown if n == "exception_stack_overflow") == [2, 3]


# --- each signal ------------------------------------------------------------------------------
def test_int_2e_path_is_seen_by_symbol_and_code(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["hard_int2e"]
    view = view_of(r, _state(r))
    assert view.read(view.context.rip - 2, 2) == b"\xcd\x2e"
    sym, code = symbol_signal(view), code_signal(view)
    assert sym and code
    assert "int 2Eh before RIP, in a win10 stub at ntdll!ZwCallbackReturn loading SSN 0x5" in code.evidence[0]


def test_direct_syscall_copy_is_seen_by_code_not_by_symbol(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["hard_direct_syscall_return"]
    v = combined(view_of(r, _state(r)))
    assert v.pending and v.code and v.symbol.value == "no"
    assert v.detection is not None and v.detection.rip == "app!my_callback_return+0xa"
    assert any("private copy of the stub" in d for d in v.disagreements)


def test_syscall_through_callback_returns_stub_is_told_by_the_stack(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["hard_after_callback_return"]
    at_stub = [s for s in r.trace.states if r.symbolize(s.rip) == "ntdll!ZwCallbackReturn+0x14"]
    assert [s.pending for s in at_stub] == [False, True, False, False]
    for s in at_stub:
        v = combined(view_of(r, s))
        assert v.symbol and v.code  # RIP, bytes and the stub's SSN all say "waiting"
        assert v.pending == s.pending
        if not s.pending:
            assert v.stack.value == "no" and any("shows no callback" in d for d in v.disagreements)


def test_forged_frame_fools_a_stack_scan_but_not_the_unwind(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["hard_no_callback_forged_frame"]
    kernel = next(s for s in r.trace.states if s.mode == "kernel" and s.service == "NtCallbackReturn")
    view = view_of(r, kernel)
    assert len(dispatcher_frames(view)) == 1  # what scanning the stack finds
    v = combined(view)
    assert not v.pending and v.stack.value == "no" and v.symbol and v.code
    assert any("stale or forged" in e for e in v.stack.evidence)
    assert "STATUS_NO_CALLBACK_ACTIVE" in v.reason


def test_nested_syscall_has_callbacks_on_the_stack_but_rip_elsewhere(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["hard_nested_syscall"]
    nested = [s for s in r.trace.states if s.mode == "kernel" and s.service in ("NtClose", "NtYieldExecution")]
    assert [s.depth for s in nested] == [1, 2]
    for s in nested:
        v = combined(view_of(r, s))
        assert not v.pending and v.stack and v.stack.depth == s.depth
        assert v.symbol.value == "no" and v.code.value == "no"
        assert any("RIP is elsewhere" in d for d in v.disagreements)


def test_corrupt_rsp_makes_the_stack_unknown_with_a_reason(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["hard_corrupt_rsp"]
    corrupt = [s for s in r.trace.states if r.symbolize(s.rip).startswith("app!on_message+")]
    reasons = []
    for s in corrupt:
        v = stack_signal(view_of(r, s))
        assert v.value == "unknown" and not v.frames
        reasons.append(v.evidence[-1].split("stopped: ")[1])
    assert [s.mode for s in corrupt] == ["kernel", "user"] * 4
    assert reasons[::2] == reasons[1::2]  # the same reason in the kernel state and after the sysret
    assert reasons[0] == "RSP 0x13370 is not in readable stack memory"
    assert reasons[2].startswith("RSP 0x") and reasons[2].endswith("is not 8-byte aligned")
    assert reasons[4] == "RSP 0x7ffe0000 is not in readable stack memory"
    assert reasons[6] == "RSP 0xdeadbeefdeadbee8 is not in readable stack memory"


def test_code_signal_needs_no_symbols_but_the_callback_returns_export(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["callback_roundtrip"]
    view = view_of(r, _state(r))
    stripped = []
    for m in view.modules:
        keep = {n: a for n, a in m.exports.items() if n == "NtCallbackReturn"}
        image = dataclasses.replace(m.image, exports=keep, symbols=keep)
        stripped.append(ModuleInfo(m.name, m.base, m.size, keep, image))
    bare = dataclasses.replace(view, modules=tuple(stripped))
    code = code_signal(bare)
    assert code and "in a win10 stub at ntdll!NtCallbackReturn loading SSN 0x5" in code.evidence[0]
    # ... and with no export at all in the stub's place, the stub is found by scanning back.
    other = view_of(r, next(s for s in r.trace.states if s.mode == "kernel" and s.service == "NtTerminateThread"))
    v = code_signal(dataclasses.replace(other, modules=tuple(stripped)))
    assert v.value == "no" and "stub at ntdll!NtCallbackReturn+0x" in v.evidence[0] and "SSN 0x53" in v.evidence[0]
    nothing = dataclasses.replace(view, modules=tuple(dataclasses.replace(m, exports={}) for m in stripped))
    assert code_signal(nothing).value == "unknown"


def test_a_syscall_whose_eax_was_loaded_before_the_stub_is_no_stub() -> None:
    # `mov r10, rcx; syscall` after the SSN: a stub shape, but not one that loads its SSN itself.
    code = (
        "main:\n    sub rsp, 0x28\n    mov eax, 0xF\n    mov r10, rcx\n    syscall\nafter:\n    add rsp, 0x28\n    ret"
    )
    services = '[services.NtClose]\nsteps = [{ kind = "return", status = "STATUS_SUCCESS" }]\n'
    r = run(parse_scenario(asm_scenario(code, services=services)))
    assert r.error is None and r.detections == []
    v = code_signal(view_of(r, r.trace.states[1]))
    assert v.value == "no" and "no syscall stub ends there" in v.evidence[0]
    assert stack_signal(view_of(r, r.trace.states[1])).value == "no"


def test_user_mode_view_is_never_pending(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["callback_roundtrip"]
    view = dataclasses.replace(view_of(r, _state(r)), kernel_mode=False)
    v = combined(view)
    assert not v.pending and v.symbol and v.code and v.stack and v.mode == "user"
    dump_like = dataclasses.replace(view, kernel_mode=None)  # a user-mode dump cannot tell
    assert combined(dump_like).pending


def test_signals_on_views_without_ntdll_or_memory() -> None:
    from emu.context import UserContext

    empty = ThreadView(1, UserContext(*([0] * 18)), (), ())
    v = combined(empty)
    assert not v.pending and {v.symbol.value, v.code.value, v.stack.value} == {"unknown"}
    assert str(v).startswith("not pending: RIP is not just after NtCallbackReturn's system call")


# --- the note: why the other signals exist ----------------------------------------------------------
def test_naive_detector_is_wrong_on_the_hard_cases_and_combined_is_not() -> None:
    naive = score(naive_detector, HARD)
    assert len(naive.false_positives) >= 1
    assert {m.scenario for m in naive.false_positives} == {
        "hard_after_callback_return",
        "hard_no_callback_forged_frame",
    }
    assert [m.scenario for m in naive.false_negatives] == ["hard_direct_syscall_return"]
    assert score(combined, HARD).perfect and score(combined, HARD, explore=True).perfect
