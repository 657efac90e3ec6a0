"""What the CPU reports when user code faults or stops: a :class:`Trap` and why a run returned."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field

from unicorn import (
    UC_MEM_FETCH_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ_PROT,
    UC_MEM_READ_UNMAPPED,
    UC_MEM_WRITE_PROT,
    UC_MEM_WRITE_UNMAPPED,
    Uc,
)

from emu.context import UserContext
from emu.records import record

# A thread's first floating-point state on x64 Windows (WRK ke/amd64/thredini.c,
# KiInitializeContextThread: INITIAL_FPCSR and INITIAL_MXCSR): x87 control word 0x27F (all
# exceptions masked, 53-bit precision), MXCSR 0x1F80 (all masked, round to nearest).
INITIAL_FPCW, INITIAL_MXCSR = 0x27F, 0x1F80


# Unicorn's memory access kinds as a Trap names them: (access, why).
ACCESS = {
    UC_MEM_READ_UNMAPPED: ("read", "unmapped"),
    UC_MEM_WRITE_UNMAPPED: ("write", "unmapped"),
    UC_MEM_FETCH_UNMAPPED: ("execute", "unmapped"),
    UC_MEM_READ_PROT: ("read", "protected"),
    UC_MEM_WRITE_PROT: ("write", "protected"),
    UC_MEM_FETCH_PROT: ("execute", "protected"),
}


@record(frozen=True)
class Trap:
    """A fault in user code, as the CPU reported it, before anyone turns it into an exception.

    ``kind``: "memory" (an access to unmapped or protected memory: ``access`` is "read",
    "write" or "execute", ``address`` the byte), "interrupt" (a CPU exception or `int n`
    the kernel did not take as a system call: ``vector``), or "invalid" (an opcode the CPU
    refused: #UD). ``rip`` is where the CPU stood: the faulting instruction for faults, the
    next one for traps (`int3`, `int n`, single step). ``message`` is the one-line
    description a stopped run reports.
    """

    kind: str
    rip: int
    message: str
    vector: int = -1
    access: str = ""
    address: int = 0
    region: str = ""
    context: UserContext | None = None  # the registers to deliver it with, when the hook saw them first
    undo: Callable[[], None] | None = None  # what the hook changed to stop the CPU, undone before delivery


@record(frozen=True)
class StopInfo:
    """Why ``Machine.run`` returned: ``requested`` by a handler, ``instructions`` or ``timeout``."""

    reason: str
    elapsed: float


SyscallHandler = Callable[[Uc, object], None]
InterruptHandler = Callable[[Uc, int, object], None]
# Called outside any hook with a fault: True when it made the thread go on (a Windows
# exception was delivered, the registers say where), False to stop the run with MachineFault.
ExceptionHandler = Callable[[Trap], bool]


@record
class ExtendedState:
    """The vector state an exception's CONTEXT carries besides the general registers, and the
    x87 state (control, status and tag words, then R0..R7 as (mantissa, exponent); None: leave it)."""

    xmm: list[int] = field(default_factory=lambda: [0] * 16)
    mxcsr: int = INITIAL_MXCSR
    x87: tuple[tuple[int, int, int], tuple[tuple[int, int], ...]] | None = None
