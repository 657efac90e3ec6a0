"""Write a minidump of one recorded state: what a debugger would save of that thread.

The file has the streams a user-mode dump of the thread would have (MS
``minidumpapiset.h``): SystemInfo (AMD64, the profile's Windows version), ThreadList with
the thread's user-mode x64 CONTEXT, ModuleList, Memory64List (or MemoryList) with the
stack from RSP up and each image's headers and sections, MemoryInfoList and MiscInfo —
plus emu's own ``EmuModulesStream`` with the export names, section names and unwind data
of each module, because images emu assembles have no PE export directory to read them from.

Only the user-mode context goes in: a dump cannot tell that the thread is in kernel
mode, and nothing else from the kernel model is written. Image memory is the images as
loaded (writes to their data sections during the run are not recorded per state). The
same state always gives the same bytes: no clock, no host paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emu.dump_format import (
    CONTEXT,
    CONTEXT_CONTROL,
    CONTEXT_INTEGER,
    CONTEXT_REGISTERS,
    CONTEXT_SEGMENTS,
    CONTEXT_SIZE,
    INITIAL_MXCSR,
    MEM_COMMIT,
    MEM_IMAGE,
    MEM_PRIVATE,
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
    MINIDUMP_SYSTEM_INFO,
    MINIDUMP_THREAD,
    MINIDUMP_VERSION,
    PAGE_EXECUTE_WRITECOPY,
    PAGE_READWRITE,
    PROCESSOR_ARCHITECTURE_AMD64,
    PROTECT_BY_PERMS,
    SEG_CS,
    SEG_DATA,
    SEG_FS,
    VER_NT_WORKSTATION,
    VER_PLATFORM_WIN32_NT,
    VS_FFI_SIGNATURE,
    VS_FFI_STRUCVERSION,
    EmuModulesStream,
    Memory64ListStream,
    MemoryInfoListStream,
    MemoryListStream,
    MiniDumpWithFullMemoryInfo,
    MiscInfoStream,
    ModuleListStream,
    SystemInfoStream,
    ThreadListStream,
)
from emu.dump_modules import emu_stream
from emu.engine import PROCESS_ID, THREAD_ID_BASE  # the engine owns the numbering
from emu.errors import DumpError
from emu.image import PAGE, Image, page_align
from emu.writing import write_atomic

if TYPE_CHECKING:
    from emu.engine import Run
    from emu.trace import State

BUILTIN_MODULES = ("ntdll", "win32u")  # emu's own runtime, named as System32 DLLs
NORMAL_PRIORITY_CLASS = 0x20  # winbase.h; Priority 0 is THREAD_PRIORITY_NORMAL


@dataclass(frozen=True)
class Region:
    """One MINIDUMP_MEMORY_INFO entry, and its bytes when the dump holds them."""

    start: int
    size: int
    perms: str
    allocation_base: int
    kind: int  # MEM_IMAGE or MEM_PRIVATE
    data: bytes | None = None


def thread_id(index: int) -> int:
    """The Windows thread id emu gives thread ``index`` (its TEB's ClientId.UniqueThread)."""
    return THREAD_ID_BASE + 4 * index


def module_path(image: Image) -> str:
    """The MINIDUMP_MODULE name: a Windows path, never a host path (dumps must not depend on the host)."""
    name = image.name if "." in image.name else f"{image.name}.dll"
    if image.name.lower().removesuffix(".dll") in BUILTIN_MODULES:
        return f"C:\\Windows\\System32\\{name}"
    return f"C:\\emu\\{name}"


def csd_version(title: str) -> str:
    """MINIDUMP_SYSTEM_INFO's CSDVersion: 'Service Pack 1' for a profile titled '... SP1 ...', else ''."""
    m = re.search(r"\bSP(\d+)\b", title)
    return f"Service Pack {m.group(1)}" if m else ""


def image_regions(image: Image) -> list[Region]:
    """The header page and the sections as mapped (page-aligned, zero-filled, never overlapping)."""
    head = max(PAGE, len(image.headers))  # the machine maps a header page for every image
    spans = [(image.base, head, "r", image.headers)]
    spans += [(image.base + s.rva, s.size, s.perms, s.data) for s in image.sections]
    spans.sort(key=lambda t: t[0])
    out: list[Region] = []
    for i, (start, size, perms, data) in enumerate(spans):
        end = start + page_align(max(size, 1))
        if i + 1 < len(spans):
            end = min(end, spans[i + 1][0])
        if out and start < out[-1].start + out[-1].size:
            continue  # a section inside the one before it (never in images emu builds)
        if end > start:
            body = data[: end - start]
            out.append(Region(start, end - start, perms, image.base, MEM_IMAGE, body + bytes(end - start - len(body))))
    return out


def stack_regions(rsp: int, stack: bytes, limit: int, base: int) -> list[Region]:
    """The stack allocation, split at RSP: emu records the bytes from RSP up, so that part holds data.

    A Memory64List range must start where a MemoryInfoList region starts (udmp-parser, for
    one, looks ranges up by region base), hence a region boundary at RSP, unaligned.
    """

    def private(start: int, end: int, data: bytes | None = None) -> Region:
        return Region(start, end - start, "rw", limit, MEM_PRIVATE, data)

    if not (stack and limit <= rsp < base):
        return [private(limit, base)] if base > limit else []
    top = rsp + len(stack)
    out = [private(limit, rsp)] if rsp > limit else []
    out.append(private(rsp, top, stack))
    if top < base:
        out.append(private(top, base))
    return out


def _pe_stamps(headers: bytes) -> tuple[int, int]:
    """(CheckSum, TimeDateStamp) from PE headers (IMAGE_NT_HEADERS64), or zeros for an assembled image."""
    if len(headers) < 0x40:
        return 0, 0
    nt = int.from_bytes(headers[0x3C:0x40], "little")
    if headers[nt : nt + 4] != b"PE\0\0" or len(headers) < nt + 0x5C:
        return 0, 0
    stamp = int.from_bytes(headers[nt + 8 : nt + 12], "little")  # IMAGE_FILE_HEADER.TimeDateStamp
    checksum = int.from_bytes(headers[nt + 0x58 : nt + 0x5C], "little")  # IMAGE_OPTIONAL_HEADER64.CheckSum
    return checksum, stamp


def minidump_string(text: str) -> bytes:
    """MINIDUMP_STRING: Length in bytes (without the terminator), then UTF-16LE and a null WCHAR."""
    raw = text.encode("utf-16-le")
    return len(raw).to_bytes(4, "little") + raw + b"\0\0"


def context_bytes(state: State) -> bytes:
    """The thread's user-mode x64 CONTEXT (0x4D0 bytes): control, integer and segment registers."""
    values: dict[str, int | bytes] = {
        "ContextFlags": CONTEXT_CONTROL | CONTEXT_INTEGER | CONTEXT_SEGMENTS,
        "MxCsr": INITIAL_MXCSR, "FltSave.MxCsr": INITIAL_MXCSR,
        "SegCs": SEG_CS, "SegDs": SEG_DATA, "SegEs": SEG_DATA, "SegFs": SEG_FS, "SegGs": SEG_DATA, "SegSs": SEG_DATA,
    }  # fmt: skip
    for reg, fname in CONTEXT_REGISTERS.items():
        values[fname] = getattr(state.context, reg) & (0xFFFF_FFFF if fname == "EFlags" else 0xFFFF_FFFF_FFFF_FFFF)
    return CONTEXT.pack(values)


def _memory_info(r: Region) -> bytes:
    return MINIDUMP_MEMORY_INFO.pack({
        "BaseAddress": r.start, "AllocationBase": r.allocation_base, "RegionSize": r.size, "State": MEM_COMMIT,
        "AllocationProtect": PAGE_EXECUTE_WRITECOPY if r.kind == MEM_IMAGE else PAGE_READWRITE,
        "Protect": PROTECT_BY_PERMS.get(r.perms, PAGE_READWRITE), "Type": r.kind,
    })  # fmt: skip


class _File:
    """The file being laid out: blobs appended at aligned offsets (RVAs)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def add(self, data: bytes, align: int = 8) -> int:
        self.buf += bytes(-len(self.buf) % align)
        rva = len(self.buf)
        self.buf += data
        return rva


def write_minidump(run: Run, state: State, path: str | Path | None = None, *, memory64: bool = True) -> bytes:
    """A minidump of ``state`` (a state of ``run``); written atomically to ``path`` when given.

    ``memory64`` picks Memory64ListStream (what full-memory dumps use, and what
    udmp-parser reads) or MemoryListStream (what MiniDumpNormal uses).

    Raises:
        DumpError: the state's thread is not part of the run.
    """
    thread = run.threads.get(state.thread)
    if thread is None:
        raise DumpError(f"state s{state.id}: thread {state.thread} is not part of the run")
    images = sorted(run.images, key=lambda i: i.base)
    regions = [r for img in images for r in image_regions(img)]
    regions += stack_regions(state.context.rsp, state.stack, thread.stack_limit, thread.stack_base)
    regions.sort(key=lambda r: r.start)
    ranges = [r for r in regions if r.data]
    stack_index = next((i for i, r in enumerate(ranges) if r.kind == MEM_PRIVATE), None)
    first = _layout(run, state, thread.teb, images, regions, ranges, stack_index, 0, memory64)
    data_base = len(first.buf) + (-len(first.buf) % 16)
    f = _layout(run, state, thread.teb, images, regions, ranges, stack_index, data_base, memory64)
    f.add(b"".join(r.data or b"" for r in ranges), 16)
    out = bytes(f.buf)
    if path is not None:
        write_atomic(path, out)
    return out


def _layout(
    run: Run, state: State, teb: int, images: list[Image], regions: list[Region], ranges: list[Region],
    stack_index: int | None, data_base: int, memory64: bool,
) -> _File:  # fmt: skip
    """Everything but the memory bytes, which go at ``data_base`` (known after a first pass)."""
    f = _File()
    streams: list[tuple[int, int, int]] = []  # (StreamType, DataSize, Rva)

    def stream(kind: int, data: bytes) -> None:
        streams.append((kind, len(data), f.add(data)))

    count = 7
    f.add(MINIDUMP_HEADER.pack({
        "Signature": MINIDUMP_SIGNATURE, "Version": MINIDUMP_VERSION, "NumberOfStreams": count,
        "StreamDirectoryRva": MINIDUMP_HEADER.size, "Flags": MiniDumpWithFullMemoryInfo,
    }))  # fmt: skip
    directory = f.add(bytes(MINIDUMP_DIRECTORY.size * count), 4)

    offsets, pos = [], data_base
    for r in ranges:
        offsets.append(pos)
        pos += len(r.data or b"")

    ctx = f.add(context_bytes(state), 16)
    stack_start, stack_size, stack_rva = state.context.rsp, 0, 0
    if stack_index is not None:
        stack_start, stack_size, stack_rva = ranges[stack_index].start, ranges[stack_index].size, offsets[stack_index]
    stream(ThreadListStream, (1).to_bytes(4, "little") + MINIDUMP_THREAD.pack({
        "ThreadId": thread_id(state.thread), "SuspendCount": 1,  # MiniDumpWriteDump suspends the threads it dumps
        "PriorityClass": NORMAL_PRIORITY_CLASS, "Teb": teb,
        "Stack.StartOfMemoryRange": stack_start, "Stack.Memory.DataSize": stack_size, "Stack.Memory.Rva": stack_rva,
        "ThreadContext.DataSize": CONTEXT_SIZE, "ThreadContext.Rva": ctx,
    }))  # fmt: skip

    names = [f.add(minidump_string(module_path(img)), 4) for img in images]
    entries = []
    for img, name in zip(images, names):
        checksum, stamp = _pe_stamps(img.headers)
        entries.append(MINIDUMP_MODULE.pack({
            "BaseOfImage": img.base, "SizeOfImage": img.size, "CheckSum": checksum, "TimeDateStamp": stamp,
            "ModuleNameRva": name, "VersionInfo.dwSignature": VS_FFI_SIGNATURE,
            "VersionInfo.dwStrucVersion": VS_FFI_STRUCVERSION,
        }))  # fmt: skip
    stream(ModuleListStream, len(images).to_bytes(4, "little") + b"".join(entries))

    if memory64:
        descs = [MINIDUMP_MEMORY_DESCRIPTOR64.pack({"StartOfMemoryRange": r.start, "DataSize": r.size}) for r in ranges]
        head = MINIDUMP_MEMORY64_LIST.pack({"NumberOfMemoryRanges": len(ranges), "BaseRva": data_base})
        stream(Memory64ListStream, head + b"".join(descs))
    else:
        descs = [
            MINIDUMP_MEMORY_DESCRIPTOR.pack({"StartOfMemoryRange": r.start, "Memory.DataSize": r.size, "Memory.Rva": o})
            for r, o in zip(ranges, offsets)
        ]
        stream(MemoryListStream, len(ranges).to_bytes(4, "little") + b"".join(descs))

    infos = [_memory_info(r) for r in regions]
    head = MINIDUMP_MEMORY_INFO_LIST.pack({
        "SizeOfHeader": MINIDUMP_MEMORY_INFO_LIST.size, "SizeOfEntry": MINIDUMP_MEMORY_INFO.size,
        "NumberOfEntries": len(regions),
    })  # fmt: skip
    stream(MemoryInfoListStream, head + b"".join(infos))

    profile = run.scenario.profile
    csd = f.add(minidump_string(csd_version(profile.title)), 4)
    stream(SystemInfoStream, MINIDUMP_SYSTEM_INFO.pack({
        "ProcessorArchitecture": PROCESSOR_ARCHITECTURE_AMD64, "NumberOfProcessors": 1,  # emu runs one CPU
        "ProductType": VER_NT_WORKSTATION, "MajorVersion": profile.major, "MinorVersion": profile.minor,
        "BuildNumber": profile.build, "PlatformId": VER_PLATFORM_WIN32_NT, "CSDVersionRva": csd,
    }))  # fmt: skip
    stream(MiscInfoStream, MINIDUMP_MISC_INFO.pack({
        "SizeOfInfo": MINIDUMP_MISC_INFO.size, "Flags1": MINIDUMP_MISC1_PROCESS_ID, "ProcessId": PROCESS_ID,
    }))  # fmt: skip
    source = {"scenario": run.scenario.name, "profile": profile.name, "state": state.id}
    stream(EmuModulesStream, emu_stream(images, source))

    for i, (kind, size, rva) in enumerate(streams):
        at = directory + i * MINIDUMP_DIRECTORY.size
        f.buf[at : at + MINIDUMP_DIRECTORY.size] = MINIDUMP_DIRECTORY.pack(
            {"StreamType": kind, "Location.DataSize": size, "Location.Rva": rva}
        )
    return f
