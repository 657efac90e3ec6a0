"""What a dump says about the system and the kernel objects: SystemInfo per profile, HandleData with object state.

Expected values come from the sources, not from emu's tables: the Windows versions from
Microsoft's release information (Windows 7 SP1 is 6.1.7601 "Service Pack 1", Windows 10
22H2 is 10.0.19045, Windows 11 23H2 is 10.0.22631); the handle stream's layout from
``minidumpapiset.h`` (MINIDUMP_HANDLE_DESCRIPTOR_2 is 40 bytes; MINIDUMP_HANDLE_OBJECT_INFORMATION
is NextInfoRva, InfoType, SizeOfInfo; MiniMutantInformation1 = 2, MiniMutantInformation2 =
3, MiniEventInformation1 = 6); the object information as NtQueryEvent/NtQueryMutant return
it (WRK ntexapi.h: EVENT_BASIC_INFORMATION, MUTANT_BASIC_INFORMATION, MUTANT_OWNER_INFORMATION),
with a mutant's CurrentCount its SignalState: 1 when free, 0 once acquired (WRK ke/mutntobj.c).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from emu.dump import thread_id, write_minidump
from emu.dump.live import capture, provisional_run
from emu.engine import RunResult
from emu.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
HandleDataStream = 12


def _stream(data: bytes, kind: int) -> bytes:
    n, rva = struct.unpack_from("<II", data, 8)
    for i in range(n):
        t, size, at = struct.unpack_from("<III", data, rva + 12 * i)
        if t == kind:
            return data[at : at + size]
    raise KeyError(kind)


def _string(data: bytes, rva: int) -> str:
    (n,) = struct.unpack_from("<I", data, rva)
    return data[rva + 4 : rva + 4 + n].decode("utf-16-le")


def _handles(data: bytes) -> dict[int, tuple[str, list[tuple[int, bytes]]]]:
    """Handle -> (type name, [(InfoType, raw information)...]) read by the layouts minidumpapiset.h gives."""
    s = _stream(data, HandleDataStream)
    head, size, count, _ = struct.unpack_from("<IIII", s)
    assert (head, size) == (16, 40)
    out = {}
    for i in range(count):
        handle, type_rva, _name, _attr, _access, _hc, _pc, info_rva, _ = struct.unpack_from(
            "<QIIIIIIII", s, head + 40 * i
        )
        infos = []
        while info_rva:
            nxt, kind, length = struct.unpack_from("<III", data, info_rva)
            infos.append((kind, data[info_rva + 12 : info_rva + 12 + length]))
            info_rva = nxt
        out[handle] = (_string(data, type_rva), infos)
    return out


def _dumps(scenario: object) -> tuple[RunResult, dict[int, bytes]]:
    out: dict[int, bytes] = {}

    def sink(process: object, live: object) -> None:
        pr = provisional_run(process)  # type: ignore[arg-type]
        out[live.state] = write_minidump(pr, pr.trace.state(live.state), live=live)  # type: ignore[attr-defined, arg-type]

    r = capture(scenario, lambda sid: True, sink)  # type: ignore[arg-type]
    return r, out


def _mutant(infos: list[tuple[int, bytes]]) -> tuple[int, tuple[int, int]]:
    (k1, basic), (k2, owner) = infos
    assert (k1, k2, len(basic), len(owner)) == (2, 3, 8, 16)
    count, owned_by_caller, abandoned = struct.unpack_from("<iBB", basic)
    assert (owned_by_caller, abandoned) == (0, 0)  # the dump writer owns nothing; nothing was abandoned
    return count, struct.unpack("<QQ", owner)


def test_mutants_carry_their_count_and_owner_at_each_state() -> None:
    r, dumps = _dumps(load_scenario(ROOT / "scenarios" / "threads_no_deadlock.toml"))
    names = {t.name: t.tid for t in r.threads.values()}
    ui = (0x1000, thread_id(names["ui"]))
    steps = r.trace.transitions
    free = (1, (0, 0))
    # (step after which, {handle: (CurrentCount, owner CLIENT_ID)}), read off the run's table above.
    expected = {
        0: {0x100: free, 0x104: free},  # ui entered NtWaitForSingleObject(A): nothing acquired yet
        1: {0x100: (0, ui), 0x104: free},  # ui holds A
        5: {0x100: (0, ui), 0x104: (0, ui)},  # and B
        7: {0x100: (0, ui), 0x104: free},  # released B
        12: {0x100: free, 0x104: free},  # released A
    }
    for step, want in expected.items():
        t = steps[step]
        assert t.thread == names["ui"]
        got = {h: _mutant(infos) for h, (kind, infos) in _handles(dumps[t.dst]).items() if kind == "Mutant"}
        assert got == want, (step, t.kind, t.service)
    worker = (0x1000, thread_id(names["worker"]))
    taken = next(t for t in steps if t.thread == names["worker"] and t.kind == "sysret")
    assert _mutant(_handles(dumps[taken.dst])[0x100][1]) == (0, worker)  # the worker takes A once ui let it go


def test_events_carry_their_type_and_state(tmp_path: Path) -> None:
    text = """
[scenario]
name = "set_once"
[[module]]
name = "app"
code = '''
main:
    sub rsp, 0x28
    mov ecx, 0x100
    xor edx, edx
    call NtSetEvent
    xor eax, eax
    add rsp, 0x28
    ret
'''
[thread]
entry = "app!main"
[[object]]
kind = "event"
name = "manual"
handle = 0x100
manual_reset = true
[[object]]
kind = "event"
name = "auto"
handle = 0x104
"""
    r, dumps = _dumps(parse_scenario(text, str(tmp_path / "set_once.toml")))
    sysret = next(t for t in r.trace.transitions if t.service == "NtSetEvent" and t.kind == "sysret")
    before, after = _handles(dumps[sysret.src]), _handles(dumps[sysret.dst])
    # EVENT_BASIC_INFORMATION: EventType NotificationEvent 0 (manual reset) / SynchronizationEvent 1, EventState.
    assert before[0x100] == ("Event", [(6, struct.pack("<Ii", 0, 0))])
    assert after[0x100] == ("Event", [(6, struct.pack("<Ii", 0, 1))])
    assert before[0x104] == after[0x104] == ("Event", [(6, struct.pack("<Ii", 1, 0))])


def test_skelsec_minidump_reads_the_handle_descriptors(caplog: pytest.LogCaptureFixture) -> None:
    from minidump.minidumpfile import MinidumpFile

    r, dumps = _dumps(load_scenario(ROOT / "scenarios" / "callback_waits_on_event.toml"))
    block = next(t for t in r.trace.transitions if t.kind == "block")
    with caplog.at_level(logging.DEBUG):
        mf = MinidumpFile.parse_bytes(dumps[block.dst])
    assert not [x.getMessage() for x in caplog.records if x.levelno >= logging.WARNING]
    [h] = mf.handles.handles
    assert (h.Handle, h.TypeName, h.HandleCount) == (0x100, "Event", 1)
    assert [o.InfoType for o in h.ObjectInfos] == [6] and h.ObjectInfos[0].info_bytes == struct.pack("<Ii", 1, 0)


def test_udmp_parser_opens_dumps_with_object_information(tmp_path: Path) -> None:
    import udmp_parser

    r, dumps = _dumps(load_scenario(ROOT / "scenarios" / "threads_no_deadlock.toml"))
    for sid in (3, len(r.trace.states) - 1):
        path = tmp_path / f"s{sid}.dmp"
        path.write_bytes(dumps[sid])
        p = udmp_parser.UserDumpParser()
        assert p.Parse(path)
        assert p.Threads()[thread_id(r.trace.states[sid].thread)].Context.Rip == r.trace.states[sid].rip


@pytest.mark.parametrize(
    ("profile", "version", "csd"),
    [
        ("win7-sp1", (6, 1, 7601), "Service Pack 1"),
        ("win10-22h2", (10, 0, 19045), ""),
        ("win11-23h2", (10, 0, 22631), ""),
    ],
)
def test_system_info_is_the_profiles_windows(
    profile: str, version: tuple[int, int, int], csd: str, tmp_path: Path
) -> None:
    from minidump.minidumpfile import MinidumpFile

    text = (ROOT / "scenarios" / "callback_roundtrip.toml").read_text().replace('"win10-22h2"', f'"{profile}"')
    _, dumps = _dumps(parse_scenario(text, str(tmp_path / "x.toml")))
    mf = MinidumpFile.parse_bytes(dumps[0])
    s = mf.sysinfo
    assert (s.MajorVersion, s.MinorVersion, s.BuildNumber) == version
    assert s.ProcessorArchitecture.value == 9 and s.PlatformId.value == 2  # AMD64, VER_PLATFORM_WIN32_NT
    assert (s.CSDVersion or "") == csd
