"""A PE image's function table (.pdata): where each function begins and ends, and so where
"the function at this address" ends, in one place for every reader.

RUNTIME_FUNCTION is {BeginAddress, EndAddress, UnwindData}, three RVAs, sorted by begin
(MS docs "x64 exception handling", struct RUNTIME_FUNCTION). The table is ``Image.pdata``
when the loader kept it, else the exception directory read from the PE headers mapped at
the image base (as a debugger reads it from a dump).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from emu.loader.image import Image
from emu.winnt import IMAGE_DOS_E_LFANEW, RUNTIME_FUNCTION_SIZE

__all__ = ["RuntimeFunction", "entry_at", "function_end", "function_table", "parse_function_table"]


@dataclass(frozen=True, order=True)
class RuntimeFunction:
    """One .pdata entry, as absolute addresses."""

    begin: int
    end: int
    unwind: int  # address of the UNWIND_INFO


def parse_function_table(raw: bytes, base: int, limit: int) -> tuple[RuntimeFunction, ...]:
    """RUNTIME_FUNCTION entries (RVAs) as absolute addresses, sorted; entries outside the image dropped."""
    out = []
    for off in range(0, len(raw) - RUNTIME_FUNCTION_SIZE + 1, RUNTIME_FUNCTION_SIZE):
        begin, end, unwind = struct.unpack_from("<III", raw, off)
        if begin < end <= limit and 0 < unwind < limit:
            out.append(RuntimeFunction(base + begin, base + end, base + unwind))
    return tuple(sorted(out))


def function_table(image: Image) -> tuple[RuntimeFunction, ...]:
    """The image's .pdata: ``Image.pdata`` when the loader kept it, else the exception directory
    read from the PE headers mapped at its base (as in a dump); empty when there is none."""
    raw = image.pdata or _pdata_from_headers(image)
    return parse_function_table(raw, image.base, image.size) if raw else ()


def _pdata_from_headers(image: Image) -> bytes:
    # MS "PE Format": e_lfanew at 0x3C, "PE\0\0", the COFF header (20 bytes), then the PE32+
    # optional header (magic 0x20B) whose data directory 3 (exception) is at +112 + 3 * 8.
    head = image.read(image.base, 0x40)
    if head is None or head[:2] != b"MZ":
        return b""
    pe = int.from_bytes(head[IMAGE_DOS_E_LFANEW : IMAGE_DOS_E_LFANEW + 4], "little")
    opt = image.read(image.base + pe, 24 + 112 + 4 * 8)
    if opt is None or opt[:4] != b"PE\0\0" or int.from_bytes(opt[24:26], "little") != 0x20B:
        return b""
    rva, size = struct.unpack_from("<II", opt, 24 + 112 + 3 * 8)
    if not rva or not size or size > 0x100000:
        return b""
    return image.read(image.base + rva, size) or b""


def entry_at(table: Sequence[RuntimeFunction], address: int) -> RuntimeFunction | None:
    """The entry of a sorted function table covering ``address`` (binary search, as
    RtlLookupFunctionEntry does), or None."""
    lo, hi = 0, len(table)
    while lo < hi:
        mid = (lo + hi) // 2
        f = table[mid]
        if address < f.begin:
            hi = mid
        elif address >= f.end:
            lo = mid + 1
        else:
            return f
    return None


def function_end(table: Sequence[RuntimeFunction], exports: Iterable[int], start: int, limit: int) -> int:
    """Where the function at ``start`` ends: the end of the .pdata entry that begins there, else
    the next export above ``start``, else ``limit`` (the module's end).

    The unwind data is exact; exports are what a tool without it has (a leaf stub has no
    .pdata entry and ends where the next exported stub begins).
    """
    entry = entry_at(table, start)
    if entry is not None and entry.begin == start:
        return entry.end
    return min((a for a in exports if a > start), default=limit)
