"""PE32+ (x64) files as :class:`~emu.loader.image.Image`: sections, relocations, exports, imports.

The headers and the section table are checked here with ``struct`` before LIEF sees the
file, so that every malformed input is one :class:`~emu.errors.ImageError` line naming
the file and what is wrong, and so that LIEF only ever parses tables whose sizes are
bounded by the image. LIEF reads the export and import directories and the COFF symbol
table; base relocations are walked here, because a malformed block must be an error,
not silently skipped.

Every layout fact is from Microsoft's "PE Format" specification
(learn.microsoft.com/windows/win32/debug/pe-format) unless a comment says otherwise.

>>> load_pe(b"MZ" + bytes(10), name="tiny")
Traceback (most recent call last):
...
emu.errors.ImageError: tiny: truncated: 12 bytes is too small for the DOS header (0x40 bytes)
"""

from __future__ import annotations

import itertools
import struct
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.errors import ImageError
from emu.interrupts import deferred_interrupt
from emu.loader.binding import TRAP_BASE, TRAP_STRIDE, ImportTrap, ImportTraps, bind_imports
from emu.loader.image import PAGE, Forwarder, Image, ImageImport, Section, page_align
from emu.loader.pe_headers import nt_header_u32 as nt_header_u32
from emu.winnt import (
    IMAGE_DIRECTORY_ENTRY_BASERELOC,
    IMAGE_DIRECTORY_ENTRY_EXCEPTION,
    IMAGE_DIRECTORY_ENTRY_EXPORT,
    IMAGE_DOS_E_LFANEW,
    IMAGE_EXPORT_DIRECTORY_SIZE,
    IMAGE_FILE_HEADER_SIZE,
    IMAGE_SCN_MEM_EXECUTE,
    IMAGE_SCN_MEM_READ,
    IMAGE_SCN_MEM_WRITE,
    IMAGE_SECTION_HEADER_SIZE,
)

if TYPE_CHECKING:
    import lief

__all__ = ["MAX_IMAGE_SIZE", "TRAP_BASE", "TRAP_STRIDE", "ImportTrap", "ImportTraps", "bind_imports", "load_pe"]

MAX_IMAGE_SIZE = 256 << 20  # emu's cap on SizeOfImage and on any one section (not a Windows limit)
MAX_FILE_SIZE = 512 << 20
USER_END = 0x7FFF_FFFF_0000  # x64 user space ends at 0x7FFFFFFEFFFF (MS docs "Virtual address spaces")

MACHINE_AMD64 = 0x8664  # IMAGE_FILE_MACHINE_AMD64
PE32_PLUS = 0x20B  # optional header magic of a PE32+ image
RELOCS_STRIPPED = 0x0001  # IMAGE_FILE_RELOCS_STRIPPED: the image must load at its preferred base
MAX_SECTIONS = 96  # "the Windows loader limits the number of sections to 96"
OPTIONAL_FIXED = 112  # PE32+ optional header up to the data directories
SYMBOL_SIZE = 18  # COFF symbol table record
DIR_NAMES = {0: "export", 1: "import", 3: "exception", 5: "base relocation", 12: "import address table"}
# Base relocation types valid in an x64 image (IMAGE_REL_BASED_*), with the width they patch.
REL_ABSOLUTE, REL_HIGH, REL_LOW, REL_HIGHLOW, REL_HIGHADJ, REL_DIR64 = 0, 1, 2, 3, 4, 10
REL_NAMES = {REL_HIGH: "HIGH", REL_LOW: "LOW", REL_HIGHLOW: "HIGHLOW", REL_HIGHADJ: "HIGHADJ", REL_DIR64: "DIR64"}
REL_WIDTH = {REL_HIGH: 2, REL_LOW: 2, REL_HIGHLOW: 4, REL_HIGHADJ: 2, REL_DIR64: 8}


@cache
def _lief() -> Any:
    """LIEF, imported on first use: runs with only assembled images never load it (a third of
    emu's start-up time). A Ctrl-C during its import is held back until the import is done:
    raised inside LIEF's native module initialisation it would abort the process."""
    with deferred_interrupt():
        import lief as module
    module.logging.disable()  # LIEF logs to stderr on malformed input; emu reports one line instead
    return module


def _symbol_classes() -> set[Any]:
    """COFF storage classes worth a symbol (IMAGE_SYM_CLASS_EXTERNAL, IMAGE_SYM_CLASS_STATIC)."""
    cls = _lief().COFF.Symbol.STORAGE_CLASS
    return {cls.EXTERNAL, cls.STATIC}


@dataclass(frozen=True)
class _RawSection:
    name: str
    rva: int
    vsize: int  # VirtualSize, or SizeOfRawData when VirtualSize is 0
    raw_ptr: int
    raw_size: int
    characteristics: int

    @property
    def perms(self) -> str:
        c = self.characteristics
        return (
            ("r" if c & IMAGE_SCN_MEM_READ else "")
            + ("w" if c & IMAGE_SCN_MEM_WRITE else "")
            + ("x" if c & IMAGE_SCN_MEM_EXECUTE else "")
        )


@dataclass(frozen=True)
class _Headers:
    file_header: int
    characteristics: int
    image_base: int
    size_of_image: int
    size_of_headers: int
    entry_rva: int
    dirs: list[tuple[int, int]]
    sections: list[_RawSection]
    symbols_ok: bool


def _u16(b: bytes | bytearray, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "little")


def _u32(b: bytes | bytearray, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "little")


def _parse_headers(raw: bytes, label: str) -> _Headers:
    n = len(raw)
    if n < 0x40:
        raise ImageError(f"{label}: truncated: {n} bytes is too small for the DOS header (0x40 bytes)")
    if raw[:2] != b"MZ":
        raise ImageError(f"{label}: not a PE file (no MZ signature)")
    pe = _u32(raw, IMAGE_DOS_E_LFANEW)
    fh = pe + 4
    if fh + IMAGE_FILE_HEADER_SIZE > n:
        raise ImageError(
            f"{label}: truncated: the PE header at e_lfanew {pe:#x} ends past the end of the file ({n:#x} bytes)"
        )
    if raw[pe:fh] != b"PE\0\0":
        raise ImageError(f"{label}: not a PE file (no PE signature at e_lfanew {pe:#x})")
    # COFF file header: Machine +0, NumberOfSections +2, PointerToSymbolTable +8,
    # NumberOfSymbols +12, SizeOfOptionalHeader +16, Characteristics +18.
    machine, nsect = _u16(raw, fh), _u16(raw, fh + 2)
    symtab, nsyms = _u32(raw, fh + 8), _u32(raw, fh + 12)
    opt_size, characteristics = _u16(raw, fh + 16), _u16(raw, fh + 18)
    opt = fh + IMAGE_FILE_HEADER_SIZE
    magic = _u16(raw, opt) if opt + 2 <= n else 0
    if machine != MACHINE_AMD64:
        raise ImageError(f"{label}: not an x64 image (Machine {machine:#x}); emu loads PE32+ x64 images only")
    if magic != PE32_PLUS:
        raise ImageError(
            f"{label}: not a PE32+ image (optional header magic {magic:#x}); emu loads PE32+ x64 images only"
        )
    if opt_size < OPTIONAL_FIXED:
        raise ImageError(
            f"{label}: bad optional header: SizeOfOptionalHeader {opt_size:#x} is below {OPTIONAL_FIXED:#x}"
        )
    if opt + opt_size > n:
        raise ImageError(f"{label}: truncated: SizeOfOptionalHeader {opt_size:#x} does not fit the file ({n:#x} bytes)")
    # IMAGE_OPTIONAL_HEADER64: AddressOfEntryPoint +16, ImageBase +24, SectionAlignment +32,
    # SizeOfImage +56, SizeOfHeaders +60, NumberOfRvaAndSizes +108, DataDirectory[] +112.
    entry_rva = _u32(raw, opt + 16)
    image_base = int.from_bytes(raw[opt + 24 : opt + 32], "little")
    section_alignment = _u32(raw, opt + 32)
    size_of_image, size_of_headers = _u32(raw, opt + 56), _u32(raw, opt + 60)
    ndirs = _u32(raw, opt + 108)
    if OPTIONAL_FIXED + 8 * min(ndirs, 16) > opt_size:
        raise ImageError(
            f"{label}: bad optional header: {ndirs} data directories do not fit SizeOfOptionalHeader {opt_size:#x}"
        )
    if not 0 < size_of_image <= MAX_IMAGE_SIZE:
        raise ImageError(f"{label}: absurd SizeOfImage {size_of_image:#x} (emu's limit is {MAX_IMAGE_SIZE:#x})")
    if section_alignment == 0 or section_alignment % PAGE:
        # emu maps each section with its own protection, so sections must start on pages.
        raise ImageError(
            f"{label}: SectionAlignment {section_alignment:#x} is not a multiple of the page size {PAGE:#x}"
        )
    if not 0 < size_of_headers <= min(size_of_image, n):
        raise ImageError(
            f"{label}: bad SizeOfHeaders {size_of_headers:#x} (SizeOfImage {size_of_image:#x}, file {n:#x} bytes)"
        )
    if entry_rva >= size_of_image:
        raise ImageError(
            f"{label}: AddressOfEntryPoint {entry_rva:#x} lies outside the image (SizeOfImage {size_of_image:#x})"
        )
    dirs = [(_u32(raw, opt + 112 + 8 * i), _u32(raw, opt + 116 + 8 * i)) for i in range(min(ndirs, 16))]
    dirs += [(0, 0)] * (16 - len(dirs))
    for i, what in DIR_NAMES.items():
        rva, size = dirs[i]
        if size and (rva == 0 or rva + size > size_of_image):
            raise ImageError(
                f"{label}: the {what} directory [{rva:#x}, {rva + size:#x}) lies outside the image (SizeOfImage {size_of_image:#x})"
            )
    table = opt + opt_size
    if nsect == 0 or nsect > MAX_SECTIONS:
        raise ImageError(
            f"{label}: bad section table: NumberOfSections {nsect} (the Windows loader accepts 1 to {MAX_SECTIONS})"
        )
    if table + IMAGE_SECTION_HEADER_SIZE * nsect > min(size_of_headers, n):
        raise ImageError(
            f"{label}: bad section table: {nsect} entries at {table:#x} end past SizeOfHeaders {size_of_headers:#x}"
        )
    sections = [_section(raw, table + IMAGE_SECTION_HEADER_SIZE * i, label) for i in range(nsect)]
    _check_sections(sections, size_of_image, size_of_headers, section_alignment, n, label)
    # The COFF symbol table is optional and ignored by the Windows loader: a bad one is dropped.
    symbols_ok = symtab != 0 and symtab + SYMBOL_SIZE * nsyms <= n
    return _Headers(
        fh, characteristics, image_base, size_of_image, size_of_headers, entry_rva, dirs, sections, symbols_ok
    )


def _section(raw: bytes, off: int, label: str) -> _RawSection:
    # IMAGE_SECTION_HEADER: Name[8], VirtualSize, VirtualAddress, SizeOfRawData,
    # PointerToRawData (+8..+24), Characteristics +36.
    name = raw[off : off + 8].rstrip(b"\0").decode("latin-1")
    vsize, rva, raw_size, raw_ptr = struct.unpack_from("<IIII", raw, off + 8)
    characteristics = _u32(raw, off + 36)
    for what, value in (("VirtualSize", vsize), ("SizeOfRawData", raw_size)):
        if value > MAX_IMAGE_SIZE:
            raise ImageError(f"{label}: section {name}: absurd {what} {value:#x} (emu's limit is {MAX_IMAGE_SIZE:#x})")
    return _RawSection(name, rva, vsize or raw_size, raw_ptr, raw_size, characteristics)


def _check_sections(
    sections: list[_RawSection], size_of_image: int, size_of_headers: int, alignment: int, n: int, label: str
) -> None:
    for s in sections:
        if s.rva % alignment:
            raise ImageError(
                f"{label}: section {s.name}: VirtualAddress {s.rva:#x} is not a multiple of SectionAlignment {alignment:#x}"
            )
        if s.rva < page_align(size_of_headers):
            raise ImageError(
                f"{label}: section {s.name} at RVA {s.rva:#x} overlaps the headers (SizeOfHeaders {size_of_headers:#x})"
            )
        if s.rva + s.vsize > size_of_image:
            raise ImageError(
                f"{label}: section {s.name} [{s.rva:#x}, {s.rva + s.vsize:#x}) ends past SizeOfImage {size_of_image:#x}"
            )
        if s.raw_size and s.raw_ptr + s.raw_size > n:
            raise ImageError(
                f"{label}: truncated: section {s.name} raw data [{s.raw_ptr:#x}, {s.raw_ptr + s.raw_size:#x}) "
                f"ends past the end of the file ({n:#x} bytes)"
            )
    ordered = sorted(sections, key=lambda s: s.rva)
    for a, b in itertools.pairwise(ordered):
        if b.rva < a.rva + page_align(a.vsize):
            raise ImageError(
                f"{label}: sections {a.name} [{a.rva:#x}, {a.rva + a.vsize:#x}) and "
                f"{b.name} [{b.rva:#x}, {b.rva + b.vsize:#x}) overlap"
            )


def _map(raw: bytes, h: _Headers) -> bytearray:
    """The image as the loader lays it out at RVA 0 (zero-filled beyond each section's raw data)."""
    mem = bytearray(h.size_of_image)
    mem[: h.size_of_headers] = raw[: h.size_of_headers]
    for s in h.sections:
        init = min(s.raw_size, s.vsize)
        mem[s.rva : s.rva + init] = raw[s.raw_ptr : s.raw_ptr + init]
    return mem


def _relocate(mem: bytearray, h: _Headers, delta: int, label: str) -> None:
    """Apply the base relocation blocks (IMAGE_BASE_RELOCATION + 16-bit entries) for ``delta``."""
    rva, size = h.dirs[IMAGE_DIRECTORY_ENTRY_BASERELOC]
    off, end = rva, rva + size
    while off + 8 <= end:
        page, block = struct.unpack_from("<II", mem, off)
        if block < 8 or off + block > end or block % 2:
            raise ImageError(f"{label}: bad base relocation block at RVA {off:#x} (SizeOfBlock {block:#x})")
        entries = memoryview(mem)[off + 8 : off + block].cast("H").tolist()
        i = 0
        while i < len(entries):
            kind, target = entries[i] >> 12, page + (entries[i] & 0xFFF)
            i += 1
            if kind == REL_ABSOLUTE:
                continue  # padding
            if kind not in REL_WIDTH:
                raise ImageError(f"{label}: unsupported base relocation type {kind} at RVA {target:#x}")
            if target + REL_WIDTH[kind] > h.size_of_image:
                raise ImageError(
                    f"{label}: base relocation at RVA {target:#x} ({REL_NAMES[kind]}) lies outside the image "
                    f"(SizeOfImage {h.size_of_image:#x})"
                )
            if kind == REL_DIR64:
                v = (int.from_bytes(mem[target : target + 8], "little") + delta) & (2**64 - 1)
                mem[target : target + 8] = v.to_bytes(8, "little")
            elif kind == REL_HIGHLOW:
                v = (_u32(mem, target) + delta) & 0xFFFFFFFF
                mem[target : target + 4] = v.to_bytes(4, "little")
            elif kind == REL_LOW:
                mem[target : target + 2] = ((_u16(mem, target) + delta) & 0xFFFF).to_bytes(2, "little")
            else:  # HIGH / HIGHADJ: the high half of a 32-bit value; HIGHADJ's low half is the next slot
                low = 0
                if kind == REL_HIGHADJ:
                    if i >= len(entries):
                        raise ImageError(f"{label}: HIGHADJ base relocation at RVA {target:#x} has no second slot")
                    low = struct.unpack("<h", entries[i].to_bytes(2, "little"))[0]
                    i += 1
                whole = (_u16(mem, target) << 16) + low + (delta & 0xFFFFFFFF) + (0x8000 if kind == REL_HIGHADJ else 0)
                mem[target : target + 2] = ((whole >> 16) & 0xFFFF).to_bytes(2, "little")
        off += block


def _check_export_tables(mem: bytearray, h: _Headers, label: str) -> None:
    """Bound the export tables by the image before LIEF walks them (NumberOfFunctions is untrusted)."""
    rva, size = h.dirs[IMAGE_DIRECTORY_ENTRY_EXPORT]
    if not size:
        return
    if size < IMAGE_EXPORT_DIRECTORY_SIZE:
        raise ImageError(f"{label}: the export directory is {size:#x} bytes, smaller than IMAGE_EXPORT_DIRECTORY")
    nfunc, nnames, funcs, names, ords = struct.unpack_from("<IIIII", mem, rva + 20)
    for what, at, count, width in (
        ("functions", funcs, nfunc, 4),
        ("names", names, nnames, 4),
        ("name ordinals", ords, nnames, 2),
    ):
        if count and at + count * width > h.size_of_image:
            raise ImageError(
                f"{label}: the export {what} table ({count} entries at RVA {at:#x}) lies outside the image "
                f"(SizeOfImage {h.size_of_image:#x})"
            )


@dataclass
class _Parsed:
    exports: dict[str, int] = field(default_factory=dict)
    ordinals: dict[int, int] = field(default_factory=dict)
    export_ordinals: dict[str, int] = field(default_factory=dict)
    forwarders: list[Forwarder] = field(default_factory=list)
    imports: list[ImageImport] = field(default_factory=list)
    symbols: dict[str, int] = field(default_factory=dict)
    export_name: str = ""


def _parse_tables(raw: bytes, h: _Headers, base: int, label: str) -> _Parsed:
    lief = _lief()
    config = lief.PE.ParserConfig()
    config.parse_signature = False
    config.parse_rsrc = False
    config.parse_reloc = False  # walked by _relocate
    config.parse_exceptions = False
    if not h.symbols_ok:  # hide an unusable COFF symbol table from LIEF
        patched = bytearray(raw)
        patched[h.file_header + 8 : h.file_header + 16] = bytes(8)
        raw = bytes(patched)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LIEF warns on unknown enum values (e.g. a COFF storage class)
        binary = lief.PE.parse(raw, config)
        if binary is None:
            raise ImageError(f"{label}: LIEF could not parse the image")
        return _collect(binary, h, base, label)


def _collect(binary: lief.PE.Binary, h: _Headers, base: int, label: str) -> _Parsed:
    out = _Parsed()
    export = binary.get_export() if binary.has_exports else None
    if export is not None:
        out.export_name = _text(export.name)
        for e in export.entries:
            name = _text(e.name) or None
            if e.is_forwarded:
                fwd = e.forward_information
                out.forwarders.append(Forwarder(name, e.ordinal, f"{_text(fwd.library)}.{_text(fwd.function)}"))
                continue
            if e.address == 0:
                continue  # an unused slot in the export address table
            if e.address >= h.size_of_image:
                what = name or f"#{e.ordinal}"
                raise ImageError(
                    f"{label}: export {what} (ordinal {e.ordinal}) has RVA {e.address:#x} outside the image "
                    f"(SizeOfImage {h.size_of_image:#x})"
                )
            out.ordinals[e.ordinal] = base + e.address
            if name:
                out.exports[name] = base + e.address
                out.export_ordinals[name] = e.ordinal
    for imp in binary.imports:
        for entry in imp.entries:
            name = None if entry.is_ordinal else _text(entry.name)
            item = ImageImport(
                _text(imp.name), name, entry.ordinal if entry.is_ordinal else None, base + entry.iat_address
            )
            if entry.iat_address + 8 > h.size_of_image:
                raise ImageError(
                    f"{label}: import {item.label}: IAT slot at RVA {entry.iat_address:#x} lies outside the image"
                )
            out.imports.append(item)
    if h.symbols_ok:
        classes = _symbol_classes()
        for sym in binary.symbols:
            idx = sym.section_idx  # 1-based section number; 0, -1, -2 are undefined/absolute/debug
            sym_name = sym.name
            if not isinstance(sym_name, str) or sym_name.startswith(".") or not 1 <= idx <= len(h.sections):
                continue  # undecodable names, section and file records, undefined/absolute/debug symbols
            if sym.storage_class not in classes:
                continue
            rva = h.sections[idx - 1].rva + sym.value
            if rva < h.size_of_image:
                out.symbols[sym_name] = base + rva
    return out


def _text(value: str | bytes) -> str:
    """LIEF gives bytes for a name that is not UTF-8; Windows names are bytes, so keep them all."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _read(source: str | Path | bytes, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray):
        return bytes(source), name or "<bytes>"
    path = Path(source)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_SIZE:
            raise ImageError(f"{path}: the file is {size:#x} bytes (emu's limit is {MAX_FILE_SIZE:#x})")
        return path.read_bytes(), str(path)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}") from None


def load_pe(source: str | Path | bytes, base: int | None = None, name: str | None = None) -> Image:
    """Load a PE32+ x64 file as an :class:`Image`, at its preferred base or at ``base``.

    Args:
        source: a path, or the file's bytes.
        base: where to load it (page-aligned); base relocations are applied when it
            differs from the file's ImageBase.
        name: the module name (default: the file name without ``.dll``).

    Returns:
        An Image with sections (protections from the section characteristics), the
        headers page, exports by name and ordinal, forwarders (listed, never followed),
        imports (for :func:`bind_imports`) and COFF symbols when the file has them.

    Raises:
        ImageError: one line naming the file and what is wrong with it.
    """
    raw, label = _read(source, name)
    try:
        h = _parse_headers(raw, label)
        at = h.image_base if base is None else base
        if at % PAGE or at <= 0 or at + h.size_of_image > USER_END:
            raise ImageError(
                f"{label}: cannot load at {at:#x}: the image must be page-aligned in user space (below {USER_END:#x})"
            )
        mem = _map(raw, h)
        if at != h.image_base:
            if h.characteristics & RELOCS_STRIPPED:
                raise ImageError(
                    f"{label}: cannot load at {at:#x}: relocations are stripped (ImageBase {h.image_base:#x})"
                )
            _relocate(mem, h, at - h.image_base, label)
        _check_export_tables(mem, h, label)
        parsed = _parse_tables(raw, h, at, label)
    except ImageError:
        raise
    except Exception as e:  # anything LIEF or struct raise on input we did not foresee: still one line
        raise ImageError(f"{label}: malformed PE ({type(e).__name__}: {' '.join(str(e).split())})") from e
    sections = [
        Section(s.name, s.rva, bytes(mem[s.rva : s.rva + s.vsize]).rstrip(b"\0"), s.perms, s.vsize) for s in h.sections
    ]
    pdata_rva, pdata_size = h.dirs[IMAGE_DIRECTORY_ENTRY_EXCEPTION]
    module = name or (Path(label).name if not isinstance(source, bytes | bytearray) else parsed.export_name) or "image"
    if module.lower().endswith(".dll"):
        module = module[:-4]
    return Image(
        name=module,
        base=at,
        sections=sections,
        exports=parsed.exports,
        symbols={**parsed.symbols, **parsed.exports},
        headers=bytes(mem[: h.size_of_headers]),
        ordinals=parsed.ordinals,
        export_ordinals=parsed.export_ordinals,
        forwarders=parsed.forwarders,
        imports=parsed.imports,
        entry=at + h.entry_rva if h.entry_rva else None,
        preferred_base=h.image_base,
        path=None if isinstance(source, bytes | bytearray) else label,
        pdata=bytes(mem[pdata_rva : pdata_rva + pdata_size]),
    )
