"""The CPU and the user address space: Unicorn, mapped regions, fast register access.

The machine knows nothing of system calls: it maps memory, moves registers and
reports `syscall`, interrupts and faults to handlers the kernel installs. A fault in
user code is a :class:`Trap`; the kernel's exception handler may turn it into a Windows
exception (and the CPU goes on where the handler put it), otherwise it becomes a
:class:`MachineFault` naming the access, the address and the RIP.

User code runs at CPL 3, as on Windows: the machine enters it once through ``sysretq``
(Intel SDM vol. 2B SYSRET: CS = STAR[63:48] + 16 | 3, SS = STAR[63:48] + 8 | 3), with
STAR[63:48] = 0x23 as Windows sets it, so CS reads 0x33 and SS 0x2B (KGDT64_R3_CODE |
RPL 3, KGDT64_R3_DATA | RPL 3) and privileged instructions (cli, hlt, wrmsr, mov crN,
...) raise #GP instead of running. Not in/out: Unicorn runs them at CPL 3 whatever IOPL says,
so :mod:`emu.kernel.port_io` turns them into the #GP. Unicorn hands `syscall` to the kernel's
hook without changing privilege, so the CPU never leaves CPL 3.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import time
from collections.abc import Callable, Sequence

from unicorn import (
    UC_ARCH_X86,
    UC_ERR_INSN_INVALID,
    UC_ERR_OK,
    UC_ERR_READ_UNMAPPED,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_PROT,
    UC_HOOK_MEM_FETCH_UNMAPPED,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_READ_PROT,
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_MEM_WRITE_PROT,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MEM_WRITE_PROT,
    UC_MODE_64,
    UC_QUERY_TIMEOUT,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from emu import cpu_state, interrupts
from emu.errors import ImageError, MachineFault
from emu.loader.image import PAGE, Image, page_align
from emu.regions import Region, uc_prot
from emu.registers import _REG_IDS, _XMM, _XMM_SETS, RegisterFile
from emu.snapshot import CowMemory
from emu.trap import (
    ACCESS,
    ExceptionHandler,
    ExtendedState,
    InterruptHandler,
    StopInfo,
    SyscallHandler,
    Trap,
)

_SYSCALL_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)  # uc_cb_insn_syscall_t


class Machine:
    """A Unicorn x86-64 CPU and the regions mapped into it."""

    ALLOC_BASE = 0x0000_0001_0000_0000

    def __init__(self) -> None:
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.regs = RegisterFile(self.uc)
        self.regions: list[Region] = []
        self._index: tuple[list[Region], list[int], list[int]] | None = None  # region_at's search index
        self._next_alloc = self.ALLOC_BASE
        self.symbolize: Callable[[int], str] = lambda a: f"{a:#x}"
        # Direct uc_mem_read into one reusable buffer: the binding allocates a buffer per call.
        self._mem_buf = ctypes.create_string_buffer(0x10000)
        lib = self.regs._lib
        self._mem_read = lib.uc_mem_read if lib is not None else None
        self._handle = getattr(self.regs, "_handle", None)
        self._stop_requested = False
        self._cow_retry = False
        self.cow: CowMemory | None = None
        self.watchdog_fired = False
        self._hook_error: BaseException | None = None  # raised by a hook registered without the binding
        self._keep: list[object] = []  # ctypes callbacks Unicorn holds pointers to
        # Regions whose bytes live in memory emu owns (mapped with uc_mem_map_ptr): start -> buffer.
        self.host: dict[int, mmap.mmap] = {}
        self._host_code: set[int] = set()  # host regions some part of which is executable
        self._zero_xmm: dict[tuple[int, ...], Callable[[], int]] = {}
        self._trap: Trap | None = None
        self.exception_handler: ExceptionHandler | None = None
        # Called with (address, data) after each write the kernel model makes (emu.hooks); None: no cost.
        self.write_watch: Callable[[int, bytes], None] | None = None
        self.read_watch: Callable[[int, bytes], None] | None = (
            None  # reads Windows' kernel would make, for read hooks (emu.hooks)
        )
        # Called with (address, size) before each read of user memory the kernel model makes
        # (emu.kernel.record read_or_none, a service's reads; emu.symbolic); None: no cost.
        self.kernel_read_watch: Callable[[int, int], None] | None = None
        self._enter_user_mode()
        self.uc.hook_add(
            UC_HOOK_MEM_READ_UNMAPPED
            | UC_HOOK_MEM_WRITE_UNMAPPED
            | UC_HOOK_MEM_FETCH_UNMAPPED
            | UC_HOOK_MEM_READ_PROT
            | UC_HOOK_MEM_WRITE_PROT
            | UC_HOOK_MEM_FETCH_PROT,
            self._fault_hook,
        )

    def _enter_user_mode(self) -> None:
        """Drop the CPU to CPL 3 (:func:`emu.cpu_state.enter_user_mode`) and keep that CPU state
        as the clean one :meth:`_clear_exception_state` goes back to."""
        self._clean = cpu_state.enter_user_mode(self.uc)

    def _clear_exception_state(self) -> None:
        """Forget the CPU exception in flight, keeping every register a thread can see.

        QEMU counts a #DE or #GP as "in flight" until the IDT delivers it; Unicorn hands it to
        the hook instead, so the next #DE/#GP would become a double fault (#DF) and a third a
        shutdown. Restoring the clean CPU state (taken at CPL 3) clears that.
        """
        regs = self.regs.context()
        gs = self.uc.reg_read(_REG_IDS["gs_base"])
        ext = self.extended_state()
        self.uc.context_restore(self._clean)
        self.regs.set_context(regs)
        self.uc.reg_write(_REG_IDS["gs_base"], gs)
        self.set_extended_state(ext)

    def extended_state(self) -> ExtendedState:
        return cpu_state.extended_state(self.uc)

    def set_extended_state(self, ext: ExtendedState) -> None:
        cpu_state.set_extended_state(self.uc, ext)

    def register(self, name: str) -> int | None:
        """Any x86 register by its assembler name (``eax``, ``r8d``, ``ah``), or None if unknown."""
        reg = getattr(x86, f"UC_X86_REG_{name.upper()}", None)
        return None if reg is None else int(self.uc.reg_read(reg))

    def segment_selectors(self) -> tuple[int, int]:
        """(CS, SS) as the CPU holds them: (0x33, 0x2B) in user mode."""
        return self.uc.reg_read(x86.UC_X86_REG_CS), self.uc.reg_read(x86.UC_X86_REG_SS)

    # --- memory ---------------------------------------------------------------------
    def map(self, start: int, size: int, perms: str, label: str, data: bytes = b"", host: bool = False) -> Region:
        """Map a region. ``host``: its bytes live in a buffer emu owns (``self.host[start]``),
        which Python reads with a slice instead of a call into Unicorn (thread stacks: the
        recorder copies them at every transition)."""
        size = page_align(max(size, len(data), 1))
        if start % PAGE:
            raise ImageError(f"{label}: start {start:#x} is not page-aligned")
        for r in self.regions:
            if start < r.end and r.start < start + size:
                raise ImageError(
                    f"{label} at {start:#x}..{start + size:#x} overlaps {r.label} at {r.start:#x}..{r.end:#x}"
                )
        if host:
            # Private, so a forked worker gets its own copy (an anonymous mmap is shared by default).
            buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.uc.mem_map_ptr(start, size, uc_prot(perms), ctypes.addressof(ctypes.c_char.from_buffer(buf)))
            self.host[start] = buf
            if "x" in perms:
                self._host_code.add(start)
        else:
            self.uc.mem_map(start, size, uc_prot(perms))
        if data:
            self.uc.mem_write(start, bytes(data))
        region = Region(start, size, perms, label)
        self.regions = sorted([*self.regions, region], key=lambda r: r.start)  # a new list: region_at's index follows
        if self.cow is not None:
            self.cow.on_layout(start, size, perms)
        return region

    def map_image(self, image: Image) -> None:
        """Map an image's headers (read-only; a PE file's real header bytes) and each section."""
        self.map(image.base, max(PAGE, len(image.headers)), "r", f"{image.name} headers", image.headers)
        for s in image.sections:
            self.map(image.base + s.rva, s.size, s.perms, f"{image.name} {s.name}", s.data)

    def allocate(self, size: int, perms: str, label: str, data: bytes = b"") -> int:
        start = self._next_alloc
        region = self.map(start, size, perms, label, data)
        self._next_alloc = region.end + PAGE  # an unmapped page between allocations
        return start

    def allocate_stack(self, size: int, label: str, reserve: int = PAGE) -> tuple[int, int]:
        """A stack with a no-access guard page below it and ``reserve`` bytes left unmapped below
        that (the first reserved page is the gap every allocation leaves); returns (limit, base)."""
        start = self._next_alloc + reserve - PAGE
        self.map(start, PAGE, "", f"{label} guard")
        region = self.map(start + PAGE, size, "rw", label, host=True)
        self._next_alloc = region.end + PAGE
        return region.start, region.end

    def host_view(self, start: int, end: int) -> tuple[mmap.mmap, int] | None:
        """The buffer holding [start, end) and the address of its first byte, when one host
        region holds the whole range (else None: read it with :meth:`read`)."""
        for base, buf in self.host.items():
            if base <= start and end <= base + len(buf):
                return buf, base
        return None

    def protect(self, start: int, size: int, perms: str, label: str) -> None:
        """Change a mapped range's protection (a whole region), as NtProtectVirtualMemory would."""
        self.uc.mem_protect(start, size, uc_prot(perms))
        if "x" in perms:
            self._host_code.update(b for b, buf in self.host.items() if b < start + size and start < b + len(buf))
        self.regions = sorted(
            [r for r in self.regions if r.start != start] + [Region(start, size, perms, label)], key=lambda r: r.start
        )
        if self.cow is not None:
            self.cow.on_layout(start, size, perms)

    def region_at(self, address: int) -> Region | None:
        index = self._index
        if index is None or index[0] is not self.regions:
            # Regions are sorted and never overlap (map, protect): a binary search over their starts.
            index = self._index = (self.regions, [r.start for r in self.regions], [r.end for r in self.regions])
        i = bisect.bisect_right(index[1], address) - 1
        return index[0][i] if i >= 0 and address < index[2][i] else None

    def read(self, address: int, size: int) -> bytes:
        """Bytes of user memory; raises UcError if any of it is unmapped."""
        if self._mem_read is None or size > len(self._mem_buf):
            return bytes(self.uc.mem_read(address, size))
        if self._mem_read(self._handle, address, self._mem_buf, size) != UC_ERR_OK:
            raise UcError(UC_ERR_READ_UNMAPPED)
        return ctypes.string_at(self._mem_buf, size)

    def write(self, address: int, data: bytes) -> None:
        """Write user memory from the host (the kernel model, the loader); Unicorn's hooks never see it."""
        if self.cow is not None:
            self.cow.on_host_write(address, len(data))
        slot = self.host_slot(address, len(data))
        if slot is not None:
            buf, start, end = slot
            buf[start:end] = data
        else:
            self.uc.mem_write(address, bytes(data))
        if self.write_watch is not None:
            self.write_watch(address, data)

    def host_slot(self, address: int, size: int) -> tuple[mmap.mmap, int, int] | None:
        """Where :meth:`write` would put ``size`` bytes at ``address`` in a host buffer: (the
        buffer, start, end), or None when such a write goes through Unicorn. Valid while the
        regions stay the same object; a caller writing there itself must first check that
        :attr:`cow` and :attr:`write_watch` are None, as :meth:`write` would act on them."""
        end = address + size
        for base, buf in self.host.items():
            # Unicorn must see writes to code it may have translated: those go through it.
            if base <= address and end <= base + len(buf) and base not in self._host_code:
                return buf, address - base, end - base
        return None

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.uc.mem_read(address, 8), "little")

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))

    def readable(self, address: int, size: int) -> bool:
        return self.mapped_with(address, size, "r")

    def mapped_with(self, address: int, size: int, perm: str) -> bool:
        end = address + size
        while address < end:
            r = self.region_at(address)
            if r is None or perm not in r.perms:
                return False
            address = r.end
        return True

    # --- execution ------------------------------------------------------------------
    def add_code_hook(self, begin: int, end: int, callback: Callable[[Uc, int, int, object], None]) -> None:
        """A hook on instructions in [begin, end) only: free everywhere else."""
        self.uc.hook_add(UC_HOOK_CODE, callback, None, begin, end - 1)

    def add_memory_hook(
        self, write: bool, begin: int, end: int, callback: Callable[[Uc, int, int, int, int, object], None]
    ) -> None:
        """A hook on user code's reads (or writes) of [begin, end): accesses starting there, nowhere else."""
        self.uc.hook_add(UC_HOOK_MEM_WRITE if write else UC_HOOK_MEM_READ, callback, None, begin, end - 1)

    def zero_xmm(self, numbers: Sequence[int]) -> None:
        """Zero XMM registers by number (the kernel scrubbing them on its way to user mode)."""
        key = numbers if isinstance(numbers, tuple) else tuple(numbers)
        call = self._zero_xmm.get(key)
        if call is None:
            ids = _XMM_SETS.get(key)
            if ids is None:
                ids = _XMM_SETS[key] = tuple(_XMM[n] for n in key)
            if self.regs._lib is None:  # pragma: no cover - other binding layouts
                self.regs.zero_wide(ids)
                return
            call = self._zero_xmm[key] = self.regs._zeroer(ids)
        if call() != UC_ERR_OK:
            raise UcError(1)

    def jump(self, rip: int) -> None:
        """Set RIP from a code hook: the CPU goes on there instead of running the hooked instruction
        (the binding's single-register write; a batched write of RIP is not seen as a jump)."""
        self.uc.reg_write(x86.UC_X86_REG_RIP, rip)

    def set_gs_base(self, value: int) -> None:
        self.uc.reg_write(_REG_IDS["gs_base"], value)

    def request_stop(self) -> None:
        """Called by a handler: stop after the current instruction (Unicorn is told once per run)."""
        if not self._stop_requested:
            self._stop_requested = True
            self.uc.emu_stop()

    def enable_cow(self) -> CowMemory:
        """Track dirty pages for snapshots (exploration); call once, after everything is mapped."""
        if self.cow is None:
            self.cow = CowMemory(self)
        return self.cow

    def run(self, begin: int, instructions: int, timeout: float | None) -> StopInfo:
        """Run from ``begin`` until a handler stops it, or a budget runs out.

        ``timeout=None`` leaves wall time to the caller (a :class:`Watchdog`): Unicorn's
        own timeout starts a timer thread per call, about 0.1 ms, which dominates short
        runs such as an explorer's segments.

        With copy-on-write tracking on, the first write to a tracked page stops the CPU
        before the instruction takes effect; the page is made writable and the run
        resumes at the same instruction (the instruction budget applies per resumption).
        """
        self._stop_requested = False
        start = time.perf_counter()
        interrupts.running.add(self)
        try:
            return self._run(begin, instructions, timeout, start)
        finally:
            interrupts.running.discard(self)

    def stop_for_interrupt(self) -> None:
        """Ctrl-C (from :mod:`emu.interrupts`' thread): stop the CPU; Python then raises KeyboardInterrupt."""
        self.uc.emu_stop()

    def _run(self, begin: int, instructions: int, timeout: float | None, start: float) -> StopInfo:
        while True:
            if self.watchdog_fired:
                break  # the deadline passed while Python ran (between two emu_start calls)
            self._trap = None
            self._cow_retry = False
            us = 0 if timeout is None else max(1, int((timeout - (time.perf_counter() - start)) * 1_000_000))
            try:
                self.uc.emu_start(begin, NEVER, timeout=us, count=instructions)
                self._raise_hook_error()
            except UcError as e:
                self._raise_hook_error()
                if self._cow_retry:
                    if self._stop_requested:
                        break  # the stop came first: the write happens when the CPU goes on
                    begin = self.regs.read(("rip",))[0]
                    continue
                # A fault hook returned False, so Unicorn reports the access as an error; the
                # hook has kept the explanation.
                trap = self._trap
                if trap is None:
                    rip = self.regs.read(("rip",))[0]
                    where = self.symbolize(rip)
                    if e.errno != UC_ERR_INSN_INVALID:
                        raise MachineFault(f"CPU error: {e} at {where}", rip, where) from None
                    trap = Trap("invalid", rip, f"invalid instruction at {where}", vector=6)
                begin = self._deliver(trap)
                if self._stop_requested:
                    break
                continue
            if self._trap is not None and not self._stop_requested:
                begin = self._deliver(self._trap)
                if self._stop_requested:
                    break
                continue
            break
        elapsed = time.perf_counter() - start
        if self._stop_requested:
            return StopInfo("requested", elapsed)
        if timeout is not None and self.uc.query(UC_QUERY_TIMEOUT):
            return StopInfo("timeout", elapsed)
        if self.watchdog_fired:
            return StopInfo("timeout", elapsed)
        return StopInfo("instructions", elapsed)

    def _raise_hook_error(self) -> None:
        error = self._hook_error
        if error is not None:
            self._hook_error = None
            raise error

    def _deliver(self, trap: Trap) -> int:
        """Hand a fault to the exception handler: where the CPU goes on, or MachineFault."""
        self._clear_exception_state()
        self._trap = None
        if trap.undo is not None:
            trap.undo()
        if trap.context is not None:
            self.regs.set_context(trap.context)
        if self.exception_handler is None or not self.exception_handler(trap):
            where = self.symbolize(trap.rip)
            raise MachineFault(trap.message, trap.rip, where)
        return int(self.regs.read(("rip",))[0])

    def raise_trap(self, trap: Trap) -> None:
        """From a hook: stop the CPU and hand ``trap`` to the exception handler (outside the hook).
        The first trap wins: what the CPU does before it stops is not delivered."""
        if self._trap is None:
            self._trap = trap
        self.uc.emu_stop()

    # --- hooks ----------------------------------------------------------------------
    def hook_failed(self, error: BaseException) -> None:
        """What a `syscall` handler registered with ``handles_errors`` calls with what it caught:
        the CPU stops and :meth:`run` raises ``error`` (the first one, if several)."""
        if self._hook_error is None:
            self._hook_error = error
        self.uc.emu_stop()

    def _guarded(self, on_syscall: SyscallHandler) -> Callable[[int, int], None]:
        def entry(handle: int, user_data: int) -> None:
            try:
                on_syscall(None, None)  # type: ignore[arg-type]
            except BaseException as e:  # re-raised by run(), after Unicorn has stopped
                self.hook_failed(e)

        return entry

    def install(self, on_syscall: SyscallHandler, on_interrupt: InterruptHandler, handles_errors: bool = False) -> None:
        """Hand `syscall` and interrupts to the kernel, registered directly (no extra Python layer).

        Unicorn calls ``on_syscall(uc, user_data)`` with RIP at the `syscall` itself and
        ``on_interrupt(uc, intno, user_data)`` with RIP past the `int`. Without a handler a
        `syscall` does nothing and an interrupt stops the CPU with an error.

        The `syscall` hook is registered with ``uc_hook_add`` itself rather than through the
        binding, whose wrapper adds two Python calls to every system call; what the handler
        raises stops the CPU and :meth:`run` raises it, as the binding would. ``handles_errors``:
        the handler catches what it raises itself and passes it to :meth:`hook_failed`, so it is
        registered as it is (one Python frame fewer per system call).
        """
        lib = self.regs._lib
        if lib is None:  # pragma: no cover - other binding layouts
            self.uc.hook_add(UC_HOOK_INSN, on_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        else:
            if handles_errors:
                callback = _SYSCALL_HOOK(on_syscall)  # called as on_syscall(handle, user_data)
            else:
                callback = _SYSCALL_HOOK(self._guarded(on_syscall))
            hook = ctypes.c_size_t()
            status = lib.uc_hook_add(
                self._handle, ctypes.byref(hook), UC_HOOK_INSN, callback, None,
                ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(x86.UC_X86_INS_SYSCALL),
            )  # fmt: skip
            if status != UC_ERR_OK:
                raise UcError(status)
            self._keep.append(callback)
        self.uc.hook_add(UC_HOOK_INTR, on_interrupt)

    def _fault_hook(self, uc: Uc, access: int, address: int, size: int, value: int, user_data: object) -> bool:
        if self._trap is not None:
            return False  # a hook stopped the CPU already (emu.kernel.port_io): this access is not made
        if access == UC_MEM_WRITE_PROT and self.cow is not None and self.cow.on_write_fault(address, size):
            self._cow_retry = True
            return False  # stop before the write; run() resumes at the same instruction
        rip = self.regs.read(("rip",))[0]
        what, why = ACCESS.get(access, ("access", "invalid"))
        region = self.region_at(address)
        if region is not None and "guard" in region.label:
            why = f"guard page of {region.label.replace(' guard', '')} (stack overflow)"
        elif region is not None:
            why = f"{why}: {region.label} is '{region.perms or '-'}'"
        where = self.symbolize(rip)
        message = f"memory fault: {what} of {size} byte(s) at {address:#x} ({why}) at {where}"
        self._trap = Trap("memory", rip, message, access=what, address=address, region=region.label if region else "")
        return False


NEVER = 0xFFFF_FFFF_FFFF_F000  # an `until` no user code reaches (kernel space): 0 would stop a NULL call quietly
