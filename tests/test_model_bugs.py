"""The model's own invariant failures surface as bugs (ModelBug), never as guest faults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from conftest import ROOT, asm_scenario
from emu.api import run
from emu.cli.score import add_parser
from emu.engine import build
from emu.errors import EmuError, ModelBug, UnimplementedService
from emu.exploration.explorer import Explorer
from emu.kernel import HANDLE, CallbackResult, KernelHooks, KThread, sched
from emu.kernel.services import ScriptActivation, ServiceContext
from emu.scenario import parse_scenario

TWO_CALLS = "main:\n sub rsp, 0x28\n call NtClose\n call NtClose\n add rsp, 0x28\n ret"
CLOSE = '[services.NtClose]\nsteps = [{ kind = "return", status = 0 }]'


def test_model_bug_is_not_an_emu_error() -> None:
    # Everything that reports guest faults and budgets catches EmuError; a bug must get past it.
    assert not issubclass(ModelBug, EmuError)


def test_broken_invariant_in_a_run_raises_instead_of_ending_as_a_fault() -> None:
    scenario = parse_scenario(asm_scenario(TWO_CALLS, services=CLOSE), "t.toml")
    p = None

    def lose_the_thread(sid: int, thread: KThread) -> None:
        # Break the kernel's bookkeeping after the first system call returns: the next
        # system call finds no current thread, which only a bug in the model can cause.
        if p is not None and p.trace.raw_state(sid).mode == "user" and sid > 0:
            p.kernel.current = None

    p = build(scenario, KernelHooks(observe=lose_the_thread))
    with pytest.raises(ModelBug, match="system call with no current thread"):
        p.run()


def test_guest_side_kernel_errors_still_end_the_run_as_a_fault() -> None:
    # The contrast: a service the scenario does not implement is the run's limit, kept on the Run.
    r = run(parse_scenario(asm_scenario(TWO_CALLS), "t.toml"))
    assert isinstance(r.error, UnimplementedService) and r.stop == "fault"


def test_broken_invariant_while_exploring_raises_instead_of_becoming_a_fault() -> None:
    explorer = Explorer(parse_scenario(asm_scenario(TWO_CALLS), "t.toml"))
    kernel = explorer.kernel

    @kernel.registry.service("NtClose")
    def close_and_wake_a_running_thread(ctx: ServiceContext, Handle: HANDLE) -> int:
        # Waking a thread that does not wait breaks a scheduler invariant.
        sched.wake(kernel, kernel.threads[ctx.thread_id], CallbackResult(0))
        return 0

    with pytest.raises(ModelBug, match="is not waiting"):
        explorer.run()


def test_resume_without_a_pending_choice_is_a_bug() -> None:
    p = build(parse_scenario(asm_scenario(TWO_CALLS, services=CLOSE), "t.toml"))
    with pytest.raises(ModelBug, match="no choice is pending"):
        p.kernel.resume("anything")


def test_an_option_for_a_service_that_asked_for_none_is_a_bug() -> None:
    # The kernel hands an option only to the activation whose choice is pending.
    p = build(parse_scenario(asm_scenario(TWO_CALLS, services=CLOSE), "t.toml"))
    spec = p.kernel.registry.get("NtClose")
    assert spec is not None and spec.script is not None
    with pytest.raises(ModelBug, match="asked for no choice"):
        ScriptActivation(spec, [(spec.script, 0)]).step("left")


def test_emu_score_does_not_blame_the_detector_for_a_model_bug(tmp_path: Path) -> None:
    # `emu score` turns whatever a detector raises into one line about the detector; a ModelBug
    # is emu's own and must reach the user as a bug.
    (tmp_path / "bugged.py").write_text(
        "from emu.errors import ModelBug\n\ndef detector(view):\n    raise ModelBug('broken invariant')\n"
    )
    parser = argparse.ArgumentParser(prog="emu")
    parser.add_argument("--allow-path", action="append", default=[])
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["score", str(ROOT / "scenarios" / "callback_roundtrip.toml"), "--detector",
                              f"{tmp_path / 'bugged.py'}:detector"])  # fmt: skip
    with pytest.raises(ModelBug, match="broken invariant"):
        args.func(args)
