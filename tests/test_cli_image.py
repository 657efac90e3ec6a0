"""``emu image FILE.dll``: the text report, --json, and errors (through a parser like emu's)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pe_fixtures import PeFixtures, pe_fixtures_or_fail

from emu.cli.image import add_parser
from emu.errors import EmuError


@pytest.fixture(scope="session")
def pe_files() -> PeFixtures:
    return pe_fixtures_or_fail()


def _emu_image(argv: list[str]) -> int:
    """What ``emu image ...`` does once emu/cli/main.py wires add_parser in (EmuError -> exit 2)."""
    parser = argparse.ArgumentParser(prog="emu")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["image", *argv])
    try:
        code: int = args.func(args)
        return code
    except EmuError as e:
        print(e)
        return 2


def test_text_report(pe_files: PeFixtures, capsys: pytest.CaptureFixture[str]) -> None:
    assert _emu_image([str(pe_files.ntdll), "--profile", "win10-22h2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ntdll at 0x7ffb00000000, entry 0x7ffb000011a0\n")
    assert "  .text      0x7ffb00001000..0x7ffb000011e0      0x1e0  rx\n" in out
    assert "  0x7ffb00001020      2  NtCallbackReturn  ssn 0x5 (win10-reversed, syscall at +0x15)\n" in out
    assert "  0x7ffb00001040     13  ZwClose  ssn 0xf (win10, syscall at +0x12)\n" in out
    assert "  0x7ffb00001190     42  (by ordinal)\n" in out
    assert "     15  RtlForwardedSleep -> kernelbase.Sleep\n" in out
    assert "KiUserCallbackDispatcher convention: registers (guess: reads ecx at +0x4 before writing it)\n" in out
    assert "SSNs that differ from profile win10-22h2 (0):\n" in out


def test_json_report_relocated(pe_files: PeFixtures, capsys: pytest.CaptureFixture[str]) -> None:
    assert _emu_image([str(pe_files.callbacks), "--json", "--base", "0x150000000"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["base"], report["preferred_base"]) == ("0x150000000", "0x7ffa00000000")
    assert [(i["dll"], i["name"], i["ordinal"]) for i in report["imports"]] == [
        ("ntdll.dll", "NtCallbackReturn", None),
        ("ntdll.dll", "NtUserMessageCall", None),
        ("ntdll.dll", None, 42),
    ]
    assert {e["name"] for e in report["exports"]} == {
        "CallbackReturn1234",
        "CallbackCallsNtCallbackReturn",
        "CallbackNestedSyscall",
    }
    assert report["dispatcher_guess"]["convention"] == "unknown"


def test_bad_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.dll"
    bad.write_bytes(b"MZ" + bytes(0x3E) + b"not a PE")
    assert _emu_image([str(bad)]) == 2
    assert capsys.readouterr().out == f"{bad}: not a PE file (no PE signature at e_lfanew 0x0)\n"
