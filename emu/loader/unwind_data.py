"""x64 unwind data read from memory: the exception directory and UNWIND_INFO, for every reader
(the built-in ntdll's RtlVirtualUnwind in :mod:`emu.kernel.vunwind`, the debugger's stack walk in
:mod:`emu.detection.unwind`).

Facts from MS docs "x64 exception handling" (learn.microsoft.com/cpp/build/exception-handling-x64,
sections "struct RUNTIME_FUNCTION", "struct UNWIND_INFO" and "struct UNWIND_CODE"), checked
against ReactOS ``sdk/lib/rtl/amd64/unwind.c`` (RtlVirtualUnwind, RtlLookupFunctionEntry):

* UNWIND_INFO is Version:3|Flags:5, SizeOfProlog, CountOfCodes, FrameRegister:4|FrameOffset:4,
  then CountOfCodes 16-bit slots (padded to an even count); after them the exception handler's
  RVA and its data (UNW_FLAG_EHANDLER / UHANDLER) or, with UNW_FLAG_CHAININFO, a
  RUNTIME_FUNCTION whose codes are applied after these.
* The exception directory is PE data directory 3 (MS "PE Format").
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from emu.context import REGISTER_NAMES
from emu.loader.pdata import RuntimeFunction
from emu.records import record
from emu.winnt import (
    IMAGE_DOS_E_LFANEW,
    RUNTIME_FUNCTION_SIZE,
    UNW_FLAG_CHAININFO,
    UWOP_ALLOC_LARGE,
    UWOP_ALLOC_SMALL,
    UWOP_PUSH_MACHFRAME,
    UWOP_PUSH_NONVOL,
    UWOP_SAVE_NONVOL,
    UWOP_SAVE_NONVOL_FAR,
    UWOP_SAVE_XMM128,
    UWOP_SAVE_XMM128_FAR,
)

__all__ = [
    "GPR", "OP_NAMES", "Reader", "UnwindCode", "UnwindDataError", "UnwindInfo", "exception_directory",
    "read_unwind_info",
]  # fmt: skip

Reader = Callable[[int, int], "bytes | None"]
OP_NAMES = ("PUSH_NONVOL", "ALLOC_LARGE", "ALLOC_SMALL", "SET_FPREG", "SAVE_NONVOL", "SAVE_NONVOL_FAR",
            "EPILOG", "SPARE_CODE", "SAVE_XMM128", "SAVE_XMM128_FAR", "PUSH_MACHFRAME")  # fmt: skip
# Slots each code takes (ReactOS UnwindOpSlots); ALLOC_LARGE with OpInfo 1 takes 3.
_SLOTS = (1, 2, 1, 1, 2, 3, 2, 3, 2, 3, 1)
# Register numbers in unwind codes: RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 (MS docs),
# which is UserContext's order.
GPR = REGISTER_NAMES[:16]


class UnwindDataError(Exception):
    """Unwind data that cannot be read or makes no sense; the message says why, in one line."""


@record(frozen=True)
class UnwindCode:
    """One decoded unwind operation; ``value`` is the size (ALLOC) or stack offset (SAVE) in bytes."""

    offset: int
    op: int
    info: int
    value: int = 0

    def __str__(self) -> str:
        name = OP_NAMES[self.op] if self.op < len(OP_NAMES) else f"op{self.op}"
        reg = f" {GPR[self.info]}" if self.op in (UWOP_PUSH_NONVOL, UWOP_SAVE_NONVOL, UWOP_SAVE_NONVOL_FAR) else ""
        val = f" {self.value:#x}" if self.value else ""
        return f"+{self.offset:#x} {name}{reg}{val}"


@record(frozen=True)
class UnwindInfo:
    """A decoded UNWIND_INFO: header fields, unwind codes and the chained entry if any."""

    version: int
    flags: int
    prolog_size: int
    frame_register: int
    frame_offset: int  # scaled: bytes = 16 * frame_offset
    codes: tuple[UnwindCode, ...]
    chained: RuntimeFunction | None
    tail: int = 0  # address after the code slots: the handler's RVA, or the chained RUNTIME_FUNCTION


def read_unwind_info(read: Reader, address: int, base: int) -> UnwindInfo:
    """Decode the UNWIND_INFO at ``address`` (``base``: the image base its RVAs are relative to)."""
    head = read(address, 4)
    if head is None:
        raise UnwindDataError(f"UNWIND_INFO at {address:#x} is not readable")
    version, flags = head[0] & 7, head[0] >> 3
    if version not in (1, 2):
        raise UnwindDataError(f"UNWIND_INFO at {address:#x} has version {version}")
    count = head[2]
    raw = read(address + 4, 2 * count) if count else b""
    if raw is None:
        raise UnwindDataError(f"unwind codes at {address + 4:#x} are not readable")
    codes, i = [], 0
    while i < count:
        offset, op, info = raw[2 * i], raw[2 * i + 1] & 0xF, raw[2 * i + 1] >> 4
        if op > UWOP_PUSH_MACHFRAME:
            raise UnwindDataError(f"UNWIND_INFO at {address:#x} has an unknown unwind op {op}")
        n = 3 if op == UWOP_ALLOC_LARGE and info else _SLOTS[op]
        if i + n > count:
            raise UnwindDataError(f"UNWIND_INFO at {address:#x}: code {i} runs past CountOfCodes")
        slot16 = int.from_bytes(raw[2 * i + 2 : 2 * i + 4], "little") if n >= 2 else 0
        slot32 = int.from_bytes(raw[2 * i + 2 : 2 * i + 6], "little") if n == 3 else 0
        value = {
            UWOP_ALLOC_LARGE: slot32 if info else slot16 * 8,  # unscaled, or divided by 8
            UWOP_ALLOC_SMALL: info * 8 + 8,
            UWOP_SAVE_NONVOL: slot16 * 8,
            UWOP_SAVE_NONVOL_FAR: slot32,
            UWOP_SAVE_XMM128: slot16 * 16,
            UWOP_SAVE_XMM128_FAR: slot32,
        }.get(op, 0)
        codes.append(UnwindCode(offset, op, info, value))
        i += n
    tail = address + 4 + 2 * ((count + 1) & ~1)
    chained = None
    if flags & UNW_FLAG_CHAININFO:
        raw_chain = read(tail, RUNTIME_FUNCTION_SIZE)
        if raw_chain is None:
            raise UnwindDataError(f"chained RUNTIME_FUNCTION after {address:#x} is not readable")
        b, e, u = struct.unpack("<III", raw_chain)
        chained = RuntimeFunction(base + b, base + e, base + u)
    return UnwindInfo(version, flags, head[1], head[3] & 0xF, head[3] >> 4, tuple(codes), chained, tail)


def exception_directory(read: Reader, base: int) -> tuple[int, int] | None:
    """(RVA, size) of a mapped PE32+ image's exception directory (data directory 3), or None:
    e_lfanew at 0x3C, "PE\\0\\0", the COFF header (20 bytes), then the optional header (magic
    0x20B) whose data directories start at +112 (MS "PE Format")."""
    head = read(base, 0x40)
    if head is None or head[:2] != b"MZ":
        return None
    (lfanew,) = struct.unpack_from("<I", head, IMAGE_DOS_E_LFANEW)
    nt = read(base + lfanew, 24 + 112 + 16 * 8)
    if nt is None or nt[:4] != b"PE\0\0" or struct.unpack_from("<H", nt, 24)[0] != 0x20B:
        return None
    rva, size = struct.unpack_from("<II", nt, 24 + 112 + 3 * 8)
    return (rva, size) if rva and size else None
