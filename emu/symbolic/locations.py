"""Where the symbolic executor reads and writes: registers (with their 8/16/32-bit aliases),
memory operands' addresses, and memory bytes, each an expression over the declared values or
None when concrete (then the CPU's value is read). A 32-bit register write zero-extends and an
8/16-bit one keeps the rest (Intel SDM vol. 1, 3.4.1.1); memory is little-endian bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import z3
from capstone import x86 as cx

from emu.symbolic.flags import Unsupported
from emu.symbolic.regs import ALIASES, UC_FS_BASE, UC_GS_BASE, UC_IDS
from emu.symbolic.store import Expr, Store


def as_bv(e: Expr | None, conc: int, bits: int) -> Expr:
    return z3.BitVecVal(conc, bits) if e is None else e


def simplified(e: Expr) -> Expr | None:
    """Simplified, or None when the expression is a constant (the location is concrete again)."""
    s = z3.simplify(e)
    return None if z3.is_bv_value(s) else s


def merge_bits(old: Expr, part: Expr, lo: int, bits: int) -> Expr:
    """``old`` (64 bits) with bits lo..lo+bits-1 replaced by ``part``."""
    parts = []
    if lo + bits < 64:
        parts.append(z3.Extract(63, lo + bits, old))
    parts.append(part)
    if lo:
        parts.append(z3.Extract(lo - 1, 0, old))
    return z3.Concat(*parts)


class Locations:
    """Reads and writes of registers and memory, symbolic where the store says so.

    ``fix(expr, value, site, text)``: a symbolic address is ``value`` on this run (the driver
    explores the other feasible values).
    """

    uc: Any
    store: Store
    fix: Callable[[Expr, int, int, str], None]
    _unfilled: list[tuple[str, Any]]

    def reg(self, name: str) -> tuple[Expr | None, int]:
        canon, lo, bits = ALIASES[name]
        conc64 = self.uc.reg_read(UC_IDS[canon])
        conc = (conc64 >> lo) & ((1 << bits) - 1)
        t = self.store.regs.get(canon)
        if t is None:
            return None, conc
        if t[1] is not None and t[1] != conc64:
            del self.store.regs[canon]  # overwritten by something emu did not follow
            return None, conc
        e = t[0]
        return (e if bits == 64 else z3.Extract(lo + bits - 1, lo, e)), conc

    def set_reg(self, name: str, e: Expr | None) -> None:
        canon, lo, bits = ALIASES[name]
        regs = self.store.regs
        if bits == 64:
            full = e
        elif bits == 32:  # a 32-bit write zero-extends (Intel SDM vol. 1, 3.4.1.1)
            full = None if e is None else z3.ZeroExt(32, e)
        else:  # 8 and 16 bits: the rest of the register stays
            old, conc = self.reg(canon)
            if old is None and e is None:
                return
            if e is None:
                # The concrete part is known once the CPU has run the instruction.
                self._unfilled.append(("p", (canon, lo, bits, old)))
                regs.pop(canon, None)
                return
            old = as_bv(old, conc, 64)
            full = merge_bits(old, e, lo, bits)
        if full is not None:
            full = simplified(full)
        if full is None:
            regs.pop(canon, None)
        else:
            regs[canon] = (full, None)
            self._unfilled.append(("r", canon))

    def address(self, op: Any, insn: Any) -> tuple[Expr | None, int]:
        """The operand's address: (expr when a register in it is symbolic, concrete value)."""
        m = op.mem
        conc = m.disp
        if m.segment in (cx.X86_REG_GS, cx.X86_REG_FS):
            conc += self.uc.reg_read(UC_GS_BASE if m.segment == cx.X86_REG_GS else UC_FS_BASE)
        sym: Expr | None = None
        if m.base == cx.X86_REG_RIP:
            conc += insn.address + insn.size
        elif m.base:
            e, c = self.reg(insn.reg_name(m.base))
            conc += c
            sym = e
        if m.index:
            e, c = self.reg(insn.reg_name(m.index))
            conc += c * m.scale
            if e is not None:
                sym = e * m.scale if sym is None else sym + e * m.scale
        conc &= (1 << 64) - 1
        if sym is None:
            return None, conc
        return sym + z3.BitVecVal(self._concrete_rest(op, insn), 64), conc

    def _tainted(self, name: str) -> bool:
        return self.reg(name)[0] is not None

    def _concrete_rest(self, op: Any, insn: Any) -> int:
        """The address's displacement, segment base and the untainted registers."""
        m = op.mem
        rest = m.disp
        if m.segment in (cx.X86_REG_GS, cx.X86_REG_FS):
            rest += self.uc.reg_read(UC_GS_BASE if m.segment == cx.X86_REG_GS else UC_FS_BASE)
        if m.base == cx.X86_REG_RIP:
            rest += insn.address + insn.size
        elif m.base and not self._tainted(insn.reg_name(m.base)):
            rest += self.reg(insn.reg_name(m.base))[1]
        if m.index and not self._tainted(insn.reg_name(m.index)):
            rest += self.reg(insn.reg_name(m.index))[1] * m.scale
        return int(rest) & ((1 << 64) - 1)

    def mem_address(self, op: Any, insn: Any) -> int:
        """The operand's address; a symbolic one is fixed to its concrete value (the driver
        explores the other feasible values)."""
        sym, conc = self.address(op, insn)
        if sym is not None:
            self.fix(sym, conc, insn.address, f"address of {insn.mnemonic} {insn.op_str}")
        return conc

    def load(self, addr: int, size: int) -> tuple[Expr | None, int]:
        raw = bytes(self.uc.mem_read(addr, size))
        conc = int.from_bytes(raw, "little")
        mem = self.store.mem
        if not any((addr + i) in mem for i in range(size)):
            return None, conc
        parts = []
        tainted = False
        for i in reversed(range(size)):
            t = mem.get(addr + i)
            if t is not None and t[1] is not None and t[1] != raw[i]:
                del mem[addr + i]
                t = None
            if t is None:
                parts.append(z3.BitVecVal(raw[i], 8))
            else:
                parts.append(t[0])
                tainted = True
        if not tainted:
            return None, conc
        return (z3.Concat(*parts) if size > 1 else parts[0]), conc

    def store_mem(self, addr: int, size: int, e: Expr | None) -> None:
        mem = self.store.mem
        if e is None:
            for i in range(size):
                mem.pop(addr + i, None)
            return
        for i in range(size):
            b = simplified(z3.Extract(8 * i + 7, 8 * i, e))
            if b is None:
                mem.pop(addr + i, None)
            else:
                mem[addr + i] = (b, None)
                self._unfilled.append(("m", addr + i))

    def read(self, op: Any, insn: Any) -> tuple[Expr | None, int, int]:
        """An operand's (expr or None, concrete value, bits)."""
        if op.type == cx.X86_OP_REG:
            e, c = self.reg(insn.reg_name(op.reg))
            return e, c, op.size * 8
        if op.type == cx.X86_OP_IMM:
            return None, op.imm & ((1 << (op.size * 8)) - 1), op.size * 8
        if op.type == cx.X86_OP_MEM:
            e, c = self.load(self.mem_address(op, insn), op.size)
            return e, c, op.size * 8
        raise Unsupported(f"operand kind {op.type}")

    def write(self, op: Any, insn: Any, e: Expr | None) -> None:
        if op.type == cx.X86_OP_REG:
            name = insn.reg_name(op.reg)
            if name not in ALIASES:
                if e is not None:
                    raise Unsupported(f"a symbolic value into {name}")
                return
            self.set_reg(name, e)
        elif op.type == cx.X86_OP_MEM:
            self.store_mem(self.mem_address(op, insn), op.size, e)
