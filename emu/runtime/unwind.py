"""x64 unwind data for the built-in ntdll: .pdata and .xdata sections, as a PE ntdll has them.

"Table-based exception handling requires a table entry for all functions that allocate stack
space or call another function" (MS docs "x64 exception handling"), so Windows' ntdll has a
RUNTIME_FUNCTION for each such function and a debugger unwinds through it. The runtime's
assembly is hand-written, so its table is written here, next to it: one :class:`FunctionUnwind`
per non-leaf function, its UNWIND_CODEs in the documented order (reverse prologue order,
CodeOffset = the end of the prologue instruction). The syscall stubs and RtlRaiseStatus are
leaves and have none. ``tests/test_detect_unwind.py`` checks every entry against the
disassembled prologue and the kernel's UCALLOUT_FRAME layout.

KiUserCallbackDispatcher is entered by the kernel, not called: its frame ends in a machine
frame (UWOP_PUSH_MACHFRAME) over the UCALLOUT_FRAME's MachineFrame, as Wine writes it
(dlls/ntdll/signal_x86_64.c: ``.seh_pushframe; .seh_stackalloc 0x30``).
"""

from __future__ import annotations

import dataclasses
import struct

from emu.loader.image import PAGE, Image, Section, page_align
from emu.records import record
from emu.winnt import UNW_FLAG_EHANDLER as UNW_FLAG_EHANDLER
from emu.winnt import UNW_FLAG_UHANDLER as UNW_FLAG_UHANDLER
from emu.winnt import UWOP_ALLOC_LARGE as UWOP_ALLOC_LARGE
from emu.winnt import UWOP_ALLOC_SMALL as UWOP_ALLOC_SMALL
from emu.winnt import UWOP_PUSH_MACHFRAME as UWOP_PUSH_MACHFRAME
from emu.winnt import UWOP_PUSH_NONVOL as UWOP_PUSH_NONVOL

UNWIND_VERSION = 1
SLOT = -1  # a code tuple (value, _SLOT, 0): the extra 16-bit slot an UWOP_ALLOC_LARGE takes


@record(frozen=True)
class FunctionUnwind:
    """One RUNTIME_FUNCTION: the function from label ``name`` to label ``end``, its prologue
    size and its UNWIND_CODEs as (CodeOffset, UnwindOp, OpInfo), in UNWIND_INFO order."""

    name: str
    end: str
    prolog: int
    codes: tuple[tuple[int, int, int], ...]
    handler: str = ""  # label of the exception handler, if any
    handler_flags: int = UNW_FLAG_EHANDLER  # when it is called: exceptions, unwinding or both


def alloc_small(offset: int, size: int) -> tuple[int, int, int]:
    """UWOP_ALLOC_SMALL: 8 to 128 bytes, OpInfo = size / 8 - 1 (MS docs)."""
    if not (8 <= size <= 128 and size % 8 == 0):
        raise ValueError(f"UWOP_ALLOC_SMALL cannot describe {size:#x} bytes")
    return (offset, UWOP_ALLOC_SMALL, size // 8 - 1)


def alloc(offset: int, size: int) -> tuple[tuple[int, int, int], ...]:
    """The codes for ``sub rsp, size``: UWOP_ALLOC_SMALL up to 128 bytes, else UWOP_ALLOC_LARGE with
    OpInfo 0 and size / 8 in the next slot (up to 512 KiB - 8; MS docs)."""
    if size <= 128:
        return (alloc_small(offset, size),)
    if size % 8 or size > 0x7FFF8:
        raise ValueError(f"UWOP_ALLOC_LARGE (OpInfo 0) cannot describe {size:#x} bytes")
    return ((offset, UWOP_ALLOC_LARGE, 0), (size // 8, SLOT, 0))


# dispatcher_stack.asm: entered with RSP at the UCALLOUT_FRAME, which it never moves; the 0x30
# bytes below the MachineFrame (home area, Buffer, Length, ApiNumber) and the machine frame
# were pushed by the kernel (ReactOS ntoskrnl/ke/amd64/usercall.c builds the frame).
# Windows' ntdll registers KiUserCallbackDispatcherHandler as the dispatcher's exception handler
# (Microsoft's public ntdll symbols); see dispatcher_handler.asm for what emu's does.
_BOTH = UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER
_DISPATCHER_STACK = FunctionUnwind(
    "KiUserCallbackDispatcher", "RtlUserThreadStart", 0,
    (alloc_small(0, 0x30), (0, UWOP_PUSH_MACHFRAME, 0)), "KiUserCallbackDispatcherHandler", _BOTH,
)  # fmt: skip
# dispatcher_registers.asm: entered like a call, a zero return address below the UCALLOUT_FRAME
# (emu's kernel writes it), then `sub rsp, 0x28` (4 bytes).
_DISPATCHER_REGISTERS = FunctionUnwind(
    "KiUserCallbackDispatcher", "RtlUserThreadStart", 4,
    (alloc_small(4, 0x28), alloc_small(0, 8 + 0x30), (0, UWOP_PUSH_MACHFRAME, 0)), "KiUserCallbackDispatcherHandler",
    _BOTH,
)  # fmt: skip
# ntdll_exceptions.asm and dispatcher_handler.asm: each function's prologue is one `sub rsp, N`
# (4 bytes for N < 0x80, 7 bytes otherwise). KiUserExceptionDispatcher is entered by the kernel
# with the CONTEXT, CONTEXT_EX and EXCEPTION_RECORD (0x590 bytes) below the machine frame
# (emu.kernel.exception.frame_layout), so it unwinds through that machine frame to the fault.
_EXCEPTIONS = (
    FunctionUnwind("KiUserCallbackDispatcherHandler", "LdrLoadDll", 4, alloc(4, 0x38)),
    FunctionUnwind("KiUserExceptionDispatcher", "RtlDispatchException", 0,
                   (*alloc(0, 0x590), (0, UWOP_PUSH_MACHFRAME, 0))),
    FunctionUnwind("RtlDispatchException", "RtlpCallVectoredHandlers", 7, alloc(7, 0x618)),
    FunctionUnwind("RtlpCallVectoredHandlers", "RtlpExecuteHandlerForException", 4, alloc(4, 0x48)),
    FunctionUnwind("RtlpExecuteHandlerForException", "RtlpExecuteHandlerForUnwind", 4, alloc(4, 0x28)),
    FunctionUnwind("RtlpExecuteHandlerForUnwind", "RtlUnwindEx", 4, alloc(4, 0x28)),
    FunctionUnwind("RtlUnwindEx", "RtlRaiseException", 7, alloc(7, 0x618)),
    FunctionUnwind("RtlRaiseException", "RtlpRaiseStatus", 7, alloc(7, 0x518)),
    FunctionUnwind("RtlpRaiseStatus", "RtlpRaiseStatusEnd", 7, alloc(7, 0xC8)),
    FunctionUnwind("__C_specific_handler", "__C_specific_handler__end", 4, alloc(4, 0x78)),
)  # fmt: skip
# ntdll.asm: RtlUserThreadStart's `sub rsp, 0x28` (4 bytes) is its whole prologue.
_COMMON = (FunctionUnwind("RtlUserThreadStart", "RtlRaiseStatus", 4, (alloc_small(4, 0x28),)), *_EXCEPTIONS)

TABLES: dict[str, tuple[FunctionUnwind, ...]] = {
    "stack": (_DISPATCHER_STACK, *_COMMON),
    "registers": (_DISPATCHER_REGISTERS, *_COMMON),
}


def unwind_info_bytes(f: FunctionUnwind, handler_rva: int | None = None) -> bytes:
    """UNWIND_INFO: Version|Flags, SizeOfProlog, CountOfCodes, FrameRegister|FrameOffset, codes (even
    count), then the exception handler's RVA when ``handler_rva`` is given (UNW_FLAG_EHANDLER)."""
    flags = f.handler_flags if handler_rva is not None else 0
    out = bytearray([UNWIND_VERSION | flags << 3, f.prolog, len(f.codes), 0])
    for offset, op, info in f.codes:
        out += struct.pack("<H", offset) if op == SLOT else bytes([offset, op | info << 4])
    if len(f.codes) % 2:
        out += b"\0\0"
    if handler_rva is not None:
        out += struct.pack("<I", handler_rva)
    return bytes(out)


def with_unwind_data(image: Image, convention: str) -> Image:
    """The image with .xdata (UNWIND_INFO) and .pdata (RUNTIME_FUNCTION) sections after its last one."""
    table = TABLES[convention]
    xdata_rva = image.size
    xdata = bytearray()
    entries = []
    for f in table:
        begin, end = image.symbols[f.name], image.symbols[f.end]
        entries.append((begin - image.base, end - image.base, xdata_rva + len(xdata)))
        handler = image.symbols[f.handler] - image.base if f.handler else None
        xdata += unwind_info_bytes(f, handler)
        xdata += bytes(-len(xdata) % 4)  # UNWIND_INFO is DWORD-aligned
    pdata = b"".join(struct.pack("<III", *e) for e in sorted(entries))
    pdata_rva = xdata_rva + page_align(max(len(xdata), 1))
    sections = [
        *image.sections,
        Section(".xdata", xdata_rva, bytes(xdata), "r", PAGE),
        Section(".pdata", pdata_rva, pdata, "r", page_align(max(len(pdata), 1))),
    ]
    return dataclasses.replace(image, sections=sections, pdata=pdata)
