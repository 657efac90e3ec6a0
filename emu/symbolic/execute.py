"""Following Unicorn's concrete run symbolically while a symbolic value is live.

A code hook, installed only while some register, byte or flag holds an expression, sees each
instruction before the CPU runs it, decodes it with capstone and computes what it writes as z3
expressions over the declared values (concrete operands read from the CPU). Supported:
mov, movzx, movsx(d), lea, add, sub, and, or, xor, cmp, test, inc, dec, neg, not, shl/sal, shr,
sar, imul (2 and 3 operands), xchg, cdqe, cdq, cqo, push, pop, call, ret, jmp, jcc, setcc,
cmovcc, with memory addressed through registers. Semantics: Intel SDM vol. 2.

A conditional jump on symbolic flags is a *branch* (the driver asks the solver about the other
side); a memory address, jump target or return address that is symbolic is *fixed* to its
concrete value with the other feasible values left to the driver. Any other instruction that
reads a symbolic operand has that operand concretized: the path condition records the value
(so its witness still reaches the state) and the path is reported incomplete there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import capstone
import z3
from capstone import x86 as cx
from unicorn import UcError

from emu.symbolic.decode import Decoded
from emu.symbolic.flags import CONDITIONS, Unsupported, add_overflow, condition, holds, sub_overflow
from emu.symbolic.regs import ALIASES, CF, OF, SF, UC_FS_BASE, UC_GS_BASE, UC_IDS, UC_RFLAGS, ZF
from emu.symbolic.store import Expr, Flags, Store

_ARITH = {"add", "sub", "and", "or", "xor", "cmp", "test"}


def _bv(e: Expr | None, conc: int, bits: int) -> Expr:
    return z3.BitVecVal(conc, bits) if e is None else e


def _simp(e: Expr) -> Expr | None:
    """Simplified, or None when the expression is a constant (the location is concrete again)."""
    s = z3.simplify(e)
    return None if z3.is_bv_value(s) else s


class Executor:
    """Propagates expressions through one thread's instructions; asks ``branch``/``fix`` at decisions.

    ``branch(cond, site, text)``: ``cond`` held at this conditional jump on this run.
    ``fix(expr, value, site, text)``: ``expr`` (an address or target) is ``value`` on this run.
    ``concretize(exprs_values, site, text)``: an unsupported use of symbolic operands.
    """

    def __init__(
        self,
        machine: Any,
        branch: Callable[[Any, int, str], None],
        fix: Callable[[Expr, int, int, str], None],
        concretize: Callable[[list[tuple[Expr, int]], int, str], None],
    ) -> None:
        self.machine = machine
        self.uc = machine.uc
        self.branch, self.fix, self.concretize = branch, fix, concretize
        self.store = Store()
        self.md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.md.detail = True
        self._cache: dict[tuple[int, int], Decoded] = {}
        self._unfilled: list[tuple[str, Any]] = []
        self.hook: int | None = None
        self.instructions = 0  # instructions followed symbolically (for the benchmark)

    # --- the hook ---------------------------------------------------------------------
    def sync_hook(self, running: bool) -> None:
        """Install the hook while something is live, remove it when nothing is; inside a run a
        new hook takes effect from the next start, so the CPU is stopped and restarted."""
        live = self.store.live
        if live and self.hook is None:
            self.hook = self.uc.hook_add(capstone_hook_kind(), self._on_code)
            # Code translated before has no call to the hook compiled in: translate it again.
            self.uc.ctl_flush_tb()
            if running:
                self.machine.request_stop()
        elif not live and self.hook is not None:
            self.uc.hook_del(self.hook)
            self.hook = None
            self.uc.ctl_flush_tb()

    def fill(self) -> None:
        """Record the concrete values written by the last instruction followed (the CPU has run it)."""
        st = self.store
        for kind, where in self._unfilled:
            if kind == "r":
                e = st.regs.get(where)
                if e is not None:
                    st.regs[where] = (e[0], self.uc.reg_read(UC_IDS[where]))
            elif kind == "p":
                canon, lo, bits, old = where
                val = self.uc.reg_read(UC_IDS[canon])
                part = z3.BitVecVal((val >> lo) & ((1 << bits) - 1), bits)
                full = _simp(_merge(old, part, lo, bits))
                if full is not None:
                    st.regs[canon] = (full, val)
            else:
                e = st.mem.get(where)
                if e is not None:
                    try:
                        st.mem[where] = (e[0], self.uc.mem_read(where, 1)[0])
                    except UcError:  # the write faulted: nothing was written there
                        del st.mem[where]
        self._unfilled.clear()

    def _on_code(self, uc: Any, address: int, size: int, user_data: object) -> None:
        if self._unfilled:
            self.fill()
        st = self.store
        if not (st.regs or st.mem or st.flags):
            return
        # Decoded once per address and length: code is not rewritten under the hook.
        info = self._cache.get((address, size))
        if info is None:
            insn = next(self.md.disasm(bytes(uc.mem_read(address, size)), address), None)
            if insn is None:
                return
            info = self._cache[(address, size)] = Decoded.of(insn)
        self.instructions += 1
        if self._untouched(info):
            return
        try:
            self._step(info.insn)
        except Unsupported as e:
            self._generic(info.insn, str(e))
        if not (st.regs or st.mem or st.flags) and not any(k == "p" for k, _ in self._unfilled):
            # Nothing symbolic is live any more: drop the hook so concrete code runs at full
            # speed. The CPU stops before this instruction and runs it again without the hook.
            self._unfilled.clear()
            self.uc.hook_del(self.hook)
            self.hook = None
            self.uc.ctl_flush_tb()
            self.machine.request_stop()

    def _untouched(self, info: Decoded) -> bool:
        """The fast path: an instruction that reads nothing symbolic only makes what it writes
        concrete (a partial write to a symbolic register keeps the rest: the slow path)."""
        st = self.store
        regs = st.regs
        if info.memory and st.mem:
            return False
        if info.reads_flags and st.flags is not None:
            return False
        for r in info.reads:
            if r in regs:
                return False
        for r in info.partial:
            if r in regs:
                return False
        for r in info.writes:
            regs.pop(r, None)
        if info.writes_flags:
            st.flags = None
        return True

    # --- reading and writing locations --------------------------------------------------
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
            old = _bv(old, conc, 64)
            full = _merge(old, e, lo, bits)
        if full is not None:
            full = _simp(full)
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
            b = _simp(z3.Extract(8 * i + 7, 8 * i, e))
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

    # --- instructions -------------------------------------------------------------------
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
            res = _bv(a, ca, bits) * _bv(b, cb, bits)
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
            self.write(ops[0], insn, z3.If(cond, _bv(s, cs, bits), _bv(d, cd, bits)))
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
        ea = _bv(a, ca, bits)
        eb = _bv(b, cb, bbits)
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


def _merge(old: Expr, part: Expr, lo: int, bits: int) -> Expr:
    """``old`` (64 bits) with bits lo..lo+bits-1 replaced by ``part``."""
    parts = []
    if lo + bits < 64:
        parts.append(z3.Extract(63, lo + bits, old))
    parts.append(part)
    if lo:
        parts.append(z3.Extract(lo - 1, 0, old))
    return z3.Concat(*parts)


def capstone_hook_kind() -> int:
    from unicorn import UC_HOOK_CODE

    return int(UC_HOOK_CODE)
