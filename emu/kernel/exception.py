"""CPU faults as Windows exceptions: what the trap handlers raise, KiDispatchException's user-mode
half, NtContinue, NtRaiseException and the end of a process that leaves an exception unhandled.

Sources: WRK ``base/ntos/ke/amd64/trap.asm`` (the code, parameters and address each trap
handler passes on), ``ke/amd64/decode.c`` (KiPreprocessFault: privileged instructions, divide
error vs. overflow, a plain #GP as an access violation), ``ke/amd64/exceptn.c``
(KiDispatchException: the frame on the user stack, first and second chance), ReactOS
``ntoskrnl/ke/amd64/except.c`` (KiDispatchExceptionToUser) and WRK ``mm/acceschk.c``
(MiCheckForUserStackOverflow: the stack's guard page).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from emu.context import UserContext
from emu.errors import MachineFault
from emu.kernel import sched
from emu.kernel.stack_guard import is_guard, touch_guard
from emu.kernel.user_read import kernel_read
from emu.loader.image import PAGE
from emu.ntcontext import (
    CONTEXT_CONTROL,
    CONTEXT_EX_SIZE,
    CONTEXT_FLOATING_POINT,
    CONTEXT_FULL,
    CONTEXT_INTEGER,
    CONTEXT_SEGMENTS,
    CONTEXT_SIZE,
    EXCEPTION_RECORD_SIZE,
    MACHINE_FRAME_SIZE,
    USER_CS,
    USER_SS,
    Context,
    ExceptionRecord,
    context_ex,
)
from emu.records import record
from emu.trap import ExtendedState, Trap
from emu.winnt import (
    STATUS_ACCESS_VIOLATION,
    STATUS_ASSERTION_FAILURE,
    STATUS_BREAKPOINT,
    STATUS_ILLEGAL_INSTRUCTION,
    STATUS_INTEGER_DIVIDE_BY_ZERO,
    STATUS_INTEGER_OVERFLOW,
    STATUS_INVALID_HANDLE,
    STATUS_INVALID_PARAMETER,
    STATUS_PRIVILEGED_INSTRUCTION,
    STATUS_SINGLE_STEP,
    STATUS_STACK_BUFFER_OVERRUN,
    STATUS_STACK_OVERFLOW,
    status_name,
)

if TYPE_CHECKING:
    from emu.kernel.core import Kernel
    from emu.kernel.thread import KThread

RFLAGS_TF = 0x100
# WRK SANITIZE_EFLAGS for user mode: only the flags user code may change (arithmetic flags,
# TF, DF, AC, ID) come from a CONTEXT; IF is forced on and IOPL stays 0.
_USER_EFLAGS = 0x0024_0DD7
_RFLAGS_IF = 0x200
# KiPageFault's load/store indicator (WRK trap.asm: error code bits W and I/D, `shr 1; and 9`);
# MS docs EXCEPTION_RECORD: 0 read, 1 write, 8 user-mode DEP violation.
_ACCESS_INDICATOR = {"read": 0, "write": 1, "execute": 8}


@record(frozen=True)
class Raised:
    """An exception a fault raises: the record, the CONTEXT's RIP and RFLAGS, and what to call it."""

    record: ExceptionRecord
    rip: int
    rflags: int
    description: str
    fast_fail: bool = False  # int 29h: no handler runs (the process ends at once)


def _read(kernel: Kernel, address: int, size: int) -> bytes:
    return kernel_read(kernel.machine, address, size) or b""


def _skip_prefixes(code: bytes) -> tuple[int, bool]:
    """Index of the opcode byte after legacy and REX prefixes (WRK decode.c KiOpIsPrefix), and REX.W."""
    i, rex_w = 0, False
    while i < len(code):
        b = code[i]
        if b in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3):
            i += 1
        elif b & 0xF0 == 0x40:
            rex_w = bool(b & 8)
            i += 1
        else:
            break
    return i, rex_w


def is_privileged(code: bytes) -> bool:
    """Whether the instruction is one WRK decode.c lists for KiOp_Priv (cli, sti, in/out, ins/outs,
    hlt; 0F: lldt/ltr, lgdt/lidt/lmsw/invlpg/swapgs, invd, wbinvd, sysexit, mov to/from CR/DR,
    wrmsr/rdtsc/rdmsr/rdpmc, clts, sysret)."""
    i, _ = _skip_prefixes(code)
    if i >= len(code):
        return False
    op = code[i]
    if op in (0xFA, 0xFB, 0xF4) or 0xE4 <= op <= 0xE7 or 0xEC <= op <= 0xEF or 0x6C <= op <= 0x6F:
        return True
    if op != 0x0F or i + 1 >= len(code):
        return False
    op2 = code[i + 1]
    reg = (code[i + 2] >> 3) & 7 if i + 2 < len(code) else -1
    if op2 == 0x00:
        return reg in (2, 3)
    if op2 == 0x01:
        return reg in (2, 3, 6, 7)
    return op2 in (0x06, 0x07, 0x08, 0x09, 0x35) or 0x20 <= op2 <= 0x23 or 0x30 <= op2 <= 0x33


def _divisor_is_zero(kernel: Kernel, code: bytes, regs: UserContext) -> bool:
    """KiOp_Div (WRK decode.c): STATUS_INTEGER_OVERFLOW when the divisor can be read and is not
    zero (the quotient did not fit), STATUS_INTEGER_DIVIDE_BY_ZERO otherwise."""
    import capstone
    from capstone import x86 as cx86

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    insn = next(iter(md.disasm(code, regs.rip)), None)
    if insn is None or insn.mnemonic not in ("div", "idiv") or not insn.operands:
        return True
    operand = insn.operands[-1]
    size = operand.size
    if operand.type == cx86.X86_OP_REG:
        value = kernel.machine.register(insn.reg_name(operand.reg))
        return value is None or value & ((1 << (8 * size)) - 1) == 0
    if operand.type == cx86.X86_OP_MEM:
        mem = operand.mem
        address = mem.disp
        for reg, scale in ((mem.base, 1), (mem.index, mem.scale)):
            if reg:
                name = insn.reg_name(reg)
                value = regs.rip + insn.size if name == "rip" else kernel.machine.register(name)
                if value is None:
                    return True
                address += value * scale
        raw = _read(kernel, address & 0xFFFF_FFFF_FFFF_FFFF, size)
        return len(raw) != size or int.from_bytes(raw, "little") == 0
    return True


def classify(kernel: Kernel, thread: KThread, trap: Trap, regs: UserContext, overflow: bool = False) -> Raised:
    """The exception Windows raises for a fault (WRK trap.asm and decode.c), with the CONTEXT's RIP;
    ``overflow``: the fault touched the stack's guard page with no room left to move it down."""
    sym = kernel.trace.symbolize
    rip = trap.rip
    code = _read(kernel, rip, 16)
    where = sym(rip)
    if trap.kind == "memory":
        indicator = _ACCESS_INDICATOR.get(trap.access, 0)
        if overflow:
            # MiCheckForUserStackOverflow (WRK mm/acceschk.c, emu.kernel.stack_guard): no room was
            # left to move the guard page down, so the fault becomes STATUS_STACK_OVERFLOW (KiPageFault
            # passes the load/store indicator and the address as its two parameters).
            record = ExceptionRecord(STATUS_STACK_OVERFLOW, rip, (indicator, trap.address))
            return Raised(record, rip, regs.rflags, f"stack overflow ({trap.message})")
        record = ExceptionRecord(STATUS_ACCESS_VIOLATION, rip, (indicator, trap.address))
        what = {"read": "reading", "write": "writing", "execute": "executing"}.get(trap.access, "at")
        return Raised(record, rip, regs.rflags, f"access violation {what} {trap.address:#x} at {where}")
    if trap.kind == "invalid":
        if code[:1] == b"\xf1":
            # int1 (icebp) enters KiDebugTrapOrFault as a trap: the RIP after it.
            record = ExceptionRecord(STATUS_SINGLE_STEP, rip + 1)
            return Raised(record, rip + 1, regs.rflags & ~RFLAGS_TF, f"single step (int1) at {where}")
        if is_privileged(code):
            # Unicorn reports some privileged opcodes (rdpmc) as #UD; at CPL 3 they #GP.
            record = ExceptionRecord(STATUS_PRIVILEGED_INSTRUCTION, rip)
            return Raised(record, rip, regs.rflags, f"privileged instruction at {where}")
        # KiInvalidOpcodeFault: STATUS_ILLEGAL_INSTRUCTION at the instruction, no parameters.
        # `into` is invalid in 64-bit mode (Intel SDM vol. 2A INTO), so it lands here too.
        record = ExceptionRecord(STATUS_ILLEGAL_INSTRUCTION, rip)
        return Raised(record, rip, regs.rflags, f"illegal instruction at {where}")
    vector = trap.vector
    if vector == 0:
        # KiDivideErrorFault: the faulting div/idiv itself; KiOp_Div tells overflow apart.
        zero = _divisor_is_zero(kernel, code, regs)
        status = STATUS_INTEGER_DIVIDE_BY_ZERO if zero else STATUS_INTEGER_OVERFLOW
        what = "divide error (#DE): integer divide by zero" if zero else "divide error (#DE): integer overflow"
        return Raised(ExceptionRecord(status, rip), rip, regs.rflags, f"{what} at {where}")
    if vector == 1:
        # KiDebugTrapOrFault: single step traps after the instruction; TF is cleared.
        record = ExceptionRecord(STATUS_SINGLE_STEP, rip)
        return Raised(record, rip, regs.rflags & ~RFLAGS_TF, f"single step at {where}")
    if vector == 3:
        # KiBreakpointTrap: ExceptionAddress = RIP - 1, one parameter BREAKPOINT_BREAK (0);
        # KiDispatchException turns the trap into a fault: CONTEXT.Rip -= 1.
        record = ExceptionRecord(STATUS_BREAKPOINT, rip - 1, (0,))
        return Raised(record, rip - 1, regs.rflags, f"breakpoint (int3) at {sym(rip - 1)}")
    if vector == 4:
        # KiOverflowTrap (`int 4`; `into` itself is invalid in 64-bit mode): address RIP - 1.
        record = ExceptionRecord(STATUS_INTEGER_OVERFLOW, rip - 1)
        return Raised(record, rip, regs.rflags, f"integer overflow (int 4) at {sym(rip - 2)}")
    if vector == 0x29:
        # __fastfail (MS docs "__fastfail"): int 29h with the code in ECX ends the process with
        # STATUS_STACK_BUFFER_OVERRUN; no exception handler runs.
        record = ExceptionRecord(STATUS_STACK_BUFFER_OVERRUN, rip - 2, (regs.rcx & 0xFFFF_FFFF,))
        return Raised(record, rip - 2, regs.rflags, f"fast fail {regs.rcx & 0xFFFF_FFFF} at {sym(rip - 2)}",
                      fast_fail=True)  # fmt: skip
    if vector == 0x2C:
        # KiRaiseAssertion (int 2Ch): STATUS_ASSERTION_FAILURE at the int 2Ch.
        record = ExceptionRecord(STATUS_ASSERTION_FAILURE, rip - 2)
        return Raised(record, rip - 2, regs.rflags, f"assertion failure (int 2Ch) at {sym(rip - 2)}")
    if vector == 13 and is_privileged(code):
        record = ExceptionRecord(STATUS_PRIVILEGED_INSTRUCTION, rip)
        return Raised(record, rip, regs.rflags, f"privileged instruction at {where}")
    # A #GP with no decode entry (KiPreprocessFault: "read", unknown address) and `int n`
    # through a kernel-only IDT gate (a #GP at the `int`).
    at = rip if vector == 13 else rip - 2
    record = ExceptionRecord(STATUS_ACCESS_VIOLATION, at, (0, 0xFFFF_FFFF_FFFF_FFFF))
    what = "general protection fault (#GP)" if vector == 13 else f"int {vector:#x} (no user-mode gate)"
    return Raised(record, at, regs.rflags, f"{what} at {sym(at)}")


def on_trap(kernel: Kernel, trap: Trap) -> bool:
    """The machine's exception handler: deliver the fault as a Windows exception, or stop."""
    thread = kernel.current
    if thread is None:
        return False
    machine = kernel.machine
    regs = machine.regs.context()
    guard, overflow = thread.stack_limit - PAGE, False
    if trap.kind == "memory" and guard <= trap.address < thread.stack_limit and is_guard(kernel, guard):
        if touch_guard(kernel, thread, guard):
            # The stack grew (STATUS_PAGE_FAULT_GUARD_PAGE): the access is retried, no exception.
            machine.regs.write(("rip",), (trap.rip,))
            return True
        overflow = True
    if kernel.exceptions == "stop":
        if trap.kind == "memory":
            return False  # the machine's own message (as before exceptions were delivered)
        raised = classify(kernel, thread, trap, regs, overflow)
        raise MachineFault(raised.description, trap.rip, kernel.trace.symbolize(trap.rip))
    raised = classify(kernel, thread, trap, regs, overflow)
    ext = machine.extended_state()
    ctx = Context(regs._replace(rip=raised.rip, rflags=raised.rflags), ext.xmm, ext.mxcsr, x87=ext.x87)
    thread.raising = (raised.record.to_bytes(), raised.fast_fail)
    try:
        kernel.recorder.exception(thread, tuple(ctx.regs), raised.record.code, f"{raised.description}; first chance")
    finally:
        thread.raising = None
    deliver(kernel, thread, raised.record, ctx, raised.fast_fail)
    return True


def deliver(kernel: Kernel, thread: KThread, record: ExceptionRecord, ctx: Context, fast_fail: bool) -> None:
    """A fault's exception, once the kernel has it: to the user-mode dispatcher, or (a fast
    fail) straight to the end of the process."""
    if fast_fail:
        terminate_process(kernel, thread, record.code, "fast fail: the process ends, no handler runs")
        return
    dispatch_to_user(kernel, thread, record, ctx, first_chance=True, rip_adjust=0)


def frame_layout(rsp: int) -> tuple[int, int, int]:
    """(CONTEXT, EXCEPTION_RECORD, MACHINE_FRAME) addresses for a fault at ``rsp``.

    WRK ke/amd64/exceptn.c KiDispatchException: the machine frame at (Rsp - 0x28) & ~15, the
    record (rounded to 0xA0 bytes) below it, the CONTEXT below that. From Windows 7 SP1 a
    CONTEXT_EX (0x20 bytes) sits between the CONTEXT and the record, which is why
    KiUserExceptionDispatcher finds the record at RSP + 0x4F0 (Windows 10's and Wine's
    dispatcher read it there; Wine 9's signal_x86_64.c lays the frame out the same way).
    """
    machine_frame = (rsp - MACHINE_FRAME_SIZE) & ~0xF
    record = machine_frame - ((EXCEPTION_RECORD_SIZE + 15) & ~15)
    context = record - CONTEXT_EX_SIZE - CONTEXT_SIZE
    return context, record, machine_frame


def dispatch_to_user(
    kernel: Kernel, thread: KThread, record: ExceptionRecord, ctx: Context, first_chance: bool, rip_adjust: int
) -> None:
    """KiDispatchException for an exception from user mode (no debugger, no subsystem port):
    first chance, the frame goes on the user stack and the thread continues in
    KiUserExceptionDispatcher; second chance, the process ends with the exception code."""
    sym = kernel.trace.symbolize
    if not first_chance:
        terminate_process(
            kernel, thread, record.code,
            f"second chance for {status_name(record.code)} at {sym(record.address)}: unhandled, the process ends",
        )  # fmt: skip
        return
    dispatcher = kernel.exception_dispatcher
    if dispatcher is None:
        terminate_process(kernel, thread, record.code, "the loaded ntdll exports no KiUserExceptionDispatcher")
        return
    for _attempt in range(4):
        context_at, record_at, frame_at = frame_layout(ctx.regs.rsp)
        end = frame_at + MACHINE_FRAME_SIZE
        guard = thread.stack_limit - PAGE
        if context_at < thread.stack_limit and guard <= context_at and is_guard(kernel, guard):
            # Writing the frame touches the guard page (ProbeForWrite goes up from the frame's
            # lowest page): the stack grows, or the probe fails with STATUS_STACK_OVERFLOW, which
            # KiDispatchException raises instead ("goto repeat"), keeping the address.
            if not touch_guard(kernel, thread, guard):
                record = ExceptionRecord(STATUS_STACK_OVERFLOW, record.address, (1, context_at))
            continue
        if context_at < thread.stack_limit or not _writable(kernel, context_at, end - context_at):
            # The probe fails for another reason: second chance processing, the process ends.
            terminate_process(
                kernel, thread, record.code,
                f"{status_name(record.code)}: the exception frame does not fit on the user stack "
                f"(RSP {ctx.regs.rsp:#x}); the process ends",
            )  # fmt: skip
            return
        break
    else:  # pragma: no cover - the guard page is committed on the first pass
        return
    # ContextFlags as KiDispatchException captures them: CONTEXT_FULL | CONTEXT_DEBUG_REGISTERS |
    # CONTEXT_SEGMENTS (the debug registers are all zero here).
    frame = Context(ctx.regs, ctx.xmm, ctx.mxcsr, CONTEXT_FULL | CONTEXT_SEGMENTS | 0x10, ctx.x87)
    machine_frame = struct.pack("<5Q", ctx.regs.rip, USER_CS, ctx.regs.rflags & 0xFFFF_FFFF, ctx.regs.rsp, USER_SS)
    block = bytearray(end - context_at)
    block[0:CONTEXT_SIZE] = frame.to_bytes()
    block[CONTEXT_SIZE : CONTEXT_SIZE + CONTEXT_EX_SIZE] = context_ex()
    off = record_at - context_at
    block[off : off + EXCEPTION_RECORD_SIZE] = record.to_bytes()
    block[frame_at - context_at :] = machine_frame
    kernel.machine.write(context_at, bytes(block))
    # The trap frame is restored on the way out (all registers as at the fault) with RSP at the
    # CONTEXT, RIP at KiUserExceptionDispatcher and TF cleared (WRK exceptn.c).
    entry = ctx.regs._replace(rsp=context_at, rip=dispatcher, rflags=(ctx.regs.rflags & ~RFLAGS_TF) | 0x2)
    kernel.machine.regs.set_context(entry._replace(rip=dispatcher - rip_adjust))
    # The floating-point state goes on as it was at the fault: KiDispatchException changes only
    # RSP, RIP, CS and TF in the trap frame (WRK ke/amd64/exceptn.c), so the dispatcher and the
    # handlers start with the faulting code's MXCSR, x87 control word and registers.
    kernel.machine.set_extended_state(ExtendedState(list(ctx.xmm), ctx.mxcsr, ctx.x87))
    detail = f"{status_name(record.code)} at {sym(record.address)} to KiUserExceptionDispatcher"
    kernel.recorder.exception(thread, tuple(entry), record.code, detail, mode="user")


def _writable(kernel: Kernel, address: int, size: int) -> bool:
    end = address + size
    while address < end:
        r = kernel.machine.region_at(address)
        if r is None or "w" not in r.perms:
            return False
        address = r.end
    return True


def terminate_process(kernel: Kernel, thread: KThread, status: int, detail: str) -> None:
    """NtTerminateProcess(NtCurrentProcess(), status): every thread ends with ``status``."""
    regs = kernel.recorder.context_of(thread.state_id)
    for t in kernel.threads.values():
        if t.terminated:
            continue
        t.terminated = True
        t.exit_status = status
        t.suspended = None
        sched.abandon(kernel, t)
        at = regs if t is thread else kernel.recorder.context_of(t.state_id)
        kernel.recorder.terminate(t, at, status, detail if t is thread else "the process ended")
    kernel.machine.request_stop()
    kernel.next_thread = None


# --- system services -------------------------------------------------------------------------
def nt_continue(
    kernel: Kernel, thread: KThread, regs: tuple[int, ...], via: str, ssn: int, entered: bool = True
) -> None:
    """NtContinue(ContextRecord, TestAlert): the thread goes on with the CONTEXT's registers
    (KeContextToKframes, WRK exceptn.c: control, integer and floating state as ContextFlags
    say, EFlags sanitized, CS/SS forced to the user selectors). APCs are not modelled."""
    if entered:  # False: the entry is recorded already (a run from a dump of it)
        kernel.recorder.syscall(thread, regs, "NtContinue", ssn, "NtContinue", False, _via(via))
    raw = kernel_read(kernel.machine, regs[10], CONTEXT_SIZE)
    if raw is None:
        kernel.sysret_status(thread, regs, via, STATUS_ACCESS_VIOLATION, "NtContinue")
        return
    new = _apply_context(kernel, UserContext._make(regs), Context.from_bytes(raw))
    kernel.machine.regs.set_context(new._replace(rip=new.rip - kernel.entry_len))
    kernel.recorder.continue_(thread, tuple(new), f"to {kernel.trace.symbolize(new.rip)}")


def _apply_context(kernel: Kernel, trap: UserContext, c: Context) -> UserContext:
    new = trap
    if c.flags & CONTEXT_INTEGER == CONTEXT_INTEGER:
        new = new._replace(**{n: v for n, v in zip(UserContext._fields[:16], c.regs[:16]) if n != "rsp"})
    if c.flags & CONTEXT_CONTROL == CONTEXT_CONTROL:
        new = new._replace(rip=c.regs.rip, rsp=c.regs.rsp, rflags=(c.regs.rflags & _USER_EFLAGS) | _RFLAGS_IF | 0x2)
    if c.flags & CONTEXT_FLOATING_POINT == CONTEXT_FLOATING_POINT:
        # SANITIZE_MXCSR: reserved bits cleared.
        kernel.machine.set_extended_state(ExtendedState(list(c.xmm), c.mxcsr & 0xFFFF, c.x87))
    return new


def nt_raise_exception(
    kernel: Kernel, thread: KThread, regs: tuple[int, ...], via: str, ssn: int, entered: bool = True
) -> None:
    """NtRaiseException(ExceptionRecord, ContextRecord, FirstChance): KiRaiseException copies both
    (at most 15 parameters, else STATUS_INVALID_PARAMETER), makes the CONTEXT the thread's state
    and dispatches the exception from user mode (WRK ke/raisexcp.c, exceptn.c)."""
    if entered:  # False: the entry is recorded already (a run from a dump of it)
        kernel.recorder.syscall(thread, regs, "NtRaiseException", ssn, "NtRaiseException", False, _via(via))
    rec_raw = kernel_read(kernel.machine, regs[10], EXCEPTION_RECORD_SIZE)
    ctx_raw = kernel_read(kernel.machine, regs[2], CONTEXT_SIZE)
    if rec_raw is None or ctx_raw is None:
        kernel.sysret_status(thread, regs, via, STATUS_ACCESS_VIOLATION, "NtRaiseException")
        return
    if struct.unpack_from("<I", rec_raw, 0x18)[0] > 15:
        kernel.sysret_status(thread, regs, via, STATUS_INVALID_PARAMETER, "NtRaiseException")
        return
    record = ExceptionRecord.from_bytes(rec_raw)
    ctx = Context.from_bytes(ctx_raw)
    state = _apply_context(kernel, UserContext._make(regs), ctx)
    ext = kernel.machine.extended_state()
    first = bool(regs[8] & 0xFF)
    dispatch_to_user(kernel, thread, record, Context(state, ext.xmm, ext.mxcsr, x87=ext.x87), first, kernel.entry_len)


def nt_terminate_process(
    kernel: Kernel, thread: KThread, regs: tuple[int, ...], via: str, ssn: int, entered: bool = True
) -> None:
    """NtTerminateProcess(ProcessHandle, ExitStatus) for the current process (NtCurrentProcess(),
    handle -1, or NULL: MS docs ZwTerminateProcess): every thread ends with ExitStatus."""
    if entered:  # False: the entry is recorded already (a run from a dump of it)
        kernel.recorder.syscall(thread, regs, "NtTerminateProcess", ssn, "NtTerminateProcess", False, _via(via))
    if regs[10] not in (0, 0xFFFF_FFFF_FFFF_FFFF):
        kernel.sysret_status(thread, regs, via, STATUS_INVALID_HANDLE, "NtTerminateProcess")
        return
    status = regs[2] & 0xFFFF_FFFF
    terminate_process(kernel, thread, status, f"NtTerminateProcess({status_name(status)})")


def _via(via: str) -> str:
    return "" if via == "syscall" else "entered via int 2Eh"
