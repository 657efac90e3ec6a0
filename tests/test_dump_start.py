"""Runs that start from a minidump: ``emu run --from-dump`` and ``[start] dump``.

The round trip is the test that matters: run a scenario, dump it where the seed's state is
(the thread's user RIP just after ZwCallbackReturn's ``syscall``, the kernel about to
complete the callback), start a new run from that file, and the callback completes exactly
as it did in the original run: the same later transitions (kind, thread, service, RIP,
RSP, depth, status, output), the same exit status. On emu's built-in ntdll and on Wine's
real one. Every state of every built-in scenario round-trips too, and dumps written
elsewhere (no EmuKernelStream) start their threads at their contexts.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from real_ntdll import RealNtdllError, install_real_scenarios

from emu.api import Run, run
from emu.cli.main import main
from emu.dump import read_minidump, write_minidump
from emu.dump.format import (
    MINIDUMP_DIRECTORY,
    MINIDUMP_HEADER,
    EmuKernelStream,
    Memory64ListStream,
    MemoryInfoListStream,
    SystemInfoStream,
    ThreadListStream,
    UnusedStream,
)
from emu.dump.live import capture, capture_state, provisional_run
from emu.errors import DumpError, ScenarioError
from emu.scenario import load_scenario, parse_scenario
from emu.trace import Transition

ROOT = Path(__file__).resolve().parent.parent
ROUNDTRIP = ROOT / "scenarios" / "callback_roundtrip.toml"
BUILTIN = sorted((ROOT / "scenarios").glob("*.toml"))


@pytest.fixture(scope="module")
def real_bin() -> Path:
    try:
        return install_real_scenarios()
    except (RealNtdllError, RuntimeError) as e:
        pytest.fail(f"cannot fetch the real ntdll: {e}", pytrace=False)


def _later(r: Run, state: int) -> list[tuple[object, ...]]:
    """The transitions after ``state``, without their step numbers and state ids."""
    return [_key(t) for t in r.trace.transitions if t.dst > state]


def _all(r: Run) -> list[tuple[object, ...]]:
    """Every transition of a run from a dump (its first records are the dumped threads, with none into them)."""
    return [_key(t) for t in r.trace.transitions]


def _key(t: Transition) -> tuple[object, ...]:
    return (t.kind, t.thread, t.service, t.ssn, t.rip, t.rip_symbol, t.rsp, t.depth, t.status, t.api, t.detail, t.data)


def _from(scenario_path: Path, dump: Path) -> Run:
    return run(dataclasses.replace(load_scenario(scenario_path), start_dump=str(dump), expectations=()))


# --- the round trip at the seed's state ---------------------------------------------------------


@pytest.mark.parametrize(
    "scenario", ["callback_roundtrip", "nested_callbacks", "callback_large_output", "callback_sends_to_thread"]
)
def test_cli_round_trip_at_the_pending_state(scenario: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "scenarios" / f"{scenario}.toml"
    original = run(path)
    pending = next(s for s in original.trace.states if s.pending)
    dump = tmp_path / "pending.dmp"
    assert main(["dump", str(path), "--state", "pending", "-o", str(dump)]) == 0
    capsys.readouterr()
    assert main(["run", "--json", "--from-dump", str(dump), str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["transitions"]
    # Where it starts: the thread at ZwCallbackReturn with the callback to complete, as in the dump.
    assert report["detections"][0]["rip"] == "ntdll!ZwCallbackReturn+0x14"
    assert rows[0]["kind"] == "callback_return" and rows[0]["from"] == "kernel"
    first = next(t for t in original.trace.transitions if t.src == pending.id)
    assert (rows[0]["service"], rows[0]["status"], rows[0]["detail"]) == (
        first.service,
        first.status_name,
        first.detail,
    )
    again = _from(path, dump)
    assert _all(again) == _later(original, pending.id)
    assert again.exit_status == original.exit_status and original.exit_status is not None
    assert report["exit_status"] == f"{original.exit_status:#010x}"


def test_round_trip_on_wines_ntdll(real_bin: Path, tmp_path: Path) -> None:
    for name in ("roundtrip", "nested_depth3", "compiled_callbacks"):
        path = ROOT / "scenarios" / "real" / f"{name}.toml"
        sc = load_scenario(path)
        original = run(sc)
        for pending in [s for s in original.trace.states if s.pending]:
            again, live = capture_state(sc, pending.id)
            dump = tmp_path / f"{name}-{pending.id}.dmp"
            write_minidump(again, again.trace.state(pending.id), dump, live=live)
            view = read_minidump(dump)
            assert view.threads()[0].context.rip == pending.rip  # NtCallbackReturn+0x14 in Wine's ntdll
            assert original.symbolize(pending.rip) == "ntdll!NtCallbackReturn+0x14", name
            resumed = _from(path, dump)
            assert resumed.notes == [] and resumed.error is None, (name, resumed.notes, resumed.error)
            assert _all(resumed) == _later(original, pending.id), (name, pending.id)
            assert resumed.exit_status == original.exit_status


@pytest.mark.parametrize("path", BUILTIN, ids=[p.stem for p in BUILTIN])
def test_every_state_round_trips(path: Path, tmp_path: Path) -> None:
    """From the dump of any state, the run goes on exactly as the original did from that state."""
    sc = load_scenario(path)
    original = run(sc)
    dumps: dict[int, Path] = {}

    def sink(process: object, live: object) -> None:
        pr = provisional_run(process)  # type: ignore[arg-type]
        f = tmp_path / f"s{live.state}.dmp"  # type: ignore[attr-defined]
        write_minidump(pr, pr.trace.state(live.state), f, live=live)  # type: ignore[attr-defined, arg-type]
        dumps[live.state] = f  # type: ignore[attr-defined]

    capture(sc, lambda sid: True, sink)
    assert sorted(dumps) == list(range(len(original.trace.states)))
    for sid, f in dumps.items():
        again = _from(path, f)
        where = f"{path.stem} s{sid} ({original.trace.states[sid].mode})"
        assert _all(again) == _later(original, sid), where
        assert (again.exit_status, again.stop, str(again.error)) == (
            original.exit_status, original.stop, str(original.error)
        ), where  # fmt: skip
        first = again.trace.states[
            next(i for i, s in enumerate(again.trace.states) if s.thread == original.trace.states[sid].thread)
        ]
        mine = original.trace.states[sid]
        assert (first.mode, first.context, first.depth, first.pending) == (
            mine.mode,
            mine.context,
            mine.depth,
            mine.pending,
        ), where


# --- [start] dump in a scenario ------------------------------------------------------------------


def test_a_scenario_can_start_from_a_dump_and_state_its_own_expectations(tmp_path: Path) -> None:
    original = run(ROUNDTRIP)
    pending = next(s for s in original.trace.states if s.pending)
    again, live = capture_state(original.scenario, pending.id)
    write_minidump(again, again.trace.state(pending.id), tmp_path / "pending.dmp", live=live)
    text = """
[scenario]
name = "from_pending"
profile = "win10-22h2"

[start]
dump = "pending.dmp"

[services.NtUserMessageCall]
steps = [{ kind = "callback", api = 2, text = "hello" }, { kind = "return", status = "callback" }]

[[expect]]
transitions = { callback_return = 1, sysret = 1, syscall = 1, exit = 1, callback = 0 }

[[expect]]
exit_status = 0x1234

[[expect]]
detections = 1
"""
    (tmp_path / "from_pending.toml").write_text(text)
    r = run(tmp_path / "from_pending.toml")
    assert r.error is None and r.ok, [o.message for o in r.outcomes if not o.passed]
    assert r.trace.thread_starts[0].startswith("thread0: from pending.dmp, kernel mode at ntdll!ZwCallbackReturn+0x14")


def test_start_dump_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"\[start\.dump\]: .*missing\.dmp does not exist"):
        parse_scenario('[scenario]\nname = "x"\n[start]\ndump = "missing.dmp"\n', str(tmp_path / "x.toml"))
    with pytest.raises(ScenarioError, match=r"missing required key 'thread'"):
        parse_scenario('[scenario]\nname = "x"\n[[module]]\nname = "a"\ncode = "ret"\n', str(tmp_path / "x.toml"))
    (tmp_path / "x.dmp").write_bytes(b"MDMP")
    sc = parse_scenario('[scenario]\nname = "x"\n[start]\ndump = "x.dmp"\n', str(tmp_path / "x.toml"))
    with pytest.raises(DumpError, match=r"x\.dmp: MINIDUMP_HEADER: the file is 4 bytes"):
        run(sc)
    from emu.exploration.explorer import explore

    with pytest.raises(ScenarioError, match=r"\[start\.dump\]: this scenario starts from a dump"):
        explore(sc)


def test_the_next_system_call_is_served_by_the_scenario(tmp_path: Path) -> None:
    """Same dump, another script: the pending callback returns into the service as the given scenario scripts it."""
    original = run(ROUNDTRIP)
    pending = next(s for s in original.trace.states if s.pending)
    again, live = capture_state(original.scenario, pending.id)
    write_minidump(again, again.trace.state(pending.id), tmp_path / "p.dmp", live=live)
    text = ROUNDTRIP.read_text()
    other = text.replace('{ kind = "return", status = "callback" }', '{ kind = "return", status = 0x42 }')
    assert other != text
    (tmp_path / "other.toml").write_text(other)
    r = _from(tmp_path / "other.toml", tmp_path / "p.dmp")
    sysret = next(t for t in r.trace.transitions if t.kind == "sysret")
    assert (sysret.service, sysret.status) == ("NtUserMessageCall", 0x42) and r.exit_status == 0x42
    # A scenario without the service the dumped thread is inside cannot go on: one line says why.
    bare = dataclasses.replace(load_scenario(ROUNDTRIP), services={}, start_dump=str(tmp_path / "p.dmp"))
    with pytest.raises(
        DumpError,
        match=r"EmuKernelStream: threads\[0\]\.callback_stack\[0\]\.service: the dumped thread is inside NtUserMessageCall",
    ):
        run(bare)


# --- dumps emu did not write -------------------------------------------------------------------


def _drop_stream(data: bytes, kind: int) -> bytes:
    raw = bytearray(data)
    h = MINIDUMP_HEADER.unpack(raw)
    for i in range(h["NumberOfStreams"]):
        off = h["StreamDirectoryRva"] + i * MINIDUMP_DIRECTORY.size
        if MINIDUMP_DIRECTORY.unpack(raw, off)["StreamType"] == kind:
            struct.pack_into("<I", raw, off, UnusedStream)
    return bytes(raw)


def test_a_foreign_dump_starts_each_thread_at_its_context(tmp_path: Path) -> None:
    original = run(ROUNDTRIP)
    after = next(
        s for s in original.trace.states if s.mode == "user" and s.depth == 0 and s.id > 0
    )  # back from the call
    again, live = capture_state(original.scenario, after.id)
    data = write_minidump(again, again.trace.state(after.id), live=live)
    (tmp_path / "foreign.dmp").write_bytes(_drop_stream(data, EmuKernelStream))
    r = _from(ROUNDTRIP, tmp_path / "foreign.dmp")
    assert any("has no EmuKernelStream" in n for n in r.notes)
    assert _all(r) == _later(original, after.id) and r.exit_status == 0x1234
    # At the seed's state with no kernel side, nothing is pending: the thread just goes on at its RIP.
    pending = next(s for s in original.trace.states if s.pending)
    again, live = capture_state(original.scenario, pending.id)
    data = write_minidump(again, again.trace.state(pending.id), live=live)
    (tmp_path / "pending.dmp").write_bytes(_drop_stream(data, EmuKernelStream))
    r = _from(ROUNDTRIP, tmp_path / "pending.dmp")
    first = r.trace.states[0]
    assert (first.mode, first.depth, first.pending, first.rip) == ("user", 0, False, pending.rip)
    assert not any(t.kind == "callback_return" for t in r.trace.transitions)


# --- bad dumps: exit 2, one line, no traceback ---------------------------------------------------


def _stream_at(data: bytes, kind: int) -> tuple[int, int]:
    h = MINIDUMP_HEADER.unpack(data)
    for i in range(h["NumberOfStreams"]):
        d = MINIDUMP_DIRECTORY.unpack(data, h["StreamDirectoryRva"] + i * MINIDUMP_DIRECTORY.size)
        if d["StreamType"] == kind:
            return d["Location.Rva"], d["Location.DataSize"]
    raise KeyError(kind)


def _x86(data: bytes) -> bytes:
    raw = bytearray(data)
    struct.pack_into("<H", raw, _stream_at(data, SystemInfoStream)[0], 0)  # PROCESSOR_ARCHITECTURE_INTEL
    return bytes(raw)


def _no_threads(data: bytes) -> bytes:
    raw = bytearray(data)
    struct.pack_into("<I", raw, _stream_at(data, ThreadListStream)[0], 0)  # NumberOfThreads 0
    return bytes(raw)


def _overlapping_ranges(data: bytes) -> bytes:
    raw = bytearray(data)
    descs = _stream_at(data, Memory64ListStream)[0] + 16
    first, size = struct.unpack_from("<QQ", raw, descs)
    struct.pack_into("<Q", raw, descs + 16, first + size - 0x1000)  # the second range starts inside the first
    return bytes(raw)


def _overlapping_regions(data: bytes) -> bytes:
    raw = bytearray(data)
    rva = _stream_at(data, MemoryInfoListStream)[0] + 16
    first = struct.unpack_from("<Q", raw, rva)[0]
    struct.pack_into("<Q", raw, rva + 48, first)  # MINIDUMP_MEMORY_INFO[1].BaseAddress = [0]'s
    return bytes(raw)


def _kernel_garbage(data: bytes) -> bytes:
    raw = bytearray(data)
    rva = _stream_at(data, EmuKernelStream)[0]
    raw[rva : rva + 2] = b"[{"
    return bytes(raw)


BAD = [
    ("x86", _x86, "SystemInfoStream: ProcessorArchitecture 0 is not AMD64 (9): emu reads x64 dumps only"),
    ("no thread list", lambda d: _drop_stream(d, ThreadListStream), "ThreadListStream: missing: the dump has no ThreadListStream"),
    ("no threads", _no_threads, "ThreadListStream: the dump lists no thread to run"),
    ("overlapping memory ranges", _overlapping_ranges, "Memory64ListStream: memory ranges at "),
    ("overlapping regions", _overlapping_regions, "MemoryInfoListStream: regions at "),
    ("kernel stream garbage", _kernel_garbage, "EmuKernelStream: not emu's JSON (JSONDecodeError)"),
]  # fmt: skip


@pytest.fixture(scope="module")
def live_pending_dump() -> bytes:
    original = run(ROUNDTRIP)
    pending = next(s for s in original.trace.states if s.pending)
    again, live = capture_state(original.scenario, pending.id)
    return write_minidump(again, again.trace.state(pending.id), live=live)


@pytest.mark.parametrize(("edit", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_dump_is_exit_2_and_one_line(
    live_pending_dump: bytes, edit: object, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.dmp"
    bad.write_bytes(edit(live_pending_dump))  # type: ignore[operator]
    capsys.readouterr()
    assert main(["run", "--from-dump", str(bad), str(ROUNDTRIP)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{bad}: {expected}") and err.count("\n") == 1, err
    if "Kernel" not in expected and "no thread to run" not in expected:
        assert main(["detect", "--dump", str(bad)]) == 2
        assert capsys.readouterr().err.startswith(f"{bad}: {expected}")


def test_bad_dump_from_the_command_line_has_no_traceback(live_pending_dump: bytes, tmp_path: Path) -> None:
    bad = tmp_path / "bad.dmp"
    bad.write_bytes(_x86(live_pending_dump))
    scenario = tmp_path / "s.toml"
    scenario.write_text('[scenario]\nname = "s"\n[start]\ndump = "bad.dmp"\n')
    out = subprocess.run(
        [sys.executable, "-m", "emu.cli", "run", str(scenario)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert "ProcessorArchitecture 0 is not AMD64" in out.stderr
