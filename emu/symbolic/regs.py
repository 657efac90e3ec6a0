"""x86-64 general-purpose registers as the symbolic executor sees them: every name capstone
prints maps to (its 64-bit register, lowest bit, width) (Intel SDM vol. 1, 3.4.1.1)."""

from __future__ import annotations

from unicorn import x86_const

GPR = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{i}" for i in range(8, 16)))

_LEGACY = {
    "rax": ("eax", "ax", "al", "ah"),
    "rbx": ("ebx", "bx", "bl", "bh"),
    "rcx": ("ecx", "cx", "cl", "ch"),
    "rdx": ("edx", "dx", "dl", "dh"),
    "rsi": ("esi", "si", "sil", ""),
    "rdi": ("edi", "di", "dil", ""),
    "rbp": ("ebp", "bp", "bpl", ""),
    "rsp": ("esp", "sp", "spl", ""),
}


def _table() -> dict[str, tuple[str, int, int]]:
    out: dict[str, tuple[str, int, int]] = {}
    for r in GPR:
        d, w, b, h = _LEGACY.get(r, (f"{r}d", f"{r}w", f"{r}b", ""))
        out[r] = (r, 0, 64)
        out[d] = (r, 0, 32)
        out[w] = (r, 0, 16)
        out[b] = (r, 0, 8)
        if h:
            out[h] = (r, 8, 8)
    return out


ALIASES = _table()
UC_IDS = {r: getattr(x86_const, f"UC_X86_REG_{r.upper()}") for r in GPR}
UC_RFLAGS = x86_const.UC_X86_REG_RFLAGS
UC_GS_BASE = x86_const.UC_X86_REG_GS_BASE
UC_FS_BASE = x86_const.UC_X86_REG_FS_BASE
# RFLAGS bits (Intel SDM vol. 1, 3.4.3.1).
CF, ZF, SF, OF = 1 << 0, 1 << 6, 1 << 7, 1 << 11
