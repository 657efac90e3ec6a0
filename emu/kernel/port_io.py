"""`in`, `out`, `ins` and `outs` in user code: a #GP, as on Windows.

User code runs at CPL 3 with IOPL 0 in RFLAGS, so the CPU checks the TSS's I/O permission
bitmap for the port (Intel SDM vol. 1, 19.5 "Protection and I/O"); Windows x64 gives user
threads no I/O access, so every port faults with #GP, which KiPreprocessFault names
STATUS_PRIVILEGED_INSTRUCTION (WRK ke/amd64/decode.c lists in/out/ins/outs as KiOp_Priv).
Unicorn performs the access instead (it keeps no I/O bitmap), so these hooks stop the CPU at
the instruction and hand the machine a #GP there, with the registers as they were before it.
Unicorn stops only after the next instruction has started, so until the #GP is delivered all
memory is read-only: a store that instruction makes faults and is not made.
One difference stays: for `ins`, Unicorn (as QEMU) stores a dummy zero at [RDI] before it
reads the port, so that element of the destination is zero when the exception is delivered;
on Windows it keeps its value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import UC_HOOK_INSN, UC_PROT_WRITE, Uc
from unicorn import x86_const as x86

from emu.trap import Trap

if TYPE_CHECKING:
    from emu.machine import Machine

GP_VECTOR = 13
_PREFIXES = frozenset({0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65})


def install(machine: Machine) -> None:
    """Hook `in`/`ins` and `out`/`outs` (called only when one runs: nothing on other instructions)."""
    hooks = _PortHooks(machine)
    machine.uc.hook_add(UC_HOOK_INSN, hooks.on_in, None, 1, 0, x86.UC_X86_INS_IN)
    machine.uc.hook_add(UC_HOOK_INSN, hooks.on_out, None, 1, 0, x86.UC_X86_INS_OUT)


class _PortHooks:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def _fault(self) -> tuple[int, bool]:
        """Stop at the instruction (Unicorn gives its address as RIP here) with a #GP; returns
        (RIP, whether it is the string form) for the value the hook must hand back."""
        m = self.machine
        ctx = m.regs.context()
        code = next((m.read(ctx.rip, n) for n in (16, 4, 1) if m.readable(ctx.rip, n)), b"")
        i = 0
        while i < len(code) and (code[i] in _PREFIXES or code[i] & 0xF0 == 0x40):
            i += 1
        string = i < len(code) and 0x6C <= code[i] <= 0x6F
        where = m.symbolize(ctx.rip)
        message = f"general protection fault (#GP): port I/O at CPL 3 with IOPL 0 at {where}"
        regions = [(begin, end - begin + 1, prot) for begin, end, prot in m.uc.mem_regions()]
        for begin, size, prot in regions:
            if prot & UC_PROT_WRITE:
                m.uc.mem_protect(begin, size, prot & ~UC_PROT_WRITE)

        def undo() -> None:
            for begin, size, prot in regions:
                if prot & UC_PROT_WRITE:
                    m.uc.mem_protect(begin, size, prot)

        m.raise_trap(Trap("interrupt", ctx.rip, message, GP_VECTOR, context=ctx, undo=undo))
        return ctx.rip, string

    def on_in(self, uc: Uc, port: int, size: int, user_data: object) -> int:
        _, string = self._fault()
        if string:
            return 0  # `ins`: [RDI] holds Unicorn's dummy zero already (see above); keep it so
        return self.machine.regs.context().rax & ((1 << (8 * size)) - 1)  # AL/AX/EAX keep their value

    def on_out(self, uc: Uc, port: int, size: int, value: int, user_data: object) -> None:
        self._fault()
