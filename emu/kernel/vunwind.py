"""RtlLookupFunctionEntry and RtlVirtualUnwind for the built-in ntdll, over guest memory.

Facts from MS docs "x64 exception handling" (RUNTIME_FUNCTION, UNWIND_INFO, UNWIND_CODE, the
unwind procedure and its epilog rules) and ReactOS ``sdk/lib/rtl/amd64/unwind.c``. Everything
is read from the loaded images as mapped (the PE exception directory in their headers), so a
module's own ``.pdata`` is what the walk uses, as on Windows.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from emu.loader.unwind_data import GPR, Reader, UnwindDataError, exception_directory, read_unwind_info
from emu.winnt import (
    UNW_FLAG_EHANDLER,
    UNW_FLAG_UHANDLER,
    UWOP_ALLOC_LARGE,
    UWOP_ALLOC_SMALL,
    UWOP_PUSH_MACHFRAME,
    UWOP_PUSH_NONVOL,
    UWOP_SAVE_NONVOL,
    UWOP_SAVE_NONVOL_FAR,
    UWOP_SAVE_XMM128,
    UWOP_SAVE_XMM128_FAR,
    UWOP_SET_FPREG,
)

__all__ = [
    "UNW_FLAG_EHANDLER", "UNW_FLAG_UHANDLER", "FunctionEntry", "Reader", "UnwindError", "Unwound", "exception_directory",
    "lookup", "virtual_unwind",
]  # fmt: skip


@dataclass(frozen=True)
class FunctionEntry:
    """A RUNTIME_FUNCTION found for an address: where it lives and what it says (RVAs)."""

    address: int  # of the RUNTIME_FUNCTION itself (what RtlLookupFunctionEntry returns)
    image_base: int
    begin: int
    end: int
    unwind: int


def lookup(read: Reader, images: list[tuple[int, int]], pc: int) -> FunctionEntry | None:
    """RtlLookupFunctionEntry: the RUNTIME_FUNCTION covering ``pc`` in the image holding it
    (``images``: (base, end) of each loaded module), by binary search of its sorted .pdata."""
    for base, end in images:
        if not base <= pc < end:
            continue
        found = exception_directory(read, base)
        if found is None:
            return None
        rva, size = found
        raw = read(base + rva, size - size % 12)
        if raw is None:
            return None
        table = [struct.unpack_from("<III", raw, i) for i in range(0, len(raw), 12)]
        off = pc - base
        i = bisect.bisect_right([t[0] for t in table], off) - 1
        if i >= 0 and table[i][0] <= off < table[i][1]:
            begin, fend, unwind = table[i]
            return FunctionEntry(base + rva + 12 * i, base, begin, fend, unwind)
        return None
    return None


@dataclass
class Unwound:
    """What RtlVirtualUnwind gives back besides the updated context."""

    handler: int  # the language handler's address, or 0
    handler_data: int  # address of the handler data (right after the handler's RVA)
    establisher: int  # the establisher frame


class UnwindError(UnwindDataError):
    """The unwind data or the stack cannot be read: the walk stops (a broken stack)."""


def _u64(read: Reader, address: int) -> int:
    raw = read(address, 8)
    if raw is None:
        raise UnwindError(f"stack at {address:#x} is not readable")
    return int.from_bytes(raw, "little")


def _in_epilog(read: Reader, pc: int, entry: FunctionEntry) -> bool:
    """MS docs "Unwind procedure": RIP is in an epilog when what follows it is an optional
    `add rsp, imm` / `lea rsp, [reg+disp]`, pops of nonvolatile registers and a `ret`."""
    code = read(pc, 32)
    if code is None:
        return False
    i = 0
    if code[i : i + 3] in (b"\x48\x83\xc4", b"\x48\x81\xc4"):
        i += 4 if code[i + 1] == 0x83 else 7
    elif (
        code[i : i + 2] == b"\x48\x8d"
        and code[i + 2] & 0xC7 in (0x44, 0x84, 0x64, 0xA4)
        and (code[i + 2] >> 3) & 7 == 4
    ):
        return False  # lea rsp, [...]: rare in the code emu meets; treated as a body
    while i < len(code):
        b = code[i]
        if 0x58 <= b <= 0x5F:
            i += 1
        elif b == 0x41 and i + 1 < len(code) and 0x58 <= code[i + 1] <= 0x5F:
            i += 2
        else:
            break
    return i < len(code) and (code[i] == 0xC3 or code[i : i + 2] == b"\xf3\xc3")


def _emulate_epilog(read: Reader, pc: int, regs: dict[str, int]) -> None:
    code = read(pc, 32) or b""
    i = 0
    if code[:3] == b"\x48\x83\xc4":
        regs["rsp"] += code[3] if code[3] < 0x80 else code[3] - 0x100
        i = 4
    elif code[:3] == b"\x48\x81\xc4":
        regs["rsp"] += struct.unpack_from("<i", code, 3)[0]
        i = 7
    while i < len(code):
        b = code[i]
        if 0x58 <= b <= 0x5F:
            regs[GPR[b - 0x58]] = _u64(read, regs["rsp"])
            regs["rsp"] += 8
            i += 1
        elif b == 0x41 and 0x58 <= code[i + 1] <= 0x5F:
            regs[GPR[8 + code[i + 1] - 0x58]] = _u64(read, regs["rsp"])
            regs["rsp"] += 8
            i += 2
        else:
            break
    regs["rip"] = _u64(read, regs["rsp"])
    regs["rsp"] += 8


def virtual_unwind(
    read: Reader, handler_type: int, pc: int, entry: FunctionEntry, regs: dict[str, int], xmm: list[int] | None = None
) -> Unwound:
    """RtlVirtualUnwind: ``regs`` (rip, rsp and the 16 general registers) become the caller's.

    Returns the handler of ``handler_type`` (UNW_FLAG_EHANDLER / UHANDLER) when RIP is past the
    prolog and not in an epilog, and the establisher frame (RSP, or the frame register minus
    its offset once the prolog set it).
    """
    base = entry.image_base
    offset = pc - (base + entry.begin)
    if _in_epilog(read, pc, entry):
        establisher = regs["rsp"]
        _emulate_epilog(read, pc, regs)
        return Unwound(0, 0, establisher)
    current = entry
    first = True
    handler = handler_data = 0
    establisher = regs["rsp"]
    machframe = False
    while True:
        try:
            info = read_unwind_info(read, base + current.unwind, base)
        except UnwindDataError as e:
            raise UnwindError(str(e)) from None
        frame_reg, frame_off = info.frame_register, info.frame_offset * 16
        if first:
            establisher = regs["rsp"]
            if frame_reg:
                # CodeOffset of SET_FPREG: from there on the frame register holds the frame.
                set_at = next((c.offset for c in info.codes if c.op == UWOP_SET_FPREG), 0)
                if offset >= info.prolog_size or offset >= set_at:
                    establisher = regs[GPR[frame_reg]] - frame_off
        for code in info.codes:
            if first and code.offset > offset:
                continue  # this prolog instruction has not run yet
            op = code.op
            if op == UWOP_PUSH_NONVOL:
                regs[GPR[code.info]] = _u64(read, regs["rsp"])
                regs["rsp"] += 8
            elif op in (UWOP_ALLOC_LARGE, UWOP_ALLOC_SMALL):
                regs["rsp"] += code.value
            elif op == UWOP_SET_FPREG:
                regs["rsp"] = regs[GPR[frame_reg]] - frame_off
            elif op in (UWOP_SAVE_NONVOL, UWOP_SAVE_NONVOL_FAR):
                regs[GPR[code.info]] = _u64(read, regs["rsp"] + code.value)
            elif op in (UWOP_SAVE_XMM128, UWOP_SAVE_XMM128_FAR):
                value = read(regs["rsp"] + code.value, 16)
                if xmm is not None and value is not None:
                    xmm[code.info] = int.from_bytes(value, "little")
            elif op == UWOP_PUSH_MACHFRAME:
                # A machine frame (Rip, SegCs, EFlags, Rsp, SegSs), after an error code if OpInfo is 1.
                at = regs["rsp"] + (8 if code.info else 0)
                regs["rip"] = _u64(read, at)
                regs["rsp"] = _u64(read, at + 0x18)
                machframe = True
        wanted = info.flags & (UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER) & handler_type
        if first and wanted and offset >= info.prolog_size:
            rva = read(info.tail, 4)
            if rva is None:
                raise UnwindError(f"exception handler RVA at {info.tail:#x} is not readable")
            handler, handler_data = base + int.from_bytes(rva, "little"), info.tail + 4
        if info.chained is not None:
            c = info.chained
            current = FunctionEntry(info.tail, base, c.begin - base, c.end - base, c.unwind - base)
            first = False
            continue
        break
    if not machframe:
        regs["rip"] = _u64(read, regs["rsp"])
        regs["rsp"] += 8
    return Unwound(handler, handler_data, establisher)
