"""CPU state the machine sets up once or moves whole: the drop to CPL 3, the XMM/x87 state.

User code runs at CPL 3, as on Windows: the machine enters it once through ``sysretq``
(Intel SDM vol. 2B SYSRET: CS = STAR[63:48] + 16 | 3, SS = STAR[63:48] + 8 | 3), with
STAR[63:48] = 0x23 as Windows sets it, so CS reads 0x33 and SS 0x2B (KGDT64_R3_CODE | RPL 3,
KGDT64_R3_DATA | RPL 3).
"""

from __future__ import annotations

from typing import Any

from unicorn import UC_PROT_EXEC, UC_PROT_READ, Uc
from unicorn import x86_const as x86

from emu.loader.image import PAGE
from emu.registers import _XMM
from emu.trap import INITIAL_FPCW, INITIAL_MXCSR, ExtendedState
from emu.winnt import MSR_EFER, MSR_STAR

_X87_WORDS = (x86.UC_X86_REG_FPCW, x86.UC_X86_REG_FPSW, x86.UC_X86_REG_FPTAG)
_X87_REGS = tuple(getattr(x86, f"UC_X86_REG_FP{n}") for n in range(8))  # R0..R7 (physical, not ST(i))
# Where the one instruction that drops the CPU to CPL 3 goes (mapped for that moment only).
_SYSRET_PAGE = 0x1000
_EFER_SCE = 1  # IA32_EFER.SCE: SYSCALL/SYSRET enabled (Intel SDM vol. 3A, 2.2.1)


def enter_user_mode(uc: Uc) -> Any:
    """Run one `sysretq` (STAR as Windows sets it), reset the FPU and SSE control words as a
    new thread has them, and return that CPU state (a Unicorn context)."""
    uc.mem_map(_SYSRET_PAGE, PAGE, UC_PROT_EXEC | UC_PROT_READ)
    uc.mem_write(_SYSRET_PAGE, b"\x48\x0f\x07")  # sysretq
    uc.reg_write(x86.UC_X86_REG_MSR, (MSR_EFER, uc.reg_read(x86.UC_X86_REG_MSR, MSR_EFER) | _EFER_SCE))
    uc.reg_write(x86.UC_X86_REG_MSR, (MSR_STAR, 0x23 << 48 | 0x10 << 32))
    uc.reg_write(x86.UC_X86_REG_RCX, _SYSRET_PAGE + 3)  # where sysret goes: the `until` address
    uc.reg_write(x86.UC_X86_REG_R11, 0x202)
    uc.emu_start(_SYSRET_PAGE, _SYSRET_PAGE + 3, count=1)
    uc.mem_unmap(_SYSRET_PAGE, PAGE)
    uc.reg_write(x86.UC_X86_REG_R11, 0)
    uc.reg_write(x86.UC_X86_REG_FPCW, INITIAL_FPCW)
    uc.reg_write(x86.UC_X86_REG_MXCSR, INITIAL_MXCSR)
    return uc.context_save()


def extended_state(uc: Uc) -> ExtendedState:
    """XMM0-15, MXCSR and the x87 words and registers, as the CPU holds them."""
    words = tuple(int(uc.reg_read(r)) for r in _X87_WORDS)
    x87 = ((words[0], words[1], words[2]), tuple(tuple(uc.reg_read(r)) for r in _X87_REGS))
    return ExtendedState([int(uc.reg_read(r)) for r in _XMM], int(uc.reg_read(x86.UC_X86_REG_MXCSR)), x87)


def set_extended_state(uc: Uc, ext: ExtendedState) -> None:
    for r, v in zip(_XMM, ext.xmm):
        uc.reg_write(r, v)
    uc.reg_write(x86.UC_X86_REG_MXCSR, ext.mxcsr)
    if ext.x87 is not None:
        words, regs = ext.x87
        for r, v in zip(_X87_WORDS, words):
            uc.reg_write(r, v)
        for r, pair in zip(_X87_REGS, regs):
            uc.reg_write(r, pair)
