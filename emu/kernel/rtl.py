"""The built-in ntdll's exception routines whose work runs in Python: the traps at the end of
``emu/runtime/ntdll_exceptions.asm``.

Each trap is a one-byte ``ret`` in ntdll. When the CPU reaches it, a range-limited code hook
(free everywhere else) runs the matching function below with the x64 arguments (RCX, RDX,
R8, R9, then [RSP+0x28]...), which reads and writes guest memory, sets RAX and lets the
``ret`` run: to the guest it is an ordinary leaf call into ntdll. Nothing is kept in Python
between two traps; every routine's state is in its caller's stack frame (the assembly's
"block"), so forks, dumps and debuggers see what they would on Windows. The frame walks are
in :mod:`emu.kernel.rtl_walk`.

The guest-visible behaviour follows ReactOS ``sdk/lib/rtl/amd64/except.c``, ``unwind.c`` and
``rtl/vectoreh.c``, and MS docs "x64 exception handling" for the DISPATCHER_CONTEXT handlers get.
The vectored handler lists are LIST_ENTRY lists in ntdll's .data, as ReactOS ``vectoreh.c``
keeps them; the entries come from a pool next to the heads where Windows takes them from the
heap (emu has no heap), and hold the handler as passed where Windows stores it encoded with
RtlEncodePointer. A handle is the address of the entry.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from emu.kernel.rtl_traps import BUILTIN_TRAPS_END as BUILTIN_TRAPS_END
from emu.kernel.rtl_walk import FrameWalks
from emu.kernel.vunwind import FunctionEntry, UnwindError
from emu.loader.image import Image
from emu.ntcontext import (
    CONTEXT_SIZE,
    CTX_RAX,
    CTX_RIP,
    LIST_BLINK,
    LIST_FLINK,
    VEH_BLINK,
    VEH_ENTRIES,
    VEH_ENTRY_SIZE,
    VEH_FLINK,
    VEH_HANDLER,
    VEH_REFS,
    Context,
)

if TYPE_CHECKING:
    from emu.kernel.core import Kernel
    from emu.machine import Machine


class BuiltinRtl(FrameWalks):
    """The traps of one process's built-in ntdll, bound to its kernel."""

    def __init__(self, kernel: Kernel, ntdll: Image, images: list[Image]) -> None:
        self.kernel = kernel
        self.machine: Machine = kernel.machine
        self.images = sorted((img.base, img.end) for img in images)
        self.handlers: dict[int, Callable[[], None]] = {}
        names: dict[str, Callable[[], None]] = {
            "RtlLookupFunctionEntry": self.lookup_function_entry,
            "RtlVirtualUnwind": self.virtual_unwind,
            "RtlCaptureContext": self.capture_context,
            "RtlAddVectoredExceptionHandler": lambda: self.add_vectored(0),
            "RtlRemoveVectoredExceptionHandler": lambda: self.remove_vectored(0),
            "RtlAddVectoredContinueHandler": lambda: self.add_vectored(1),
            "RtlRemoveVectoredContinueHandler": lambda: self.remove_vectored(1),
            "RtlpCallVectoredHandlers__get": self.get_vectored,
            "RtlDispatchException__next_frame": self.dispatch_next_frame,
            "RtlDispatchException__disposition": self.dispatch_disposition,
            "RtlUnwindEx__next_frame": self.unwind_next_frame,
            "RtlRaiseException__capture": self.raise_capture,
            "__C_specific_handler__step": self.c_specific_step,
        }
        for name, fn in names.items():
            self.handlers[ntdll.symbols[name]] = fn
        self.raise_status = ntdll.symbols["RtlRaiseStatus"]
        self.raise_status_body = ntdll.symbols["RtlpRaiseStatus"]
        self.handlers[self.raise_status] = self.jump_to_raise_status
        # The code hooks that call on_trap are emu.kernel.rtl_traps's, set when the process is built.
        # The vectored handler lists: LIST_ENTRY heads and a pool of entries in ntdll's .data.
        self.vectored_heads = (ntdll.symbols["RtlpVectoredExceptionList"], ntdll.symbols["RtlpVectoredContinueList"])
        self.vectored_pool = ntdll.symbols["RtlpVectoredHandlerEntries"]

    # --- plumbing ------------------------------------------------------------------------------
    def on_trap(self, address: int) -> None:
        """The guest reached ``address`` in the traps' range: run its routine, if one is there."""
        fn = self.handlers.get(address)
        if fn is not None:
            fn()

    # --- exported routines -----------------------------------------------------------------------
    def lookup_function_entry(self) -> None:
        """PRUNTIME_FUNCTION RtlLookupFunctionEntry(ControlPc, PDWORD64 ImageBase, HistoryTable)."""
        regs = self._regs()
        entry = self._lookup(regs.rcx)
        if entry is None:
            self._ret(0)
            return
        if regs.rdx:
            self._write(regs.rdx, struct.pack("<Q", entry.image_base))
        self._ret(entry.address)

    def virtual_unwind(self) -> None:
        """PEXCEPTION_ROUTINE RtlVirtualUnwind(HandlerType, ImageBase, ControlPc, FunctionEntry,
        ContextRecord, HandlerData*, EstablisherFrame*, ContextPointers)."""
        regs = self._regs()
        handler_type, base, pc, fe_addr = (self._arg(regs, i) for i in range(4))
        ctx_addr, data_out, frame_out = (self._arg(regs, i) for i in (4, 5, 6))
        raw = self._read(fe_addr, 12)
        ctx_raw = self._read(ctx_addr, CONTEXT_SIZE)
        if raw is None or ctx_raw is None:
            self._ret(0)
            return
        b, e, u = struct.unpack("<III", raw)
        entry = FunctionEntry(fe_addr, base, b, e, u)
        ctx = Context.from_bytes(ctx_raw)
        try:
            values, unwound = self._unwind(handler_type & 3, pc, entry, ctx)
        except UnwindError:
            self._ret(0)
            return
        self._write(ctx_addr + CTX_RAX, struct.pack("<16Q", *values[:16]))
        self._write(ctx_addr + CTX_RIP, struct.pack("<Q", values[16]))
        if data_out:
            self._write(data_out, struct.pack("<Q", unwound.handler_data))
        if frame_out:
            self._write(frame_out, struct.pack("<Q", unwound.establisher))
        self._ret(unwound.handler)

    def capture_context(self) -> None:
        """VOID RtlCaptureContext(ContextRecord): the caller's registers as they are at the call,
        RIP = the return address and RSP as after the return (ReactOS rtl/amd64/except.S)."""
        regs = self._regs()
        ret = self._u64(regs.rsp)
        self._write_context(regs.rcx, regs._replace(rip=ret, rsp=regs.rsp + 8))

    # --- the vectored handler lists (in ntdll's .data: emu.runtime's _VECTORED_DATA) -------------
    def vectored_entries(self, which: int) -> list[int]:
        """The entries (handles) of vectored list ``which``: 0 exception handlers, 1 continue handlers."""
        return self._entries(which)

    def _entries(self, which: int) -> list[int]:
        """The entries of list ``which`` (0 exception, 1 continue), following Flink from the head."""
        head = self.vectored_heads[which]
        out: list[int] = []
        entry = self._u64(head + LIST_FLINK)
        while entry not in (head, 0) and len(out) < VEH_ENTRIES:
            out.append(entry)
            entry = self._u64(entry + VEH_FLINK)
        return out

    def add_vectored(self, which: int) -> None:
        """PVOID RtlAddVectoredExceptionHandler / RtlAddVectoredContinueHandler(First, Handler):
        a handle for the new entry, first or last in the list (MS docs AddVectoredExceptionHandler;
        ReactOS vectoreh.c RtlpAddVectoredHandler: the handle is the entry's address)."""
        regs = self._regs()
        pool = self.vectored_pool
        entry = next(
            (
                e
                for e in range(pool, pool + VEH_ENTRIES * VEH_ENTRY_SIZE, VEH_ENTRY_SIZE)
                if not self._u32(e + VEH_REFS)
            ),
            0,
        )
        if not entry or not regs.rdx:
            self._ret(0)  # the heap allocation failed (here: the pool is used up)
            return
        head = self.vectored_heads[which]
        if regs.rcx & 0xFFFF_FFFF:  # InsertHeadList
            prev, nxt = head, self._u64(head + LIST_FLINK)
        else:  # InsertTailList
            prev, nxt = self._u64(head + LIST_BLINK), head
        self._write(entry, struct.pack("<QQQI", nxt, prev, regs.rdx, 1))
        self._write(prev + LIST_FLINK, struct.pack("<Q", entry))
        self._write(nxt + LIST_BLINK, struct.pack("<Q", entry))
        self._ret(entry)

    def remove_vectored(self, which: int) -> None:
        """ULONG RtlRemoveVectored*Handler(Handle): non-zero when the handle was in the list."""
        handle = self._regs().rcx
        if handle not in self._entries(which):
            self._ret(0)
            return
        prev, nxt = self._u64(handle + VEH_BLINK), self._u64(handle + VEH_FLINK)
        self._write(prev + LIST_FLINK, struct.pack("<Q", nxt))  # RemoveEntryList
        self._write(nxt + LIST_BLINK, struct.pack("<Q", prev))
        self._write(handle, bytes(VEH_ENTRY_SIZE))  # back to the pool (RtlFreeHeap)
        self._ret(1)

    def get_vectored(self) -> None:
        """The Index-th handler of list ``List`` (0 exception, 1 continue), or NULL past the end."""
        regs = self._regs()
        entries = self._entries(regs.rcx & 1)
        i = regs.rdx & 0xFFFF_FFFF
        self._ret(self._u64(entries[i] + VEH_HANDLER) if i < len(entries) else 0)

    # --- RtlRaiseException / RtlRaiseStatus -------------------------------------------------------
    def raise_capture(self) -> None:
        """RtlRaiseException's context: the caller's (RIP = the return address, RSP after the
        return), and ExceptionRecord->ExceptionAddress = that RIP."""
        regs = self._regs()
        rec, buf = regs.rcx, regs.rdx
        frame_top = buf - 0x30 + 0x518  # RSP at RtlRaiseException's entry
        caller = regs._replace(rip=self._u64(frame_top), rsp=frame_top + 8)
        self._write_context(buf, caller)
        self._write(rec + 0x10, struct.pack("<Q", caller.rip))

    def jump_to_raise_status(self) -> None:
        """RtlRaiseStatus (2 bytes before the stubs, kept where it was) continues in RtlpRaiseStatus."""
        self.machine.jump(self.raise_status_body)
