"""Build a process from a scenario and run its threads: images, TEB/PEB, kernel, trace.

``build(scenario).run()`` returns a :class:`RunResult`: the trace, the images, the
threads' outcome and any error that stopped the run, as data. Errors that stop a run
(a fault, a budget) are kept on it with everything recorded so far; errors in the input
(a bad scenario, assembly that does not assemble) are raised. :func:`emu.api.run` adds
the state graph, the detections and the scenario's expectations on top.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING

from emu.address_space import MODULE_BASE, MODULE_STRIDE, PEB_ADDRESS, WIN32U_BASE
from emu.collector import collector_paused
from emu.errors import (
    BudgetExceeded,
    EmuError,
    ExtensionError,
    ImageError,
    KernelError,
    MachineFault,
    ScenarioError,
    UnimplementedImport,
)
from emu.hooks import Halt
from emu.kernel import Kernel, KernelHooks, KThread, Recorder
from emu.kernel.objects import Event, Mutant
from emu.kernel.rtl_traps import BUILTIN_TRAPS_END, RtlTraps
from emu.loader.binding import ImportTraps, bind_imports
from emu.loader.callback_table import peb_callback_table
from emu.loader.image import PAGE, AssemblyError, Image, Symbolizer, find_symbol, image_from_assembly
from emu.loader.loader_data import build_loader_data, main_image
from emu.machine import Machine
from emu.process_services import registry_for, service_numbers
from emu.process_start import ThreadStart, file_name, probe_start
from emu.records import record
from emu.runtime import NTDLL_BASE, build_ntdll, build_win32u
from emu.runtime.pe_image import with_pe_headers
from emu.scenario import PeSpec, Scenario, ThreadSpec, load_scenario
from emu.services import Services, bind, services_for
from emu.trace import Trace
from emu.watchdog import Watchdog
from emu.winnt import (
    KUSER_NT_BUILD_NUMBER,
    KUSER_NT_MAJOR_VERSION,
    KUSER_NT_MINOR_VERSION,
    KUSER_SHARED_DATA,
    KUSER_SYSTEM_CALL,
    PEB_IMAGE_BASE,
    PEB_KERNEL_CALLBACK_TABLE,
    PEB_LDR,
    PEB_PROCESS_PARAMETERS,
    PEB_SIZE,
)

if TYPE_CHECKING:
    from emu.kernel.rtl import BuiltinRtl


@record
class RunResult:
    """What running a process produced, as plain data: the trace, the images, the threads'
    final state and why it stopped. Views of it (the state graph, detections, a scenario's
    expectations) are composed one layer up, in :class:`emu.api.Run`."""

    scenario: Scenario
    trace: Trace
    images: list[Image]
    threads: dict[int, KThread]
    error: EmuError | None = None
    max_depth: int = 0
    stop: str = "exit"  # "exit", "fault", "budget", "deadlock"; "hook" or "service" (emu.hooks, emu.services)
    deadlock: list[str] = field(default_factory=list)  # wait chains when the threads ended waiting on each other
    notes: list[str] = field(default_factory=list)  # e.g. SSNs where the loaded ntdll and the profile disagree
    details: list[str] = field(default_factory=list)  # the long form of some notes (``emu run --verbose``)
    system: str = ""  # what the run models: the profile's Windows build, or the foreign ntdll and the profile

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


class Process:
    """A scenario built into a machine, a kernel and threads, ready to run."""

    def __init__(
        self, scenario: Scenario, start: str | None = None, hooks: KernelHooks | None = None,
        services: Services | None = None,
    ) -> None:  # fmt: skip
        """Build the process; ``start`` forces every thread's start mode (the start probe uses it);
        ``hooks`` steer the run (who answers choices, who watches states, when to stop);
        ``services`` are Python services besides the scenario's own (:mod:`emu.services`)."""
        if scenario.start_dump is not None:
            raise ScenarioError(
                scenario.path, "start.dump", "this scenario starts from a dump: `emu run` runs it, `emu explore` cannot",
                scenario.line_of("start", "dump"),
            )  # fmt: skip
        self.scenario = scenario
        self.hooks = hooks or KernelHooks()
        self.profile = scenario.profile  # with what the loaded images decide (dispatcher): service_numbers
        self.machine = Machine()
        self.images: list[Image] = []
        self.notes: list[str] = []  # what a reader should know: SSN disagreements, convention guesses
        self.details: list[str] = []  # the long form of some notes (``emu run --verbose``)
        self.traps = ImportTraps()
        self.foreign = scenario.ntdll is not None
        # Services a scenario numbers itself ("ssn = 0x...") get stubs in the built-in runtime.
        explicit = {n: s.ssn for n, s in scenario.services.items() if s.ssn is not None}
        own_win32u = any(pe.name.lower() == "win32u" for pe in scenario.pe)
        if scenario.ntdll is not None:
            self.ntdll = self._load_pe(scenario.ntdll, ("ntdll", "path"))
            self.images.append(self.ntdll)
        else:
            runtime = self.profile.with_overrides(ssn=explicit)
            self.ntdll = build_ntdll(runtime, NTDLL_BASE)
            self.images.append(self.ntdll)
            if not own_win32u and any(n.startswith(("NtUser", "NtGdi")) for n in runtime.ssn):
                self.images.append(build_win32u(runtime, WIN32U_BASE))
        # Thread starts: kernel32, the init-thunk pointer, TEBs and first contexts (emu.process_start).
        self.thread_start = ThreadStart(scenario, self.machine, self.images, self.ntdll, self.notes, self.details)
        for i, pe in enumerate(scenario.pe):
            self.images.append(self._load_pe(pe, ("pe", str(i), "path")))
        if self.foreign and self.thread_start.kernel32() is None:
            # Right after ntdll, where the Windows loader puts kernel32 in the load order.
            self.images.insert(1, self.thread_start.builtin_kernel32())
        self._bind_imports()
        for i, spec in enumerate(scenario.modules):
            self.images.append(self._assemble(i, spec.name, spec.code, spec.data))
        self.ssn_table, self.profile = service_numbers(
            scenario, self.ntdll, self.images, explicit, self.notes, self.details
        )
        self.trace = Trace(symbolize=Symbolizer([]))
        for img in self.images:
            self.machine.map_image(img)
        self.init_thunk = self.thread_start.fill_init_thunk()
        if self.traps.traps:
            trap_image = with_pe_headers(self.traps.image(), "unbound.dll")
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
        if self.foreign:
            # Wine's PE ntdll reads its debug-channel options from the pages after the PEB
            # (dlls/ntdll/debug.c init_options: PEB + 2 pages on 64-bit, an array of
            # {flags, name[15]} ending at an empty name, written by its Unix side). Zeroed
            # pages there mean "no channel enabled"; on Windows the pages are simply free.
            self.machine.map(PEB_ADDRESS + PAGE, 2 * PAGE, "rw", "PEB neighbourhood")
        specs = scenario.threads or (ThreadSpec("thread0", scenario.entry, scenario.argument),)
        tids = {t.name: i for i, t in enumerate(specs)}
        registry, shared = registry_for(scenario, tids)
        table = file_name(self.ntdll) if self.foreign else f"profile {self.profile.name}"
        shared = bind(registry, shared, services_for(scenario, services), scenario, self.ssn_table, table, self.notes)
        self.halt = Halt()  # a hook's request to stop, or its failure (emu.hooks)
        dispatcher = self.ntdll.export("KiUserCallbackDispatcher")
        if dispatcher is None:
            raise self.thread_start.missing("KiUserCallbackDispatcher", "every kernel-to-user callback enters it")
        b = scenario.budgets
        hooks = self.hooks
        recorder = Recorder(self.trace, self.machine, b.states if hooks.budget_states else None, b.output_bytes,
                            hooks.observe)  # fmt: skip
        self.kernel = Kernel(
            self.machine, self.profile, registry, recorder, dispatcher, b.callback_depth, self.ssn_table, hooks
        )
        self.kernel.visible = lambda name: name in shared
        self._deliver_exceptions()
        many = len(specs) > 1
        self.entries: list[int] = []
        modes: list[str] = []
        for i, th in enumerate(specs):
            where = ("thread", str(i), "entry") if many else ("thread", "entry")
            entry = self.resolve(th.entry, where)
            mode = start or self.thread_start.mode(th, lambda: probe_start(scenario, _reaches_entry))
            t = self.thread_start.create_thread(i, entry, th.argument, mode)
            t.name = th.name
            self.kernel.add_thread(t)
            self.entries.append(entry)
            modes.append(mode)
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
        sym = Symbolizer(self.images, self.thread_start.stack_regions)
        self.trace.symbolize = sym
        self.machine.symbolize = sym
        # How each thread starts, in words: `emu run` and `emu explain` show it.
        self.trace.thread_starts = [
            f"{th.name}: {self.thread_start.describe(mode, entry, sym)}"
            for th, mode, entry in zip(specs, modes, self.entries)
        ]

    # --- building -------------------------------------------------------------------
    def _load_pe(self, spec: PeSpec, where: tuple[str, ...]) -> Image:
        """Load a PE file at its base (or its preferred one; relocated if that is taken)."""
        from emu.loader.pe import load_pe  # here: a run of assembled modules only never loads the PE reader

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

    def _deliver_exceptions(self) -> None:
        """Faults go to the loaded ntdll's KiUserExceptionDispatcher (or stop the run, per
        ``[machine] exceptions``). emu's built-in ntdll does part of its exception work in
        Python behind traps (:mod:`emu.kernel.rtl`); a foreign ntdll runs all of its own."""
        self.kernel.exceptions = self.scenario.exceptions
        self.kernel.exception_dispatcher = self.ntdll.export("KiUserExceptionDispatcher")
        builtin = BUILTIN_TRAPS_END in self.ntdll.symbols
        self.rtl_traps = RtlTraps(self.kernel, self.ntdll, self.images) if builtin else None

    @property
    def rtl(self) -> BuiltinRtl | None:
        """The built-in ntdll's Python routines (None with a foreign ntdll), loaded on first use."""
        return None if self.rtl_traps is None else self.rtl_traps.routines

    def describe(self) -> str:
        """What the run models, for report headers: the profile, or the foreign images and the profile."""
        if not self.foreign:
            return self.scenario.profile.title
        return (
            f"{file_name(self.ntdll)}: its own stubs, SSNs and '{self.profile.dispatcher}' dispatcher; "
            f"defaults from {self.scenario.profile.title}"
        )

    def _trap_hit(self, uc: object, address: int, size: int, user_data: object) -> None:
        trap = self.traps.trap_at(address)
        if trap is None:
            raise UnimplementedImport(f"{address:#x}", "", "an address on the trap page that no import uses")
        raise UnimplementedImport(trap.label, trap.importer, trap.reason)

    def _assemble(self, i: int, name: str, code: str, data: str) -> Image:
        def exporter(sym: str) -> tuple[str, int] | None:
            for img in self.images:
                if sym in img.exports:
                    return img.name, img.exports[sym]
            return None

        try:
            # Names other modules export are linked through import slots, as a linker does (emu.loader.link).
            image = image_from_assembly(name, MODULE_BASE + i * MODULE_STRIDE, code, data, imports=exporter)
            return with_pe_headers(image, f"{name}.dll")  # a PE image in memory, as a loaded DLL is
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
        addr = find_symbol(self.images, ref)
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
        # Every loaded image is a module on PEB.Ldr's lists; the import-trap page is not.
        modules = [img for img in self.images if not (self.traps.traps and img.base == self.traps.base)]
        overrides = {i: self.resolve(ref, ("kernel_callback_table", str(i))) for i, ref in s.callback_table.items()}
        try:
            table_addr, table = peb_callback_table(modules, s.callback_table_from, s.callback_table_size, overrides)
        except ImageError as e:
            where = ("kernel_callback_table", "from")
            raise ScenarioError(s.path, ".".join(where), str(e), s.line_of(*where)) from None
        if table_addr is None:
            table_addr = self.machine.allocate(len(table), "r", "KernelCallbackTable", table)
        main = main_image(modules, s.entry)
        size = len(build_loader_data(modules, 0, main).data)
        self.loader = build_loader_data(modules, self.machine.allocate(size, "rw", "loader data"), main)
        self.machine.write(self.loader.address, self.loader.data)
        peb = bytearray(PEB_SIZE)
        for off, value in (
            (PEB_IMAGE_BASE, self.loader.image_base), (PEB_LDR, self.loader.ldr),
            (PEB_PROCESS_PARAMETERS, self.loader.process_parameters), (PEB_KERNEL_CALLBACK_TABLE, table_addr),
        ):  # fmt: skip
            peb[off : off + 8] = value.to_bytes(8, "little")
        self.machine.map(PEB_ADDRESS, PEB_SIZE, "rw", "PEB", bytes(peb))
        return table_addr

    def reaches_entry(self, seconds: float) -> str | None:
        """Run thread 0 until it reaches its entry: None if it does, else why it did not."""
        reached: list[int] = []

        def hit(uc: object, address: int, size: int, user_data: object) -> None:
            reached.append(address)
            self.machine.request_stop()

        entry = self.entries[0]
        self.machine.add_code_hook(entry, entry + 1, hit)
        try:
            self.kernel.continue_thread(self.thread)
            stop = self.drive(seconds, stop=lambda: bool(reached))
        except EmuError as e:
            return str(e)
        return None if reached else f"the thread ended ({stop}) first"

    # --- running --------------------------------------------------------------------
    def run(self) -> RunResult:
        # The hot path allocates many small records and no cycles (emu.collector).
        with collector_paused():
            self.kernel.continue_thread(self.thread)
            error, stop = self.advance(self.scenario.budgets.wall_time)
        return self.result(error, stop)

    def advance(
        self,
        wall_time: float | None,
        stop: Callable[[], bool] | None = None,
        instructions: int | None = None,
        run: Callable[[], str] | None = None,
    ) -> tuple[EmuError | None, str]:
        """:meth:`drive`, with the errors that end a run kept as data: (error, stop reason).
        A fault is recorded on the thread it stopped (the trace's last transition).
        ``run``: another way to run the process (a step, to a breakpoint: :mod:`emu.debug.control`)."""
        kernel = self.kernel
        try:
            return None, run() if run is not None else self.drive(wall_time, stop, instructions)
        except (MachineFault, UnimplementedImport) as e:
            kernel.record_fault(kernel.current or self.thread, e)
            return e, "fault"
        except BudgetExceeded as e:
            return e, "budget"
        except KernelError as e:
            return e, "fault"
        except ExtensionError as e:
            return e, e.kind

    def result(self, error: EmuError | None, stop: str) -> RunResult:
        """The run as it stands: the trace so far, the threads, why it stopped."""
        kernel = self.kernel
        if self.halt.failure is not None:
            error, stop = self.halt.failure, "hook"
        elif stop == "stopped" and self.halt.reason is not None:
            stop = "hook"
        return RunResult(
            scenario=self.scenario, trace=self.trace, images=self.images, threads=dict(kernel.threads),
            error=error, max_depth=kernel.max_depth, stop=stop, notes=list(self.notes),
            deadlock=list(kernel.deadlock), details=list(self.details), system=self.describe(),
        )  # fmt: skip

    def drive(
        self, wall_time: float | None, stop: Callable[[], bool] | None = None, instructions: int | None = None
    ) -> str:
        """Run threads until none can: "exit", "deadlock", "choice" (an explorer decides next),
        or "stopped" (``stop``, by default the hooks', said so after some user code ran or
        a thread was put on the CPU).

        ``wall_time=None`` leaves the clock to a Watchdog the caller holds; otherwise one is
        held here (a thread that stops the CPU at the deadline: Unicorn's own ``timeout=``
        would start a thread polling the clock at every ``emu_start``). ``instructions``: run
        at most that many at a time and return "instructions" when they are done (a debugger's
        single step) instead of the budget's error. Raises BudgetExceeded when a thread runs
        out of instructions or time, MachineFault when it faults.
        """
        if wall_time is None:
            return self._drive(stop, instructions)
        with Watchdog(self.machine, wall_time):
            return self._drive(stop, instructions)

    def _drive(self, stop: Callable[[], bool] | None, instructions: int | None) -> str:
        kernel, machine, b = self.kernel, self.machine, self.scenario.budgets
        stop_requested = stop or self.hooks.stop
        count = (b.instructions or 0) if instructions is None else instructions
        halt = self.halt
        while True:
            if halt.halted:
                return "stopped"
            if kernel.pending_choice is not None:
                return "choice"
            t = kernel.current
            if t is not None and t.running:
                rip = machine.regs.read(("rip",))[0]
                info = machine.run(rip, count, None)
                if info.reason != "requested" and t.running and kernel.pending_choice is None:
                    if instructions is not None and info.reason == "instructions":
                        return "instructions"
                    where = self.trace.symbolize(machine.regs.read(("rip",))[0])
                    if info.reason == "timeout":
                        raise BudgetExceeded("wall_time", f"{b.wall_time:g} s", where)
                    raise BudgetExceeded("instructions", b.instructions or 0, where)
                if stop_requested() or halt.halted:
                    return "stopped"
                continue
            if kernel.deadlock:
                return "deadlock"
            nxt = kernel.next_thread
            if nxt is None:
                return "exit"
            kernel.continue_thread(nxt)
            if stop_requested():
                return "stopped"


def _reaches_entry(scenario: Scenario) -> str | None:
    """Build the scenario with every thread started through RtlUserThreadStart and run
    thread 0 to its entry (2 s at most): None when it gets there, else why not."""
    return Process(scenario, start="rtl").reaches_entry(min(2.0, scenario.budgets.wall_time))


def _overlaps(a: Image, b: Image) -> bool:
    return a.base < b.end and b.base < a.end


def build(
    scenario: Scenario | str | Path, hooks: KernelHooks | None = None, services: Services | None = None
) -> Process:
    """Build the process for a scenario (a Scenario or a path) from its modules and threads,
    without running it. A ``[start] dump`` scenario is built by :func:`emu.api.build`."""
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    return Process(scenario, hooks=hooks, services=services)
