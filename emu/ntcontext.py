"""The x64 exception structures as bytes: CONTEXT, EXCEPTION_RECORD, DISPATCHER_CONTEXT.

Layouts from winnt.h as MS docs give them ("CONTEXT structure (winnt.h)", "EXCEPTION_RECORD
structure (winnt.h)") and ReactOS ``sdk/include/xdk/amd64/ke.h`` / ``winnt.h``; each offset is
named once here. The kernel model writes them on the user stack when it delivers an
exception and reads them back in NtContinue and NtRaiseException; the built-in ntdll's
routines read and write them in place.
"""

from __future__ import annotations

import struct
from dataclasses import field

from emu.context import UserContext
from emu.records import record

# --- CONTEXT (x64, 16-byte aligned, 0x4D0 bytes) -----------------------------------------------
CONTEXT_SIZE = 0x4D0
CTX_P1HOME = 0x00  # P1Home..P6Home: the register home area
CTX_FLAGS = 0x30
CTX_MXCSR = 0x34
CTX_SEGCS, CTX_SEGDS, CTX_SEGES, CTX_SEGFS, CTX_SEGGS, CTX_SEGSS = 0x38, 0x3A, 0x3C, 0x3E, 0x40, 0x42
CTX_EFLAGS = 0x44
CTX_DR0 = 0x48  # Dr0..Dr3, Dr6, Dr7
CTX_RAX = 0x78  # Rax, Rcx, Rdx, Rbx, Rsp, Rbp, Rsi, Rdi, R8..R15: 16 quadwords in this order
CTX_RSP = 0x98
CTX_RIP = 0xF8
CTX_FLTSAVE = 0x100  # XMM_SAVE_AREA32 (FXSAVE layout, 0x200 bytes)
CTX_FLT_CONTROL_WORD = CTX_FLTSAVE + 0x00
CTX_FLT_STATUS_WORD = CTX_FLTSAVE + 0x02
CTX_FLT_TAG_WORD = CTX_FLTSAVE + 0x04  # the abridged tag: one bit per register, 1 = not empty
CTX_FLT_REGISTERS = CTX_FLTSAVE + 0x20  # ST(0)..ST(7), 16 bytes each (80-bit values)
CTX_FLT_MXCSR = CTX_FLTSAVE + 0x18
CTX_FLT_MXCSR_MASK = CTX_FLTSAVE + 0x1C
CTX_XMM0 = CTX_FLTSAVE + 0xA0  # Xmm0..Xmm15, 16 bytes each
# ContextFlags (winnt.h): CONTEXT_AMD64 | CONTROL 1, INTEGER 2, SEGMENTS 4, FLOATING_POINT 8, DEBUG 0x10.
CONTEXT_AMD64 = 0x0010_0000
CONTEXT_CONTROL = CONTEXT_AMD64 | 0x1
CONTEXT_INTEGER = CONTEXT_AMD64 | 0x2
CONTEXT_SEGMENTS = CONTEXT_AMD64 | 0x4
CONTEXT_FLOATING_POINT = CONTEXT_AMD64 | 0x8
CONTEXT_FULL = CONTEXT_CONTROL | CONTEXT_INTEGER | CONTEXT_FLOATING_POINT
# The order of the integer registers in CONTEXT (Rax at 0x78 .. R15 at 0xF0); UserContext's first
# 16 fields are the same registers in the same order.
CTX_GPR_ORDER = UserContext._fields[:16]

# CONTEXT_EX follows the CONTEXT in an exception frame from Windows 7 SP1 on (XSTATE support):
# three CONTEXT_CHUNKs {LONG Offset; ULONG Length}: All, Legacy, XState, relative to itself.
CONTEXT_EX_SIZE = 0x20

# --- EXCEPTION_RECORD (x64, 0x98 bytes) ----------------------------------------------------------
EXCEPTION_RECORD_SIZE = 0x98
ER_CODE, ER_FLAGS, ER_RECORD, ER_ADDRESS, ER_NUMBER_PARAMETERS, ER_INFORMATION = 0x00, 0x04, 0x08, 0x10, 0x18, 0x20
EXCEPTION_MAXIMUM_PARAMETERS = 15
# ExceptionFlags (ReactOS sdk/include/xdk/winnt_old.h, Wine include/winnt.h)
EXCEPTION_NONCONTINUABLE = 0x01
EXCEPTION_UNWINDING = 0x02
EXCEPTION_EXIT_UNWIND = 0x04
EXCEPTION_STACK_INVALID = 0x08
EXCEPTION_NESTED_CALL = 0x10
EXCEPTION_TARGET_UNWIND = 0x20
EXCEPTION_COLLIDED_UNWIND = 0x40
# EXCEPTION_DISPOSITION (excpt.h) and the vectored handlers' answers (winnt.h)
EXCEPTION_CONTINUE_EXECUTION_DISPOSITION = 0  # ExceptionContinueExecution
EXCEPTION_CONTINUE_SEARCH_DISPOSITION = 1  # ExceptionContinueSearch
EXCEPTION_NESTED_DISPOSITION = 2  # ExceptionNestedException
EXCEPTION_COLLIDED_DISPOSITION = 3  # ExceptionCollidedUnwind
VEH_CONTINUE_EXECUTION = 0xFFFF_FFFF  # EXCEPTION_CONTINUE_EXECUTION (-1) as a 32-bit LONG
VEH_CONTINUE_SEARCH = 0

# --- RTL_VECTORED_HANDLER_ENTRY (ReactOS sdk/lib/rtl/vectoreh.c): ListEntry, VectoredHandler, Refs
VEH_FLINK, VEH_BLINK, VEH_HANDLER, VEH_REFS = 0x00, 0x08, 0x10, 0x18
VEH_ENTRY_SIZE = 0x20
VEH_ENTRIES = 64  # the built-in ntdll's pool of entries (both lists together; Windows uses the heap)
LIST_FLINK, LIST_BLINK = 0x00, 0x08  # LIST_ENTRY

# --- DISPATCHER_CONTEXT (x64, winnt.h; MS docs "x64 exception handling": language-specific handler)
DC_CONTROL_PC, DC_IMAGE_BASE, DC_FUNCTION_ENTRY, DC_ESTABLISHER_FRAME = 0x00, 0x08, 0x10, 0x18
DC_TARGET_IP, DC_CONTEXT_RECORD, DC_LANGUAGE_HANDLER, DC_HANDLER_DATA = 0x20, 0x28, 0x30, 0x38
DC_HISTORY_TABLE, DC_SCOPE_INDEX = 0x40, 0x48
DISPATCHER_CONTEXT_SIZE = 0x50

# --- MACHINE_FRAME (MS docs "struct UNWIND_CODE", UWOP_PUSH_MACHFRAME) ---------------------------
MACHINE_FRAME_SIZE = 0x28
MF_RIP, MF_SEGCS, MF_EFLAGS, MF_RSP, MF_SEGSS = 0x00, 0x08, 0x10, 0x18, 0x20

# Selectors a user-mode CONTEXT carries on Windows x64 (ReactOS ketypes.h: KGDT64_R3_CODE | 3,
# KGDT64_R3_DATA | 3, KGDT64_R3_CMTEB | 3 for FS).
USER_CS, USER_SS, USER_FS = 0x33, 0x2B, 0x53
MXCSR_DEFAULT = 0x1F80  # all exceptions masked, round to nearest (Intel SDM vol. 1, 10.2.3.1)
FPU_CONTROL_DEFAULT = 0x027F  # x64 Windows' initial x87 control word (53-bit precision, all masked)
# The x87 state: (control, status, tag words), then R0..R7 (physical registers) as (mantissa, exponent).
X87State = tuple[tuple[int, int, int], tuple[tuple[int, int], ...]]


@record
class Context:
    """A CONTEXT as emu models it: the 16 general registers, RIP, EFlags, XMM0-15, MXCSR, flags."""

    regs: UserContext
    xmm: list[int] = field(default_factory=lambda: [0] * 16)
    mxcsr: int = MXCSR_DEFAULT
    flags: int = CONTEXT_FULL | CONTEXT_SEGMENTS
    x87: X87State | None = None  # None: the initial state (control word 0x27F, all registers empty)

    def to_bytes(self) -> bytes:
        buf = bytearray(CONTEXT_SIZE)
        struct.pack_into("<II", buf, CTX_FLAGS, self.flags, self.mxcsr)
        struct.pack_into("<HHHHHH", buf, CTX_SEGCS, USER_CS, USER_SS, USER_SS, USER_FS, USER_SS, USER_SS)
        struct.pack_into("<I", buf, CTX_EFLAGS, self.regs.rflags & 0xFFFF_FFFF)
        struct.pack_into("<16Q", buf, CTX_RAX, *(v & 0xFFFF_FFFF_FFFF_FFFF for v in self.regs[:16]))
        struct.pack_into("<Q", buf, CTX_RIP, self.regs.rip & 0xFFFF_FFFF_FFFF_FFFF)
        struct.pack_into("<H", buf, CTX_FLT_CONTROL_WORD, FPU_CONTROL_DEFAULT)
        if self.x87 is not None:
            # FXSAVE's layout (Intel SDM vol. 1, 10.5.1): the registers in stack order from ST(0).
            (control, status, tag), regs = self.x87
            top = (status >> 11) & 7
            abridged = sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)
            struct.pack_into("<HHB", buf, CTX_FLT_CONTROL_WORD, control, status, abridged)
            for i in range(8):
                mantissa, exponent = regs[(top + i) & 7]
                struct.pack_into("<QH", buf, CTX_FLT_REGISTERS + 16 * i, mantissa, exponent)
        struct.pack_into("<II", buf, CTX_FLT_MXCSR, self.mxcsr, 0xFFFF)
        for i, v in enumerate(self.xmm):
            buf[CTX_XMM0 + 16 * i : CTX_XMM0 + 16 * (i + 1)] = (v & (1 << 128) - 1).to_bytes(16, "little")
        return bytes(buf)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Context:
        flags, mxcsr = struct.unpack_from("<II", raw, CTX_FLAGS)
        gprs = struct.unpack_from("<16Q", raw, CTX_RAX)
        (rip,) = struct.unpack_from("<Q", raw, CTX_RIP)
        (eflags,) = struct.unpack_from("<I", raw, CTX_EFLAGS)
        xmm = [int.from_bytes(raw[CTX_XMM0 + 16 * i : CTX_XMM0 + 16 * (i + 1)], "little") for i in range(16)]
        return cls(UserContext._make((*gprs, rip, eflags)), xmm, mxcsr, flags, _x87_from(raw))


def _x87_from(raw: bytes) -> X87State:
    """The x87 state of a CONTEXT's FltSave, with the full tag word FXRSTOR rebuilds from the
    abridged one and the values (Intel SDM vol. 1, 10.5.1.1: valid 00, zero 01, special 10, empty 11)."""
    control, status, abridged = struct.unpack_from("<HHB", raw, CTX_FLT_CONTROL_WORD)
    top = (status >> 11) & 7
    regs: list[tuple[int, int]] = [(0, 0)] * 8
    tag = 0
    for i in range(8):
        mantissa, exponent = struct.unpack_from("<QH", raw, CTX_FLT_REGISTERS + 16 * i)
        phys = (top + i) & 7
        regs[phys] = (mantissa, exponent)
        if not abridged >> phys & 1:
            kind = 3
        elif exponent & 0x7FFF == 0:
            kind = 1 if mantissa == 0 else 2
        elif exponent & 0x7FFF == 0x7FFF or not mantissa >> 63:
            kind = 2
        else:
            kind = 0
        tag |= kind << (2 * phys)
    return (control, status, tag), tuple(regs)


def context_ex(buffer_size: int = CONTEXT_SIZE) -> bytes:
    """The CONTEXT_EX after a CONTEXT with no XSTATE: All and Legacy span the CONTEXT (and, for
    All, the CONTEXT_EX itself); XState is empty (Wine dlls/ntdll/exception.c
    RtlInitializeExtendedContext2, the layout Windows 7 SP1 introduced)."""
    return struct.pack("<iIiIiI", -buffer_size, buffer_size + CONTEXT_EX_SIZE, -buffer_size, buffer_size,
                       CONTEXT_EX_SIZE, 0)  # fmt: skip


@record(frozen=True)
class ExceptionRecord:
    """An EXCEPTION_RECORD: code, flags, the chained record's address, where, parameters."""

    code: int
    address: int
    params: tuple[int, ...] = ()
    flags: int = 0
    chained: int = 0

    def to_bytes(self) -> bytes:
        buf = bytearray(EXCEPTION_RECORD_SIZE)
        n = min(len(self.params), EXCEPTION_MAXIMUM_PARAMETERS)
        struct.pack_into("<IIQQI", buf, 0, self.code, self.flags, self.chained, self.address, n)
        struct.pack_into(f"<{n}Q", buf, ER_INFORMATION, *(p & 0xFFFF_FFFF_FFFF_FFFF for p in self.params[:n]))
        return bytes(buf)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ExceptionRecord:
        code, flags, chained, address, n = struct.unpack_from("<IIQQI", raw, 0)
        n = min(n, EXCEPTION_MAXIMUM_PARAMETERS)
        params = struct.unpack_from(f"<{n}Q", raw, ER_INFORMATION)
        return cls(code, address, tuple(params), flags, chained)
