"""x64 unwind data as a debugger reads it from memory: .pdata and UNWIND_INFO.

Facts from Microsoft's "x64 exception handling" (learn.microsoft.com/cpp/build/exception-handling-x64,
sections "struct RUNTIME_FUNCTION", "struct UNWIND_INFO" and "struct UNWIND_CODE"), checked
against ReactOS ``sdk/lib/rtl/amd64/unwind.c`` (RtlVirtualUnwind, RtlLookupFunctionEntry):

* ``.pdata`` holds RUNTIME_FUNCTION {BeginAddress, EndAddress, UnwindData}: three RVAs, sorted.
* UNWIND_INFO is Version:3|Flags:5, SizeOfProlog, CountOfCodes, FrameRegister:4|FrameOffset:4,
  then CountOfCodes 16-bit slots (padded to an even count); with UNW_FLAG_CHAININFO a
  RUNTIME_FUNCTION follows, whose codes are applied after these.

:mod:`emu.detection.unwind` walks a stack with them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emu.detection.prologue import GPR
from emu.loader.pdata import RuntimeFunction as RuntimeFunction
from emu.loader.pdata import entry_at
from emu.loader.pdata import function_table as function_table
from emu.loader.pdata import parse_function_table as parse_function_table
from emu.winnt import (
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

if TYPE_CHECKING:
    from emu.detection.view import ModuleInfo

OP_NAMES = ("PUSH_NONVOL", "ALLOC_LARGE", "ALLOC_SMALL", "SET_FPREG", "SAVE_NONVOL", "SAVE_NONVOL_FAR",
            "EPILOG", "SPARE_CODE", "SAVE_XMM128", "SAVE_XMM128_FAR", "PUSH_MACHFRAME")  # fmt: skip
# Slots each code takes (ReactOS UnwindOpSlots); ALLOC_LARGE with OpInfo 1 takes 3.
_SLOTS = (1, 2, 1, 1, 2, 3, 2, 3, 2, 3, 1)
# Operation-info register numbers are RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 (MS docs):
# emu.detection.prologue.GPR, which is also UserContext's field order.

Reader = Callable[[int, int], "bytes | None"]


__all__ = [
    "OP_NAMES", "Reader", "RuntimeFunction", "UnwindCode", "UnwindInfo", "WalkStop", "function_table", "lookup",
    "parse_function_table", "read_unwind_info",
]  # fmt: skip


class WalkStop(Exception):
    """Ends a stack walk: unwind data or stack memory that cannot be read or makes no sense; the
    message says why, in one line (:func:`emu.detection.unwind.walk` turns it into a ``problem``)."""


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class UnwindInfo:
    version: int
    flags: int
    prolog_size: int
    frame_register: int
    frame_offset: int  # scaled: bytes = 16 * frame_offset
    codes: tuple[UnwindCode, ...]
    chained: RuntimeFunction | None


def read_unwind_info(read: Reader, address: int, base: int) -> UnwindInfo:
    """Decode the UNWIND_INFO at ``address`` (``base``: the image base its RVAs are relative to)."""
    head = read(address, 4)
    if head is None:
        raise WalkStop(f"UNWIND_INFO at {address:#x} is not readable")
    version, flags = head[0] & 7, head[0] >> 3
    if version not in (1, 2):
        raise WalkStop(f"UNWIND_INFO at {address:#x} has version {version}")
    count = head[2]
    raw = read(address + 4, 2 * count) if count else b""
    if raw is None:
        raise WalkStop(f"unwind codes at {address + 4:#x} are not readable")
    codes, i = [], 0
    while i < count:
        offset, op, info = raw[2 * i], raw[2 * i + 1] & 0xF, raw[2 * i + 1] >> 4
        if op > UWOP_PUSH_MACHFRAME:
            raise WalkStop(f"UNWIND_INFO at {address:#x} has an unknown unwind op {op}")
        n = 3 if op == UWOP_ALLOC_LARGE and info else _SLOTS[op]
        if i + n > count:
            raise WalkStop(f"UNWIND_INFO at {address:#x}: code {i} runs past CountOfCodes")
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
    chained = None
    if flags & UNW_FLAG_CHAININFO:
        tail = read(address + 4 + 2 * ((count + 1) & ~1), RUNTIME_FUNCTION_SIZE)
        if tail is None:
            raise WalkStop(f"chained RUNTIME_FUNCTION after {address:#x} is not readable")
        b, e, u = struct.unpack("<III", tail)
        chained = RuntimeFunction(base + b, base + e, base + u)
    return UnwindInfo(version, flags, head[1], head[3] & 0xF, head[3] >> 4, tuple(codes), chained)


def lookup(module: ModuleInfo, address: int) -> RuntimeFunction | None:
    """The .pdata entry covering ``address`` (binary search, like RtlLookupFunctionEntry)."""
    return entry_at(module.function_table, address)
