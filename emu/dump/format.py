"""The minidump file format as data: structure layouts with Microsoft's field names, and constants.

Every layout and number here comes from MS ``minidumpapiset.h`` and the MS docs pages of
the same names (MINIDUMP_HEADER, MINIDUMP_DIRECTORY, MINIDUMP_THREAD, ...), unless said
otherwise next to it. Minidump structures are packed to 4 bytes (``#pragma pack(4)``), so
the offsets below run on without padding; the x64 CONTEXT (``winnt.h``) is given with its
own offsets. :mod:`emu.dump.write` and :mod:`emu.dump.read` both work from these tables.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

# --- MINIDUMP_HEADER ---------------------------------------------------------------------
MINIDUMP_SIGNATURE = 0x504D444D  # 'MDMP' read as a little-endian ULONG32
MINIDUMP_VERSION = 0xA793  # the low word of Version; the high word is implementation-specific
MiniDumpWithFullMemoryInfo = 0x00000800  # MINIDUMP_TYPE: a MemoryInfoListStream is present

# --- MINIDUMP_STREAM_TYPE ----------------------------------------------------------------
UnusedStream = 0
ThreadListStream = 3
ModuleListStream = 4
MemoryListStream = 5
SystemInfoStream = 7
Memory64ListStream = 9
MiscInfoStream = 15
MemoryInfoListStream = 16
LastReservedStream = 0xFFFF  # types above this are free for an application's own streams

# emu's own stream: the modules' export names (assembled images have no export directory),
# section names and unwind data, as UTF-8 JSON (see emu.dump.write.emu_stream). The type
# is 'EMU' + 1 as a big-endian tag, above LastReservedStream as MS reserves for user streams.
EmuModulesStream = 0x454D5501
# emu's kernel-model stream ('EMU' + 2): callback stacks, pending services, waits, objects (emu.dump.kernel_stream).
EmuKernelStream = 0x454D5502

STREAM_NAMES: dict[int, str] = {
    ThreadListStream: "ThreadListStream",
    ModuleListStream: "ModuleListStream",
    MemoryListStream: "MemoryListStream",
    SystemInfoStream: "SystemInfoStream",
    Memory64ListStream: "Memory64ListStream",
    MiscInfoStream: "MiscInfoStream",
    MemoryInfoListStream: "MemoryInfoListStream",
    EmuModulesStream: "EmuModulesStream",
    EmuKernelStream: "EmuKernelStream",
}


def stream_name(stream_type: int) -> str:
    return STREAM_NAMES.get(stream_type, f"stream type {stream_type:#x}")


# --- SystemInfo ----------------------------------------------------------------------------
PROCESSOR_ARCHITECTURE_AMD64 = 9  # MINIDUMP_SYSTEM_INFO.ProcessorArchitecture (winnt.h)
VER_PLATFORM_WIN32_NT = 2
VER_NT_WORKSTATION = 1  # ProductType
MINIDUMP_MISC1_PROCESS_ID = 0x00000001  # MINIDUMP_MISC_INFO.Flags1: ProcessId is valid

# --- x64 CONTEXT.ContextFlags (winnt.h) ---------------------------------------------------
CONTEXT_AMD64 = 0x00100000
CONTEXT_CONTROL = CONTEXT_AMD64 | 0x1  # SegSs, Rsp, SegCs, Rip, EFlags
CONTEXT_INTEGER = CONTEXT_AMD64 | 0x2  # Rax, Rcx, Rdx, Rbx, Rbp, Rsi, Rdi, R8-R15
CONTEXT_SEGMENTS = CONTEXT_AMD64 | 0x4  # SegDs, SegEs, SegFs, SegGs
CONTEXT_SIZE = 0x4D0
INITIAL_MXCSR = 0x1F80  # what Windows starts threads with (winnt.h); emu does not model SSE state

# --- MINIDUMP_MEMORY_INFO (winnt.h MEMORY_BASIC_INFORMATION values) ------------------------
MEM_COMMIT = 0x1000
MEM_PRIVATE = 0x20000
MEM_IMAGE = 0x1000000
PAGE_NOACCESS = 0x01
PAGE_READONLY = 0x02
PAGE_READWRITE = 0x04
PAGE_EXECUTE = 0x10
PAGE_EXECUTE_READ = 0x20
PAGE_EXECUTE_READWRITE = 0x40
PAGE_EXECUTE_WRITECOPY = 0x80  # AllocationProtect of an image mapping
PAGE_GUARD = 0x100  # a modifier: the first touch raises STATUS_GUARD_PAGE_VIOLATION (a stack's guard page)
PROTECT_BY_PERMS: dict[str, int] = {
    "": PAGE_NOACCESS,
    "r": PAGE_READONLY,
    "rw": PAGE_READWRITE,
    "w": PAGE_READWRITE,
    "x": PAGE_EXECUTE,
    "rx": PAGE_EXECUTE_READ,
    "rwx": PAGE_EXECUTE_READWRITE,
    "wx": PAGE_EXECUTE_READWRITE,
}
PERMS_BY_PROTECT: dict[int, str] = {
    PAGE_NOACCESS: "",
    PAGE_READONLY: "r",
    PAGE_READWRITE: "rw",
    0x08: "rw",  # PAGE_WRITECOPY
    PAGE_EXECUTE: "x",
    PAGE_EXECUTE_READ: "rx",
    PAGE_EXECUTE_READWRITE: "rwx",
    PAGE_EXECUTE_WRITECOPY: "rwx",
}

VS_FFI_SIGNATURE = 0xFEEF04BD  # VS_FIXEDFILEINFO.dwSignature
VS_FFI_STRUCVERSION = 0x00010000  # VS_FIXEDFILEINFO.dwStrucVersion: 1.0
MINIDUMP_STRING_MAX = 0x10000  # emu's bound on a MINIDUMP_STRING (a 32767-character path fits)


@dataclass(frozen=True)
class Layout:
    """A structure: MS field names, ``struct`` codes and offsets, and its documented size.

    ``fields`` are ``(name, code)`` pairs laid out one after the other (pack(4), no
    padding) unless ``offsets`` gives each field's offset (the CONTEXT). Nested structures
    are spelled with dots (``Stack.Memory.Rva``). The constructor checks that the fields
    end within ``size``, so a typo in a table fails at import.
    """

    name: str
    size: int
    fields: tuple[tuple[str, str], ...]
    offsets: tuple[int, ...] = ()
    _at: dict[str, tuple[int, struct.Struct]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        at: dict[str, tuple[int, struct.Struct]] = {}
        pos = 0
        for i, (fname, code) in enumerate(self.fields):
            s = struct.Struct("<" + code)
            off = self.offsets[i] if self.offsets else pos
            if off < pos:
                raise ValueError(f"{self.name}.{fname} overlaps the field before it")
            at[fname] = (off, s)
            pos = off + s.size
        if pos > self.size or (not self.offsets and pos != self.size):
            raise ValueError(f"{self.name}: fields end at {pos:#x}, the structure is {self.size:#x} bytes")
        object.__setattr__(self, "_at", at)

    def pack(self, values: Mapping[str, int | bytes]) -> bytes:
        """The structure's bytes; fields not in ``values`` are zero."""
        buf = bytearray(self.size)
        for fname, value in values.items():
            off, s = self._at[fname]
            s.pack_into(buf, off, value)
        return bytes(buf)

    def unpack(self, data: bytes | bytearray, offset: int = 0) -> dict[str, int]:
        """Field values from ``data[offset:]``; the caller has checked that ``size`` bytes are there."""
        out: dict[str, int] = {}
        for fname, (off, s) in self._at.items():
            out[fname] = s.unpack_from(data, offset + off)[0]
        return out


MINIDUMP_HEADER = Layout("MINIDUMP_HEADER", 0x20, (
    ("Signature", "I"), ("Version", "I"), ("NumberOfStreams", "I"), ("StreamDirectoryRva", "I"),
    ("CheckSum", "I"), ("TimeDateStamp", "I"), ("Flags", "Q"),
))  # fmt: skip

MINIDUMP_DIRECTORY = Layout("MINIDUMP_DIRECTORY", 12, (
    ("StreamType", "I"), ("Location.DataSize", "I"), ("Location.Rva", "I"),
))  # fmt: skip

MINIDUMP_THREAD = Layout("MINIDUMP_THREAD", 0x30, (
    ("ThreadId", "I"), ("SuspendCount", "I"), ("PriorityClass", "I"), ("Priority", "I"), ("Teb", "Q"),
    ("Stack.StartOfMemoryRange", "Q"), ("Stack.Memory.DataSize", "I"), ("Stack.Memory.Rva", "I"),
    ("ThreadContext.DataSize", "I"), ("ThreadContext.Rva", "I"),
))  # fmt: skip

VS_FIXEDFILEINFO_FIELDS = (
    "dwSignature", "dwStrucVersion", "dwFileVersionMS", "dwFileVersionLS", "dwProductVersionMS",
    "dwProductVersionLS", "dwFileFlagsMask", "dwFileFlags", "dwFileOS", "dwFileType", "dwFileSubtype",
    "dwFileDateMS", "dwFileDateLS",
)  # fmt: skip

MINIDUMP_MODULE = Layout("MINIDUMP_MODULE", 108, (
    ("BaseOfImage", "Q"), ("SizeOfImage", "I"), ("CheckSum", "I"), ("TimeDateStamp", "I"), ("ModuleNameRva", "I"),
    *((f"VersionInfo.{n}", "I") for n in VS_FIXEDFILEINFO_FIELDS),
    ("CvRecord.DataSize", "I"), ("CvRecord.Rva", "I"), ("MiscRecord.DataSize", "I"), ("MiscRecord.Rva", "I"),
    ("Reserved0", "Q"), ("Reserved1", "Q"),
))  # fmt: skip

MINIDUMP_MEMORY_DESCRIPTOR = Layout("MINIDUMP_MEMORY_DESCRIPTOR", 16, (
    ("StartOfMemoryRange", "Q"), ("Memory.DataSize", "I"), ("Memory.Rva", "I"),
))  # fmt: skip

MINIDUMP_MEMORY64_LIST = Layout("MINIDUMP_MEMORY64_LIST", 16, (("NumberOfMemoryRanges", "Q"), ("BaseRva", "Q")))

MINIDUMP_MEMORY_DESCRIPTOR64 = Layout("MINIDUMP_MEMORY_DESCRIPTOR64", 16, (
    ("StartOfMemoryRange", "Q"), ("DataSize", "Q"),
))  # fmt: skip

MINIDUMP_MEMORY_INFO_LIST = Layout("MINIDUMP_MEMORY_INFO_LIST", 16, (
    ("SizeOfHeader", "I"), ("SizeOfEntry", "I"), ("NumberOfEntries", "Q"),
))  # fmt: skip

MINIDUMP_MEMORY_INFO = Layout("MINIDUMP_MEMORY_INFO", 48, (
    ("BaseAddress", "Q"), ("AllocationBase", "Q"), ("AllocationProtect", "I"), ("__alignment1", "I"),
    ("RegionSize", "Q"), ("State", "I"), ("Protect", "I"), ("Type", "I"), ("__alignment2", "I"),
))  # fmt: skip

MINIDUMP_SYSTEM_INFO = Layout("MINIDUMP_SYSTEM_INFO", 0x38, (
    ("ProcessorArchitecture", "H"), ("ProcessorLevel", "H"), ("ProcessorRevision", "H"),
    ("NumberOfProcessors", "B"), ("ProductType", "B"),
    ("MajorVersion", "I"), ("MinorVersion", "I"), ("BuildNumber", "I"), ("PlatformId", "I"),
    ("CSDVersionRva", "I"), ("SuiteMask", "H"), ("Reserved2", "H"),
    ("Cpu.OtherCpuInfo.ProcessorFeatures0", "Q"), ("Cpu.OtherCpuInfo.ProcessorFeatures1", "Q"), ("Cpu.Reserved", "Q"),
))  # fmt: skip

MINIDUMP_MISC_INFO = Layout("MINIDUMP_MISC_INFO", 24, (
    ("SizeOfInfo", "I"), ("Flags1", "I"), ("ProcessId", "I"),
    ("ProcessCreateTime", "I"), ("ProcessUserTime", "I"), ("ProcessKernelTime", "I"),
))  # fmt: skip

# x64 CONTEXT (winnt.h): the fields emu writes or reads, at their offsets; 0x4D0 bytes in all.
_CONTEXT_FIELDS: tuple[tuple[str, str, int], ...] = (
    *((f"P{i}Home", "Q", 8 * (i - 1)) for i in range(1, 7)),
    ("ContextFlags", "I", 0x30), ("MxCsr", "I", 0x34),
    ("SegCs", "H", 0x38), ("SegDs", "H", 0x3A), ("SegEs", "H", 0x3C), ("SegFs", "H", 0x3E),
    ("SegGs", "H", 0x40), ("SegSs", "H", 0x42), ("EFlags", "I", 0x44),
    ("Dr0", "Q", 0x48), ("Dr1", "Q", 0x50), ("Dr2", "Q", 0x58), ("Dr3", "Q", 0x60), ("Dr6", "Q", 0x68), ("Dr7", "Q", 0x70),
    ("Rax", "Q", 0x78), ("Rcx", "Q", 0x80), ("Rdx", "Q", 0x88), ("Rbx", "Q", 0x90),
    ("Rsp", "Q", 0x98), ("Rbp", "Q", 0xA0), ("Rsi", "Q", 0xA8), ("Rdi", "Q", 0xB0),
    *((f"R{i}", "Q", 0xB8 + 8 * (i - 8)) for i in range(8, 16)),
    ("Rip", "Q", 0xF8),
    ("FltSave.MxCsr", "I", 0x100 + 0x18),  # XMM_SAVE_AREA32 (512 bytes) at 0x100
    ("VectorControl", "Q", 0x4A0), ("DebugControl", "Q", 0x4A8),
    ("LastBranchToRip", "Q", 0x4B0), ("LastBranchFromRip", "Q", 0x4B8),
    ("LastExceptionToRip", "Q", 0x4C0), ("LastExceptionFromRip", "Q", 0x4C8),
)  # fmt: skip
CONTEXT = Layout(
    "CONTEXT", CONTEXT_SIZE, tuple((n, c) for n, c, _ in _CONTEXT_FIELDS), tuple(o for _, _, o in _CONTEXT_FIELDS)
)

# UserContext field → CONTEXT field.
CONTEXT_REGISTERS: dict[str, str] = {
    "rax": "Rax", "rcx": "Rcx", "rdx": "Rdx", "rbx": "Rbx", "rsp": "Rsp", "rbp": "Rbp", "rsi": "Rsi",
    "rdi": "Rdi", "r8": "R8", "r9": "R9", "r10": "R10", "r11": "R11", "r12": "R12", "r13": "R13",
    "r14": "R14", "r15": "R15", "rip": "Rip", "rflags": "EFlags",
}  # fmt: skip
