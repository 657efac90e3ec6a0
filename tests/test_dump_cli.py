"""``emu dump`` and ``emu detect --dump``: written files, refusals, exit codes and messages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from emu.api import run
from emu.cli import dump as cli_dump

ROOT = Path(__file__).resolve().parent.parent
ROUNDTRIP = ROOT / "scenarios" / "callback_roundtrip.toml"


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="emu")
    sub = p.add_subparsers(dest="command", required=True)
    cli_dump.add_parser(sub)
    d = sub.add_parser("detect")
    d.add_argument("--dump", required=True)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cli_dump.cmd_detect_dump)
    args = p.parse_args(argv)
    code: int = args.func(args)
    return code


def test_emu_dump_writes_refuses_to_overwrite_and_forces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s3.dmp"
    assert _cli(["dump", str(ROUNDTRIP), "--state", "s3", "-o", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    first = out.read_bytes()
    assert _cli(["dump", str(ROUNDTRIP), "--state", "pending", "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"{out} exists: pass --force to overwrite it\n"
    assert _cli(["dump", str(ROUNDTRIP), "--state", "3", "-o", str(out), "--force"]) == 0
    assert out.read_bytes() == first
    assert _cli(["dump", str(ROUNDTRIP), "--state", "pending", "-o", str(out), "--force"]) == 0
    assert out.read_bytes() == first


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("s99", "--state 's99': the run has {n} states (s0 to s{last})"),
        ("x3", "--state 'x3': expected a state id like s3 or 3 (emu run), n3 (emu explore), or 'pending'"),
    ],
)
def test_emu_dump_bad_state_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str, message: str
) -> None:
    n = len(run(ROUNDTRIP).trace.states)
    assert _cli(["dump", str(ROUNDTRIP), "--state", state, "-o", str(tmp_path / "x.dmp")]) == 2
    assert capsys.readouterr().err == f"{ROUNDTRIP}: " + message.format(n=n, last=n - 1) + "\n"
    assert not (tmp_path / "x.dmp").exists()


def test_emu_dump_pending_when_none_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scen = ROOT / "scenarios" / "syscall_basic.toml"
    assert _cli(["dump", str(scen), "--state", "pending", "-o", str(tmp_path / "x.dmp")]) == 2
    assert (
        capsys.readouterr().err == f"{scen}: --state 'pending': no state of this run is pending at ZwCallbackReturn\n"
    )


def test_emu_detect_dump_text_json_and_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s3.dmp"
    assert _cli(["dump", str(ROUNDTRIP), "--state", "pending", "-o", str(out)]) == 0
    capsys.readouterr()
    assert _cli(["detect", "--dump", str(out)]) == 0
    assert capsys.readouterr().out == (
        "thread 0x1004: ntdll!ZwCallbackReturn+0x14  [rsp] -> ntdll!KiUserCallbackDispatcherContinue+0xc  depth 1  api 2\n"
    )
    assert _cli(["detect", "--dump", str(out), "--json"]) == 0
    [d] = json.loads(capsys.readouterr().out)
    assert d == {
        "state": None, "thread": 0x1004, "rip": "ntdll!ZwCallbackReturn+0x14", "rip_address": "0x7ffb00001086",
        "return_address": "ntdll!KiUserCallbackDispatcherContinue+0xc", "return_address_value": "0x7ffb0000102d",
        "depth": 1, "api_number": 2,
    }  # fmt: skip
    assert cli_dump.detect_dump(out)[0].as_dict() == d
    assert _cli(["dump", str(ROUNDTRIP), "--state", "s0", "-o", str(tmp_path / "s0.dmp")]) == 0
    capsys.readouterr()
    assert _cli(["detect", "--dump", str(tmp_path / "s0.dmp")]) == 0
    assert capsys.readouterr().out == f"no thread is at ZwCallbackReturn in {tmp_path / 's0.dmp'}\n"
    (tmp_path / "bad.dmp").write_bytes(out.read_bytes()[:16])
    assert _cli(["detect", "--dump", str(tmp_path / "bad.dmp")]) == 2
    err = capsys.readouterr().err
    assert err == f"{tmp_path / 'bad.dmp'}: MINIDUMP_HEADER: the file is 16 bytes, shorter than the 32-byte header\n"


def test_dump_cli_refuses_to_overwrite_and_writes_with_the_umask(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "x.dmp"
    cmd = [
        sys.executable,
        "-m",
        "emu.cli",
        "dump",
        str(ROOT / "scenarios" / "callback_roundtrip.toml"),
        "--state",
        "pending",
        "-o",
        str(out),
        "--full",
    ]
    old = os.umask(0o027)
    try:
        first = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        os.umask(old)
    assert first.returncode == 0, first.stderr
    assert out.stat().st_mode & 0o777 == 0o640
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr
