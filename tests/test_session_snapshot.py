"""Session snapshots: restoring one and running on records what the run recorded after it,
byte for byte, on every shipped scenario; from a file too; foreign files are one line."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

import emu
from conftest import SCENARIOS
from emu.api import Run
from emu.errors import SnapshotError
from emu.session import Session
from emu.session_snapshot import Snapshot


def recorded(r: Run) -> bytes:
    return repr((r.trace.raw_states, r.trace.raw_transitions, r.stop, str(r.error), r.exit_status)).encode()


def first_callback_or_halfway(session: Session) -> bool:
    """Where the snapshot is taken: inside the first callback, else halfway through the run."""
    return bool(session.callback_stack()) or session.position >= HALF[session.scenario.name]


HALF: dict[str, int] = {}


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_restoring_a_snapshot_records_the_same_future(path: Path, shipped_runs: dict[str, Run], tmp_path: Path) -> None:
    ref = shipped_runs[path.stem]
    HALF[ref.scenario.name] = len(ref.trace) // 2
    s = Session(path)
    s.run_until(first_callback_or_halfway)
    snap = s.snapshot()
    assert snap.position == s.position
    first = s.finish()
    assert recorded(first) == recorded(ref)
    # Back in time, a detour (a few instructions), back again, and on to the end.
    s.restore(snap)
    assert s.position == snap.position and s.regs.rip == snap.cpu["rip"]
    s.step_instruction(5)
    s.restore(snap)
    again = s.finish()
    assert recorded(again) == recorded(ref)
    assert recorded(first) == recorded(ref), "a Run returned before a restore must not change"
    # Through a file, into a fresh session of the same scenario that has run elsewhere meanwhile.
    snap.save(tmp_path / "snap.zip")
    fresh = Session(path)
    fresh.step()
    fresh.restore(Snapshot.load(tmp_path / "snap.zip"))
    assert recorded(fresh.finish()) == recorded(ref)


def test_a_snapshot_taken_before_the_stack_overflow_puts_the_guard_page_back(root: Path) -> None:
    # The kernel turns the guard page into committed stack when the overflow hits (the
    # STATUS_GUARD_PAGE_VIOLATION / STACK_OVERFLOW path); going back before it must map it
    # no-access again, or the second run would not fault there.
    path = root / "scenarios" / "exception_stack_overflow.toml"
    s = Session(path)
    snap = s.snapshot()
    ref = s.finish()
    guards = [r for r in snap.regions if "guard" in r.label]
    assert any(r not in s.process.machine.regions for r in guards), "the run did not touch a guard page"
    s.restore(snap)
    assert all(r in s.process.machine.regions for r in guards)
    assert recorded(s.finish()) == recorded(ref)


def test_memory_written_after_a_snapshot_comes_back(root: Path) -> None:
    s = Session(root / "scenarios" / "callback_roundtrip.toml")
    s.run_to("app!main")
    rsp = s.regs.rsp
    before = s.read(rsp - 0x40, 0x40)
    snap = s.snapshot()
    s.write(rsp - 0x40, b"\xcc" * 0x40)
    s.regs.rbx = 0xDEAD
    s.restore(snap)
    assert s.read(rsp - 0x40, 0x40) == before
    assert s.regs.rbx == snap.cpu["rbx"]


def test_the_file_is_the_same_bytes_every_time(root: Path, tmp_path: Path) -> None:
    a, b = (Session(root / "scenarios" / "nested_callbacks.toml") for _ in range(2))
    for s, name in ((a, "a.zip"), (b, "b.zip")):
        s.run_until(lambda s: len(s.callback_stack()) == 2)
        s.snapshot().save(tmp_path / name)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as z:
        assert sorted(z.namelist()) == ["memory.bin", "snapshot.json"]
        doc = json.loads(z.read("snapshot.json"))
        assert doc["format"] == "emu-snapshot" and doc["emu"] == emu.__version__
        assert len(z.read("memory.bin")) == 0x1000 * len(doc["pages"])


def test_a_snapshot_of_another_scenario_is_refused_in_one_line(root: Path, tmp_path: Path) -> None:
    s = Session(root / "scenarios" / "callback_roundtrip.toml")
    s.step()
    s.snapshot().save(tmp_path / "rt.zip")
    other = Session(root / "scenarios" / "nested_callbacks.toml")
    with pytest.raises(SnapshotError) as e:
        other.restore(Snapshot.load(tmp_path / "rt.zip"))
    line = str(e.value)
    assert "\n" not in line and "callback_roundtrip" in line and "nested_callbacks" in line
    assert str(tmp_path / "rt.zip") in line


def test_a_snapshot_from_another_emu_version_is_refused_in_one_line(root: Path, tmp_path: Path) -> None:
    s = Session(root / "scenarios" / "callback_roundtrip.toml")
    s.step()
    s.snapshot().save(tmp_path / "rt.zip")
    with zipfile.ZipFile(tmp_path / "rt.zip") as z:
        doc, memory = json.loads(z.read("snapshot.json")), z.read("memory.bin")
    doc["emu"] = "0.0.1"
    with zipfile.ZipFile(tmp_path / "old.zip", "w") as z:
        z.writestr("snapshot.json", json.dumps(doc))
        z.writestr("memory.bin", memory)
    with pytest.raises(SnapshotError, match=r"old\.zip: written by emu '0\.0\.1'") as e:
        Snapshot.load(tmp_path / "old.zip")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"", "not an emu snapshot"), (b"PK\x03\x04garbage", "not an emu snapshot"), (b"{}", "not an emu snapshot")],
)
def test_files_that_are_not_snapshots_are_one_line(tmp_path: Path, content: bytes, why: str) -> None:
    f = tmp_path / "x.zip"
    f.write_bytes(content)
    with pytest.raises(SnapshotError, match=why) as e:
        Snapshot.load(f)
    assert "\n" not in str(e.value)
    with pytest.raises(SnapshotError, match="no such file"):
        Snapshot.load(tmp_path / "missing.zip")


def test_a_damaged_document_is_one_line(root: Path, tmp_path: Path) -> None:
    s = Session(root / "scenarios" / "callback_roundtrip.toml")
    s.step()
    s.snapshot().save(tmp_path / "rt.zip")
    with zipfile.ZipFile(tmp_path / "rt.zip") as z:
        doc, memory = json.loads(z.read("snapshot.json")), z.read("memory.bin")
    del doc["trace"]
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as z:
        z.writestr("snapshot.json", json.dumps(doc))
        z.writestr("memory.bin", memory)
    with pytest.raises(SnapshotError, match=r"bad\.zip: damaged snapshot\.json"):
        Snapshot.load(tmp_path / "bad.zip")


def test_a_session_that_starts_from_a_dump_steps_and_restores_too(root: Path, tmp_path: Path) -> None:
    import dataclasses

    from emu.cli.main import main
    from emu.scenario import load_scenario

    path = root / "scenarios" / "nested_callbacks.toml"
    assert main(["dump", str(path), "--state", "pending", "-o", str(tmp_path / "p.dmp")]) == 0
    scenario = dataclasses.replace(load_scenario(path), start_dump=str(tmp_path / "p.dmp"), expectations=())
    ref = emu.run(scenario)
    s = Session(scenario)
    s.step()
    snap = s.snapshot()
    assert recorded(s.finish()) == recorded(ref)
    snap.save(tmp_path / "d.snap")
    fresh = Session(scenario)
    fresh.restore(Snapshot.load(tmp_path / "d.snap"))
    assert recorded(fresh.finish()) == recorded(ref)


def test_emu_run_goes_on_from_a_snapshot_file_and_refuses_foreign_ones_with_exit_2(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from emu.cli.main import main

    nested, roundtrip = root / "scenarios" / "nested_callbacks.toml", root / "scenarios" / "callback_roundtrip.toml"
    s = Session(nested)
    s.run_to("ntdll!ZwCallbackReturn")
    s.snapshot().save(tmp_path / "n.snap")
    assert main(["run", "--json", str(nested)]) == 0
    whole = capsys.readouterr().out
    assert main(["run", "--json", str(nested), "--from-snapshot", str(tmp_path / "n.snap")]) == 0
    assert capsys.readouterr().out == whole
    (tmp_path / "bad.snap").write_bytes(b"not a zip")
    for snap in ("n.snap", "bad.snap"):
        assert main(["run", str(roundtrip), "--from-snapshot", str(tmp_path / snap)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(str(tmp_path / snap)), err
