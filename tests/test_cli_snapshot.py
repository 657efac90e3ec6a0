"""``emu snapshot``: write a snapshot file at a state or a symbol; ``emu run --from-snapshot``
goes on from it and reports the run ``emu run`` reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from emu.cli.main import main


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("callback_roundtrip.toml", ["--to", "app!on_message"]),
        ("nested_callbacks.toml", ["--to", "ntdll!ZwCallbackReturn"]),
        ("nested_callbacks.toml", ["--state", "s4"]),
        ("exception_handled_av.toml", ["--state", "2"]),
    ],
)
def test_a_snapshot_written_by_the_cli_goes_on_to_the_same_report(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, where: list[str]
) -> None:
    path, snap = str(root / "scenarios" / name), str(tmp_path / "at.emusnap")
    assert main(["snapshot", path, *where, "-o", snap]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {snap}: after s") and line.count("\n") == 1
    assert main(["run", "--json", path]) == 0
    whole = capsys.readouterr().out
    assert main(["run", "--json", path, "--from-snapshot", snap]) == 0
    assert capsys.readouterr().out == whole


def test_the_snapshot_stands_where_it_was_asked(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from emu.session import Session
    from emu.session_snapshot import Snapshot

    path = root / "scenarios" / "callback_roundtrip.toml"
    assert main(["snapshot", str(path), "--to", "app!on_message", "-o", str(tmp_path / "a.snap")]) == 0
    s = Session(path)
    s.restore(Snapshot.load(tmp_path / "a.snap"))
    # KiUserCallbackDispatcher has called KernelCallbackTable[2] with the input "WM_PAINT".
    assert s.symbol(s.regs.rip) == "app!on_message"
    assert s.read(s.regs.rcx, s.regs.rdx & 0xFFFF_FFFF) == b"WM_PAINT"
    assert [(f.api, f.service) for f in s.callback_stack()] == [(2, "NtUserMessageCall")]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--state", "s99"], "--state 's99': the run records 8 states (s0 to s7) and ends (exit)"),
        (["--state", "n3"], "--state 'n3': expected a state id of the run"),
        (["--state", "x"], "--state 'x': expected a state id of the run"),
        (["--to", "app!nosuch"], "--to 'app!nosuch': 'app!nosuch' names no symbol in the loaded images"),
        (["--to", "0x1000"], "--to '0x1000': the run ends (exit) without executing it"),
        (["--to", "12z"], "--to '12z': not a number"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    path = root / "scenarios" / "callback_roundtrip.toml"
    out = tmp_path / "x.snap"
    assert main(["snapshot", str(path), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{path}: {expected}"), err
    assert not out.exists()


def test_an_existing_output_needs_force(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, out = str(root / "scenarios" / "callback_roundtrip.toml"), tmp_path / "x.snap"
    out.write_bytes(b"keep")
    assert main(["snapshot", path, "--state", "1", "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"{out} exists: pass --force to overwrite it\n"
    assert out.read_bytes() == b"keep"
    assert main(["snapshot", path, "--state", "1", "-o", str(out), "--force"]) == 0
