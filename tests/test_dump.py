"""Minidumps: every state round-trips to the same verdict, two independent readers open the files,
malformed files are one DumpError line, and the files hold what real tools expect (the commands:
test_dump_cli.py)."""

from __future__ import annotations

import logging
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzz_support import fast_settings, no_hang, slow_only, slow_settings, tally
from hypothesis import given
from hypothesis import strategies as st
from pe_fixtures import pe_fixtures_or_fail

from emu.api import Run, run
from emu.detection.signals import code_signal, combined, stack_signal, symbol_signal
from emu.detection.view import Detection, detect_callback_return_pending, view_of
from emu.dump import read_minidump, thread_id, write_minidump
from emu.dump.format import (
    MINIDUMP_DIRECTORY,
    MINIDUMP_HEADER,
    MINIDUMP_MODULE,
    MINIDUMP_THREAD,
    EmuModulesStream,
    Memory64ListStream,
    MemoryListStream,
    ModuleListStream,
    SystemInfoStream,
    ThreadListStream,
)
from emu.dump.write import module_path
from emu.errors import DumpError
from emu.trace import State

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "scenarios").rglob("*.toml"))
PE_DIR = ROOT / "scenarios" / "pe"
ROUNDTRIP = ROOT / "scenarios" / "callback_roundtrip.toml"


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    """Every shipped scenario, the PE ones with their DLLs built by mingw-w64 (copied into scenarios/pe/bin/)."""
    built = pe_fixtures_or_fail()
    (PE_DIR / "bin").mkdir(exist_ok=True)
    for dll in built.dlls:
        shutil.copyfile(dll, PE_DIR / "bin" / dll.name)
    return {str(p.relative_to(ROOT / "scenarios")): run(p) for p in SCENARIOS}


def _pending(r: Run) -> State:
    return next(s for s in r.trace.states if s.pending)


@pytest.fixture(scope="module")
def pending_dump(runs: dict[str, Run]) -> bytes:
    r = runs["callback_roundtrip.toml"]
    return write_minidump(r, _pending(r))


def _fields(d: Detection) -> tuple[object, ...]:
    """What a detection says, apart from where it came from (a state id live, None from a dump)."""
    return d.rip, d.rip_address, d.return_address, d.return_address_value, d.depth, d.api_number


# --- round trip -------------------------------------------------------------------------------


def test_every_state_of_every_scenario_gives_the_same_verdicts_from_its_dump(runs: dict[str, Run]) -> None:
    checked = pending = 0
    for name, r in runs.items():
        for s in r.trace.states:
            live = detect_callback_return_pending(view_of(r, s))
            view, *others = read_minidump(write_minidump(r, s), name).threads()  # the state's own thread first
            got = detect_callback_return_pending(view)
            where = f"{name} s{s.id} ({s.mode})"
            assert len(others) < len(r.threads), where  # the others: tests/test_dump_threads.py
            assert view.kernel_mode is None, where  # a dump cannot tell
            assert view.thread == thread_id(s.thread) and view.context == s.context, where
            if s.stack:
                assert view.read(s.rsp, len(s.stack)) == s.stack, where
            assert (got is None) == (live is None), where
            if live is not None and got is not None:
                assert _fields(got) == _fields(live), where
                assert got.state is None and got.thread == thread_id(live.thread), where
                pending += 1
            for signal in (symbol_signal, code_signal, stack_signal):  # each signal and its evidence
                a, b = signal(view_of(r, s)), signal(view)
                assert (a.value, a.evidence) == (b.value, b.evidence), f"{where}: {signal.__name__}"
            assert bool(combined(view)) == bool(combined(view_of(r, s))), where
            checked += 1
    assert checked > 100 and pending > 0


def test_dump_view_holds_system_modules_memory_and_provenance(runs: dict[str, Run], pending_dump: bytes) -> None:
    r = runs["callback_roundtrip.toml"]
    dv = read_minidump(pending_dump, "s3.dmp")
    p = r.scenario.profile
    assert (dv.system.major, dv.system.minor, dv.system.build, dv.system.csd_version) == (p.major, p.minor, p.build, "")
    assert dv.process_id == 0x1000 and dv.source == {"scenario": "callback_roundtrip", "profile": p.name, "state": 3}
    assert [(m.name, m.base, m.size) for m in dv.modules] == sorted((i.name, i.base, i.size) for i in r.images)
    ntdll = next(m for m in dv.modules if m.name == "ntdll")
    live = next(i for i in r.images if i.name == "ntdll")
    assert ntdll.exports == live.exports
    stub = live.exports["ZwCallbackReturn"]
    assert ntdll.image.read(stub, 0x18) == live.read(stub, 0x18)  # the stub disassembles from the dump
    assert {(r.perms, r.type) for r in dv.regions} >= {("rx", 0x1000000), ("rw", 0x20000), ("r", 0x1000000)}


def test_memory_list_variant_and_win7_service_pack(runs: dict[str, Run], tmp_path: Path) -> None:
    text = ROUNDTRIP.read_text().replace('profile = "win10-22h2"', 'profile = "win7-sp1"')
    assert "win7-sp1" in text
    (tmp_path / "w7.toml").write_text(text)
    r = run(tmp_path / "w7.toml")
    s = _pending(r)
    dv = read_minidump(write_minidump(r, s, memory64=False))
    assert (dv.system.build, dv.system.csd_version) == (7601, "Service Pack 1")
    [view] = dv.threads()
    got, live = detect_callback_return_pending(view), detect_callback_return_pending(view_of(r, s))
    assert got is not None and live is not None and _fields(got) == _fields(live)


def test_pe_exports_are_read_from_memory_when_emu_stream_is_absent(runs: dict[str, Run]) -> None:
    r = runs["pe/third_party_ntdll.toml"]
    raw = bytearray(write_minidump(r, _pending(r)))
    at = _directory(raw)
    struct.pack_into("<I", raw, at[EmuModulesStream][0], 0)  # StreamType → UnusedStream
    dv = read_minidump(bytes(raw))
    assert dv.source == {}
    # PE images carry their export directory in memory; emu's assembled kernel32 has no headers yet.
    assert {m.name: m.exports for m in dv.modules} == {i.name: i.exports if i.headers else {} for i in r.images}
    d = detect_callback_return_pending(dv.threads()[0])
    assert d is not None and d.rip == "ntdll!NtCallbackReturn+0x17" and d.depth == 2


def test_same_state_same_bytes(pending_dump: bytes, tmp_path: Path) -> None:
    again = run(ROUNDTRIP)
    out = tmp_path / "again.dmp"
    assert write_minidump(again, _pending(again), out) == pending_dump == out.read_bytes()


# --- independent readers ------------------------------------------------------------------------


def test_skelsec_minidump_reads_thread_modules_and_stack(
    runs: dict[str, Run], pending_dump: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    from minidump.minidumpfile import MinidumpFile

    r = runs["callback_roundtrip.toml"]
    s = _pending(r)
    with caplog.at_level(logging.DEBUG):
        mf = MinidumpFile.parse_bytes(pending_dump)  # it parses the PEB too: TEB and PEB are in the dump
    assert not [x.getMessage() for x in caplog.records if x.levelno >= logging.WARNING]
    assert mf.peb is not None and mf.peb.address == int.from_bytes(
        mf.get_reader().read(mf.threads.threads[0].Teb + 0x60, 8), "little"
    )
    [t] = mf.threads.threads
    assert (t.ThreadId, t.ContextObject.Rip, t.ContextObject.Rsp) == (thread_id(s.thread), s.rip, s.rsp)
    assert {m.name: m.baseaddress for m in mf.modules.modules} == {module_path(i): i.base for i in r.images}
    assert module_path(r.images[0]) == "C:\\Windows\\System32\\ntdll.dll"
    assert mf.get_reader().read(s.rsp, 16) == s.stack[:16]
    assert (mf.sysinfo.BuildNumber, mf.misc_info.ProcessId) == (r.scenario.profile.build, 0x1000)


def test_udmp_parser_reads_thread_modules_and_stack(runs: dict[str, Run], pending_dump: bytes, tmp_path: Path) -> None:
    import udmp_parser

    r = runs["callback_roundtrip.toml"]
    s = _pending(r)
    path = tmp_path / "s3.dmp"
    path.write_bytes(pending_dump)
    p = udmp_parser.UserDumpParser()
    assert p.Parse(path)
    [(tid, t)] = p.Threads().items()
    assert (tid, t.Context.Rip, t.Context.Rsp, t.Context.SegCs) == (thread_id(s.thread), s.rip, s.rsp, 0x33)
    mods = {base: str(m) for base, m in p.Modules().items()}
    for img in r.images:
        assert img.base in mods and img.name in mods[img.base]
    assert bytes(p.ReadMemory(s.rsp, 16) or b"") == s.stack[:16]
    stub = next(i for i in r.images if i.name == "ntdll").exports["ZwCallbackReturn"]
    assert bytes(p.ReadMemory(stub + 0x12, 2) or b"") == b"\x0f\x05"  # the syscall before RIP


# --- malformed dumps: one DumpError line each ---------------------------------------------------


def _directory(raw: bytes | bytearray) -> dict[int, tuple[int, int, int]]:
    """StreamType → (offset of its directory entry, Location.Rva, Location.DataSize)."""
    h = MINIDUMP_HEADER.unpack(raw)
    out = {}
    for i in range(h["NumberOfStreams"]):
        off = h["StreamDirectoryRva"] + i * MINIDUMP_DIRECTORY.size
        d = MINIDUMP_DIRECTORY.unpack(raw, off)
        out[d["StreamType"]] = (off, d["Location.Rva"], d["Location.DataSize"])
    return out


Mutation = Callable[[bytearray, dict[int, tuple[int, int, int]]], bytes]


def _put(fmt: str, stream: int | None, offset: int, value: int) -> Mutation:
    """Write ``value`` at ``offset`` into a stream (or into the file, for stream None)."""

    def mutate(raw: bytearray, at: dict[int, tuple[int, int, int]]) -> bytes:
        struct.pack_into(fmt, raw, (at[stream][1] if stream is not None else 0) + offset, value)
        return bytes(raw)

    return mutate


def _entry(stream: int, field: int, value: Callable[[dict[int, tuple[int, int, int]]], int]) -> Mutation:
    """Rewrite a directory entry's field (0 StreamType, 1 DataSize, 2 Rva)."""

    def mutate(raw: bytearray, at: dict[int, tuple[int, int, int]]) -> bytes:
        struct.pack_into("<I", raw, at[stream][0] + 4 * field, value(at))
        return bytes(raw)

    return mutate


THREAD, MODULE = 4, 4  # the first MINIDUMP_THREAD / MINIDUMP_MODULE follows the count
CTX = THREAD + 0x28  # MINIDUMP_THREAD.ThreadContext
# (case, mutation, expected message after "bad.dmp: "; {...} from the valid dump's layout)
MALFORMED: list[tuple[str, Mutation, str]] = [
    ("empty", lambda raw, at: b"", "MINIDUMP_HEADER: the file is 0 bytes, shorter than the 32-byte header"),
    ("cut in header", lambda raw, at: bytes(raw[:20]), "MINIDUMP_HEADER: the file is 20 bytes, shorter than the 32-byte header"),
    ("cut in directory", lambda raw, at: bytes(raw[:0x30]), "stream directory: 8 MINIDUMP_DIRECTORY entries at 0x20+0x60 runs past the end of the file (0x30 bytes)"),
    ("cut in streams", lambda raw, at: bytes(raw[:0x200]), "ThreadListStream: Location at {thread_rva:#x}+0x34 runs past the end of the file (0x200 bytes)"),
    ("cut in memory", lambda raw, at: bytes(raw[:-100]), "Memory64ListStream: the memory of {ranges} ranges (BaseRva) at {base_rva:#x}+{data_size:#x} runs past the end of the file ({cut:#x} bytes)"),
    ("bad signature", _put("<I", None, 0, 0x4D444D50), "MINIDUMP_HEADER: Signature 0x4d444d50 is not 'MDMP' (0x504d444d): not a minidump"),
    ("bad version", _put("<I", None, 4, 0xA792), "MINIDUMP_HEADER: Version 0xa792 is not MINIDUMP_VERSION (0xa793)"),
    ("no streams", _put("<I", None, 8, 0), "stream directory: NumberOfStreams is 0"),
    ("directory past EOF", _put("<I", None, 12, 0x7FFFFF00), "stream directory: 8 MINIDUMP_DIRECTORY entries at 0x7fffff00+0x60 runs past the end of the file ({size:#x} bytes)"),
    ("directory in header", _put("<I", None, 12, 8), "stream directory: StreamDirectoryRva 0x8 overlaps the header"),
    ("stream past EOF", _entry(ThreadListStream, 2, lambda at: 0xFFFFFF00), "ThreadListStream: Location at 0xffffff00+0x34 runs past the end of the file ({size:#x} bytes)"),
    ("streams overlap", _entry(ModuleListStream, 2, lambda at: at[ThreadListStream][1]), "ModuleListStream: Location at {thread_rva:#x}+{module_size:#x} points into the ThreadListStream"),
    ("stream over directory", _entry(SystemInfoStream, 2, lambda at: 0x20), "SystemInfoStream: Location at 0x20+0x38 points into the stream directory"),
    ("duplicate stream", _entry(SystemInfoStream, 0, lambda at: ThreadListStream), "ThreadListStream: appears twice in the stream directory"),
    ("no thread list", _entry(ThreadListStream, 0, lambda at: 0), "ThreadListStream: missing: the dump has no ThreadListStream"),
    ("x86", _put("<H", SystemInfoStream, 0, 0), "SystemInfoStream: ProcessorArchitecture 0 is not AMD64 (9): emu reads x64 dumps only"),
    ("thread count 2^31", _put("<I", ThreadListStream, 0, 1 << 31), "ThreadListStream: NumberOfThreads 2147483648 needs 0x1800000004 bytes but the stream has 0x34"),
    ("memory64 count 2^63", _put("<Q", Memory64ListStream, 0, 1 << 63), "Memory64ListStream: NumberOfMemoryRanges 9223372036854775808 needs 0x80000000000000010 bytes but the stream has {mem64_size:#x}"),
    ("memory ranges overlap", lambda raw, at: _copy_range_start(raw, at, 1, 2), "Memory64ListStream: memory ranges at 0x100000000 and 0x100000000 overlap"),
    ("context too small", _put("<I", ThreadListStream, CTX, 0x100), "ThreadListStream: thread 0x1004: ThreadContext is 0x100 bytes, smaller than an x64 CONTEXT (0x4d0)"),
    ("context past EOF", _put("<I", ThreadListStream, CTX + 4, 0xFFFFF000), "ThreadListStream: thread 0x1004: ThreadContext at 0xfffff000+0x4d0 runs past the end of the file ({size:#x} bytes)"),
    ("context points into itself", _put("<I", ThreadListStream, CTX + 4, 0), "ThreadListStream: thread 0x1004: ThreadContext at 0x0+0x4d0 points into the header"),
    ("context in thread list", lambda raw, at: _put("<I", ThreadListStream, CTX + 4, at[ThreadListStream][1])(raw, at), "ThreadListStream: thread 0x1004: ThreadContext at {thread_rva:#x}+0x4d0 points into the ThreadListStream"),
    ("context flags", lambda raw, at: _context_flags(raw, 0x10001F & ~0x100000), "ThreadListStream: thread 0x1004: ContextFlags 0x1f lack CONTEXT_AMD64|CONTROL|INTEGER (0x100003)"),
    ("module name past EOF", _put("<I", ModuleListStream, MODULE + 0x14, 0x7FFFFFF0), "ModuleListStream: module 0 (base 0x7ffac0000000): ModuleNameRva at 0x7ffffff0+0x4 runs past the end of the file ({size:#x} bytes)"),
    ("module name odd length", lambda raw, at: _module_name_length(raw, at, 7), "ModuleListStream: module 0 (base 0x7ffac0000000): ModuleNameRva at {name_rva:#x} has Length 0x7 (expected an even number of bytes up to 64 KiB)"),
    ("module count", _put("<I", ModuleListStream, 0, 0xFFFFFFFF), "ModuleListStream: NumberOfModules 4294967295 needs 0x6bffffff98 bytes but the stream has {module_size:#x}"),
    ("modules overlap", _put("<Q", ModuleListStream, MODULE + MINIDUMP_MODULE.size, 0x7FFAC0000000), "ModuleListStream: modules 'C:\\\\emu\\\\app.dll' and 'C:\\\\Windows\\\\System32\\\\ntdll.dll' overlap"),
    ("emu stream garbage", lambda raw, at: _fill(raw, at[EmuModulesStream][1], b"{\n"), "EmuModulesStream: not emu's JSON (JSONDecodeError)"),
]  # fmt: skip


def _copy_range_start(raw: bytearray, at: dict[int, tuple[int, int, int]], src: int, dst: int) -> bytes:
    """Memory64List: range ``dst`` starts where range ``src`` does (by address: 0 is KUSER_SHARED_DATA, 1 the first allocation)."""
    descs = at[Memory64ListStream][1] + 16
    struct.pack_into("<Q", raw, descs + 16 * dst, struct.unpack_from("<Q", raw, descs + 16 * src)[0])
    return bytes(raw)


def _context_flags(raw: bytearray, flags: int) -> bytes:
    at = _directory(raw)
    ctx = MINIDUMP_THREAD.unpack(raw, at[ThreadListStream][1] + THREAD)["ThreadContext.Rva"]
    struct.pack_into("<I", raw, ctx + 0x30, flags)
    return bytes(raw)


def _module_name_length(raw: bytearray, at: dict[int, tuple[int, int, int]], length: int) -> bytes:
    rva = MINIDUMP_MODULE.unpack(raw, at[ModuleListStream][1] + MODULE)["ModuleNameRva"]
    struct.pack_into("<I", raw, rva, length)
    return bytes(raw)


def _fill(raw: bytearray, rva: int, text: bytes) -> bytes:
    raw[rva : rva + len(text)] = text
    return bytes(raw)


def _layout(raw: bytes) -> dict[str, int]:
    at = _directory(raw)
    mem = at[Memory64ListStream][1]
    ranges, base_rva = struct.unpack_from("<QQ", raw, mem)
    sizes = struct.unpack_from(f"<{2 * ranges}Q", raw, mem + 16)[1::2]
    name = MINIDUMP_MODULE.unpack(raw, at[ModuleListStream][1] + MODULE)["ModuleNameRva"]
    return {
        "size": len(raw), "cut": len(raw) - 100, "thread_rva": at[ThreadListStream][1], "module_size": at[ModuleListStream][2],
        "mem64_size": at[Memory64ListStream][2], "ranges": ranges, "base_rva": base_rva, "data_size": sum(sizes),
        "name_rva": name,
    }  # fmt: skip


@pytest.mark.parametrize(("mutate", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_dump_is_one_dump_error_line(pending_dump: bytes, mutate: Mutation, expected: str) -> None:
    bad = mutate(bytearray(pending_dump), _directory(pending_dump))
    with pytest.raises(DumpError) as e:
        read_minidump(bad, "bad.dmp")
    assert str(e.value) == "bad.dmp: " + expected.format(**_layout(pending_dump))
    assert "\n" not in str(e.value)


def test_memory_list_count_of_2_31(runs: dict[str, Run]) -> None:
    r = runs["callback_roundtrip.toml"]
    raw = bytearray(write_minidump(r, _pending(r), memory64=False))
    at = _directory(raw)
    struct.pack_into("<I", raw, at[MemoryListStream][1], 1 << 31)
    with pytest.raises(DumpError) as e:
        read_minidump(bytes(raw), "bad.dmp")
    assert str(e.value) == (
        f"bad.dmp: MemoryListStream: NumberOfMemoryRanges 2147483648 needs 0x800000004 bytes "
        f"but the stream has {at[MemoryListStream][2]:#x}"
    )


def test_unreadable_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DumpError) as e:
        read_minidump(tmp_path / "missing.dmp")
    assert str(e.value) == f"{tmp_path / 'missing.dmp'}: cannot read: No such file or directory"


# --- fuzz: flipped and truncated dumps → a view or one DumpError line, quickly -----------------

CASE_SECONDS = 1.0


@pytest.fixture(scope="module")
def fuzz_base(pending_dump: bytes) -> tuple[bytes, int]:
    """The valid dump and where its memory bytes start (flips before that hit structures)."""
    return pending_dump, struct.unpack_from("<Q", pending_dump, _directory(pending_dump)[Memory64ListStream][1] + 8)[0]


flips = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255), st.booleans()), min_size=1, max_size=8)
cuts = st.one_of(st.none(), st.integers(0, 1 << 30))


def _check(base: tuple[bytes, int], ops: list[tuple[int, int, bool]], cut: int | None, config: pytest.Config) -> None:
    raw, structure = base
    bad = bytearray(raw)
    for pos, value, in_structure in ops:
        bad[pos % (structure if in_structure else len(bad))] = value
    if cut is not None:
        del bad[cut % len(bad) :]
    t = tally("minidump reader", config)
    with no_hang(10 * CASE_SECONDS):
        try:
            for view in read_minidump(bytes(bad), "fuzz.dmp").threads():
                detect_callback_return_pending(view)
            t.record(None)
        except DumpError as e:
            t.record(e)
            assert "\n" not in str(e) and str(e).startswith("fuzz.dmp: ") and "malformed (" not in str(e), str(e)


@fast_settings(300)
@given(ops=flips, cut=cuts)
def test_fuzzed_dumps_are_read_or_one_dump_error(
    pytestconfig: pytest.Config, fuzz_base: tuple[bytes, int], ops: list[tuple[int, int, bool]], cut: int | None
) -> None:
    _check(fuzz_base, ops, cut, pytestconfig)


@slow_only
@slow_settings(20_000)
@given(ops=flips, cut=cuts)
def test_fuzzed_dumps_slow(
    pytestconfig: pytest.Config, fuzz_base: tuple[bytes, int], ops: list[tuple[int, int, bool]], cut: int | None
) -> None:
    _check(fuzz_base, ops, cut, pytestconfig)


# --- what real tools expect of a user-mode dump -----------------------------------------------


def test_regions_are_whole_pages_and_hold_teb_peb_kuser_and_the_thread_info(
    runs: dict[str, Run], caplog: pytest.LogCaptureFixture
) -> None:
    from minidump.minidumpfile import MinidumpFile

    from emu.dump.streams import CONTEXT_ALL
    from emu.winnt import KUSER_SHARED_DATA, TEB_PEB

    r = runs["callback_roundtrip.toml"]
    s = _pending(r)
    view = read_minidump(write_minidump(r, s), "pending.dmp")
    assert all(g.base % 0x1000 == 0 and g.size % 0x1000 == 0 for g in view.regions)
    assert all(start % 0x1000 == 0 and len(d) % 0x1000 == 0 for start, d in view.memory)
    teb = r.threads[s.thread].teb
    peb = int.from_bytes(view.read(teb + TEB_PEB, 8) or b"", "little")
    assert peb and view.read(peb, 0x10) is not None
    assert view.read(KUSER_SHARED_DATA + 0x308, 1) is not None  # KUSER_SHARED_DATA.SystemCall
    assert view.read(r.images[0].base, 2) == b"MZ"  # every module's headers
    data = write_minidump(r, s, full=True)
    with caplog.at_level(logging.DEBUG):
        mf = MinidumpFile.parse_bytes(data)
    assert not [x.getMessage() for x in caplog.records if x.levelno >= logging.WARNING]
    assert mf.threads.threads[0].ContextObject.ContextFlags == CONTEXT_ALL
    assert mf.threads.threads[0].ContextObject.SegCs == 0x33 and mf.threads.threads[0].ContextObject.SegSs == 0x2B
    assert [t.ThreadId for t in mf.thread_info.infos] == [thread_id(s.thread)]
    assert mf.sysinfo.BuildNumber == r.scenario.profile.build


def test_handle_data_lists_the_scenarios_events_and_mutants(runs: dict[str, Run]) -> None:
    from minidump.minidumpfile import MinidumpFile

    r = run(ROOT / "scenarios" / "threads_no_deadlock.toml")
    mf = MinidumpFile.parse_bytes(write_minidump(r, r.trace.states[-1]))
    got = sorted((h.Handle, h.TypeName) for h in mf.handles.handles)
    assert got == sorted((o.handle, "Event" if o.kind == "event" else "Mutant") for o in r.scenario.objects) and got
