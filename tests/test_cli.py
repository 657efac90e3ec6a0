"""The emu command: tables, JSON, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emu.cli import main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("emu 0.")


def test_run_prints_transitions_and_detection(root: Path, capsys) -> None:
    code = main(["run", str(root / "scenarios/callback_roundtrip.toml")])
    out = capsys.readouterr().out
    assert code == 0
    assert "syscall         user   -> kernel  NtCallbackReturn" in out
    assert "<- callback-return pending" in out
    assert (
        "state s3: rip ntdll!ZwCallbackReturn+0x14, [rsp] -> ntdll!KiUserCallbackDispatcherReturn+0xc, depth 1, api 2"
        in out
    )


def test_run_json(root: Path, capsys) -> None:
    assert main(["run", "--json", str(root / "scenarios/nested_callbacks.toml")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {t["kind"] for t in rep["transitions"]} >= {"syscall", "callback", "callback_return", "sysret", "exit"}
    assert len(rep["detections"]) == 3
    assert all(e["passed"] for e in rep["expectations"])


def test_detect_json_keys(root: Path, capsys) -> None:
    assert main(["detect", "--json", str(root / "scenarios/callback_early_return.toml")]) == 0
    dets = json.loads(capsys.readouterr().out)
    assert len(dets) == 1
    assert {"state", "rip", "return_address", "depth", "api_number"} <= set(dets[0])
    assert dets[0]["return_address"].startswith("app!")


def test_failed_expectation_exits_1_and_names_it(root: Path, tmp_path: Path, capsys) -> None:
    text = (
        (root / "scenarios/callback_roundtrip.toml").read_text().replace("exit_status = 0x1234", "exit_status = 0x1235")
    )
    p = tmp_path / "wrong.toml"
    p.write_text(text)
    assert main(["run", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{p}: expectation failed: expect[3].exit_status (line ")
    assert "exit status 0x00001234, expected 0x00001235" in err


def test_budget_stop_exits_3(tmp_path: Path, capsys) -> None:
    p = tmp_path / "loop.toml"
    p.write_text(
        '[scenario]\nname = "loop"\n[budgets]\ninstructions = 1000\n'
        '[[module]]\nname = "app"\ncode = "main: jmp main"\n[thread]\nentry = "main"\n'
    )
    assert main(["run", str(p)]) == 3
    assert capsys.readouterr().err.strip() == (
        f"{p}: stopped by budget: budget 'instructions' exceeded (limit 1000) at app!main"
    )


def test_graph_writes_each_format(root: Path, tmp_path: Path, capsys) -> None:
    for ext in ("graphml", "json", "dot"):
        out = tmp_path / f"g.{ext}"
        assert main(["graph", str(root / "scenarios/callback_roundtrip.toml"), "-o", str(out)]) == 0
        assert out.stat().st_size > 100
    assert main(["graph", str(root / "scenarios/callback_roundtrip.toml"), "-o", str(tmp_path / "g.png")]) == 2
