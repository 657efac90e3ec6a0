"""Build a process from a scenario and run its thread: images, TEB/PEB, kernel, trace.

``run(scenario)`` is the one entry point; it returns a :class:`Run` holding the trace,
the images, the thread's outcome and any error that stopped it. Errors that stop
a run (a fault, a budget) are kept on the Run with everything recorded so far;
errors in the input (a bad scenario, assembly that does not assemble) are raised.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from emu.binding import ImportTraps, bind_imports
from emu.context import UserContext
from emu.errors import (
    BudgetExceeded,
    EmuError,
    ImageError,
    KernelError,
    MachineFault,
    ScenarioError,
    UnimplementedImport,
)
from emu.image import PAGE, AssemblyError, Image, Symbolizer, image_from_assembly
from emu.kernel import Kernel, KThread, ServiceRegistry, UserCallback, builtin_services
from emu.kernel.objects import Event, Mutant, ReleaseMutant, SendMessage, SetEvent, Wait
from emu.kernel.services import ChoiceStep as KChoiceStep
from emu.kernel.services import ScriptStep, get_message_service
from emu.machine import Machine
from emu.pe import load_pe
from emu.runtime import NTDLL_BASE, build_ntdll, build_win32u
from emu.scenario import CallbackStep, ChoiceStep, ObjectStep, PeSpec, Scenario, Step, ThreadSpec, load_scenario
from emu.stubs import compare_with_profile, guess_dispatcher_convention, service_table
from emu.trace import Trace
from emu.winnt import (
    KUSER_NT_BUILD_NUMBER,
    KUSER_NT_MAJOR_VERSION,
    KUSER_NT_MINOR_VERSION,
    KUSER_SHARED_DATA,
    KUSER_SYSTEM_CALL,
    PEB_IMAGE_BASE,
    PEB_KERNEL_CALLBACK_TABLE,
    PEB_SIZE,
    RFLAGS_IF,
    RFLAGS_RESERVED,
    TEB_CLIENT_ID,
    TEB_PEB,
    TEB_SELF,
    TEB_SIZE,
    TEB_STACK_BASE,
    TEB_STACK_LIMIT,
)

if TYPE_CHECKING:
    from emu.detect import Detection
    from emu.expect import Outcome
    from emu.graph import StateGraph

# Address-space layout. Classic x64 user layout (Windows 7): PEB just below
# KUSER_SHARED_DATA's neighbourhood at the top of the 8 TB user range, TEBs below it.
PEB_ADDRESS = 0x7FF_FFFD_F000
TEB_ADDRESS = 0x7FF_FFFD_D000  # thread i at TEB_ADDRESS - i * TEB_SIZE
WIN32U_BASE = NTDLL_BASE + 0x0100_0000
MODULE_BASE = 0x7FFA_C000_0000  # scenario modules, 16 MiB apart (within rel32 reach of ntdll)
MODULE_STRIDE = 0x0100_0000
STACK_SIZE = 0x40000
PROCESS_ID = 0x1000
THREAD_ID_BASE = 0x1004


def _script_steps(steps: tuple[Step, ...], threads: dict[str, int], handles: dict[str, int]) -> list[ScriptStep]:
    """A scenario's service steps as the kernel's script: callbacks, choices, object requests, a status."""
    out: list[ScriptStep] = []
    for st in steps:
        if isinstance(st, CallbackStep):
            out.append(UserCallback(st.api, st.data, st.by_depth))
        elif isinstance(st, ChoiceStep):
            options = tuple((n, tuple(_script_steps(o, threads, handles))) for n, o in st.options)
            out.append(KChoiceStep(st.name, st.default, options))
        elif isinstance(st, ObjectStep):
            if st.kind == "send":
                out.append(SendMessage(threads[st.target], st.api, st.data))
            elif st.kind == "wait":
                out.append(Wait(handles[st.target], st.timeout))
            elif st.kind == "set":
                out.append(SetEvent(handles[st.target]))
            else:
                out.append(ReleaseMutant(handles[st.target]))
        else:
            out.append(st.status)
    return out


# Services that touch what several threads share: where an explorer interleaves threads.
SHARED_SERVICES = frozenset(
    {
        "NtWaitForSingleObject",
        "NtSetEvent",
        "NtReleaseMutant",
        "NtUserGetMessage",
        "NtCallbackReturn",
        "NtTerminateThread",
    }
)


@dataclass
class Run:
    """The outcome of running one scenario."""

    scenario: Scenario
    trace: Trace
    images: list[Image]
    threads: dict[int, KThread]
    error: EmuError | None = None
    max_depth: int = 0
    stop: str = "exit"  # "exit", "fault", "budget", "deadlock"
    deadlock: list[str] = field(default_factory=list)  # wait chains when the threads ended waiting on each other
    notes: list[str] = field(default_factory=list)  # e.g. SSNs where the loaded ntdll and the profile disagree
    _views: dict[int, object] = field(default_factory=dict, repr=False)

    @property
    def symbolize(self) -> Symbolizer:
        return self.trace.symbolize  # type: ignore[return-value]

    def thread(self, name: str) -> KThread:
        """A thread of the run by name."""
        for t in self.threads.values():
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def exit_status(self) -> int | None:
        t = self.threads.get(0)
        return t.exit_status if t else None

    @cached_property
    def graph(self) -> StateGraph:
        from emu.graph import StateGraph

        return StateGraph.from_trace(self.trace)

    @cached_property
    def detections(self) -> list[Detection]:
        from emu.detect import detect_run

        return detect_run(self)

    @cached_property
    def outcomes(self) -> list[Outcome]:
        from emu.expect import check

        return check(self)

    @property
    def ok(self) -> bool:
        return all(o.passed for o in self.outcomes)


class Process:
    """A scenario built into a machine, a kernel and threads, ready to run."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        profile = scenario.profile
        self.machine = Machine()
        self.images: list[Image] = []
        self.notes: list[str] = []  # what a reader should know: SSN disagreements, convention guesses
        self.traps = ImportTraps()
        # Services a scenario numbers itself ("ssn = 0x...") get stubs in the built-in runtime.
        explicit = {n: s.ssn for n, s in scenario.services.items() if s.ssn is not None}
        if scenario.ntdll is not None:
            self.ntdll = self._load_pe(scenario.ntdll, ("ntdll", "path"))
            self.images.append(self.ntdll)
        else:
            runtime = profile.with_overrides(ssn=explicit)
            self.ntdll = build_ntdll(runtime, NTDLL_BASE)
            self.images.append(self.ntdll)
            if any(n.startswith(("NtUser", "NtGdi")) for n in runtime.ssn):
                self.images.append(build_win32u(runtime, WIN32U_BASE))
        for i, pe in enumerate(scenario.pe):
            self.images.append(self._load_pe(pe, ("pe", str(i), "path")))
        self._bind_imports()
        for i, spec in enumerate(scenario.modules):
            self.images.append(self._assemble(i, spec.name, spec.code, spec.data))
        self.ssn_table = self._service_table(explicit)
        self.stack_regions: list[tuple[int, int, str]] = []
        self.trace = Trace(symbolize=Symbolizer([]))
        for img in self.images:
            self.machine.map_image(img)
        if self.traps.traps:
            trap_image = self.traps.image()
            self.images.append(trap_image)
            self.machine.map_image(trap_image)
            self.machine.add_code_hook(trap_image.base, trap_image.end, self._trap_hit)
        for i, mem in enumerate(scenario.memory):
            if mem.start < KUSER_SHARED_DATA + PAGE and mem.start + mem.size > KUSER_SHARED_DATA:
                at = f"{KUSER_SHARED_DATA:#x}..{KUSER_SHARED_DATA + PAGE:#x}"
                key, line = f"memory[{i}]", scenario.line_of("memory", i)
                raise ScenarioError(scenario.path, key, f"{mem.name} overlaps KUSER_SHARED_DATA at {at}", line)
            self.machine.map(mem.start, mem.size, mem.perms, f"memory {mem.name}")
        self._map_kuser()
        self.callback_table = self._map_peb()
        registry = builtin_services(ServiceRegistry())
        if "NtUserGetMessage" not in scenario.services:
            get_message_service(registry)
        specs = scenario.threads or (ThreadSpec("thread0", scenario.entry, scenario.argument),)
        tids = {t.name: i for i, t in enumerate(specs)}
        handles = {o.name: o.handle for o in scenario.objects}
        shared = set(SHARED_SERVICES)
        for name, script in scenario.services.items():
            steps = _script_steps(script.steps, tids, handles)
            registry.add_script(name, steps)
            if _touches_shared(steps):
                shared.add(name)
        dispatcher = self.ntdll.export("KiUserCallbackDispatcher")
        if dispatcher is None:
            raise ImageError("ntdll exports no KiUserCallbackDispatcher")
        b = scenario.budgets
        self.kernel = Kernel(
            self.machine, profile, registry, self.trace, dispatcher, b.callback_depth, self.ssn_table,
            state_budget=b.states, output_budget=b.output_bytes,
        )  # fmt: skip
        self.kernel.visible = lambda name: name in shared
        many = len(specs) > 1
        for i, th in enumerate(specs):
            where = ("thread", str(i), "entry") if many else ("thread", "entry")
            t = self.create_thread(i, self.resolve(th.entry, where), th.argument)
            t.name = th.name
            self.kernel.add_thread(t)
        self.thread = self.kernel.threads[0]
        for o in scenario.objects:
            owner = tids[o.owner] if o.owner else None
            obj: Event | Mutant = (
                Event(o.name, o.manual_reset, o.signaled)
                if o.kind == "event"
                else Mutant(o.name, owner, 1 if owner is not None else 0)
            )
            self.kernel.objects.objects[o.handle] = obj
        mapped = sum(r.size for r in self.machine.regions)
        if mapped > b.memory:
            raise BudgetExceeded("memory", b.memory, f"{scenario.path}: {mapped} bytes mapped", "bytes")
        sym = Symbolizer(self.images, self.stack_regions)
        self.trace.symbolize = sym
        self.machine.symbolize = sym

    # --- building -------------------------------------------------------------------
    def _load_pe(self, spec: PeSpec, where: tuple[str, ...]) -> Image:
        """Load a PE file at its base (or its preferred one; relocated if that is taken)."""
        try:
            image = load_pe(spec.path, spec.base, spec.name)
            if spec.base is None and any(_overlaps(image, other) for other in self.images):
                slot = MODULE_BASE + (len(self.scenario.modules) + len(self.images)) * MODULE_STRIDE
                image = load_pe(spec.path, slot, spec.name)
        except ImageError as e:
            raise ScenarioError(self.scenario.path, ".".join(where), str(e), self.scenario.line_of(*where)) from None
        clash = next((o for o in self.images if _overlaps(image, o)), None)
        if clash is not None:
            raise ScenarioError(
                self.scenario.path, ".".join(where),
                f"{image.name} at {image.base:#x}..{image.end:#x} overlaps {clash.name} at {clash.base:#x}..{clash.end:#x}",
                self.scenario.line_of(*where),
            )  # fmt: skip
        return image

    def _bind_imports(self) -> None:
        mode = self.scenario.unbound_imports
        for i, image in enumerate(self.images):
            if image.imports:
                try:
                    self.images[i], _ = bind_imports(image, self.images, mode, self.traps)
                except ImageError as e:
                    raise ScenarioError(self.scenario.path, "", str(e)) from None

    def _service_table(self, explicit: dict[str, int]) -> dict[str, int]:
        """Service numbers from the stubs in the loaded code; disagreements with the profile become notes."""
        profile = self.scenario.profile
        if self.scenario.ntdll is None:
            return {**profile.ssn, **explicit}
        table = service_table(self.ntdll)
        for d in compare_with_profile(table, profile):
            self.notes.append(
                f"ntdll's code gives {d.service} SSN {d.in_code:#x}; profile {profile.name} says {d.in_profile:#x} (the code is used)"
            )
        guess = guess_dispatcher_convention(self.ntdll)
        if guess.convention != "unknown" and guess.convention != profile.dispatcher:
            self.notes.append(
                f"ntdll's KiUserCallbackDispatcher looks like the '{guess.convention}' convention ({guess.evidence}); "
                f"the profile says '{profile.dispatcher}': set [profile] dispatcher if the run misbehaves"
            )
        for name in self.scenario.services:
            if name not in table and name not in explicit:
                raise ScenarioError(
                    self.scenario.path, f"services.{name}",
                    f"{name} has no stub in {self.ntdll.path or 'ntdll'} and no 'ssn = 0x...'",
                    self.scenario.line_of("services", name),
                )  # fmt: skip
        return {**table, **explicit}

    def _trap_hit(self, uc: object, address: int, size: int, user_data: object) -> None:
        trap = self.traps.trap_at(address)
        if trap is None:
            raise UnimplementedImport(f"{address:#x}", "", "an address on the trap page that no import uses")
        raise UnimplementedImport(trap.label, trap.importer, trap.reason)

    def _assemble(self, i: int, name: str, code: str, data: str) -> Image:
        def resolve(sym: str) -> int | None:
            for img in self.images:
                if sym in img.exports:
                    return img.exports[sym]
            return None

        try:
            return image_from_assembly(name, MODULE_BASE + i * MODULE_STRIDE, code, data, resolve)
        except AssemblyError as e:
            key = e.section
            where = self.scenario.line_of("module", i, key)
            line = where
            if where is not None and e.line is not None:
                # TOML drops the newline right after an opening triple quote, so the text
                # starts on the key's own line only when something follows the quotes there.
                opener = self.scenario.source.splitlines()[where - 1].split("=", 1)[-1].strip()
                same_line = opener not in ('"""', "'''")
                line = where + e.line - (1 if same_line else 0)
            shown = f" in {e.text!r}" if e.text else ""
            raise ScenarioError(
                self.scenario.path, f"module[{i}].{key}",
                f"assembly does not assemble: {f'line {e.line} of the {key}: ' if e.line else ''}{e.detail}{shown}", line,
            ) from None  # fmt: skip

    def resolve(self, ref: str, where: tuple[str, ...]) -> int:
        mod, bang, label = ref.partition("!")
        for img in self.images:
            if bang and img.name.lower() != mod.lower():
                continue
            addr = img.symbols.get(label if bang else ref)
            if addr is not None:
                return addr
        raise ScenarioError(
            self.scenario.path,
            ".".join(where),
            f"{ref!r} names no symbol in the loaded images",
            self.scenario.line_of(*where),
        )

    def _map_kuser(self) -> None:
        p = self.scenario.profile
        page = bytearray(PAGE)
        page[KUSER_NT_BUILD_NUMBER : KUSER_NT_BUILD_NUMBER + 4] = p.build.to_bytes(4, "little")
        page[KUSER_NT_MAJOR_VERSION : KUSER_NT_MAJOR_VERSION + 4] = p.major.to_bytes(4, "little")
        page[KUSER_NT_MINOR_VERSION : KUSER_NT_MINOR_VERSION + 4] = p.minor.to_bytes(4, "little")
        page[KUSER_SYSTEM_CALL] = self.scenario.system_call
        # KUSER_SHARED_DATA is read-only to user mode (MS docs, KUSER_SHARED_DATA).
        self.machine.map(KUSER_SHARED_DATA, PAGE, "r", "KUSER_SHARED_DATA", bytes(page))

    def _map_peb(self) -> int:
        s = self.scenario
        table = bytearray(8 * s.callback_table_size)
        for idx, ref in s.callback_table.items():
            table[8 * idx : 8 * idx + 8] = self.resolve(ref, ("kernel_callback_table", str(idx))).to_bytes(8, "little")
        table_addr = self.machine.allocate(len(table), "r", "KernelCallbackTable", bytes(table))
        peb = bytearray(PEB_SIZE)
        first = self.images[-1].base if s.modules else 0
        peb[PEB_IMAGE_BASE : PEB_IMAGE_BASE + 8] = first.to_bytes(8, "little")
        peb[PEB_KERNEL_CALLBACK_TABLE : PEB_KERNEL_CALLBACK_TABLE + 8] = table_addr.to_bytes(8, "little")
        self.machine.map(PEB_ADDRESS, PEB_SIZE, "rw", "PEB", bytes(peb))
        return table_addr

    def create_thread(self, index: int, entry: int, argument: int) -> KThread:
        """TEB, stack with a guard page, and a context at RtlUserThreadStart(entry, argument)."""
        m = self.machine
        limit, base = m.allocate_stack(STACK_SIZE, f"thread {index} stack")
        self.stack_regions.append((limit, base, f"stack{index}"))
        teb = TEB_ADDRESS - index * TEB_SIZE
        t = bytearray(TEB_SIZE)
        tid = THREAD_ID_BASE + 4 * index
        for off, val in (
            (TEB_STACK_BASE, base), (TEB_STACK_LIMIT, limit), (TEB_SELF, teb),
            (TEB_CLIENT_ID, PROCESS_ID), (TEB_CLIENT_ID + 8, tid), (TEB_PEB, PEB_ADDRESS),
        ):  # fmt: skip
            t[off : off + 8] = val.to_bytes(8, "little")
        m.map(teb, TEB_SIZE, "rw", f"thread {index} TEB", bytes(t))
        start = self.ntdll.export("RtlUserThreadStart")
        if start is None:
            raise ImageError("ntdll exports no RtlUserThreadStart")
        # Threads begin at RtlUserThreadStart as if called: RSP = 8 mod 16, a zero return address.
        rsp = base - 0x30 - 8
        ctx = UserContext(
            rax=0, rcx=entry, rdx=argument, rbx=0, rsp=rsp, rbp=0, rsi=0, rdi=0, r8=0, r9=0, r10=0,
            r11=0, r12=0, r13=0, r14=0, r15=0, rip=start, rflags=RFLAGS_IF | RFLAGS_RESERVED,
        )  # fmt: skip
        return KThread(tid=index, teb=teb, stack_base=base, stack_limit=limit, entry_context=ctx)

    # --- running --------------------------------------------------------------------
    def run(self) -> Run:
        kernel = self.kernel
        error: EmuError | None = None
        stop = "exit"
        # The hot path allocates many small records and no cycles; the cyclic collector
        # rescanning the growing trace would cost more than the run itself.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            kernel.continue_thread(self.thread)
            stop = self.drive(self.scenario.budgets.wall_time)
        except MachineFault as e:
            kernel.record_fault(kernel.current or self.thread, e)
            error, stop = e, "fault"
        except BudgetExceeded as e:
            error, stop = e, "budget"
        except UnimplementedImport as e:
            kernel.record_fault(kernel.current or self.thread, e)
            error, stop = e, "fault"
        except KernelError as e:
            error, stop = e, "fault"
        finally:
            if gc_was_enabled:
                gc.enable()
        return Run(
            scenario=self.scenario, trace=self.trace, images=self.images, threads=dict(kernel.threads),
            error=error, max_depth=kernel.max_depth, stop=stop, notes=list(self.notes),
            deadlock=list(kernel.deadlock),
        )  # fmt: skip

    def drive(self, wall_time: float | None) -> str:
        """Run threads until none can: "exit", "deadlock", or "choice" (an explorer decides next).

        ``wall_time=None`` leaves the clock to a Watchdog. Raises BudgetExceeded when a
        thread runs out of instructions or time, MachineFault when it faults.
        """
        kernel, machine, b = self.kernel, self.machine, self.scenario.budgets
        deadline = None if wall_time is None else time.perf_counter() + wall_time
        while True:
            if kernel.pending_choice is not None:
                return "choice"
            t = kernel.current
            if t is not None and t.running:
                rip = machine.regs.read(("rip",))[0]
                left = None if deadline is None else max(0.001, deadline - time.perf_counter())
                info = machine.run(rip, b.instructions or 0, left)
                if info.reason != "requested" and t.running and kernel.pending_choice is None:
                    where = self.trace.symbolize(machine.regs.read(("rip",))[0])
                    if info.reason == "timeout":
                        raise BudgetExceeded("wall_time", f"{b.wall_time:g} s", where)
                    raise BudgetExceeded("instructions", b.instructions or 0, where)
                if self.stop_requested():
                    return "stopped"
                continue
            if kernel.deadlock:
                return "deadlock"
            nxt = kernel.next_thread
            if nxt is None:
                return "exit"
            kernel.continue_thread(nxt)

    def stop_requested(self) -> bool:
        """Whether an observer (an explorer) asked the run to stop where it is."""
        return False


def _touches_shared(steps: list[ScriptStep]) -> bool:
    for st in steps:
        if isinstance(st, (Wait, SetEvent, ReleaseMutant, SendMessage)):
            return True
        if isinstance(st, KChoiceStep) and any(_touches_shared(list(o)) for _, o in st.options):
            return True
    return False


def _overlaps(a: Image, b: Image) -> bool:
    return a.base < b.end and b.base < a.end


def build(scenario: Scenario | str | Path) -> Process:
    """Build the process for a scenario (a Scenario or a path) without running it."""
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    return Process(scenario)


def run(scenario: Scenario | str | Path) -> Run:
    """Load (if given a path), build and run a scenario.

    Example (from the repository root)::

        r = run("scenarios/callback_roundtrip.toml")
        [d.rip for d in r.detections]   # ['ntdll!ZwCallbackReturn+0x14']
    """
    return build(scenario).run()
