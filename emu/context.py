"""The user-mode register context of a thread, as a debugger or GetThreadContext shows it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from emu.winnt import (
    KGDT64_R3_CODE,
    KGDT64_R3_DATA,
    KTRAP_FRAME_EFLAGS,
    KTRAP_FRAME_R8,
    KTRAP_FRAME_R9,
    KTRAP_FRAME_R10,
    KTRAP_FRAME_R11,
    KTRAP_FRAME_RAX,
    KTRAP_FRAME_RCX,
    KTRAP_FRAME_RDX,
    KTRAP_FRAME_RIP,
    KTRAP_FRAME_RSP,
    KTRAP_FRAME_SEGCS,
    KTRAP_FRAME_SEGSS,
    KTRAP_FRAME_SIZE,
)

REGISTER_NAMES: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)  # fmt: skip

# Callee-saved under the Windows x64 calling convention (MS docs "x64 ABI conventions").
NONVOLATILE: tuple[str, ...] = ("rbx", "rbp", "rsi", "rdi", "r12", "r13", "r14", "r15")


class UserContext(NamedTuple):
    """General-purpose registers, RIP and RFLAGS; immutable and cheap to build."""

    rax: int
    rcx: int
    rdx: int
    rbx: int
    rsp: int
    rbp: int
    rsi: int
    rdi: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int

    def changed(self, other: UserContext) -> dict[str, tuple[int, int]]:
        """Registers whose values differ: name → (self's value, other's value)."""
        return {n: (a, b) for n, a, b in zip(REGISTER_NAMES, self, other) if a != b}

    def as_hex(self) -> dict[str, str]:
        return {n: f"{v:#018x}" for n, v in zip(REGISTER_NAMES, self)}


@dataclass(frozen=True, slots=True)
class KTrapFrame:
    """The user context the kernel saves on entry (x64 KTRAP_FRAME; offsets in emu.winnt)."""

    ctx: UserContext
    via: str = "syscall"  # or "int 2Eh"

    def to_bytes(self) -> bytes:
        """The KTRAP_FRAME fields emu models, at their Windows offsets (0x190 bytes)."""
        buf = bytearray(KTRAP_FRAME_SIZE)
        c = self.ctx
        for off, val in (
            (KTRAP_FRAME_RAX, c.rax), (KTRAP_FRAME_RCX, c.rcx), (KTRAP_FRAME_RDX, c.rdx),
            (KTRAP_FRAME_R8, c.r8), (KTRAP_FRAME_R9, c.r9), (KTRAP_FRAME_R10, c.r10),
            (KTRAP_FRAME_R11, c.r11), (KTRAP_FRAME_RIP, c.rip), (KTRAP_FRAME_SEGCS, KGDT64_R3_CODE),
            (KTRAP_FRAME_EFLAGS, c.rflags), (KTRAP_FRAME_RSP, c.rsp), (KTRAP_FRAME_SEGSS, KGDT64_R3_DATA),
        ):  # fmt: skip
            buf[off : off + 8] = (val & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")
        return bytes(buf)
