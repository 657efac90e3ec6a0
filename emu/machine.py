"""The CPU and the user address space: Unicorn, mapped regions, fast register access.

The machine knows nothing of system calls: it maps memory, moves registers and
reports `syscall`, interrupts and faults to handlers the kernel installs. Faults in
user code become :class:`MachineFault` naming the access, the address and the RIP.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from unicorn import (
    UC_ARCH_X86,
    UC_ERR_OK,
    UC_ERR_READ_UNMAPPED,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_PROT,
    UC_HOOK_MEM_FETCH_UNMAPPED,
    UC_HOOK_MEM_READ_PROT,
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE_PROT,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MEM_FETCH_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ_PROT,
    UC_MEM_READ_UNMAPPED,
    UC_MEM_WRITE_PROT,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_64,
    UC_PROT_EXEC,
    UC_PROT_NONE,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_QUERY_TIMEOUT,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from emu import interrupts
from emu.context import REGISTER_NAMES, UserContext
from emu.errors import ImageError, MachineFault
from emu.loader.image import PAGE, Image, page_align
from emu.snapshot import CowMemory

_REG_IDS: dict[str, int] = {
    **{n: getattr(x86, f"UC_X86_REG_{n.upper()}") for n in REGISTER_NAMES if n != "rflags"},
    "rflags": x86.UC_X86_REG_RFLAGS,
    "gs_base": x86.UC_X86_REG_GS_BASE,
}

_XMM: tuple[int, ...] = tuple(getattr(x86, f"UC_X86_REG_XMM{n}") for n in range(16))

_ACCESS = {
    UC_MEM_READ_UNMAPPED: ("read", "unmapped"),
    UC_MEM_WRITE_UNMAPPED: ("write", "unmapped"),
    UC_MEM_FETCH_UNMAPPED: ("execute", "unmapped"),
    UC_MEM_READ_PROT: ("read", "protected"),
    UC_MEM_WRITE_PROT: ("write", "protected"),
    UC_MEM_FETCH_PROT: ("execute", "protected"),
}


def _prot(perms: str) -> int:
    p = UC_PROT_NONE
    if "r" in perms:
        p |= UC_PROT_READ
    if "w" in perms:
        p |= UC_PROT_WRITE
    if "x" in perms:
        p |= UC_PROT_EXEC
    return p


class RegisterFile:
    """Batched register access through the C API: one call for many registers.

    The binding's ``reg_read`` costs about 1.3 µs per register and ``reg_read_batch``
    more; ``uc_reg_read_batch`` through ctypes with preallocated arrays reads all 18
    user registers in under 1 µs. Falls back to the binding if its internals move.
    """

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._lib = None
        try:
            from unicorn.unicorn_py3 import unicorn as binding

            self._lib = binding.uclib
            self._handle = uc._uch
        except (ImportError, AttributeError):  # pragma: no cover - other binding layouts
            self._lib = None
        self._batches: dict[tuple[str, ...], tuple[object, object, object, int]] = {}
        self._all = tuple(REGISTER_NAMES)

    def _batch(self, names: tuple[str, ...]) -> tuple[object, object, object, int]:
        b = self._batches.get(names)
        if b is None:
            n = len(names)
            ids = (ctypes.c_int * n)(*[_REG_IDS[x] for x in names])
            vals = (ctypes.c_uint64 * n)()
            base = ctypes.addressof(vals)
            ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
            b = self._batches[names] = (ids, vals, ptrs, n)
        return b

    def reader(self, names: tuple[str, ...]) -> Callable[[], list[int]]:
        """A function reading ``names`` in one C call (for hot paths: arrays bound once)."""
        if self._lib is None:
            return lambda: self.read(names)
        ids, vals, ptrs, n = self._batch(names)
        fn, handle = self._lib.uc_reg_read_batch, self._handle

        def read() -> list[int]:
            fn(handle, ids, ptrs, n)
            return vals[:]  # type: ignore[index]

        return read

    def writer(self, names: tuple[str, ...]) -> Callable[[Sequence[int]], None]:
        """A function writing ``names`` in one C call (values must fit in 64 bits)."""
        if self._lib is None:
            return lambda values: self.write(names, values)
        ids, vals, ptrs, n = self._batch(names)
        fn, handle = self._lib.uc_reg_write_batch, self._handle

        def write(values: Sequence[int]) -> None:
            vals[:] = values  # type: ignore[index]
            fn(handle, ids, ptrs, n)

        return write

    def read(self, names: tuple[str, ...]) -> list[int]:
        if self._lib is None:
            return [self._uc.reg_read(_REG_IDS[n]) for n in names]
        ids, vals, ptrs, n = self._batch(names)
        if self._lib.uc_reg_read_batch(self._handle, ids, ptrs, n) != UC_ERR_OK:
            raise UcError(1)
        return vals[:]  # type: ignore[index]

    def write(self, names: tuple[str, ...], values: Sequence[int]) -> None:
        if self._lib is None:
            for name, v in zip(names, values):
                self._uc.reg_write(_REG_IDS[name], v)
            return
        ids, vals, ptrs, n = self._batch(names)
        for i, v in enumerate(values):
            vals[i] = v & 0xFFFF_FFFF_FFFF_FFFF  # type: ignore[index]
        if self._lib.uc_reg_write_batch(self._handle, ids, ptrs, n) != UC_ERR_OK:
            raise UcError(1)

    def context(self) -> UserContext:
        return UserContext._make(self.read(self._all))

    def set_context(self, ctx: UserContext) -> None:
        self.write(self._all, ctx)


@dataclass(frozen=True)
class Region:
    start: int
    size: int
    perms: str
    label: str

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class StopInfo:
    """Why ``Machine.run`` returned: ``requested`` by a handler, ``instructions`` or ``timeout``."""

    reason: str
    elapsed: float


SyscallHandler = Callable[[Uc, object], None]
InterruptHandler = Callable[[Uc, int, object], None]


class Machine:
    """A Unicorn x86-64 CPU and the regions mapped into it."""

    ALLOC_BASE = 0x0000_0001_0000_0000

    def __init__(self) -> None:
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.regs = RegisterFile(self.uc)
        self.regions: list[Region] = []
        self._next_alloc = self.ALLOC_BASE
        self.symbolize: Callable[[int], str] = lambda a: f"{a:#x}"
        # Direct uc_mem_read into one reusable buffer: the binding allocates a buffer per call.
        self._mem_buf = ctypes.create_string_buffer(0x10000)
        lib = self.regs._lib
        self._mem_read = lib.uc_mem_read if lib is not None else None
        self._handle = getattr(self.regs, "_handle", None)
        self._stop_requested = False
        self._fault: MachineFault | None = None
        self._cow_retry = False
        self.cow: CowMemory | None = None
        self.watchdog_fired = False
        self.uc.hook_add(
            UC_HOOK_MEM_READ_UNMAPPED
            | UC_HOOK_MEM_WRITE_UNMAPPED
            | UC_HOOK_MEM_FETCH_UNMAPPED
            | UC_HOOK_MEM_READ_PROT
            | UC_HOOK_MEM_WRITE_PROT
            | UC_HOOK_MEM_FETCH_PROT,
            self._fault_hook,
        )

    # --- memory ---------------------------------------------------------------------
    def map(self, start: int, size: int, perms: str, label: str, data: bytes = b"") -> Region:
        size = page_align(max(size, len(data), 1))
        if start % PAGE:
            raise ImageError(f"{label}: start {start:#x} is not page-aligned")
        for r in self.regions:
            if start < r.end and r.start < start + size:
                raise ImageError(
                    f"{label} at {start:#x}..{start + size:#x} overlaps {r.label} at {r.start:#x}..{r.end:#x}"
                )
        self.uc.mem_map(start, size, _prot(perms))
        if data:
            self.uc.mem_write(start, bytes(data))
        region = Region(start, size, perms, label)
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.start)
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

    def allocate_stack(self, size: int, label: str) -> tuple[int, int]:
        """A stack with a no-access guard page below it; returns (limit, base)."""
        start = self._next_alloc
        self.map(start, PAGE, "", f"{label} guard")
        region = self.map(start + PAGE, size, "rw", label)
        self._next_alloc = region.end + PAGE
        return region.start, region.end

    def region_at(self, address: int) -> Region | None:
        for r in self.regions:
            if r.start <= address < r.end:
                return r
        return None

    def read(self, address: int, size: int) -> bytes:
        """Bytes of user memory; raises UcError if any of it is unmapped."""
        if self._mem_read is None or size > len(self._mem_buf):
            return bytes(self.uc.mem_read(address, size))
        if self._mem_read(self._handle, address, self._mem_buf, size) != UC_ERR_OK:
            raise UcError(UC_ERR_READ_UNMAPPED)
        return ctypes.string_at(self._mem_buf, size)

    def write(self, address: int, data: bytes) -> None:
        if self.cow is not None:
            self.cow.on_host_write(address, len(data))
        self.uc.mem_write(address, bytes(data))

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.uc.mem_read(address, 8), "little")

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))

    def readable(self, address: int, size: int) -> bool:
        end = address + size
        while address < end:
            r = self.region_at(address)
            if r is None or "r" not in r.perms:
                return False
            address = r.end
        return True

    # --- execution ------------------------------------------------------------------
    def add_code_hook(self, begin: int, end: int, callback: Callable[[Uc, int, int, object], None]) -> None:
        """A hook on instructions in [begin, end) only: free everywhere else."""
        self.uc.hook_add(UC_HOOK_CODE, callback, None, begin, end - 1)

    def zero_xmm(self, numbers: Sequence[int]) -> None:
        """Zero XMM registers by number (the kernel scrubbing them on its way to user mode)."""
        for n in numbers:
            self.uc.reg_write(_XMM[n], 0)

    def set_gs_base(self, value: int) -> None:
        self.uc.reg_write(_REG_IDS["gs_base"], value)

    def request_stop(self) -> None:
        """Called by a handler: stop after the current instruction."""
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
            self._fault = None
            self._cow_retry = False
            us = 0 if timeout is None else max(1, int((timeout - (time.perf_counter() - start)) * 1_000_000))
            try:
                self.uc.emu_start(begin, NEVER, timeout=us, count=instructions)
                break
            except UcError as e:
                if self._cow_retry:
                    begin = self.regs.read(("rip",))[0]
                    continue
                # A fault hook returned False, so Unicorn reports the access as an error; the
                # hook has kept the explanation.
                if self._fault is not None:
                    raise self._fault from None
                rip = self.regs.read(("rip",))[0]
                where = self.symbolize(rip)
                raise MachineFault(f"CPU error: {e} at {where}", rip, where) from None
        elapsed = time.perf_counter() - start
        if not self._stop_requested and not self.watchdog_fired:
            rip = self.regs.read(("rip",))[0]
            if self.readable(rip - 1, 1) and self.read(rip - 1, 1) == b"\xf4":
                # HLT is privileged (Intel SDM): user mode gets #GP, Windows
                # STATUS_PRIVILEGED_INSTRUCTION; Unicorn just stops.
                where = self.symbolize(rip - 1)
                raise MachineFault(f"privileged instruction hlt at {where}", rip - 1, where)
        if self._stop_requested:
            return StopInfo("requested", elapsed)
        if timeout is not None and self.uc.query(UC_QUERY_TIMEOUT):
            return StopInfo("timeout", elapsed)
        if self.watchdog_fired:
            return StopInfo("timeout", elapsed)
        return StopInfo("instructions", elapsed)

    # --- hooks ----------------------------------------------------------------------
    def install(self, on_syscall: SyscallHandler, on_interrupt: InterruptHandler) -> None:
        """Hand `syscall` and interrupts to the kernel, registered directly (no extra Python layer).

        Unicorn calls ``on_syscall(uc, user_data)`` with RIP at the `syscall` itself and
        ``on_interrupt(uc, intno, user_data)`` with RIP past the `int`. Without a handler a
        `syscall` does nothing and an interrupt stops the CPU with an error.
        """
        self.uc.hook_add(UC_HOOK_INSN, on_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        self.uc.hook_add(UC_HOOK_INTR, on_interrupt)

    def _fault_hook(self, uc: Uc, access: int, address: int, size: int, value: int, user_data: object) -> bool:
        if access == UC_MEM_WRITE_PROT and self.cow is not None and self.cow.on_write_fault(address, size):
            self._cow_retry = True
            return False  # stop before the write; run() resumes at the same instruction
        rip = self.regs.read(("rip",))[0]
        what, why = _ACCESS.get(access, ("access", "invalid"))
        region = self.region_at(address)
        if region is not None and "guard" in region.label:
            why = f"guard page of {region.label.replace(' guard', '')} (stack overflow)"
        elif region is not None:
            why = f"{why}: {region.label} is '{region.perms or '-'}'"
        where = self.symbolize(rip)
        self._fault = MachineFault(
            f"memory fault: {what} of {size} byte(s) at {address:#x} ({why}) at {where}", rip, where
        )
        return False


NEVER = 0xFFFF_FFFF_FFFF_F000  # an `until` no user code reaches (kernel space): 0 would stop a NULL call quietly


class Watchdog:
    """Stops a machine once a deadline passes, across many short runs (one thread, not one per run)."""

    def __init__(self, machine: Machine, seconds: float) -> None:
        self.machine = machine
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(seconds,), daemon=True)

    def _watch(self, seconds: float) -> None:
        if not self._done.wait(seconds):
            self.machine.watchdog_fired = True
            self.machine.uc.emu_stop()

    def __enter__(self) -> Watchdog:
        self.machine.watchdog_fired = False
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
