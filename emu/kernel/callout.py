"""KeUserModeCallback's user-mode half: where the callout frame goes, what it holds, and
the registers KiUserCallbackDispatcher starts with.

Pure functions of the trap frame, the input and the profile: the kernel writes what
they return and records the crossing. :func:`prepare_callout` adds the kernel's checks before a frame
is written (the kernel stack's growth, the depth budget, the probe of the user stack).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from emu.context import REGISTER_NAMES, UserContext
from emu.errors import BudgetExceeded
from emu.profile import Profile
from emu.registers import XMM_IDS
from emu.winnt import (
    KERNEL_STACK_CONTROL_LENGTH,
    KGDT64_R3_CODE,
    KGDT64_R3_DATA,
    PAGE_SIZE,
    RFLAGS_IF,
    RFLAGS_RESERVED,
    STATUS_ACCESS_VIOLATION,
    STATUS_STACK_OVERFLOW,
    UCALLOUT_API_NUMBER,
    UCALLOUT_BUFFER,
    UCALLOUT_FRAME_SIZE,
    UCALLOUT_LENGTH,
    UCALLOUT_MF_EFLAGS,
    UCALLOUT_MF_RIP,
    UCALLOUT_MF_RSP,
    UCALLOUT_MF_SEGCS,
    UCALLOUT_MF_SEGSS,
)

if TYPE_CHECKING:
    from emu.kernel.core import Kernel
    from emu.kernel.thread import KThread


class Callout(NamedTuple):
    """One callout frame laid out on the user stack."""

    frame: int  # the UCALLOUT_FRAME (RSP at the dispatcher under the "stack" convention)
    buffer: int  # the copied input, right above the frame
    lowest: int  # the lowest byte the kernel writes (probed before anything is written)
    block: bytes  # everything from ``lowest`` up: (a return slot,) the frame, the input
    entry: tuple[int, ...]  # the registers KiUserCallbackDispatcher starts with (UserContext order)
    xmm_zero: tuple[int, ...] = ()  # XMM registers zeroed on the way out (their numbers)


_AT = {name: i for i, name in enumerate(REGISTER_NAMES)}  # a register's place in a UserContext
_ZERO_REACTOS = tuple(
    _AT[n] for n in ("rax", "rdx", "r8", "r9", "r10", "rbx", "rdi", "rsi", "rbp", "r12", "r13", "r14", "r15")
)
_RCX, _RDX, _RSP, _RBP, _R8, _R9, _R10, _R11, _RIP, _RFLAGS = (
    _AT[n] for n in ("rcx", "rdx", "rsp", "rbp", "r8", "r9", "r10", "r11", "rip", "rflags")
)
_M64 = 0xFFFF_FFFF_FFFF_FFFF
_XMM_LOW, _XMM_ALL = tuple(range(6)), tuple(range(16))  # XMM registers scrubbed: 0-5 (WRK), all (ReactOS)


def entry_registers(
    profile: Profile, trap: UserContext, rsp: int, dispatcher: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The registers (a plain tuple in UserContext order, as a state records them) and the zeroed
    XMM numbers KiUserCallbackDispatcher starts with under the
    "stack" convention, after the kernel's trap frame has RSP = the callout frame.

    Every source leaves through SYSRET (Intel SDM: RIP <- RCX, RFLAGS <- R11), so RCX is the
    dispatcher's address and RFLAGS what R11 held. Per ``profile.dispatcher_registers``:

    * ``wrk`` — WRK ``base/ntos/ke/amd64/callout.asm`` KiCallUserMode, the exit taken when no
      user APC is pending: R11 = the trap frame's EFLAGS, RSP and RBP reloaded from it, R10 and
      XMM0-5 scrubbed; R8 and R9 keep the RSP and RBP values it loaded them with. The other
      registers hold kernel values there; the model keeps the system call's.
    * ``windows10`` — as ``wrk``, with RDX, R8, R9 and R10 zero too (no kernel values leak):
      observed behaviour of Windows 10 and 11 builds, no published source.
    * ``reactos`` — ReactOS ``ntoskrnl/ke/amd64/usercall_asm.S`` KiUserCallbackExit: RAX, RDX,
      R8-R10 and the non-volatile RBX, RDI, RSI, RBP, R12-R15 zero, XMM0-15 zero, R11 =
      EFLAGS_IF_MASK (0x200), RSP from the trap frame.
    """
    make, xmm = _POLICIES[profile.dispatcher_registers]
    return make(trap, rsp, dispatcher), xmm


def entry_maker(profile: Profile, dispatcher: int) -> Callable[[UserContext, int], tuple[int, ...]]:
    """``entry_registers(profile, trap, rsp, dispatcher)[0]`` as a function of ``(trap, rsp)``,
    with the profile's policy chosen once (the kernel derives these registers at every callback)."""
    return functools.partial(_POLICIES[profile.dispatcher_registers][0], dispatcher=dispatcher)


# The policies of entry_registers (see there for their sources). Each starts from the trap
# frame's registers, changed in place (cheaper than namedtuple _replace), leaves through SYSRET
# with RCX = RIP = the dispatcher, and returns a plain tuple in UserContext order.
def _wrk(trap: UserContext, rsp: int, dispatcher: int) -> tuple[int, ...]:
    v = [*trap]
    v[_RSP] = v[_R8] = rsp
    v[_RIP] = v[_RCX] = dispatcher
    v[_R11] = v[_RFLAGS]  # the trap frame's RFLAGS (v is a copy of it)
    v[_R10] = 0
    v[_R9] = v[_RBP]  # the trap frame's RBP
    return tuple(v)


def _windows10(trap: UserContext, rsp: int, dispatcher: int) -> tuple[int, ...]:
    v = [*trap]
    v[_RSP] = rsp
    v[_RIP] = v[_RCX] = dispatcher
    v[_R11] = v[_RFLAGS]
    v[_RDX] = v[_R8] = v[_R9] = v[_R10] = 0
    return tuple(v)


def _reactos(trap: UserContext, rsp: int, dispatcher: int) -> tuple[int, ...]:
    v = [*trap]
    v[_RSP] = rsp
    v[_RIP] = v[_RCX] = dispatcher
    for i in _ZERO_REACTOS:
        v[i] = 0
    # SYSRET loads RFLAGS from R11 with bit 1 (reserved) set (Intel SDM vol. 2B SYSRET).
    v[_R11] = RFLAGS_IF
    v[_RFLAGS] = RFLAGS_IF | RFLAGS_RESERVED
    return tuple(v)


class _Policy(Protocol):
    def __call__(self, trap: UserContext, rsp: int, dispatcher: int) -> tuple[int, ...]: ...


_POLICIES: dict[str, tuple[_Policy, tuple[int, ...]]] = {
    "wrk": (_wrk, _XMM_LOW),
    "windows10": (_windows10, _XMM_LOW),
    "reactos": (_reactos, _XMM_ALL),
}


def kernel_stack_overflow(profile: Profile, depth: int) -> str | None:
    """Why KeUserModeCallback cannot call back once more with ``depth`` callbacks active, or None.

    WRK ``base/ntos/ke/amd64/callout.asm`` KiCallUserMode wants KERNEL_LARGE_STACK_COMMIT
    bytes free below its RSP and calls MmGrowKernelStack otherwise; ``mm/procsup.c``
    MmGrowKernelStackEx returns STATUS_STACK_OVERFLOW when the page of that new limit lies
    below the page of StackBase - KERNEL_LARGE_STACK_SIZE, and KiCallUserMode returns that
    status without entering user mode. In use at that check: the stack control area at the
    top of the thread's stack (KERNEL_STACK_CONTROL_LENGTH) and one ``callback_stack_cost``
    per level, this one included (its system call's trap frame, the service's frames,
    KiCallUserMode's own frame and stack control area).
    """
    used = KERNEL_STACK_CONTROL_LENGTH + (depth + 1) * profile.callback_stack_cost
    # Page numbers relative to StackBase (page aligned), as MiGetPteAddress compares them.
    if -((used + profile.kernel_stack_commit) // -PAGE_SIZE) <= -(-profile.kernel_stack_size // PAGE_SIZE):
        return None
    return (
        f"kernel stack: {used:#x} bytes in use + {profile.kernel_stack_commit:#x} to commit > "
        f"{profile.kernel_stack_size:#x} (MmGrowKernelStack)"
    )


def _frame_struct() -> struct.Struct:
    """The UCALLOUT_FRAME's fields emu fills, at their offsets (the rest zero): Buffer, Length,
    ApiNumber, then the MACHINE_FRAME's Rip, SegCs, EFlags, Rsp and SegSs."""
    fields = (
        (UCALLOUT_BUFFER, "Q"), (UCALLOUT_LENGTH, "I"), (UCALLOUT_API_NUMBER, "I"), (UCALLOUT_MF_RIP, "Q"),
        (UCALLOUT_MF_SEGCS, "Q"), (UCALLOUT_MF_EFLAGS, "Q"), (UCALLOUT_MF_RSP, "Q"), (UCALLOUT_MF_SEGSS, "Q"),
    )  # fmt: skip
    fmt, at = "<", 0
    for off, code in fields:
        fmt += f"{off - at}x{code}" if off > at else code
        at = off + struct.calcsize(code)
    fmt += f"{UCALLOUT_FRAME_SIZE - at}x" if at < UCALLOUT_FRAME_SIZE else ""
    return struct.Struct(fmt)


_FRAME = _frame_struct()


def place_frame(profile: Profile, old_rsp: int, length: int) -> int:
    """Where the UCALLOUT_FRAME goes below the trap frame's RSP (the input right above it).

    ``wrk`` — WRK ``base/ntos/ke/amd64/callback.c`` KeUserModeCallback: Length =
    ROUND_UP(InputLength, 16) + sizeof(UCALLOUT_FRAME), frame = (OldStack - Length) & ~15.
    ``reactos`` — ReactOS ``ntoskrnl/ke/amd64/usercall.c`` KeUserModeCallback: the input at
    ALIGN_DOWN(OldStack - InputLength, 16) - 8, the frame right below it. Both give a
    16-byte-aligned frame; ReactOS's is 0x10 lower when OldStack = 8 (mod 16) and
    InputLength mod 16 is 0 or 9..15, and the same otherwise.
    """
    if profile.callout_frame == "reactos":
        return ((old_rsp - length) & ~0xF) - 8 - UCALLOUT_FRAME_SIZE
    return (old_rsp - (((length + 0xF) & ~0xF) + UCALLOUT_FRAME_SIZE)) & ~0xF


def lay_out(profile: Profile, trap: UserContext, api: int, data: bytes, dispatcher: int) -> Callout:
    """The frame for callback ``api`` with input ``data``, below the trap frame's RSP."""
    old = trap.rsp
    frame = place_frame(profile, old, len(data))
    buffer = frame + UCALLOUT_FRAME_SIZE
    block = _FRAME.pack(
        buffer & _M64, len(data) & 0xFFFF_FFFF, api & 0xFFFF_FFFF, trap.rip & _M64, KGDT64_R3_CODE,
        trap.rflags & _M64, old & _M64, KGDT64_R3_DATA,
    )  # fmt: skip
    if profile.dispatcher == "stack":
        entry, xmm = entry_registers(profile, trap, frame, dispatcher)
        return Callout(frame, buffer, frame, block + data, entry, xmm)
    # "registers" convention (Wine 8 and earlier, dlls/ntdll/unix/signal_x86_64.c
    # call_user_mode_callback): entered like a call, ECX = api, RDX = buffer, R8D = length, a
    # (zero) return address at [RSP]; the model keeps the other registers as they were.
    entry = tuple(trap._replace(rsp=frame - 8, rip=dispatcher, rcx=api, rdx=buffer, r8=len(data)))
    return Callout(frame, buffer, frame - 8, bytes(8) + block + data, entry)


def prepare_callout(
    kernel: Kernel, thread: KThread, ctx: UserContext, api: int, data: bytes, depth: int
) -> tuple[Any, ...]:
    """KeUserModeCallback's checks and the callout frame for ``depth`` callbacks active:
    (the Callout, the register write, where and what to write, the regions and stack limit
    it was checked against, the host buffer slot of the write or None), or why the callback is refused: (status, reason)."""
    if depth in kernel._overflow:
        overflow = kernel._overflow[depth]
    else:
        overflow = kernel._overflow[depth] = kernel_stack_overflow(kernel.profile, depth)
    if overflow is not None:
        return STATUS_STACK_OVERFLOW, overflow
    if kernel.callback_depth_budget is not None and depth >= kernel.callback_depth_budget:
        raise BudgetExceeded("callback_depth", kernel.callback_depth_budget, kernel.trace.symbolize(ctx.rip))
    out, machine = lay_out(kernel.profile, ctx, api, data, kernel.dispatcher), kernel.machine
    old = ctx.rsp
    r = machine.region_at(out.lowest)  # the frame usually fits in the stack's own region
    fits = r is not None and old <= r.end and "r" in r.perms
    if out.lowest < thread.stack_limit or not (fits or machine.readable(out.lowest, old - out.lowest)):
        # ProbeForWrite of the frame fails: KeUserModeCallback returns the exception code.
        return STATUS_ACCESS_VIOLATION, "the callout frame does not fit on the user stack"
    put = kernel._put_entry.get(out.xmm_zero)
    if put is None:
        ids = tuple(XMM_IDS[i] for i in out.xmm_zero)
        put = kernel._put_entry[out.xmm_zero] = machine.regs.bound_zeroing(REGISTER_NAMES, ids)
    slot = machine.host_slot(out.lowest, len(out.block))
    return out, put, out.lowest, out.block, machine.regions, thread.stack_limit, slot
