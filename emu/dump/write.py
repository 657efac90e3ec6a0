"""Write a minidump of one recorded state: what a debugger would save of the process then.

The file has the streams a user-mode dump would have (MS ``minidumpapiset.h``):
SystemInfo (AMD64, the profile's Windows version), ThreadList with every live thread's
user-mode x64 CONTEXT (the state's own thread first), ModuleList, Memory64List (or
MemoryList) with each thread's stack from RSP up and each image's headers and sections,
MemoryInfoList and MiscInfo — plus emu's own ``EmuModulesStream`` with the export names,
section names and unwind data of each module, because images emu assembles have no PE
export directory to read them from.

Each thread is written as it is at the state: the context and stack of its latest state
up to that one (see :func:`threads_at`). Only user-mode contexts go in the ThreadList: a
dump cannot tell that a thread is in kernel mode. Without a captured process, image memory
is the images as loaded (writes to their data sections during the run are not recorded per
state); with one (``live``, :mod:`emu.dump.live`: what ``emu dump`` and ``emu corpus``
write) every region holds its bytes as they were, and ``EmuKernelStream`` the kernel
model's side. The same state always gives the same bytes: no clock, no host paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emu.address_space import PROCESS_ID
from emu.address_space import thread_id as thread_id
from emu.dump.format import (
    CONTEXT_SIZE,
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
    PAGE_GUARD,
    PAGE_READWRITE,
    PROCESSOR_ARCHITECTURE_AMD64,
    PROTECT_BY_PERMS,
    VER_NT_WORKSTATION,
    VER_PLATFORM_WIN32_NT,
    VS_FFI_SIGNATURE,
    VS_FFI_STRUCVERSION,
    EmuKernelStream,
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
from emu.dump.kernel_stream import encode
from emu.dump.memory import Region, image_regions, live_regions, process_regions, stack_regions
from emu.dump.modules import emu_stream
from emu.dump.streams import (
    HandleDataStream,
    ThreadInfoListStream,
    context_bytes,
    handle_data,
    minidump_string,
    thread_info_list,
)
from emu.errors import DumpError
from emu.loader.image import Image
from emu.loader.pe_headers import nt_header_u32
from emu.winnt import IMAGE_NT_CHECKSUM, IMAGE_NT_TIME_DATE_STAMP
from emu.writing import write_atomic

if TYPE_CHECKING:
    from emu.dump.live import LiveState
    from emu.engine import RunResult
    from emu.kernel import KThread
    from emu.trace import State

BUILTIN_MODULES = ("ntdll", "win32u")  # emu's own runtime, named as System32 DLLs
NORMAL_PRIORITY_CLASS = 0x20  # winbase.h; Priority 0 is THREAD_PRIORITY_NORMAL


def threads_at(run: RunResult, state: State) -> list[tuple[KThread, State]]:
    """The threads a dump of ``state`` holds, each with the state that shows it: the state's own thread first.

    Every other thread is shown by its latest state with an id up to ``state.id``, or by its
    first state if it has not run yet (emu records each thread's initial state as it is
    created); a thread that has exited or faulted by then is left out, as Windows leaves
    ended threads out of a dump. The state's own thread is always there, even at its exit
    or fault: that is the thread the dump is of.

    Raises:
        DumpError: ``state`` is not a state of ``run``, or its thread is not part of the run.
    """
    states = run.trace.states
    if not 0 <= state.id < len(states) or states[state.id] != state:
        raise DumpError(f"state s{state.id}: not a state of this run of {run.scenario.name}")
    own = run.threads.get(state.thread)
    if own is None:
        raise DumpError(f"state s{state.id}: thread {state.thread} is not part of the run")
    # Exact, not a guess: a thread's registers and stack do not change while it is off the
    # CPU, so its latest recorded state is its state now. The kernel model takes a thread off
    # the CPU only at a recorded state: a system call or callback-return entry (recorded before
    # any scheduling choice, so a thread that yields there has its entry state as its latest),
    # a wait (a "block" state holding the trap frame it will resume from), its exit or a fault.
    # It puts the thread back only from that state's context (the trap frame, or the entry
    # context of a thread not started yet), and only the thread's own code and its own kernel
    # work touch its stack. States are numbered in the order they happened (one run's trace).
    latest: dict[int, State] = {}
    for s in states[: state.id + 1]:
        latest[s.thread] = s
    for s in states[state.id + 1 :]:
        if len(latest) == len(run.threads):
            break
        latest.setdefault(s.thread, s)  # not run yet: its first state
    out = [(own, state)]
    for index in sorted(run.threads):
        shown = latest.get(index)
        if index != state.thread and shown is not None and shown.mode != "exited":
            out.append((run.threads[index], shown))
    return out


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


def _pe_stamps(headers: bytes) -> tuple[int, int]:
    """(CheckSum, TimeDateStamp) from PE headers (IMAGE_NT_HEADERS64), or zeros for an assembled image."""
    return nt_header_u32(headers, IMAGE_NT_CHECKSUM), nt_header_u32(headers, IMAGE_NT_TIME_DATE_STAMP)


def _memory_info(r: Region) -> bytes:
    return MINIDUMP_MEMORY_INFO.pack({
        "BaseAddress": r.start, "AllocationBase": r.allocation_base, "RegionSize": r.size, "State": MEM_COMMIT,
        "AllocationProtect": PAGE_EXECUTE_WRITECOPY if r.kind == MEM_IMAGE else PAGE_READWRITE,
        "Protect": PROTECT_BY_PERMS.get(r.perms, PAGE_READWRITE) | (PAGE_GUARD if r.guard else 0), "Type": r.kind,
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


def write_minidump(
    run: RunResult, state: State, path: str | Path | None = None, *, memory64: bool = True, full: bool = False,
    process: list[Region] | None = None, live: LiveState | None = None,
) -> bytes:  # fmt: skip
    """A minidump of ``state`` (a state of ``run``); written atomically to ``path`` when given.

    ``memory64`` picks Memory64ListStream (what full-memory dumps use, and what
    udmp-parser reads) or MemoryListStream (what MiniDumpNormal uses). ``full`` writes
    every committed byte emu knows (see :mod:`emu.dump.memory`). ``process`` is
    :func:`~emu.dump.memory.process_regions` of the run, when the caller has it already
    (it builds the process again). ``live`` is the process captured at this state
    (:func:`emu.dump.live.capture`): then the memory is the process's own bytes then, the
    HandleDataStream carries the objects' states and ``EmuKernelStream`` the kernel model's
    side, so that ``emu run --from-dump`` goes on from the dump exactly.

    Raises:
        DumpError: the state is not one of ``run``'s, its thread is not part of the run, or
            ``live`` was captured at another state.
    """
    dumped = threads_at(run, state)
    images = sorted(run.images, key=lambda i: i.base)
    if live is not None:
        if live.state != state.id:
            raise DumpError(f"state s{state.id}: the captured process is at s{live.state}")
        regions = live_regions(
            run, live, {(t.stack_limit, t.stack_base): shown.context.rsp for t, shown in dumped}, full
        )
    else:
        regions = [r for img in images for r in image_regions(img)]
        regions += process if process is not None else process_regions(run, full)
        for t, shown in dumped:
            regions += stack_regions(shown.context.rsp, shown.stack, t.stack_limit, t.stack_base, full)
        # A guard page the run has committed since (a stack overflow) is stack now, not a guard.
        stacks = [(t.stack_limit, t.stack_base) for t, _ in dumped]
        regions = [r for r in regions if not (r.guard and any(lo <= r.start < hi for lo, hi in stacks))]
    regions.sort(key=lambda r: r.start)
    ranges = [r for r in regions if r.data]
    threads = [
        _Thread(thread_id(shown.thread), t.teb, shown, _stack_range(ranges, t.stack_limit), _start_address(t))
        for t, shown in dumped
    ]
    first = _layout(run, state, threads, images, regions, ranges, 0, memory64, live)
    data_base = len(first.buf) + (-len(first.buf) % 16)
    f = _layout(run, state, threads, images, regions, ranges, data_base, memory64, live)
    f.add(b"".join(r.data or b"" for r in ranges), 16)
    out = bytes(f.buf)
    if path is not None:
        write_atomic(path, out)
    return out


@dataclass(frozen=True)
class _Thread:
    """One MINIDUMP_THREAD to write: its id, TEB, the state that shows it, and its stack's memory range."""

    tid: int
    teb: int
    state: State
    stack: int | None  # index into the memory ranges; None when the dump holds none of its stack
    start: int  # where the thread started (its entry context's RIP)


def _start_address(t: KThread) -> int:
    """The thread's entry (MINIDUMP_THREAD_INFO.StartAddress, the Win32 start address): RCX when it starts
    in RtlUserThreadStart(entry, argument), RAX when it starts at its entry (see emu.process_start.ThreadStart.create_thread)."""
    ctx = t.entry_context
    return ctx.rax or ctx.rcx


def _stack_range(ranges: list[Region], allocation: int) -> int | None:
    """The memory range holding a thread's stack bytes (the one with data in its allocation)."""
    return next((i for i, r in enumerate(ranges) if r.kind == MEM_PRIVATE and r.allocation_base == allocation), None)


def _layout(
    run: RunResult, state: State, threads: list[_Thread], images: list[Image], regions: list[Region],
    ranges: list[Region], data_base: int, memory64: bool, live: LiveState | None,
) -> _File:  # fmt: skip
    """Everything but the memory bytes, which go at ``data_base`` (known after a first pass)."""
    f = _File()
    streams: list[tuple[int, int, int]] = []  # (StreamType, DataSize, Rva)

    def stream(kind: int, data: bytes) -> None:
        streams.append((kind, len(data), f.add(data)))

    objects = run.scenario.objects
    count = 8 + bool(objects) + (live is not None)
    f.add(MINIDUMP_HEADER.pack({
        "Signature": MINIDUMP_SIGNATURE, "Version": MINIDUMP_VERSION, "NumberOfStreams": count,
        "StreamDirectoryRva": MINIDUMP_HEADER.size, "Flags": MiniDumpWithFullMemoryInfo,
    }))  # fmt: skip
    directory = f.add(bytes(MINIDUMP_DIRECTORY.size * count), 4)

    offsets, pos = [], data_base
    for r in ranges:
        offsets.append(pos)
        pos += len(r.data or b"")

    entries = []
    for t in threads:
        ctx = f.add(context_bytes(t.state), 16)
        stack_start, stack_size, stack_rva = t.state.context.rsp, 0, 0
        if t.stack is not None:
            stack_start, stack_size, stack_rva = ranges[t.stack].start, ranges[t.stack].size, offsets[t.stack]
        entries.append(MINIDUMP_THREAD.pack({
            "ThreadId": t.tid, "SuspendCount": 1,  # MiniDumpWriteDump suspends the threads it dumps
            "PriorityClass": NORMAL_PRIORITY_CLASS, "Teb": t.teb,
            "Stack.StartOfMemoryRange": stack_start, "Stack.Memory.DataSize": stack_size,
            "Stack.Memory.Rva": stack_rva, "ThreadContext.DataSize": CONTEXT_SIZE, "ThreadContext.Rva": ctx,
        }))  # fmt: skip
    stream(ThreadListStream, len(threads).to_bytes(4, "little") + b"".join(entries))

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
    stream(ThreadInfoListStream, thread_info_list([(t.tid, t.start) for t in threads]))
    if objects:
        state_of = live.objects if live is not None else None
        stream(
            HandleDataStream,
            handle_data(objects, lambda b: f.add(b, 4), state_of, lambda i: (PROCESS_ID, thread_id(i))),
        )
    source = {"scenario": run.scenario.name, "profile": profile.name, "state": state.id}
    stream(EmuModulesStream, emu_stream(images, source))
    if live is not None:
        stream(EmuKernelStream, encode(live.kernel))

    for i, (kind, size, rva) in enumerate(streams):
        at = directory + i * MINIDUMP_DIRECTORY.size
        f.buf[at : at + MINIDUMP_DIRECTORY.size] = MINIDUMP_DIRECTORY.pack(
            {"StreamType": kind, "Location.DataSize": size, "Location.Rva": rva}
        )
    return f
