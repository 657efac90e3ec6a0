"""The built-in ntdll's frame walks, behind its traps (see :mod:`emu.kernel.rtl`): one step of
RtlDispatchException's search for a frame-based handler, of RtlUnwindEx, and of
__C_specific_handler's scope table scan, after ReactOS ``sdk/lib/rtl/amd64/except.c`` and
``unwind.c`` and MS docs "x64 exception handling". Each step keeps its state in the calling
assembly's block on the guest stack, never in Python.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from emu.context import UserContext
from emu.kernel.user_read import read_or_none
from emu.kernel.vunwind import (
    UNW_FLAG_EHANDLER,
    UNW_FLAG_UHANDLER,
    FunctionEntry,
    UnwindError,
    Unwound,
    lookup,
    virtual_unwind,
)
from emu.ntcontext import (
    CONTEXT_FULL,
    CONTEXT_SEGMENTS,
    CONTEXT_SIZE,
    DC_CONTEXT_RECORD,
    DC_CONTROL_PC,
    DC_ESTABLISHER_FRAME,
    DC_FUNCTION_ENTRY,
    DC_HANDLER_DATA,
    DC_HISTORY_TABLE,
    DC_IMAGE_BASE,
    DC_LANGUAGE_HANDLER,
    DC_SCOPE_INDEX,
    DC_TARGET_IP,
    DISPATCHER_CONTEXT_SIZE,
    ER_FLAGS,
    EXCEPTION_COLLIDED_DISPOSITION,
    EXCEPTION_CONTINUE_EXECUTION_DISPOSITION,
    EXCEPTION_CONTINUE_SEARCH_DISPOSITION,
    EXCEPTION_EXIT_UNWIND,
    EXCEPTION_NESTED_CALL,
    EXCEPTION_NESTED_DISPOSITION,
    EXCEPTION_NONCONTINUABLE,
    EXCEPTION_STACK_INVALID,
    EXCEPTION_TARGET_UNWIND,
    EXCEPTION_UNWINDING,
    Context,
    ExceptionRecord,
)
from emu.trap import ExtendedState
from emu.winnt import (
    STATUS_BAD_STACK,
    STATUS_INVALID_DISPOSITION,
    STATUS_NONCONTINUABLE_EXCEPTION,
    STATUS_UNWIND,
    TEB_STACK_BASE,
    TEB_STACK_LIMIT,
    status_name,
)

if TYPE_CHECKING:
    from emu.kernel.core import Kernel
    from emu.machine import Machine


MAX_FRAMES = 4096  # a walk past this many frames is a broken stack
# The walk's block in RtlDispatchException's / RtlUnwindEx's frame (ntdll_exceptions.asm).
B_DC, B_CONTEXT = 0x00, 0x50
B_RECORD, B_CONTEXT_RECORD, B_NESTED, B_STATE, B_RAISE = 0x520, 0x528, 0x530, 0x538, 0x540
U_TARGET_FRAME, U_TARGET_IP, U_RECORD, U_RETURN, U_CONTEXT_RECORD, U_STATE, U_LOCAL_RECORD = (
    0x520, 0x528, 0x530, 0x538, 0x540, 0x548, 0x550,
)  # fmt: skip
FRAME_BLOCK = 0x30  # the block's offset in the 0x618-byte frames
FRAME_SIZE = 0x618


class TrapBase:
    """What every trap needs: the process's kernel and machine, its arguments, guest memory."""

    kernel: Kernel
    machine: Machine
    images: list[tuple[int, int]]

    def _regs(self) -> UserContext:
        return self.machine.regs.context()

    def _arg(self, regs: UserContext, n: int) -> int:
        """The n-th argument (0-based) at a trap's entry: RCX, RDX, R8, R9, then [RSP+0x28]..."""
        if n < 4:
            return int((regs.rcx, regs.rdx, regs.r8, regs.r9)[n])
        return self._u64(regs.rsp + 0x28 + 8 * (n - 4))

    def _u64(self, address: int) -> int:
        raw = read_or_none(self.machine, address, 8)
        return int.from_bytes(raw, "little") if raw is not None else 0

    def _u32(self, address: int) -> int:
        raw = read_or_none(self.machine, address, 4)
        return int.from_bytes(raw, "little") if raw is not None else 0

    def _read(self, address: int, size: int) -> bytes | None:
        return read_or_none(self.machine, address, size)

    def _write(self, address: int, data: bytes) -> bool:
        try:
            self.machine.write(address, data)
        except Exception:  # unicorn refuses an unmapped write: the guest passed a bad pointer
            return False
        return True

    def _ret(self, value: int) -> None:
        self.machine.regs.write(("rax",), (value & 0xFFFF_FFFF_FFFF_FFFF,))

    def _stack_limits(self) -> tuple[int, int]:
        thread = self.kernel.current
        if thread is None:
            return 0, 0
        return self._u64(thread.teb + TEB_STACK_LIMIT), self._u64(thread.teb + TEB_STACK_BASE)

    def _lookup(self, pc: int) -> FunctionEntry | None:
        return lookup(self._read, self.images, pc)

    def _unwind(self, handler_type: int, pc: int, entry: FunctionEntry, ctx: Context) -> tuple[list[int], Unwound]:
        regs = {n: int(v) for n, v in zip(UserContext._fields, ctx.regs)}
        regs["rip"] = pc
        unwound = virtual_unwind(self._read, handler_type, pc, entry, regs, ctx.xmm)
        values = [regs[n] & 0xFFFF_FFFF_FFFF_FFFF for n in UserContext._fields[:17]]
        return values, unwound

    def _write_context(self, address: int, regs: UserContext) -> None:
        ext = self.machine.extended_state()
        ctx = Context(regs, ext.xmm, ext.mxcsr, CONTEXT_FULL | CONTEXT_SEGMENTS, ext.x87)
        self._write(address, ctx.to_bytes())


class FrameWalks(TrapBase):
    """RtlDispatchException's and RtlUnwindEx's walks and __C_specific_handler's scan, one trap each."""

    # --- RtlDispatchException's walk --------------------------------------------------------------
    def dispatch_next_frame(self) -> None:
        """One step of RtlpDispatchException: unwind frames until one has an exception handler
        (fill the DISPATCHER_CONTEXT, return 1) or the walk ends (return 0: not handled)."""
        block = self._regs().rcx
        rec = self._u64(block + B_RECORD)
        if self._u64(block + B_STATE) == 0:
            original = self._read(self._u64(block + B_CONTEXT_RECORD), CONTEXT_SIZE)
            if original is None:
                self._ret(0)
                return
            self._write(block + B_CONTEXT, original)
            self._write(block + B_STATE, struct.pack("<Q", 1))
        low, high = self._stack_limits()
        ctx = Context.from_bytes(self._read(block + B_CONTEXT, CONTEXT_SIZE) or bytes(CONTEXT_SIZE))
        for _ in range(MAX_FRAMES):
            pc = ctx.regs.rip
            if pc == 0:
                break  # past the thread's first frame (RtlUserThreadStart's zero return address)
            entry = self._lookup(pc)
            try:
                if entry is None:
                    # A leaf: the return address is at [RSP] (ReactOS RtlpDispatchException).
                    rsp = ctx.regs.rsp
                    if not low <= rsp < high:
                        raise UnwindError("leaf frame outside the stack")
                    ctx.regs = ctx.regs._replace(rip=self._u64(rsp), rsp=rsp + 8)
                    continue
                values, unwound = self._unwind(UNW_FLAG_EHANDLER, pc, entry, ctx)
            except UnwindError:
                self._or_flags(rec, EXCEPTION_STACK_INVALID)
                break
            ctx.regs = UserContext._make((*values, ctx.regs.rflags))
            frame = unwound.establisher
            if not low <= frame < high or frame & 7:
                self._or_flags(rec, EXCEPTION_STACK_INVALID)
                break
            if unwound.handler:
                if frame == self._u64(block + B_NESTED):
                    self._and_flags(rec, ~EXCEPTION_NESTED_CALL)
                    self._write(block + B_NESTED, bytes(8))
                self._write(block + B_CONTEXT, ctx.to_bytes())
                self._fill_dc(block, pc, entry, frame, 0, block + B_CONTEXT, unwound)
                self._ret(1)
                return
        self._write(block + B_CONTEXT, ctx.to_bytes())
        self._ret(0)

    def _fill_dc(
        self, block: int, pc: int, entry: FunctionEntry, frame: int, target: int, context: int, unwound: Unwound
    ) -> None:
        dc = bytearray(DISPATCHER_CONTEXT_SIZE)
        for off, value in (
            (DC_CONTROL_PC, pc), (DC_IMAGE_BASE, entry.image_base), (DC_FUNCTION_ENTRY, entry.address),
            (DC_ESTABLISHER_FRAME, frame), (DC_TARGET_IP, target), (DC_CONTEXT_RECORD, context),
            (DC_LANGUAGE_HANDLER, unwound.handler), (DC_HANDLER_DATA, unwound.handler_data),
            (DC_HISTORY_TABLE, 0),
        ):  # fmt: skip
            struct.pack_into("<Q", dc, off, value)
        struct.pack_into("<I", dc, DC_SCOPE_INDEX, 0)
        self._write(block + B_DC, bytes(dc))

    def _flags(self, rec: int) -> int:
        raw = self._read(rec + ER_FLAGS, 4)
        return struct.unpack("<I", raw)[0] if raw else 0

    def _or_flags(self, rec: int, bits: int) -> None:
        self._write(rec + ER_FLAGS, struct.pack("<I", (self._flags(rec) | bits) & 0xFFFF_FFFF))

    def _and_flags(self, rec: int, mask: int) -> None:
        self._write(rec + ER_FLAGS, struct.pack("<I", self._flags(rec) & mask & 0xFFFF_FFFF))

    def dispatch_disposition(self) -> None:
        """What a language handler's answer means (ReactOS RtlpDispatchException): 0 search on,
        1 handled, 2 raise the record the block now holds (noncontinuable / invalid disposition)."""
        regs = self._regs()
        block, disposition = regs.rcx, regs.rdx & 0xFFFF_FFFF
        rec = self._u64(block + B_RECORD)
        self._and_flags(rec, ~EXCEPTION_NESTED_CALL)
        if disposition == EXCEPTION_CONTINUE_EXECUTION_DISPOSITION:
            if not self._flags(rec) & EXCEPTION_NONCONTINUABLE:
                self._ret(1)
                return
            status = STATUS_NONCONTINUABLE_EXCEPTION
        elif disposition == EXCEPTION_CONTINUE_SEARCH_DISPOSITION:
            self._ret(0)
            return
        elif disposition == EXCEPTION_NESTED_DISPOSITION:
            self._or_flags(rec, EXCEPTION_NESTED_CALL)
            frame = self._u64(block + B_DC + DC_ESTABLISHER_FRAME)
            if frame > self._u64(block + B_NESTED):
                self._write(block + B_NESTED, struct.pack("<Q", frame))
            self._ret(0)
            return
        else:
            status = STATUS_INVALID_DISPOSITION
        raised = ExceptionRecord(status, 0, (), EXCEPTION_NONCONTINUABLE, rec)
        self._write(block + B_RAISE, raised.to_bytes())
        self._ret(2)

    # --- RtlUnwindEx ------------------------------------------------------------------------------
    def unwind_next_frame(self) -> None:
        """One step of RtlpUnwindInternal: the next frame with a termination handler (fill the
        DISPATCHER_CONTEXT, return 1), or, at the target frame, the target context put on the
        CPU (RIP = TargetIp, RAX = ReturnValue; this trap never returns then). A broken stack:
        return 2 with ECX = STATUS_BAD_STACK (the assembly raises it)."""
        regs = self._regs()
        block = regs.rcx
        target_frame = self._u64(block + U_TARGET_FRAME)
        state = self._u64(block + U_STATE)
        rec = self._u64(block + U_RECORD)
        if state == 0:
            # RtlCaptureContext in RtlUnwindEx, unwound once: the caller's context.
            frame_top = block - FRAME_BLOCK + FRAME_SIZE  # RSP at RtlUnwindEx's entry
            caller = regs._replace(rip=self._u64(frame_top), rsp=frame_top + 8)
            ctx_buf = self._u64(block + U_CONTEXT_RECORD) or (block + B_CONTEXT)
            self._write(block + U_CONTEXT_RECORD, struct.pack("<Q", ctx_buf))
            self._write_context(ctx_buf, caller)
            if rec == 0:
                rec = block + U_LOCAL_RECORD
                self._write(rec, ExceptionRecord(STATUS_UNWIND, caller.rip).to_bytes())
                self._write(block + U_RECORD, struct.pack("<Q", rec))
            flags = EXCEPTION_UNWINDING | (0 if target_frame else EXCEPTION_EXIT_UNWIND)
            self._write(block + U_STATE, struct.pack("<Q", 1 | flags << 8))
            state = 1 | flags << 8
        else:
            disposition = regs.rdx & 0xFFFF_FFFF
            if disposition not in (EXCEPTION_CONTINUE_SEARCH_DISPOSITION, EXCEPTION_COLLIDED_DISPOSITION):
                self._fail(STATUS_INVALID_DISPOSITION)
                return
            # The handled frame is done: its unwound context becomes the current one (step 8).
            if state & 0x10000:
                self._finish(block, rec)
                return
            self._write(self._u64(block + U_CONTEXT_RECORD), self._read(block + B_CONTEXT, CONTEXT_SIZE) or b"")
        flags = (state >> 8) & 0xFF
        ctx_buf = self._u64(block + U_CONTEXT_RECORD)
        low, high = self._stack_limits()
        current = Context.from_bytes(self._read(ctx_buf, CONTEXT_SIZE) or bytes(CONTEXT_SIZE))
        for _ in range(MAX_FRAMES):
            pc = current.regs.rip
            entry = self._lookup(pc)
            unwind_ctx = Context(current.regs, list(current.xmm), current.mxcsr, current.flags, current.x87)
            try:
                if entry is None:
                    rsp = current.regs.rsp
                    if not low <= rsp < high:
                        raise UnwindError("leaf frame outside the stack")
                    current.regs = current.regs._replace(rip=self._u64(rsp), rsp=rsp + 8)
                    self._write(ctx_buf, current.to_bytes())
                    continue
                values, unwound = self._unwind(UNW_FLAG_UHANDLER, pc, entry, unwind_ctx)
            except UnwindError:
                self._fail(STATUS_BAD_STACK)
                return
            unwind_ctx.regs = UserContext._make((*values, current.regs.rflags))
            frame = unwound.establisher
            if not low <= frame < high or frame & 7:
                self._fail(STATUS_BAD_STACK)
                return
            at_target = frame == target_frame
            if unwound.handler:
                rec_flags = flags | (EXCEPTION_TARGET_UNWIND if at_target else 0)
                self._write(rec + ER_FLAGS, struct.pack("<I", rec_flags))
                self._write(block + B_CONTEXT, unwind_ctx.to_bytes())
                self._fill_dc(block, pc, entry, frame, self._u64(block + U_TARGET_IP), ctx_buf, unwound)
                self._write(block + U_STATE, struct.pack("<Q", 1 | flags << 8 | (0x10000 if at_target else 0)))
                self._ret(1)
                return
            if at_target:
                self._finish(block, rec)
                return
            current = unwind_ctx
            self._write(ctx_buf, current.to_bytes())
        self._fail(STATUS_BAD_STACK)

    def _fail(self, status: int) -> None:
        self.machine.regs.write(("rax", "rcx"), (2, status))

    def _finish(self, block: int, rec: int) -> None:
        """RtlUnwindEx at its target: RIP = TargetIp, RAX = ReturnValue, RtlRestoreContext (user mode)."""
        ctx_buf = self._u64(block + U_CONTEXT_RECORD)
        ctx = Context.from_bytes(self._read(ctx_buf, CONTEXT_SIZE) or bytes(CONTEXT_SIZE))
        regs = ctx.regs._replace(rip=self._u64(block + U_TARGET_IP), rax=self._u64(block + U_RETURN))
        thread = self.kernel.current
        self.machine.regs.set_context(regs)
        self.machine.set_extended_state(ExtendedState(list(ctx.xmm), ctx.mxcsr, ctx.x87))
        self.machine.jump(regs.rip)
        if thread is not None:
            sym = self.kernel.trace.symbolize
            frame = self._u64(block + U_TARGET_FRAME)
            code = struct.unpack("<I", self._read(rec, 4) or bytes(4))[0]
            detail = f"RtlUnwindEx to {sym(regs.rip)} (frame {frame:#x}) for {status_name(code)}"
            self.kernel.recorder.unwind(thread, tuple(regs), detail)

    # --- __C_specific_handler ---------------------------------------------------------------------
    def c_specific_step(self) -> None:
        """The next thing __C_specific_handler does (its block: rec, frame, ctx, dc, routine,
        EXCEPTION_POINTERS, last filter answer): 0 search on, 1 call the filter, 2 call the
        termination handler, 3 unwind to the JumpTarget, 4 continue execution. The routine's
        address goes to block+0x20; DispatcherContext->ScopeIndex is the position, as on Windows."""
        block = self._regs().rcx
        rec, dc = self._u64(block), self._u64(block + 0x18)
        flags = self._flags(rec)
        base = self._u64(dc + DC_IMAGE_BASE)
        pc = self._u64(dc + DC_CONTROL_PC)
        table = self._u64(dc + DC_HANDLER_DATA)
        raw_index = self._read(dc + DC_SCOPE_INDEX, 4)
        index = struct.unpack("<I", raw_index)[0] if raw_index else 0
        count_raw = self._read(table, 4)
        count = struct.unpack("<I", count_raw)[0] if count_raw else 0
        answer = self._u64(block + 0x38)
        self._write(block + 0x38, bytes(8))
        if answer:
            # The filter of scope index - 1 answered: EXECUTE_HANDLER (1), CONTINUE_EXECUTION (-1),
            # or CONTINUE_SEARCH (0, never stored: the scan just goes on).
            if answer == 1:
                self._unwind_to_scope(block, dc, table, base, index - 1)
                return
            self._ret(4)
            return
        unwinding = flags & (EXCEPTION_UNWINDING | EXCEPTION_EXIT_UNWIND)
        target_ip = self._u64(dc + DC_TARGET_IP)
        while index < min(count, 4096):
            raw = self._read(table + 4 + 16 * index, 16)
            if raw is None:
                break
            begin, end, handler, jump = struct.unpack("<IIII", raw)
            index += 1
            if not base + begin <= pc < base + end:
                continue
            if unwinding:
                if jump:
                    continue
                if flags & EXCEPTION_TARGET_UNWIND and base + begin <= target_ip < base + end:
                    break
                self._write(dc + DC_SCOPE_INDEX, struct.pack("<I", index))
                self._write(block + 0x20, struct.pack("<Q", base + handler))
                self._ret(2)
                return
            if not jump:
                continue
            self._write(dc + DC_SCOPE_INDEX, struct.pack("<I", index))
            if handler == 1:  # EXCEPTION_EXECUTE_HANDLER in place of a filter
                self._unwind_to_scope(block, dc, table, base, index - 1)
                return
            self._write(block + 0x20, struct.pack("<Q", base + handler))
            self._ret(1)
            return
        self._ret(0)

    def _unwind_to_scope(self, block: int, dc: int, table: int, base: int, index: int) -> None:
        raw = self._read(table + 4 + 16 * index + 12, 4)
        jump = struct.unpack("<I", raw)[0] if raw else 0
        self._write(block + 0x20, struct.pack("<Q", base + jump))
        self._ret(3)
