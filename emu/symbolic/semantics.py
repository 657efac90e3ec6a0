"""What each supported instruction computes, as z3 expressions (Intel SDM vol. 2, the
instruction's "Operation" and "Flags Affected" sections): data movement, arithmetic and
logic, shifts, control transfer and conditions. An instruction outside the subset raises
:class:`~emu.symbolic.flags.Unsupported` and :meth:`Semantics._generic` concretizes what
symbolic it reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import capstone
import z3
from capstone import x86 as cx

from emu.symbolic.flags import CONDITIONS, Unsupported, add_overflow, condition, holds, sub_overflow
from emu.symbolic.locations import Locations, as_bv
from emu.symbolic.regs import ALIASES, CF, OF, SF, UC_RFLAGS, ZF
from emu.symbolic.store import Expr, Flags

_ARITH = {"add", "sub", "and", "or", "xor", "cmp", "test"}


class Semantics(Locations):
    """Instruction semantics over :class:`~emu.symbolic.locations.Locations`.

    ``branch(cond, site, text)``: ``cond`` held at this conditional jump on this run.
    ``concretize(exprs_values, site, text)``: an unsupported use of symbolic operands.
    """

    branch: Callable[[Any, int, str], None]
    concretize: Callable[[list[tuple[Expr, int]], int, str], None]

    def _step(self, insn: Any) -> None:
        m = insn.mnemonic
        ops = insn.operands
        if m.startswith("rep") or m in ("syscall", "int", "int3", "hlt"):
            raise Unsupported(m)
        if m in ("nop", "endbr64"):
            return
        if m in ("mov", "movabs", "movzx", "movsx", "movsxd"):
            e, c, bits = self.read(ops[1], insn)
            dbits = ops[0].size * 8
            if e is not None and dbits > bits:
                e = z3.ZeroExt(dbits - bits, e) if m == "movzx" or m == "mov" else z3.SignExt(dbits - bits, e)
            self.write(ops[0], insn, e)
            return
        if m == "lea":
            sym, _ = self.address(ops[1], insn)
            bits = ops[0].size * 8
            self.write(ops[0], insn, None if sym is None else z3.Extract(bits - 1, 0, sym))
            return
        if m in _ARITH:
            self._arith(insn, m, ops)
            return
        if m in ("inc", "dec", "neg", "not"):
            e, c, bits = self.read(ops[0], insn)
            if e is None:
                self.write(ops[0], insn, None)
                if m != "not":
                    self.store.flags = None
                return
            one = z3.BitVecVal(1, bits)
            res = {"inc": e + one, "dec": e - one, "neg": -e, "not": ~e}[m]
            if m in ("inc", "dec"):
                old = self.store.flags
                cf = old.cf if old is not None else None  # inc/dec leave CF alone
                of = add_overflow(e, one, res) if m == "inc" else sub_overflow(e, one, res)
                self.store.flags = Flags(res == 0, res < 0, cf, of)
            elif m == "neg":
                self.store.flags = Flags(res == 0, res < 0, e != 0, e == z3.BitVecVal(1 << (bits - 1), bits))
            self.write(ops[0], insn, res)
            return
        if m in ("shl", "sal", "shr", "sar"):
            self._shift(insn, m, ops)
            return
        if m == "imul" and len(ops) >= 2:
            a, ca, bits = self.read(ops[1] if len(ops) == 3 else ops[0], insn)
            b, cb, _ = self.read(ops[2] if len(ops) == 3 else ops[1], insn)
            if a is None and b is None:
                self.write(ops[0], insn, None)
                self.store.flags = None
                return
            res = as_bv(a, ca, bits) * as_bv(b, cb, bits)
            why = "imul leaves CF/OF symbolic (not modelled)"
            self.store.flags = Flags(why, why, why, why)
            self.write(ops[0], insn, res)
            return
        if m == "xchg":
            a, _, _ = self.read(ops[0], insn)
            b, _, _ = self.read(ops[1], insn)
            self.write(ops[0], insn, b)
            self.write(ops[1], insn, a)
            return
        if m in ("cdqe", "cdq", "cqo", "cwde"):
            self._widen(m)
            return
        if m == "push":
            e, c, bits = self.read(ops[0], insn)
            if e is not None and bits < 64:
                e = z3.SignExt(64 - bits, e)
            rsp = self.reg("rsp")[1]
            self.store_mem(rsp - 8, 8, e)
            return
        if m == "pop":
            rsp = self.reg("rsp")[1]
            e, _ = self.load(rsp, 8)
            self.write(ops[0], insn, e)
            return
        if m in ("call", "jmp"):
            self._jump(insn, ops[0])
            if m == "call":
                self.store_mem(self.reg("rsp")[1] - 8, 8, None)
            return
        if m in ("ret", "retn"):
            rsp = self.reg("rsp")[1]
            e, c = self.load(rsp, 8)
            if e is not None:
                self.fix(e, c, insn.address, "return address")
            return
        if m.startswith("j") and m[1:] in CONDITIONS:
            cond = self._cond(CONDITIONS[m[1:]], insn)
            if cond is not None:
                taken = bool(self._cc_concrete(CONDITIONS[m[1:]]))
                self.branch(cond if taken else z3.Not(cond), insn.address, f"{m} {insn.op_str}")
            return
        if m.startswith("set") and m[3:] in CONDITIONS:
            cond = self._cond(CONDITIONS[m[3:]], insn)
            self.write(ops[0], insn, None if cond is None else z3.If(cond, z3.BitVecVal(1, 8), z3.BitVecVal(0, 8)))
            return
        if m.startswith("cmov") and m[4:] in CONDITIONS:
            cond = self._cond(CONDITIONS[m[4:]], insn)
            d, cd, bits = self.read(ops[0], insn)
            s, cs, _ = self.read(ops[1], insn)
            if cond is None:
                taken = self._cc_concrete(CONDITIONS[m[4:]])
                self.write(ops[0], insn, s if taken else d)
                return
            self.write(ops[0], insn, z3.If(cond, as_bv(s, cs, bits), as_bv(d, cd, bits)))
            return
        raise Unsupported(m)

    def _arith(self, insn: Any, m: str, ops: Any) -> None:
        a, ca, bits = self.read(ops[0], insn)
        b, cb, bbits = self.read(ops[1], insn)
        if (
            m in ("xor", "sub")
            and ops[0].type == cx.X86_OP_REG
            and ops[1].type == cx.X86_OP_REG
            and ops[0].reg == ops[1].reg
        ):
            a = b = None  # xor r, r / sub r, r: zero whatever r held
        if a is None and b is None:
            if m not in ("cmp", "test"):
                self.write(ops[0], insn, None)
            self.store.flags = None
            return
        ea = as_bv(a, ca, bits)
        eb = as_bv(b, cb, bbits)
        if bbits < bits:  # an 8-bit immediate is sign-extended (Intel SDM: "imm8 sign-extended")
            eb = z3.SignExt(bits - bbits, eb)
        if m in ("add",):
            res = ea + eb
            flags = Flags(res == 0, res < 0, z3.ULT(res, ea), add_overflow(ea, eb, res))
        elif m in ("sub", "cmp"):
            res = ea - eb
            flags = Flags(res == 0, res < 0, z3.ULT(ea, eb), sub_overflow(ea, eb, res), "cmp", ea, eb)
        else:
            res = {"and": ea & eb, "test": ea & eb, "or": ea | eb, "xor": ea ^ eb}[m]
            no = z3.BoolVal(False)
            flags = Flags(res == 0, res < 0, no, no, "test", res, None)
        self.store.flags = flags
        if m not in ("cmp", "test"):
            self.write(ops[0], insn, res)

    def _shift(self, insn: Any, m: str, ops: Any) -> None:
        e, _, bits = self.read(ops[0], insn)
        if len(ops) > 1:
            ce, count, _ = self.read(ops[1], insn)
            if ce is not None:
                self.concretize([(ce, count)], insn.address, f"shift count of {insn.mnemonic} {insn.op_str}")
        else:
            count = 1
        count &= 0x3F if bits == 64 else 0x1F
        if e is None or count == 0:
            if count:
                self.write(ops[0], insn, None)
                self.store.flags = None
            return
        n = z3.BitVecVal(count, bits)
        if m in ("shl", "sal"):
            res, cf = e << n, z3.Extract(bits - count, bits - count, e) == 1 if count <= bits else z3.BoolVal(False)
        elif m == "shr":
            res, cf = z3.LShR(e, n), z3.Extract(count - 1, count - 1, e) == 1
        else:
            res, cf = e >> n, z3.Extract(count - 1, count - 1, e) == 1
        of: Any = "OF after a shift by more than 1 (undefined)" if count != 1 else None
        if count == 1:
            of = {"shl": (res < 0) != cf, "sal": (res < 0) != cf, "shr": e < 0, "sar": z3.BoolVal(False)}[m]
        self.store.flags = Flags(res == 0, res < 0, cf, of)
        self.write(ops[0], insn, res)

    def _widen(self, m: str) -> None:
        if m == "cdqe":
            e, _ = self.reg("eax")
            self.set_reg("rax", None if e is None else z3.SignExt(32, e))
        elif m == "cwde":
            e, _ = self.reg("ax")
            self.set_reg("eax", None if e is None else z3.SignExt(16, e))
        elif m == "cdq":
            e, _ = self.reg("eax")
            self.set_reg("edx", None if e is None else z3.Extract(63, 32, z3.SignExt(32, e)))
        else:
            e, _ = self.reg("rax")
            self.set_reg("rdx", None if e is None else z3.Extract(127, 64, z3.SignExt(64, e)))

    def _jump(self, insn: Any, op: Any) -> None:
        if op.type == cx.X86_OP_IMM:
            return
        e, c, _ = self.read(op, insn)
        if e is not None:
            self.fix(e, c, insn.address, f"target of {insn.mnemonic} {insn.op_str}")

    # --- conditions -----------------------------------------------------------------------
    def _cond(self, cc: str, insn: Any) -> Any:
        """The condition as a z3 Bool, or None when it is concrete."""
        return condition(self.store.flags, cc, self.uc.reg_read(UC_RFLAGS))

    def _cc_concrete(self, cc: str) -> bool:
        return holds(cc, self.uc.reg_read(UC_RFLAGS))

    # --- everything else ------------------------------------------------------------------
    def _generic(self, insn: Any, why: str) -> None:
        """An instruction outside the subset: concretize what symbolic it reads; what it writes is concrete."""
        reads, writes = insn.regs_access()
        used: list[tuple[Expr, int]] = []
        for r in reads:
            name = insn.reg_name(r)
            if name in ALIASES:
                e, c = self.reg(name)
                if e is not None:
                    used.append((e, c))
            elif name in ("rflags", "eflags") and self.store.flags is not None:
                for fl in ("zf", "sf", "cf", "of"):
                    v = getattr(self.store.flags, fl)
                    if v is not None and not isinstance(v, str):
                        bit = {"zf": ZF, "sf": SF, "cf": CF, "of": OF}[fl]
                        used.append((z3.If(v, z3.BitVecVal(1, 1), z3.BitVecVal(0, 1)),
                                     int(bool(self.uc.reg_read(UC_RFLAGS) & bit))))  # fmt: skip
        mem_ops = [op for op in insn.operands if op.type == cx.X86_OP_MEM]
        for op in mem_ops:
            if op.access & capstone.CS_AC_READ:
                e, c = self.load(self.address(op, insn)[1], op.size)
                if e is not None:
                    used.append((e, c))
        if used:
            self.concretize(used, insn.address, f"{insn.mnemonic} {insn.op_str}".strip() + f" ({why})")
        for r in writes:
            name = insn.reg_name(r)
            if name in ALIASES:
                self.store.regs.pop(ALIASES[name][0], None)
            elif name in ("rflags", "eflags"):
                self.store.flags = None
        for op in mem_ops:
            if op.access & capstone.CS_AC_WRITE:
                self.store_mem(self.address(op, insn)[1], op.size, None)
