"""A satisfied wait makes the waiter Ready at once, not when it next runs.

WRK ``base/ntos/ke/eventobj.c`` KeSetEvent satisfies the waits on the event and
``ke/waitsup.c`` KiUnwaitThread readies each waiter (KiReadyThread, ``ke/thredsup.c``): from
that moment the waiter is Ready (KTHREAD_STATE 1), though the signalling thread keeps
running. win32k's reply to a sent message ends the sender's wait the same way. The trace
names the woken threads on the next transition (``Transition.woke``), and
``threads_at`` shows them Ready from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emu.api import Run, run
from emu.cli import main
from emu.detection.observers import threads_at


def _status(r: Run, name: str, state_id: int) -> str:
    (t,) = [t for t in threads_at(r, state_id) if t.name == name]
    return str(t.status)


def test_setting_the_event_readies_the_waiting_callback(root: Path) -> None:
    r = run(root / "scenarios/callback_waits_on_event.toml")
    ui, worker = r.thread("ui").tid, r.thread("worker").tid
    (woke,) = [t for t in r.trace if t.woke]
    assert (woke.thread, woke.kind, woke.service, woke.woke) == (worker, "sysret", "NtSetEvent", (ui,))
    # Inside NtSetEvent (the worker's syscall state) ui still waits; once KeSetEvent has
    # run, ui is Ready while the worker goes on running.
    assert _status(r, "ui", woke.src) == "Waiting (UserRequest)"
    assert _status(r, "ui", woke.dst) == "Ready"
    assert _status(r, "worker", woke.dst) == "Running"
    # Ready until it runs: through the worker's exit, then ui's own sysret from the wait.
    (exit_,) = [t for t in r.trace if t.kind == "exit" and t.thread == worker]
    assert _status(r, "ui", exit_.dst) == "Ready"
    back = next(t for t in r.trace if t.thread == ui and t.step > woke.step)
    assert (back.kind, back.service) == ("sysret", "NtWaitForSingleObject")
    assert _status(r, "ui", back.dst) == "Running"


def test_the_reply_readies_the_sender(root: Path) -> None:
    r = run(root / "scenarios/callback_sends_to_thread.toml")
    ui, worker = r.thread("ui").tid, r.thread("worker").tid
    (woke,) = [t for t in r.trace if t.woke]
    # The worker's NtUserGetMessage replies after its callback returned, then returns itself.
    assert (woke.thread, woke.service, woke.woke) == (worker, "NtUserGetMessage", (ui,))
    assert _status(r, "ui", woke.src) == "Waiting (WrUserRequest)"
    assert _status(r, "ui", woke.dst) == "Ready"
    # No other transition claims a wake: each satisfied wait is recorded once.
    assert sum(len(t.woke) for t in r.trace) == 1


def test_wakes_are_shown_and_exported(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(root / "scenarios/callback_waits_on_event.toml")
    assert main(["run", path]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "wakes" in x]
    assert "NtSetEvent" in line and line.endswith("<- wakes ui: Ready")
    assert main(["run", "--json", path]) == 0
    rows = json.loads(capsys.readouterr().out)["transitions"]
    assert [(r["service"], r["woke"]) for r in rows if r["woke"]] == [("NtSetEvent", ["ui"])]
    r = run(root / "scenarios/callback_waits_on_event.toml")
    assert r.graph.to_graphml().count('"woke"') >= 1 and run(path).graph.to_graphml() == r.graph.to_graphml()


def test_one_thread_records_no_wakes(root: Path) -> None:
    r = run(root / "scenarios/nested_callbacks.toml")
    assert all(t.woke == () for t in r.trace)
