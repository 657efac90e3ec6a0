"""The emu command: tables, JSON, exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from emu.api import run
from emu.cli.main import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("emu 0.")


def test_run_prints_transitions_and_detection(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(root / "scenarios/callback_roundtrip.toml")])
    out = capsys.readouterr().out
    assert code == 0
    assert "syscall         user   -> kernel  NtCallbackReturn" in out
    assert "<- callback-return pending" in out
    assert (
        "state s3: rip ntdll!ZwCallbackReturn+0x14, [rsp] -> ntdll!KiUserCallbackDispatcherContinue+0xc, depth 1, api 2"
        in out
    )


def test_run_json(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--json", str(root / "scenarios/nested_callbacks.toml")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {t["kind"] for t in rep["transitions"]} >= {"syscall", "callback", "callback_return", "sysret", "exit"}
    assert len(rep["detections"]) == 3
    assert all(e["passed"] for e in rep["expectations"])


def test_detect_json_keys(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect", "--json", str(root / "scenarios/callback_early_return.toml")]) == 0
    dets = json.loads(capsys.readouterr().out)
    assert len(dets) == 1
    assert list(dets[0]) == [
        "state", "thread", "rip", "rip_address", "return_address", "return_address_value", "depth", "api_number",
    ]  # fmt: skip
    assert dets[0]["return_address"].startswith("app!")


HEX = re.compile(r"0x[0-9a-f]+")


@pytest.mark.parametrize("command", ["run", "detect"])
def test_json_raw_addresses_are_the_values_behind_the_symbols(
    root: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """``rip_address``/``return_address_value`` (and a transition's ``rip_address``/``rsp_address``)
    are lowercase "0x..." strings: RIP and the qword at [RSP] of the detected state."""
    path = root / "scenarios/nested_callbacks.toml"
    assert main([command, "--json", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    dets = out["detections"] if command == "run" else out
    r = run(path)
    assert len(dets) == 3
    for d in dets:
        s = r.trace.state(d["state"])
        assert HEX.fullmatch(d["rip_address"]) and HEX.fullmatch(d["return_address_value"])
        assert int(d["rip_address"], 16) == s.context.rip
        assert r.symbolize(s.context.rip) == d["rip"]
        ret = int.from_bytes(s.stack[:8], "little")
        assert int(d["return_address_value"], 16) == ret
        assert r.symbolize(ret) == d["return_address"]
    if command == "run":
        for row, t in zip(out["transitions"], r.trace, strict=True):
            assert (row["rip_address"], row["rsp_address"]) == (f"{t.rip:#x}", f"{t.rsp:#x}")
            assert HEX.fullmatch(row["rip_address"]) and row["rip"] == t.rip_symbol


def test_failed_expectation_exits_1_and_names_it(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        (root / "scenarios/callback_roundtrip.toml").read_text().replace("exit_status = 0x1234", "exit_status = 0x1235")
    )
    p = tmp_path / "wrong.toml"
    p.write_text(text)
    assert main(["run", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{p}: expectation failed: expect[3].exit_status (line ")
    assert "exit status 0x00001234, expected 0x00001235" in err


def test_budget_stop_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "loop.toml"
    p.write_text(
        '[scenario]\nname = "loop"\n[budgets]\ninstructions = 1000\n'
        '[[module]]\nname = "app"\ncode = "main: jmp main"\n[thread]\nentry = "main"\n'
    )
    assert main(["run", str(p)]) == 3
    assert capsys.readouterr().err.strip() == (
        f"{p}: stopped by budget: budget 'instructions' exceeded (limit 1000) at app!main"
    )


def test_graph_writes_each_format(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for ext in ("graphml", "json", "dot"):
        out = tmp_path / f"g.{ext}"
        assert main(["graph", str(root / "scenarios/callback_roundtrip.toml"), "-o", str(out)]) == 0
        assert out.stat().st_size > 100
    assert main(["graph", str(root / "scenarios/callback_roundtrip.toml"), "-o", str(tmp_path / "g.png")]) == 2
