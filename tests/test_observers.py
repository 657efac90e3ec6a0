"""Thread states, observers and the two ground truths, reasoned from the Windows sources.

WRK ``ps/amd64/psctxamd64.c`` PspGetBaseTrapFrame: user-mode GetThreadContext reads the
trap frame at InitialStack - KTRAP_FRAME_LENGTH; ``ke/amd64/callout.asm`` KiCallUserMode
moves InitialStack per callback and NtCallbackReturn never waits (``cli``, restore, return).
So a thread that waits inside a callback is seen by everyone at its nested system call, and
the seed's instant at ZwCallbackReturn only by a kernel debugger, unless the thread is
preempted right there (then it is Ready).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emu.cli.main import main
from emu.detection.observers import ObserverError, is_true, node_status, statuses, threads_at, view_for, visible
from emu.detection.score import score
from emu.detection.signals import nested_call_detector, stack_signal
from emu.detection.view import detect_run
from emu.engine import run
from emu.errors import ScenarioError
from emu.exploration.explorer import explore
from emu.scenario import parse_scenario


def test_a_callback_that_waits_on_an_event_is_waiting_at_its_nested_call(root: Path) -> None:
    r = run(root / "scenarios/callback_waits_on_event.toml")
    known = statuses(r.trace)
    (block,) = [t for t in r.trace if t.kind == "block"]
    state = r.trace.state(block.dst)
    assert str(known[state.id]) == "Waiting (UserRequest)"  # NtWaitForSingleObject's KeWaitForSingleObject
    assert r.symbolize(state.rip) == "ntdll!ZwWaitForSingleObject+0x14"  # the nested call's site, not ZwCallbackReturn
    view = view_for("user-context", r.images, state, known[state.id])
    assert view is not None and view.kernel_mode is None  # GetThreadContext does not say the mode
    assert stack_signal(view).depth == 1  # KiUserCallbackDispatcher's frame above it
    assert is_true("waiting-in-callback", state, known[state.id]) and not state.pending
    # The seed's instant: ui Running in NtCallbackReturn; only a kernel debugger stops it there.
    (seed,) = [s for s in r.trace.states if s.pending]
    assert known[seed.id].state == "Running"
    assert visible("kernel-debugger", seed, known[seed.id]) and not visible("user-context", seed, known[seed.id])


def test_a_callback_that_sends_waits_with_wruserrequest(root: Path) -> None:
    r = run(root / "scenarios/callback_sends_to_thread.toml")
    known = statuses(r.trace)
    waiting = [s for s in r.trace.states if is_true("waiting-in-callback", s, known[s.id])]
    assert [(r.threads[s.thread].name, str(known[s.id]), r.symbolize(s.rip)) for s in waiting] == [
        ("ui", "Waiting (WrUserRequest)", "win32u!NtUserCallNoParam+0x14")
    ]
    seeds = [(r.threads[s.thread].name, known[s.id].state) for s in r.trace.states if s.pending]
    assert seeds == [("worker", "Running"), ("ui", "Running")]


def test_every_thread_at_a_state_with_what_each_observer_reads(root: Path) -> None:
    r = run(root / "scenarios/callback_waits_on_event.toml")
    (block,) = [t for t in r.trace if t.kind == "block"]
    ui, worker = threads_at(r, block.dst)
    assert (ui.name, ui.status.state, ui.depth) == ("ui", "Waiting", 1)
    assert ui.contexts["user-context"] == ui.contexts["kernel-debugger"] == r.trace.state(block.dst).context
    assert (worker.name, worker.status.state, worker.mode) == ("worker", "Ready", "user")  # not started yet
    ui, worker = threads_at(r, len(r.trace.states) - 1)
    assert ui.status.state == worker.status.state == "Terminated"
    assert ui.contexts["user-context"] is None and ui.contexts["kernel-debugger"] is not None


def test_preemption_at_callback_return_only_when_asked_and_then_ready(root: Path) -> None:
    text = (root / "scenarios/callback_returns_at_once.toml").read_text()
    asked = explore(parse_scenario(text, "at_once.toml"))
    not_asked = explore(parse_scenario(text.replace("preempt_at_callback_return = true", ""), "at_once.toml"))
    for exp, want in ((asked, {"Ready"}), (not_asked, {"Running"})):
        g = exp.graph
        assert {node_status(g, n).state for n in g.pending()} == want
    g = asked.graph
    (node,) = g.pending()
    images = run(parse_scenario(text, "at_once.toml")).images  # the same layout the explorer built
    view = view_for("user-context", images, g.state(node), node_status(g, node))
    assert view is not None and g.symbolize(view.context.rip) == "ntdll!ZwCallbackReturn+0x14"
    assert not_asked.states < asked.states


def test_detect_and_score_per_observer(root: Path) -> None:
    r = run(root / "scenarios/callback_roundtrip.toml")
    assert len(detect_run(r)) == 1 and detect_run(r, observer="user-context") == []
    path = root / "scenarios/callback_waits_on_event.toml"
    report = score(nested_call_detector, path, observer="user-context", truth="waiting-in-callback")
    c = report.total
    # The wait is found; the same context right after the nested call returned (user mode) is a false
    # positive a user-context observer cannot avoid: it is not told the thread's mode.
    assert (c.tp, c.fp, c.fn) == (1, 1, 0)
    (fp,) = report.false_positives
    assert fp.label.startswith("user | NtUserMessageCall | depth 1 | user at ntdll!ZwWaitForSingleObject+0x14")
    assert report.as_dict()["observer"] == "user-context" and report.as_dict()["truth"] == "waiting-in-callback"
    seed_user = score(nested_call_detector, path, observer="user-context")
    assert seed_user.total.total == c.total  # the same states are seen, whatever the truth
    assert score(nested_call_detector, path).total.total > c.total  # a kernel debugger sees them all


def test_unknown_observer_or_truth_names_the_valid_ones(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(root / "scenarios/callback_roundtrip.toml")
    with pytest.raises(ObserverError, match=r"unknown observer 'gdb' \(valid: kernel-debugger, user-context\)"):
        score(nested_call_detector, path, observer="gdb")
    assert main(["score", path, "--truth", "hang"]) == 2
    assert capsys.readouterr().err == "unknown truth 'hang' (valid: seed, waiting-in-callback)\n"
    assert main(["detect", path, "--observer", "windbg"]) == 2
    assert "valid: kernel-debugger, user-context" in capsys.readouterr().err
    assert main(["detect", path, "--observer", "user-context", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_scenario_keys_are_checked(root: Path) -> None:
    text = (root / "scenarios/callback_returns_at_once.toml").read_text()
    with pytest.raises(ScenarioError, match=r"machine.preempt_at_callback_return.*expected true or false, got integer"):
        parse_scenario(text.replace("preempt_at_callback_return = true", "preempt_at_callback_return = 1"), "x.toml")
    bad = text.replace('observer = "user-context", seed = 0', 'observer = "procdump", seed = 0')
    with pytest.raises(ScenarioError, match=r"unknown observer 'procdump' \(valid: kernel-debugger, user-context\)"):
        parse_scenario(bad, "x.toml")


def test_run_shows_both_truths(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(root / "scenarios/callback_waits_on_event.toml")]) == 0
    out = capsys.readouterr().out
    assert "<- waiting in callback: Waiting (UserRequest)" in out and "<- callback-return pending (seed)" in out
    assert "  seed                   1 state(s); a user-context observer" in out
    assert main(["run", "--json", str(root / "scenarios/callback_waits_on_event.toml")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["truths"] == {
        "seed": {"kernel-debugger": 1, "user-context": 0},
        "waiting-in-callback": {"kernel-debugger": 1, "user-context": 1},
    }
    assert [t["thread_state"] for t in data["transitions"] if t["kind"] == "block"] == ["Waiting"]
