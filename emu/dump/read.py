"""Read a minidump into debugger-style views: emu's own reader, which trusts no size in the file.

Every RVA and size is checked against the file before use; streams may not overlap the
header, the stream directory or each other, and nothing a stream points to may lie inside
one of them (which also rules out a descriptor pointing into itself). Counts are checked
against the size of their stream before anything is allocated, and no pointer is followed
more than one step, so a malformed file cannot make the reader loop. Anything wrong is
one :class:`~emu.errors.DumpError` line: ``FILE: STREAM: what is wrong``.

:meth:`DumpView.threads` gives one :class:`~emu.detection.view.ThreadView` per thread: the
context from its CONTEXT, the memory outside modules, and the modules with their images
rebuilt from the dump's memory (exports from emu's own stream, else from the PE export
directory in memory). ``kernel_mode`` is None: a dump cannot tell.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from emu.context import UserContext
from emu.detection.view import ModuleInfo, ThreadView
from emu.dump.format import (
    CONTEXT,
    CONTEXT_AMD64,
    CONTEXT_CONTROL,
    CONTEXT_INTEGER,
    CONTEXT_REGISTERS,
    CONTEXT_SIZE,
    MINIDUMP_DIRECTORY,
    MINIDUMP_HEADER,
    MINIDUMP_MEMORY64_LIST,
    MINIDUMP_MEMORY_DESCRIPTOR,
    MINIDUMP_MEMORY_DESCRIPTOR64,
    MINIDUMP_MEMORY_INFO,
    MINIDUMP_MEMORY_INFO_LIST,
    MINIDUMP_MISC1_PROCESS_ID,
    MINIDUMP_MISC_INFO,
    MINIDUMP_MODULE,
    MINIDUMP_SIGNATURE,
    MINIDUMP_STRING_MAX,
    MINIDUMP_SYSTEM_INFO,
    MINIDUMP_THREAD,
    MINIDUMP_VERSION,
    PAGE_GUARD,
    PERMS_BY_PROTECT,
    PROCESSOR_ARCHITECTURE_AMD64,
    STREAM_NAMES,
    EmuKernelStream,
    EmuModulesStream,
    Memory64ListStream,
    MemoryInfoListStream,
    MemoryListStream,
    MiscInfoStream,
    ModuleListStream,
    SystemInfoStream,
    ThreadListStream,
    UnusedStream,
    stream_name,
)
from emu.dump.modules import EmuModule, parse_emu_stream, pe_exports
from emu.errors import DumpError
from emu.loader.image import PAGE, Image, Section

ADDRESS_LIMIT = 1 << 64
_UNEXPECTED = (ValueError, IndexError, KeyError, OverflowError, RecursionError, struct.error)


@dataclass(frozen=True)
class SystemInfo:
    """MINIDUMP_SYSTEM_INFO as read: processor and Windows version."""

    processor_architecture: int
    major: int
    minor: int
    build: int
    platform_id: int
    csd_version: str
    number_of_processors: int


@dataclass(frozen=True)
class MemoryRegion:
    """One MINIDUMP_MEMORY_INFO entry (what VirtualQuery said about a range)."""

    base: int
    size: int
    allocation_base: int
    state: int
    protect: int
    type: int

    @property
    def perms(self) -> str:
        return "" if self.guard else PERMS_BY_PROTECT.get(self.protect & 0xFF, "r")

    @property
    def guard(self) -> bool:
        """A guard page: no access until its first touch (emu maps it so)."""
        return bool(self.protect & PAGE_GUARD)


@dataclass(frozen=True)
class DumpThread:
    """One MINIDUMP_THREAD with its CONTEXT decoded."""

    thread_id: int
    teb: int
    suspend_count: int
    context: UserContext
    context_flags: int
    stack: tuple[int, bytes]


@dataclass(frozen=True)
class DumpView:
    """What a minidump holds, as emu reads it."""

    name: str
    system: SystemInfo
    process_id: int | None
    thread_records: tuple[DumpThread, ...]
    modules: tuple[ModuleInfo, ...]
    memory: tuple[tuple[int, bytes], ...]  # every range with bytes, by address
    regions: tuple[MemoryRegion, ...]
    source: dict[str, object] = field(default_factory=dict)  # what emu's stream says the dump was made from
    kernel_stream: bytes = b""  # EmuKernelStream as written (emu.dump.kernel_stream reads it)

    def read(self, address: int, size: int) -> bytes | None:
        """Bytes from one memory range of the dump, or None where the dump has none."""
        return _memory_reader(self.memory)(address, size)

    def threads(self) -> list[ThreadView]:
        """One ThreadView per thread, in ThreadList order (emu writes the dumped state's thread first):
        its context, the stack memory (every thread's stack: the allocations holding the threads'
        Stack ranges, or all memory outside modules when the dump has no MemoryInfoList), the modules."""
        outside = tuple((s, d) for s, d in self.memory if not any(m.contains(s) for m in self.modules))
        stacks = {a for t in self.thread_records if t.stack[1] and (a := self.allocation_of(t.stack[0])) is not None}
        if self.regions:  # stack memory only (a dump also holds TEBs, the PEB, KUSER_SHARED_DATA...)
            outside = tuple((s, d) for s, d in outside if self.allocation_of(s) in stacks)
        views = []
        for t in self.thread_records:
            memory = outside
            start, data = t.stack
            if data and not any(s <= start < s + len(d) for s, d in self.memory):
                memory = tuple(sorted((*outside, t.stack)))  # a stack the memory list does not hold
            views.append(ThreadView(t.thread_id, t.context, memory, self.modules, None))
        return views

    def allocation_of(self, address: int) -> int | None:
        """The AllocationBase of the MemoryInfoList region holding ``address``, if the dump describes it."""
        for r in self.regions:
            if r.base <= address < r.base + r.size:
                return r.allocation_base
        return None

    def thread(self, thread_id: int) -> ThreadView:
        for v in self.threads():
            if v.thread == thread_id:
                return v
        raise DumpError(f"{self.name}: ThreadListStream: no thread {thread_id:#x}")


def read_minidump(source: str | Path | bytes, name: str | None = None) -> DumpView:
    """Read a minidump from a path or from bytes.

    Raises:
        DumpError: one line naming the file, the stream and what is wrong.
    """
    if isinstance(source, bytes | bytearray):
        data, label = bytes(source), name or "<bytes>"
    else:
        label = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise DumpError(f"{label}: cannot read: {e.strerror or e}") from None
    reader = _Reader(data, label)
    try:
        return reader.parse()
    except _UNEXPECTED as e:  # a check this reader lacks: still one line, never a traceback
        reader.fail(f"malformed ({type(e).__name__}: {e})")


class _Reader:
    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.name = name
        self.where = "MINIDUMP_HEADER"
        self.taken: list[tuple[int, int, str]] = []  # header, directory, streams: nothing may point inside

    # --- checks ---------------------------------------------------------------------------
    def fail(self, what: str) -> NoReturn:
        line = f"{self.name}: {self.where}: {what}"
        raise DumpError(line.replace("\r", "\\r").replace("\n", "\\n"))

    def need(self, rva: int, size: int, what: str) -> bytes:
        if rva + size > len(self.data):
            self.fail(f"{what} at {rva:#x}+{size:#x} runs past the end of the file ({len(self.data):#x} bytes)")
        return self.data[rva : rva + size]

    def blob(self, rva: int, size: int, what: str) -> bytes:
        """Bytes a descriptor points to: inside the file and outside the header, directory and streams."""
        if size == 0:
            return b""  # an empty location points nowhere (Rva 0 is usual)
        out = self.need(rva, size, what)
        if size:
            for start, end, label in self.taken:
                if rva < end and start < rva + size:
                    self.fail(f"{what} at {rva:#x}+{size:#x} points into the {label}")
        return out

    def counted(self, stream: bytes, head: int, count: int, entry: int, what: str) -> None:
        """An array of ``count`` entries after ``head`` bytes must fit in its stream."""
        need = head + count * entry
        if need > len(stream):
            self.fail(f"{what} {count} needs {need:#x} bytes but the stream has {len(stream):#x}")

    def string(self, rva: int, what: str) -> str:
        length = int.from_bytes(self.blob(rva, 4, what), "little")
        if length % 2 or length > MINIDUMP_STRING_MAX:
            self.fail(f"{what} at {rva:#x} has Length {length:#x} (expected an even number of bytes up to 64 KiB)")
        raw = self.blob(rva + 4, length, what)
        try:
            return raw.decode("utf-16-le")
        except UnicodeDecodeError:
            self.fail(f"{what} at {rva:#x} is not UTF-16")

    # --- the file ---------------------------------------------------------------------------
    def parse(self) -> DumpView:
        streams = self.directory()
        self.where = "SystemInfoStream"
        if SystemInfoStream not in streams:
            self.fail("missing: the dump has no SystemInfoStream")
        system = self.system_info(streams[SystemInfoStream])
        process_id = None
        if MiscInfoStream in streams:
            self.where = "MiscInfoStream"
            process_id = self.misc_info(streams[MiscInfoStream])
        regions: list[MemoryRegion] = []
        if MemoryInfoListStream in streams:
            self.where = "MemoryInfoListStream"
            regions = self.memory_info(streams[MemoryInfoListStream])
        memory: list[tuple[int, bytes]] = []
        if MemoryListStream in streams:
            self.where = "MemoryListStream"
            memory += self.memory_list(streams[MemoryListStream])
        if Memory64ListStream in streams:
            self.where = "Memory64ListStream"
            memory += self.memory64_list(streams[Memory64ListStream])
        memory.sort(key=lambda r: r[0])
        for (a, da), (b, _) in itertools.pairwise(memory):
            if b < a + len(da):
                self.fail(f"memory ranges at {a:#x} and {b:#x} overlap")
        self.where = "ThreadListStream"
        if ThreadListStream not in streams:
            self.fail("missing: the dump has no ThreadListStream")
        threads = self.thread_list(streams[ThreadListStream])
        emu: dict[int, EmuModule] = {}
        source: dict[str, object] = {}
        if EmuModulesStream in streams:
            self.where = "EmuModulesStream"
            source, mods = parse_emu_stream(streams[EmuModulesStream], self.fail)
            emu = {m.base: m for m in mods}
        modules: tuple[ModuleInfo, ...] = ()
        if ModuleListStream in streams:
            self.where = "ModuleListStream"
            modules = self.module_list(streams[ModuleListStream], memory, regions, emu)
        kernel = streams.get(EmuKernelStream, b"")
        return DumpView(self.name, system, process_id, threads, modules, tuple(memory), tuple(regions), source, kernel)

    def directory(self) -> dict[int, bytes]:
        if len(self.data) < MINIDUMP_HEADER.size:
            self.fail(f"the file is {len(self.data)} bytes, shorter than the {MINIDUMP_HEADER.size}-byte header")
        h = MINIDUMP_HEADER.unpack(self.data)
        if h["Signature"] != MINIDUMP_SIGNATURE:
            self.fail(f"Signature {h['Signature']:#010x} is not 'MDMP' ({MINIDUMP_SIGNATURE:#010x}): not a minidump")
        if h["Version"] & 0xFFFF != MINIDUMP_VERSION:
            self.fail(f"Version {h['Version'] & 0xFFFF:#06x} is not MINIDUMP_VERSION ({MINIDUMP_VERSION:#06x})")
        n, rva = h["NumberOfStreams"], h["StreamDirectoryRva"]
        self.where = "stream directory"
        if n == 0:
            self.fail("NumberOfStreams is 0")
        if rva < MINIDUMP_HEADER.size:
            self.fail(f"StreamDirectoryRva {rva:#x} overlaps the header")
        size = n * MINIDUMP_DIRECTORY.size
        self.need(rva, size, f"{n} MINIDUMP_DIRECTORY entries")
        self.taken = [(0, MINIDUMP_HEADER.size, "header"), (rva, rva + size, "stream directory")]
        found: dict[int, tuple[int, int]] = {}
        for i in range(n):
            d = MINIDUMP_DIRECTORY.unpack(self.data, rva + i * MINIDUMP_DIRECTORY.size)
            kind, loc_size, loc_rva = d["StreamType"], d["Location.DataSize"], d["Location.Rva"]
            if kind == UnusedStream:
                continue
            self.where = stream_name(kind)
            self.blob(loc_rva, loc_size, "Location")
            if kind in STREAM_NAMES:
                if kind in found:
                    self.fail("appears twice in the stream directory")
                found[kind] = (loc_rva, loc_size)
            if loc_size:
                self.taken.append((loc_rva, loc_rva + loc_size, self.where))
        return {k: self.data[r : r + s] for k, (r, s) in found.items()}

    def system_info(self, s: bytes) -> SystemInfo:
        if len(s) < MINIDUMP_SYSTEM_INFO.size:
            self.fail(f"the stream is {len(s)} bytes, shorter than MINIDUMP_SYSTEM_INFO ({MINIDUMP_SYSTEM_INFO.size})")
        v = MINIDUMP_SYSTEM_INFO.unpack(s)
        if v["ProcessorArchitecture"] != PROCESSOR_ARCHITECTURE_AMD64:
            self.fail(f"ProcessorArchitecture {v['ProcessorArchitecture']} is not AMD64 (9): emu reads x64 dumps only")
        csd = self.string(v["CSDVersionRva"], "CSDVersion") if v["CSDVersionRva"] else ""
        return SystemInfo(
            v["ProcessorArchitecture"], v["MajorVersion"], v["MinorVersion"], v["BuildNumber"], v["PlatformId"],
            csd, v["NumberOfProcessors"],
        )  # fmt: skip

    def misc_info(self, s: bytes) -> int | None:
        if len(s) < MINIDUMP_MISC_INFO.size:
            self.fail(f"the stream is {len(s)} bytes, shorter than MINIDUMP_MISC_INFO ({MINIDUMP_MISC_INFO.size})")
        v = MINIDUMP_MISC_INFO.unpack(s)
        return v["ProcessId"] if v["Flags1"] & MINIDUMP_MISC1_PROCESS_ID else None

    def memory_info(self, s: bytes) -> list[MemoryRegion]:
        if len(s) < MINIDUMP_MEMORY_INFO_LIST.size:
            self.fail(f"the stream is {len(s)} bytes, shorter than MINIDUMP_MEMORY_INFO_LIST")
        h = MINIDUMP_MEMORY_INFO_LIST.unpack(s)
        head, entry, n = h["SizeOfHeader"], h["SizeOfEntry"], h["NumberOfEntries"]
        if head < MINIDUMP_MEMORY_INFO_LIST.size or entry < MINIDUMP_MEMORY_INFO.size:
            self.fail(f"SizeOfHeader {head} / SizeOfEntry {entry} are smaller than the structures (16 / 48)")
        self.counted(s, head, n, entry, "NumberOfEntries")
        out = []
        for i in range(n):
            v = MINIDUMP_MEMORY_INFO.unpack(s, head + i * entry)
            base, size = v["BaseAddress"], v["RegionSize"]
            if base + size > ADDRESS_LIMIT:
                self.fail(f"region {base:#x}+{size:#x} runs past the top of the address space")
            out.append(MemoryRegion(base, size, v["AllocationBase"], v["State"], v["Protect"], v["Type"]))
        out.sort(key=lambda r: r.base)
        for a, b in itertools.pairwise(out):
            if b.base < a.base + a.size:
                self.fail(f"regions at {a.base:#x} and {b.base:#x} overlap")
        return out

    def memory_list(self, s: bytes) -> list[tuple[int, bytes]]:
        n = int.from_bytes(self.need_in(s, 4, "NumberOfMemoryRanges"), "little")
        self.counted(s, 4, n, MINIDUMP_MEMORY_DESCRIPTOR.size, "NumberOfMemoryRanges")
        out = []
        for i in range(n):
            v = MINIDUMP_MEMORY_DESCRIPTOR.unpack(s, 4 + i * MINIDUMP_MEMORY_DESCRIPTOR.size)
            start, size = v["StartOfMemoryRange"], v["Memory.DataSize"]
            self.address_range(start, size)
            out.append((start, self.blob(v["Memory.Rva"], size, f"memory range {start:#x}")))
        return [r for r in out if r[1]]

    def memory64_list(self, s: bytes) -> list[tuple[int, bytes]]:
        if len(s) < MINIDUMP_MEMORY64_LIST.size:
            self.fail(f"the stream is {len(s)} bytes, shorter than MINIDUMP_MEMORY64_LIST (16)")
        h = MINIDUMP_MEMORY64_LIST.unpack(s)
        n, rva = h["NumberOfMemoryRanges"], h["BaseRva"]
        self.counted(s, MINIDUMP_MEMORY64_LIST.size, n, MINIDUMP_MEMORY_DESCRIPTOR64.size, "NumberOfMemoryRanges")
        descs = [
            MINIDUMP_MEMORY_DESCRIPTOR64.unpack(s, MINIDUMP_MEMORY64_LIST.size + i * MINIDUMP_MEMORY_DESCRIPTOR64.size)
            for i in range(n)
        ]
        total = 0
        for v in descs:
            self.address_range(v["StartOfMemoryRange"], v["DataSize"])
            total += v["DataSize"]
        self.blob(rva, total, f"the memory of {n} ranges (BaseRva)")
        out = []
        for v in descs:
            size = v["DataSize"]
            if size:
                out.append((v["StartOfMemoryRange"], self.data[rva : rva + size]))
            rva += size
        return out

    def need_in(self, s: bytes, size: int, what: str) -> bytes:
        if len(s) < size:
            self.fail(f"the stream is {len(s)} bytes, too short for {what}")
        return s[:size]

    def address_range(self, start: int, size: int) -> None:
        if start + size > ADDRESS_LIMIT:
            self.fail(f"memory range {start:#x}+{size:#x} runs past the top of the address space")

    def thread_list(self, s: bytes) -> tuple[DumpThread, ...]:
        n = int.from_bytes(self.need_in(s, 4, "NumberOfThreads"), "little")
        self.counted(s, 4, n, MINIDUMP_THREAD.size, "NumberOfThreads")
        out: list[DumpThread] = []
        for i in range(n):
            t = MINIDUMP_THREAD.unpack(s, 4 + i * MINIDUMP_THREAD.size)
            tid = t["ThreadId"]
            if any(o.thread_id == tid for o in out):
                self.fail(f"thread {tid:#x} is listed twice")
            size, rva = t["ThreadContext.DataSize"], t["ThreadContext.Rva"]
            if size < CONTEXT_SIZE:
                self.fail(
                    f"thread {tid:#x}: ThreadContext is {size:#x} bytes, smaller than an x64 CONTEXT ({CONTEXT_SIZE:#x})"
                )
            c = CONTEXT.unpack(self.blob(rva, CONTEXT_SIZE, f"thread {tid:#x}: ThreadContext"))
            flags = c["ContextFlags"]
            want = CONTEXT_AMD64 | CONTEXT_CONTROL | CONTEXT_INTEGER
            if flags & want != want:
                self.fail(f"thread {tid:#x}: ContextFlags {flags:#x} lack CONTEXT_AMD64|CONTROL|INTEGER ({want:#x})")
            ctx = UserContext(*(c[CONTEXT_REGISTERS[r]] for r in UserContext._fields))
            start, ssize = t["Stack.StartOfMemoryRange"], t["Stack.Memory.DataSize"]
            self.address_range(start, ssize)
            stack = self.blob(t["Stack.Memory.Rva"], ssize, f"thread {tid:#x}: Stack") if ssize else b""
            out.append(DumpThread(tid, t["Teb"], t["SuspendCount"], ctx, flags, (start, stack)))
        return tuple(out)

    def module_list(
        self, s: bytes, memory: list[tuple[int, bytes]], regions: list[MemoryRegion], emu: dict[int, EmuModule]
    ) -> tuple[ModuleInfo, ...]:
        n = int.from_bytes(self.need_in(s, 4, "NumberOfModules"), "little")
        self.counted(s, 4, n, MINIDUMP_MODULE.size, "NumberOfModules")
        raw = []
        for i in range(n):
            m = MINIDUMP_MODULE.unpack(s, 4 + i * MINIDUMP_MODULE.size)
            base, size = m["BaseOfImage"], m["SizeOfImage"]
            path = self.string(m["ModuleNameRva"], f"module {i} (base {base:#x}): ModuleNameRva")
            if size == 0 or base + size > ADDRESS_LIMIT:
                self.fail(f"module {path!r}: SizeOfImage {size:#x} at {base:#x} is empty or past the address space")
            for rec in ("CvRecord", "MiscRecord"):
                self.blob(m[f"{rec}.Rva"], m[f"{rec}.DataSize"], f"module {path!r}: {rec}")
            raw.append((base, size, path))
        raw.sort(key=lambda t: t[0])  # stable: ties keep the file's order
        for (a, asz, ap), (b, _, bp) in itertools.pairwise(raw):
            if b < a + asz:
                self.fail(f"modules {ap!r} and {bp!r} overlap")
        return tuple(_module(base, size, path, memory, regions, emu.get(base)) for base, size, path in raw)


def _memory_reader(
    memory: list[tuple[int, bytes]] | tuple[tuple[int, bytes], ...],
) -> Callable[[int, int], bytes | None]:
    """Reads from sorted, non-overlapping ranges (binary search: real dumps have thousands)."""
    starts = [s for s, _ in memory]

    def read(address: int, size: int) -> bytes | None:
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0:
            start, data = memory[i]
            if address + size <= start + len(data):
                return data[address - start : address - start + size]
        return None

    return read


def _module(
    base: int, size: int, path: str, memory: list[tuple[int, bytes]], regions: list[MemoryRegion],
    record: EmuModule | None,
) -> ModuleInfo:  # fmt: skip
    """A module with an Image rebuilt from the dump's memory in its range."""
    read = _memory_reader(memory)
    inside = [(s, d) for s, d in memory if base <= s < base + size]
    headers = b""
    sections: list[Section] = []
    symbols: dict[str, int] = {}
    if record is not None:
        name, exports, pdata = record.name, {n: base + rva for n, rva in record.exports.items()}, record.pdata
        symbols = {n: base + rva for n, rva in record.symbols.items()}
        if record.headers:
            headers = read(base, PAGE) or b""
        for sec in record.sections:
            data = read(base + sec.rva, sec.size)
            if data is not None:
                sections.append(Section(sec.name, sec.rva, data, sec.perms, sec.size))
    else:
        stem = path.replace("/", "\\").rsplit("\\", 1)[-1]
        name = stem.rsplit(".", 1)[0] if "." in stem else stem
        exports, pdata = pe_exports(read, base, size), b""
        for start, data in inside:
            if start == base and data[:2] == b"MZ":
                headers = data[:PAGE]
                if len(data) <= PAGE:
                    continue
            perms = next((r.perms for r in regions if r.base <= start < r.base + r.size), "r")
            sections.append(Section(f"mem_{start - base:x}", start - base, data, perms, len(data)))
    image = Image(name=name, base=base, sections=sections, exports=dict(exports), symbols={**symbols, **exports})
    image.headers, image.pdata, image.path = headers, pdata, path
    return ModuleInfo(name, base, size, dict(exports), image)
