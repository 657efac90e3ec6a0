"""PE headers and an export directory for the images emu assembles, so they are PE images in memory.

A debugger, dumpulator or any tool reading a minidump finds a module's exports and unwind
data through its PE headers (MS docs "PE Format"): the DOS header's ``e_lfanew`` leads to the
NT headers, whose data directories point at the export directory (index 0) and the exception
directory (index 3, the ``.pdata`` RUNTIME_FUNCTION table). :func:`with_pe_headers` writes
those headers for an assembled image and adds an ``.edata`` section after its last one. The
code and every other section stay where they were: the headers fill the page at the image
base that the machine maps for every image anyway.

Every layout and value below is from the "PE Format" page unless said otherwise. The
headers describe a consistent file too (``file_bytes``): sections at FileAlignment (0x200)
offsets, so a PE parser (LIEF, pefile) reads the same exports from it as from memory.
"""

from __future__ import annotations

import dataclasses
import struct

from emu.loader.image import PAGE, Image, Section, page_align

IMAGE_FILE_MACHINE_AMD64 = 0x8664
# IMAGE_FILE_EXECUTABLE_IMAGE | IMAGE_FILE_LARGE_ADDRESS_AWARE | IMAGE_FILE_DLL
DLL_CHARACTERISTICS = 0x0002 | 0x0020 | 0x2000
PE32_PLUS_MAGIC = 0x20B
IMAGE_SUBSYSTEM_WINDOWS_CUI = 3
# IMAGE_DLLCHARACTERISTICS_HIGH_ENTROPY_VA | DYNAMIC_BASE | NX_COMPAT
DLL_FLAGS = 0x0020 | 0x0040 | 0x0100
FILE_ALIGNMENT = 0x200
NUMBER_OF_RVA_AND_SIZES = 16
IMAGE_DIRECTORY_ENTRY_EXPORT, IMAGE_DIRECTORY_ENTRY_EXCEPTION = 0, 3
DOS_HEADER_SIZE = 0x40
E_LFANEW = 0x40  # no DOS stub: the NT headers follow the DOS header
FILE_HEADER_SIZE = 20
OPTIONAL_HEADER64_SIZE = 0xF0  # 112 bytes of fields + 16 data directories of 8 bytes
SECTION_HEADER_SIZE = 40
EXPORT_DIRECTORY_SIZE = 40
# IMAGE_SCN_* section flags.
SCN_CNT_CODE, SCN_CNT_INITIALIZED_DATA = 0x20, 0x40
SCN_MEM_EXECUTE, SCN_MEM_READ, SCN_MEM_WRITE = 0x20000000, 0x40000000, 0x80000000


def section_flags(s: Section) -> int:
    flags = SCN_CNT_CODE if "x" in s.perms else SCN_CNT_INITIALIZED_DATA
    for perm, bit in (("r", SCN_MEM_READ), ("w", SCN_MEM_WRITE), ("x", SCN_MEM_EXECUTE)):
        if perm in s.perms:
            flags |= bit
    return flags


def export_section(image: Image, rva: int, dll_name: str) -> Section:
    """``.edata``: IMAGE_EXPORT_DIRECTORY, the export address, name pointer and ordinal tables, the strings.

    Each name has its own ordinal, in name order, as in Windows' ntdll, where NtX and ZwX are
    two export address table entries holding one RVA. The name pointer table is sorted by
    name (ASCII order), as the loader's binary search needs ("Export Name Pointer Table").
    """
    names = sorted(image.exports)
    n_funcs = n_names = len(names)
    eat = rva + EXPORT_DIRECTORY_SIZE
    npt = eat + 4 * n_funcs
    ordinals = npt + 4 * n_names
    strings = ordinals + 2 * n_names
    blob = bytearray()
    name_rvas = []
    dll_rva = strings
    blob += dll_name.encode("ascii") + b"\0"
    for n in names:
        name_rvas.append(strings + len(blob))
        blob += n.encode("ascii") + b"\0"
    directory = struct.pack(
        "<IIHHIIIIIII",
        0, 0, 0, 0,  # Export Flags, Time/Date Stamp (0: deterministic), Major/Minor Version
        dll_rva, 1, n_funcs, n_names, eat, npt, ordinals,  # Name RVA, Ordinal Base, counts, table RVAs
    )  # fmt: skip
    data = (
        directory
        + b"".join(struct.pack("<I", image.exports[n] - image.base) for n in names)
        + b"".join(struct.pack("<I", r) for r in name_rvas)
        + b"".join(struct.pack("<H", i) for i in range(n_names))
        + bytes(blob)
    )
    return Section(".edata", rva, data, "r", page_align(len(data)))


def _raw_layout(sections: list[Section], headers_size: int) -> list[tuple[int, int]]:
    """(PointerToRawData, SizeOfRawData) of each section in the file the headers describe."""
    out, pos = [], headers_size
    for s in sections:
        raw = -(-len(s.data) // FILE_ALIGNMENT) * FILE_ALIGNMENT
        out.append((pos if raw else 0, raw))
        pos += raw
    return out


def pe_headers(image: Image, sections: list[Section]) -> bytes:
    """DOS header, NT headers (PE32+) and the section table of ``image`` with ``sections``."""
    headers_size = -(-(E_LFANEW + 4 + FILE_HEADER_SIZE + OPTIONAL_HEADER64_SIZE
                       + SECTION_HEADER_SIZE * len(sections)) // FILE_ALIGNMENT) * FILE_ALIGNMENT  # fmt: skip
    if headers_size > PAGE:
        raise ValueError(f"{image.name}: {len(sections)} sections do not fit the header page")
    size_of_image = page_align(max(s.rva + s.size for s in sections))
    dos = bytearray(DOS_HEADER_SIZE)
    dos[0:2] = b"MZ"
    dos[0x3C:0x40] = E_LFANEW.to_bytes(4, "little")
    file_header = struct.pack(
        "<HHIIIHH", IMAGE_FILE_MACHINE_AMD64, len(sections), 0, 0, 0, OPTIONAL_HEADER64_SIZE, DLL_CHARACTERISTICS
    )
    code = [s for s in sections if "x" in s.perms]
    data = [s for s in sections if "x" not in s.perms]
    directories = [(0, 0)] * NUMBER_OF_RVA_AND_SIZES
    for s in sections:
        if s.name == ".edata":
            directories[IMAGE_DIRECTORY_ENTRY_EXPORT] = (s.rva, len(s.data))
        elif s.name == ".pdata" and image.pdata:
            directories[IMAGE_DIRECTORY_ENTRY_EXCEPTION] = (s.rva, len(image.pdata))
    optional = struct.pack(
        "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
        PE32_PLUS_MAGIC, 14, 0,  # Magic, linker version
        sum(s.size for s in code), sum(s.size for s in data), 0,  # SizeOfCode, SizeOfInitializedData, ...Uninitialized
        0,  # AddressOfEntryPoint: none (the built-in DLLs have no DllMain)
        code[0].rva if code else 0, image.base, PAGE, FILE_ALIGNMENT,  # BaseOfCode, ImageBase, alignments
        6, 0, 0, 0, 6, 0,  # OS, image and subsystem versions (6.0: what Vista and later accept)
        0, size_of_image, headers_size, 0,  # Win32VersionValue, SizeOfImage, SizeOfHeaders, CheckSum
        IMAGE_SUBSYSTEM_WINDOWS_CUI, DLL_FLAGS,
        0x40000, 0x1000, 0x100000, 0x1000,  # stack and heap reserve/commit (the linker's defaults)
        0, NUMBER_OF_RVA_AND_SIZES,  # LoaderFlags
    )  # fmt: skip
    optional += b"".join(struct.pack("<II", r, n) for r, n in directories)
    table = b"".join(
        struct.pack(
            "<8sIIIIIIHHI",
            s.name.encode("ascii")[:8], s.size, s.rva, raw_size, raw_ptr, 0, 0, 0, 0, section_flags(s),
        )
        for s, (raw_ptr, raw_size) in zip(sections, _raw_layout(sections, headers_size))
    )  # fmt: skip
    out = bytes(dos) + b"PE\0\0" + file_header + optional + table
    return out + bytes(headers_size - len(out))


def with_pe_headers(image: Image, dll_name: str) -> Image:
    """The image with PE headers in its first page and an ``.edata`` export section after its last one."""
    edata = export_section(image, image.size, dll_name)
    sections = [*image.sections, edata]
    return dataclasses.replace(image, sections=sections, headers=pe_headers(image, sections))


def file_bytes(image: Image) -> bytes:
    """The PE file the headers describe: headers, then each section's bytes at its PointerToRawData."""
    out = bytearray(image.headers)
    for s, (ptr, size) in zip(image.sections, _raw_layout(image.sections, len(image.headers))):
        if size:
            out += bytes(ptr - len(out)) + s.data + bytes(size - len(s.data))
    return bytes(out)
