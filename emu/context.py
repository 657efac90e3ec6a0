"""The user-mode register context of a thread, as a debugger or GetThreadContext shows it."""

from __future__ import annotations

from typing import NamedTuple

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
