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
from unicorn import UcError

from emu.symbolic.decode import Decoded
from emu.symbolic.flags import Unsupported
from emu.symbolic.locations import merge_bits, simplified
from emu.symbolic.regs import UC_IDS
from emu.symbolic.semantics import Semantics
from emu.symbolic.store import Expr, Store


class Executor(Semantics):
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
                full = simplified(merge_bits(old, part, lo, bits))
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


def capstone_hook_kind() -> int:
    from unicorn import UC_HOOK_CODE

    return int(UC_HOOK_CODE)
