"""A decoded instruction with what the executor's fast path needs: the 64-bit registers it
reads and writes (capstone's ``regs_access``, implicit operands included) and whether it
touches memory or the flags."""

from __future__ import annotations

from typing import Any

from capstone import x86 as cx

from emu.symbolic.regs import ALIASES

# Instructions that touch the stack (or strings) without a memory operand capstone lists.
_IMPLICIT_MEMORY = ("push", "pop", "call", "ret", "leave", "enter", "movs", "stos", "lods", "cmps", "scas", "xlat")


class Decoded:
    """An instruction with what the fast path needs: the 64-bit registers it reads and writes."""

    __slots__ = ("insn", "memory", "partial", "reads", "reads_flags", "writes", "writes_flags")

    def __init__(self, insn: Any, reads: tuple[str, ...], writes: tuple[str, ...], partial: tuple[str, ...],
                 reads_flags: bool, writes_flags: bool, memory: bool) -> None:  # fmt: skip
        self.insn, self.reads, self.writes, self.partial = insn, reads, writes, partial
        self.reads_flags, self.writes_flags, self.memory = reads_flags, writes_flags, memory

    @classmethod
    def of(cls, insn: Any) -> Decoded:
        reads, writes = insn.regs_access()
        rnames = [insn.reg_name(r) for r in reads]
        wnames = [insn.reg_name(r) for r in writes]
        memory = any(op.type == cx.X86_OP_MEM for op in insn.operands) or insn.mnemonic.startswith(
            (*_IMPLICIT_MEMORY, "rep")
        )
        full = tuple(ALIASES[n][0] for n in wnames if n in ALIASES and ALIASES[n][2] >= 32)
        partial = tuple(ALIASES[n][0] for n in wnames if n in ALIASES and ALIASES[n][2] < 32)
        return cls(
            insn,
            tuple(ALIASES[n][0] for n in rnames if n in ALIASES),
            full,
            partial,
            "rflags" in rnames or "eflags" in rnames,
            "rflags" in wnames or "eflags" in wnames,
            memory,
        )
