"""How the threads of a built process start: RtlUserThreadStart, or the entry itself.

Every Windows user thread begins at ``ntdll!RtlUserThreadStart(StartAddress, Parameter)``,
which calls ``kernel32!BaseThreadInitThunk`` through a pointer the process loader fills
(:mod:`emu.loader.startup` finds it in a foreign ntdll's code). With a foreign ntdll and no
kernel32 of the scenario's own, emu loads its built-in kernel32 and fills that pointer, as
the loader would. A thread's start mode is ``"rtl"`` (through RtlUserThreadStart) or
``"entry"`` (at the entry, as if BaseThreadInitThunk had called it); ``"auto"`` is
``"rtl"`` unless a probe run shows that a foreign RtlUserThreadStart does not reach the
entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from emu.address_space import KERNEL32_BASE, MODULE_STRIDE, PEB_ADDRESS, PROCESS_ID, STACK_SIZE, TEB_ADDRESS, thread_id
from emu.context import UserContext
from emu.errors import ScenarioError
from emu.kernel import KThread
from emu.loader.image import PAGE, Image, Symbolizer
from emu.machine import Machine
from emu.runtime import build_kernel32
from emu.scenario import Scenario, ThreadSpec
from emu.winnt import (
    RFLAGS_IF,
    RFLAGS_RESERVED,
    TEB_CLIENT_ID,
    TEB_DEALLOCATION_STACK,
    TEB_EXCEPTION_LIST,
    TEB_PEB,
    TEB_SELF,
    TEB_SIZE,
    TEB_STACK_BASE,
    TEB_STACK_LIMIT,
)

if TYPE_CHECKING:
    from emu.loader.startup import InitThunk

__all__ = ["ThreadStart", "file_name", "missing_export", "probe_start"]

# Why RtlUserThreadStart does not reach the entry, per scenario (path, text) and ntdll file.
_PROBES: dict[tuple[str, str, int, int], str | None] = {}


def file_name(image: Image) -> str:
    """The image's file name when it was loaded from one, else its module name."""
    return Path(image.path).name if image.path else image.name


def missing_export(scenario: Scenario, ntdll: Image, export: str, why: str, also: str = "") -> ScenarioError:
    """The one-line error for a (foreign) ntdll without something the run needs."""
    spec = scenario.ntdll
    alt = f" or {also}" if also else ""
    return ScenarioError(
        scenario.path, "ntdll.path" if spec else "ntdll",
        f"{file_name(ntdll)} exports no usable {export}{alt}: {why}",
        scenario.line_of("ntdll", "path") if spec else None,
    )  # fmt: skip


def probe_start(scenario: Scenario, reach: Callable[[Scenario], str | None]) -> str | None:
    """``reach(scenario)`` — build with every thread started through RtlUserThreadStart and run
    thread 0 to its entry: None when it gets there, else why not — once per scenario text and
    ntdll file."""
    spec = scenario.ntdll
    st = Path(spec.path).stat() if spec is not None else None
    key = (scenario.path, scenario.source, st.st_mtime_ns if st else 0, st.st_size if st else 0)
    if key not in _PROBES:
        if len(_PROBES) > 64:
            _PROBES.clear()
        _PROBES[key] = reach(scenario)
    return _PROBES[key]


class ThreadStart:
    """The start of the threads of one process: its kernel32, the init-thunk pointer, each
    thread's TEB, stack and first context.

    ``images`` is the process's image list (shared, it grows while the process is built);
    ``notes`` and ``details`` are the process's, for what a reader should know.
    """

    def __init__(
        self, scenario: Scenario, machine: Machine, images: list[Image], ntdll: Image,
        notes: list[str], details: list[str],
    ) -> None:  # fmt: skip
        self.scenario = scenario
        self.machine = machine
        self.images = images
        self.ntdll = ntdll
        self.foreign = scenario.ntdll is not None
        self.notes = notes
        self.details = details
        self.init_thunk: InitThunk | None = None
        self.stack_regions: list[tuple[int, int, str]] = []

    def missing(self, export: str, why: str, also: str = "") -> ScenarioError:
        """The one-line error for a foreign ntdll without something the run needs."""
        return missing_export(self.scenario, self.ntdll, export, why, also)

    def kernel32(self) -> Image | None:
        """The loaded kernel32: emu's built-in one (no path) or the scenario's own."""
        return next((img for img in self.images if img.name.lower() == "kernel32"), None)

    def builtin_kernel32(self) -> Image:
        """emu's kernel32 (BaseThreadInitThunk only), in the first free 16 MiB slot from KERNEL32_BASE."""
        terminate = self.ntdll.export("NtTerminateThread", "ZwTerminateThread")
        if terminate is None:
            raise self.missing("NtTerminateThread", "emu's built-in kernel32 ends threads through it")
        base = KERNEL32_BASE
        while any(img.base < base + MODULE_STRIDE and base < img.end for img in self.images):
            base += MODULE_STRIDE
        return build_kernel32(base, terminate)

    def fill_init_thunk(self) -> InitThunk | None:
        """Store kernel32!BaseThreadInitThunk where a foreign RtlUserThreadStart calls through it,
        as the Windows loader does (see :mod:`emu.loader.startup`); the images must be mapped."""
        if not self.foreign:
            return None
        from emu.loader.startup import find_init_thunk  # here: only a foreign ntdll needs capstone's reading

        found = find_init_thunk(self.ntdll)
        k32 = self.kernel32()
        thunk = k32.export("BaseThreadInitThunk") if k32 is not None else None
        if found is None or thunk is None:
            return None
        self.machine.write_u64(found.slot, thunk)
        self.details.append(
            f"RtlUserThreadStart calls BaseThreadInitThunk through {found.slot:#x} ({found.how}); emu stored "
            f"{k32.name if k32 else 'kernel32'}!BaseThreadInitThunk there"
        )
        self.init_thunk = found
        return found

    def mode(self, spec: ThreadSpec, probe: Callable[[], str | None]) -> str:
        """A thread's start mode: "auto" is "rtl", unless a foreign RtlUserThreadStart cannot
        reach the entry here (``probe`` finds out: None when it does, else why not)."""
        if spec.start != "auto" or not self.foreign:
            return "rtl" if spec.start == "auto" else spec.start
        k32 = self.kernel32()
        if k32 is None or k32.path is not None:
            return "rtl"  # the scenario's own kernel32: its BaseThreadInitThunk, nothing to fall back on
        if self.ntdll.export("RtlUserThreadStart") is None:
            self.notes.append(f"{file_name(self.ntdll)} exports no RtlUserThreadStart; threads start at their entry")
            return "entry"
        why = probe()
        if why is None:
            return "rtl"
        self.notes.append(
            f"{file_name(self.ntdll)}!RtlUserThreadStart did not reach the thread's entry here ({why}); "
            f'threads start at their entry instead (set [thread] start = "rtl" to run it anyway)'
        )
        return "entry"

    def describe(self, mode: str, entry: int, sym: Symbolizer) -> str:
        """How a thread starts, in words (``emu run`` and ``emu explain`` show it)."""
        if mode == "entry":
            return f"at its entry {sym(entry)}, as if called by {sym(self.exit_thunk())}"
        via = " -> kernel32!BaseThreadInitThunk" if self.init_thunk is not None else ""
        return f"ntdll!RtlUserThreadStart{via} -> {sym(entry)}"

    def create_thread(self, index: int, entry: int, argument: int, mode: str = "rtl") -> KThread:
        """TEB, stack with a guard page, and a context at the thread's start.

        ``mode`` "rtl": RtlUserThreadStart(entry, argument), entered as if called (RSP = 8
        mod 16, a zero return address). "entry": the entry itself with RCX = argument, as
        if called by the function that RtlUserThreadStart calls (kernel32!BaseThreadInitThunk
        with a foreign ntdll, the built-in RtlUserThreadStart otherwise): its 0x28-byte frame
        and a return address into it sit on the stack, so returning ends the thread.
        """
        m = self.machine
        reserve = self.scenario.stack_reserve
        limit, base = m.allocate_stack(STACK_SIZE, f"thread {index} stack", reserve)
        self.stack_regions.append((limit, base, f"stack{index}"))
        teb = TEB_ADDRESS - index * TEB_SIZE
        t = bytearray(TEB_SIZE)
        for off, val in (
            (TEB_STACK_BASE, base), (TEB_STACK_LIMIT, limit), (TEB_SELF, teb),
            (TEB_CLIENT_ID, PROCESS_ID), (TEB_CLIENT_ID + 8, thread_id(index)), (TEB_PEB, PEB_ADDRESS),
            (TEB_DEALLOCATION_STACK, limit - PAGE - reserve),
        ):  # fmt: skip
            t[off : off + 8] = val.to_bytes(8, "little")
        if self.foreign:
            # Wine's PE ntdll ends its exception frame walk with the TEB's frame list
            # (__wine_push_frame), which its thread setup starts as ~0, "end of list" (Wine
            # dlls/ntdll/unix/thread.c init_teb); x64 Windows leaves NtTib.ExceptionList unused.
            t[TEB_EXCEPTION_LIST : TEB_EXCEPTION_LIST + 8] = (2**64 - 1).to_bytes(8, "little")
        m.map(teb, TEB_SIZE, "rw", f"thread {index} TEB", bytes(t))
        rsp = base - 0x30 - 8
        regs = {"rcx": entry, "rdx": argument}
        if mode == "entry":
            rip = entry
            rsp -= 0x30  # the caller's `sub rsp, 0x28` and its `call`
            m.write_u64(rsp, self.exit_thunk())
            regs = {"rax": entry, "rcx": argument, "rdx": entry if self.foreign else argument, "r8": argument}
        else:
            start = self.ntdll.export("RtlUserThreadStart")
            if start is None:
                raise self.missing("RtlUserThreadStart", 'threads start there; [thread] start = "entry" skips it')
            rip = start
        ctx = UserContext(
            rax=0, rcx=0, rdx=0, rbx=0, rsp=rsp, rbp=0, rsi=0, rdi=0, r8=0, r9=0, r10=0,
            r11=0, r12=0, r13=0, r14=0, r15=0, rip=rip, rflags=RFLAGS_IF | RFLAGS_RESERVED,
        )._replace(**regs)  # fmt: skip
        return KThread(tid=index, teb=teb, stack_base=base, stack_limit=limit, entry_context=ctx)

    def exit_thunk(self) -> int:
        """Where a thread started at its entry returns to: the point after the call to the
        entry in emu's BaseThreadInitThunk (foreign ntdll) or RtlUserThreadStart (built-in)."""
        img = self.kernel32() if self.foreign else self.ntdll
        addr = None
        if img is not None and img.path is None:
            addr = img.symbols.get("BaseThreadInitThunk__return" if self.foreign else "RtlUserThreadStartReturn")
        if addr is None:
            raise ScenarioError(
                self.scenario.path, "thread.start",
                'start = "entry" needs emu\'s built-in kernel32 to end the thread; this scenario loads its own '
                'kernel32: use start = "rtl"',
                self.scenario.line_of("thread"),
            )  # fmt: skip
        return addr
