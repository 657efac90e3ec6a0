"""Build a process from a scenario and run its thread: images, TEB/PEB, kernel, trace.

``run(scenario)`` is the one entry point; it returns a :class:`Run` holding the trace,
the images, the thread's outcome and any error that stopped it. Errors that stop
a run (a fault, a budget) are kept on the Run with everything recorded so far;
errors in the input (a bad scenario, assembly that does not assemble) are raised.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

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
from emu.kernel import Kernel, KernelHooks, KThread, Recorder, ServiceRegistry, UserCallback, builtin_services
from emu.kernel.objects import Event, Mutant, ReleaseMutant, SendMessage, SetEvent, Wait
from emu.kernel.services import ChoiceStep as KChoiceStep
from emu.kernel.services import ScriptStep, get_message_service
from emu.loader.binding import ImportTraps, bind_imports
from emu.loader.callback_table import peb_callback_table
from emu.loader.image import PAGE, AssemblyError, Image, Symbolizer, image_from_assembly
from emu.loader.loader_data import build_loader_data, main_image
from emu.loader.pe import load_pe
from emu.loader.startup import InitThunk, find_init_thunk
from emu.loader.stubs import compare_with_profile, guess_dispatcher_convention, service_table
from emu.machine import Machine
from emu.runtime import NTDLL_BASE, build_kernel32, build_ntdll, build_win32u
from emu.runtime.pe_image import with_pe_headers
from emu.scenario import CallbackStep, ChoiceStep, ObjectStep, PeSpec, Scenario, Step, ThreadSpec, load_scenario
from emu.trace import Trace
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
    from emu.detection.view import Detection
    from emu.expect import Outcome
    from emu.graph import StateGraph

# Address-space layout. Classic x64 user layout (Windows 7): PEB just below
# KUSER_SHARED_DATA's neighbourhood at the top of the 8 TB user range, TEBs below it.
PEB_ADDRESS = 0x7FF_FFFD_F000
TEB_ADDRESS = 0x7FF_FFFD_D000  # thread i at TEB_ADDRESS - i * TEB_SIZE
WIN32U_BASE = NTDLL_BASE + 0x0100_0000
KERNEL32_BASE = NTDLL_BASE + 0x0200_0000  # emu's kernel32, loaded with a foreign ntdll
MODULE_BASE = 0x7FFA_C000_0000  # scenario modules, 16 MiB apart; they call other modules through import slots
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
# NtCallbackReturn is not one: it never waits (WRK ke/amd64/callout.asm NtCallbackReturn:
# `cli`, restore the trap frame, callback stack and InitialStack, return into
# KeUserModeCallback). A thread can only be preempted between KiSystemCall64's `sti` and
# that `cli`, and it is then Ready; a scenario asks for that with
# [machine] preempt_at_callback_return = true (PREEMPTIBLE_AT_ENTRY).
SHARED_SERVICES = frozenset(
    {
        "NtWaitForSingleObject",
        "NtSetEvent",
        "NtReleaseMutant",
        "NtUserGetMessage",
        "NtTerminateThread",
    }
)
PREEMPTIBLE_AT_ENTRY = frozenset({"NtCallbackReturn"})


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
    details: list[str] = field(default_factory=list)  # the long form of some notes (``emu run --verbose``)
    system: str = ""  # what the run models: the profile's Windows build, or the foreign ntdll and the profile
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
        from emu.detection.view import detect_run

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

    def __init__(self, scenario: Scenario, start: str | None = None, hooks: KernelHooks | None = None) -> None:
        """Build the process; ``start`` forces every thread's start mode (the start probe uses it);
        ``hooks`` steer the run (who answers choices, who watches states, when to stop)."""
        if scenario.start_dump is not None:
            raise ScenarioError(
                scenario.path, "start.dump", "this scenario starts from a dump: `emu run` runs it, `emu explore` cannot",
                scenario.line_of("start", "dump"),
            )  # fmt: skip
        self.scenario = scenario
        self.hooks = hooks or KernelHooks()
        self.profile = scenario.profile  # with what the loaded images decide (dispatcher), see _read_images
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
        for i, pe in enumerate(scenario.pe):
            self.images.append(self._load_pe(pe, ("pe", str(i), "path")))
        if self.foreign and self._kernel32() is None:
            # Right after ntdll, where the Windows loader puts kernel32 in the load order.
            self.images.insert(1, self._builtin_kernel32())
        self._bind_imports()
        for i, spec in enumerate(scenario.modules):
            self.images.append(self._assemble(i, spec.name, spec.code, spec.data))
        self.ssn_table = self._read_images(explicit)
        self.stack_regions: list[tuple[int, int, str]] = []
        self.trace = Trace(symbolize=Symbolizer([]))
        for img in self.images:
            self.machine.map_image(img)
        self.init_thunk = self._fill_init_thunk()
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
        registry = builtin_services(ServiceRegistry())
        if "NtUserGetMessage" not in scenario.services:
            get_message_service(registry)
        specs = scenario.threads or (ThreadSpec("thread0", scenario.entry, scenario.argument),)
        tids = {t.name: i for i, t in enumerate(specs)}
        handles = {o.name: o.handle for o in scenario.objects}
        shared = set(SHARED_SERVICES)
        if scenario.preempt_at_callback_return:
            shared |= PREEMPTIBLE_AT_ENTRY
        for name, script in scenario.services.items():
            steps = _script_steps(script.steps, tids, handles)
            registry.add_script(name, steps)
            if _touches_shared(steps):
                shared.add(name)
        dispatcher = self.ntdll.export("KiUserCallbackDispatcher")
        if dispatcher is None:
            raise self._missing("KiUserCallbackDispatcher", "every kernel-to-user callback enters it")
        b = scenario.budgets
        hooks = self.hooks
        recorder = Recorder(self.trace, self.machine, b.states if hooks.budget_states else None, b.output_bytes,
                            hooks.observe)  # fmt: skip
        self.kernel = Kernel(
            self.machine, self.profile, registry, recorder, dispatcher, b.callback_depth, self.ssn_table, hooks
        )
        self.kernel.visible = lambda name: name in shared
        many = len(specs) > 1
        self.entries: list[int] = []
        modes: list[str] = []
        for i, th in enumerate(specs):
            where = ("thread", str(i), "entry") if many else ("thread", "entry")
            entry = self.resolve(th.entry, where)
            mode = start or self._start_mode(th)
            t = self.create_thread(i, entry, th.argument, mode)
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
        sym = Symbolizer(self.images, self.stack_regions)
        self.trace.symbolize = sym
        self.machine.symbolize = sym
        # How each thread starts, in words: `emu run` and `emu explain` show it.
        self.trace.thread_starts = [
            f"{th.name}: {self._describe_start(mode, entry, sym)}"
            for th, mode, entry in zip(specs, modes, self.entries)
        ]

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

    def _read_images(self, explicit: dict[str, int]) -> dict[str, int]:
        """Service numbers and the dispatcher convention from the loaded code.

        The images decide: SSNs come from the stubs of a foreign ntdll and of a loaded
        win32u PE, the dispatcher convention from a foreign KiUserCallbackDispatcher's
        code. The profile gives defaults, and a ``[profile]`` key the file sets wins.
        """
        s = self.scenario
        profile = s.profile
        table: dict[str, int] = {} if self.foreign else dict(profile.ssn)
        coded: list[Image] = [self.ntdll] if self.foreign else []
        coded += [img for img in self.images if img.name.lower() == "win32u" and img.path is not None]
        for img in coded:
            found = service_table(img)
            table.update(found)
            diffs = compare_with_profile(found, profile)
            if diffs:
                self.notes.append(
                    f"{_file_name(img)} numbers {len(diffs)} service(s) differently from profile {profile.name}; "
                    f"its code is used (emu run --verbose lists them)"
                )
            self.details.extend(
                f"{_file_name(img)}: {d.service} SSN {d.in_code:#x} in its code, {d.in_profile:#x} in profile {profile.name}"
                for d in diffs
            )
        if self.foreign:
            guess = guess_dispatcher_convention(self.ntdll)
            if "dispatcher" in s.profile_overrides:
                if guess.convention not in ("unknown", profile.dispatcher):
                    self.notes.append(
                        f"{_file_name(self.ntdll)}'s KiUserCallbackDispatcher looks like the '{guess.convention}' "
                        f"convention ({guess.evidence}); [profile] dispatcher = '{profile.dispatcher}' is used"
                    )
            elif guess.convention == "unknown":
                self.notes.append(
                    f"the entry convention of {_file_name(self.ntdll)}'s KiUserCallbackDispatcher cannot be read from "
                    f"its code; the profile's '{profile.dispatcher}' is used (set [profile] dispatcher to choose)"
                )
            else:
                self.profile = profile.with_overrides(dispatcher=guess.convention)
                self.details.append(f"dispatcher convention '{guess.convention}' from the code: {guess.evidence}")
        if self.foreign or coded:
            for name in s.services:
                if name not in table and name not in explicit:
                    where = ", ".join(_file_name(i) for i in coded)
                    raise ScenarioError(
                        s.path, f"services.{name}",
                        f"{name} has no stub in {where} and no 'ssn = 0x...' (add one to script it)",
                        s.line_of("services", name),
                    )  # fmt: skip
            if _uses_callbacks(s) and "NtCallbackReturn" not in table and "NtCallbackReturn" not in explicit:
                raise self._missing(
                    "NtCallbackReturn",
                    "callbacks return through it; a stub with a readable SSN is needed, or "
                    "[profile] ssn = { NtCallbackReturn = 0x... }",
                    also="ZwCallbackReturn",
                )
        return {**table, **explicit}

    def _missing(self, export: str, why: str, also: str = "") -> ScenarioError:
        """The one-line error for a foreign ntdll without something the run needs."""
        spec = self.scenario.ntdll
        name = _file_name(self.ntdll)
        alt = f" or {also}" if also else ""
        return ScenarioError(
            self.scenario.path, "ntdll.path" if spec else "ntdll",
            f"{name} exports no usable {export}{alt}: {why}",
            self.scenario.line_of("ntdll", "path") if spec else None,
        )  # fmt: skip

    def _builtin_kernel32(self) -> Image:
        """emu's kernel32 (BaseThreadInitThunk only), in the first free 16 MiB slot from KERNEL32_BASE."""
        terminate = self.ntdll.export("NtTerminateThread", "ZwTerminateThread")
        if terminate is None:
            raise self._missing("NtTerminateThread", "emu's built-in kernel32 ends threads through it")
        base = KERNEL32_BASE
        while any(img.base < base + MODULE_STRIDE and base < img.end for img in self.images):
            base += MODULE_STRIDE
        return build_kernel32(base, terminate)

    def _fill_init_thunk(self) -> InitThunk | None:
        """Store kernel32!BaseThreadInitThunk where a foreign RtlUserThreadStart calls through it,
        as the Windows loader does (see :mod:`emu.loader.startup`)."""
        if not self.foreign:
            return None
        found = find_init_thunk(self.ntdll)
        k32 = self._kernel32()
        thunk = k32.export("BaseThreadInitThunk") if k32 is not None else None
        if found is None or thunk is None:
            return None
        self.machine.write_u64(found.slot, thunk)
        self.details.append(
            f"RtlUserThreadStart calls BaseThreadInitThunk through {found.slot:#x} ({found.how}); emu stored "
            f"{k32.name if k32 else 'kernel32'}!BaseThreadInitThunk there"
        )
        return found

    def _start_mode(self, spec: ThreadSpec) -> str:
        """A thread's start mode: "auto" is "rtl", unless a foreign RtlUserThreadStart cannot
        reach the entry here (a probe run finds out, once per scenario text and ntdll file)."""
        if spec.start != "auto" or not self.foreign:
            return "rtl" if spec.start == "auto" else spec.start
        k32 = self._kernel32()
        if k32 is None or k32.path is not None:
            return "rtl"  # the scenario's own kernel32: its BaseThreadInitThunk, nothing to fall back on
        if self.ntdll.export("RtlUserThreadStart") is None:
            self.notes.append(f"{_file_name(self.ntdll)} exports no RtlUserThreadStart; threads start at their entry")
            return "entry"
        why = _probe_start(self.scenario)
        if why is None:
            return "rtl"
        self.notes.append(
            f"{_file_name(self.ntdll)}!RtlUserThreadStart did not reach the thread's entry here ({why}); "
            f'threads start at their entry instead (set [thread] start = "rtl" to run it anyway)'
        )
        return "entry"

    def _kernel32(self) -> Image | None:
        """The loaded kernel32: emu's built-in one (no path) or the scenario's own."""
        return next((img for img in self.images if img.name.lower() == "kernel32"), None)

    def _describe_start(self, mode: str, entry: int, sym: Symbolizer) -> str:
        if mode == "entry":
            return f"at its entry {sym(entry)}, as if called by {sym(self._exit_thunk())}"
        via = " -> kernel32!BaseThreadInitThunk" if self.init_thunk is not None else ""
        return f"ntdll!RtlUserThreadStart{via} -> {sym(entry)}"

    def describe(self) -> str:
        """What the run models, for report headers: the profile, or the foreign images and the profile."""
        if not self.foreign:
            return self.scenario.profile.title
        return (
            f"{_file_name(self.ntdll)}: its own stubs, SSNs and '{self.profile.dispatcher}' dispatcher; "
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

    def create_thread(self, index: int, entry: int, argument: int, mode: str = "rtl") -> KThread:
        """TEB, stack with a guard page, and a context at the thread's start.

        ``mode`` "rtl": RtlUserThreadStart(entry, argument), entered as if called (RSP = 8
        mod 16, a zero return address). "entry": the entry itself with RCX = argument, as
        if called by the function that RtlUserThreadStart calls (kernel32!BaseThreadInitThunk
        with a foreign ntdll, the built-in RtlUserThreadStart otherwise): its 0x28-byte frame
        and a return address into it sit on the stack, so returning ends the thread.
        """
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
        rsp = base - 0x30 - 8
        regs = {"rcx": entry, "rdx": argument}
        if mode == "entry":
            rip = entry
            rsp -= 0x30  # the caller's `sub rsp, 0x28` and its `call`
            m.write_u64(rsp, self._exit_thunk())
            regs = {"rax": entry, "rcx": argument, "rdx": entry if self.foreign else argument, "r8": argument}
        else:
            start = self.ntdll.export("RtlUserThreadStart")
            if start is None:
                raise self._missing("RtlUserThreadStart", 'threads start there; [thread] start = "entry" skips it')
            rip = start
        ctx = UserContext(
            rax=0, rcx=0, rdx=0, rbx=0, rsp=rsp, rbp=0, rsi=0, rdi=0, r8=0, r9=0, r10=0,
            r11=0, r12=0, r13=0, r14=0, r15=0, rip=rip, rflags=RFLAGS_IF | RFLAGS_RESERVED,
        )._replace(**regs)  # fmt: skip
        return KThread(tid=index, teb=teb, stack_base=base, stack_limit=limit, entry_context=ctx)

    def _exit_thunk(self) -> int:
        """Where a thread started at its entry returns to: the point after the call to the
        entry in emu's BaseThreadInitThunk (foreign ntdll) or RtlUserThreadStart (built-in)."""
        img = self._kernel32() if self.foreign else self.ntdll
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
            deadlock=list(kernel.deadlock), details=list(self.details), system=self.describe(),
        )  # fmt: skip

    def drive(self, wall_time: float | None, stop: Callable[[], bool] | None = None) -> str:
        """Run threads until none can: "exit", "deadlock", "choice" (an explorer decides next),
        or "stopped" (``stop``, by default the hooks', said so after some user code ran).

        ``wall_time=None`` leaves the clock to a Watchdog. Raises BudgetExceeded when a
        thread runs out of instructions or time, MachineFault when it faults.
        """
        kernel, machine, b = self.kernel, self.machine, self.scenario.budgets
        stop_requested = stop or self.hooks.stop
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
                if stop_requested():
                    return "stopped"
                continue
            if kernel.deadlock:
                return "deadlock"
            nxt = kernel.next_thread
            if nxt is None:
                return "exit"
            kernel.continue_thread(nxt)


def _touches_shared(steps: list[ScriptStep]) -> bool:
    for st in steps:
        if isinstance(st, (Wait, SetEvent, ReleaseMutant, SendMessage)):
            return True
        if isinstance(st, KChoiceStep) and any(_touches_shared(list(o)) for _, o in st.options):
            return True
    return False


def _file_name(image: Image) -> str:
    return Path(image.path).name if image.path else image.name


def _uses_callbacks(s: Scenario) -> bool:
    def any_callback(steps: tuple[Step, ...]) -> bool:
        for st in steps:
            if isinstance(st, CallbackStep) or (isinstance(st, ObjectStep) and st.kind == "send"):
                return True
            if isinstance(st, ChoiceStep) and any(any_callback(o) for _, o in st.options):
                return True
        return False

    return any(any_callback(script.steps) for script in s.services.values()) or bool(s.callback_table)


# Start probes: scenario (path, text) and ntdll file -> why RtlUserThreadStart does not reach the entry.
_PROBES: dict[tuple[str, str, int, int], str | None] = {}


def _probe_start(scenario: Scenario) -> str | None:
    """Build the scenario with every thread started through RtlUserThreadStart and run
    thread 0 to its entry (2 s at most): None when it gets there, else why not."""
    spec = scenario.ntdll
    st = Path(spec.path).stat() if spec is not None else None
    key = (scenario.path, scenario.source, st.st_mtime_ns if st else 0, st.st_size if st else 0)
    if key not in _PROBES:
        if len(_PROBES) > 64:
            _PROBES.clear()
        probe = Process(scenario, start="rtl")
        _PROBES[key] = probe.reaches_entry(min(2.0, scenario.budgets.wall_time))
    return _PROBES[key]


def _overlaps(a: Image, b: Image) -> bool:
    return a.base < b.end and b.base < a.end


def build(scenario: Scenario | str | Path, hooks: KernelHooks | None = None) -> Process:
    """Build the process for a scenario (a Scenario or a path) without running it: from its
    ``[start] dump`` when it names one (:mod:`emu.dump.start`), else from its modules and threads."""
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    if scenario.start_dump is not None:
        from emu.dump.start import DumpProcess  # the dump layer reads minidumps; built on demand

        return DumpProcess(scenario, scenario.start_dump, hooks)
    return Process(scenario, hooks=hooks)


def run(scenario: Scenario | str | Path) -> Run:
    """Load (if given a path), build and run a scenario.

    Example (from the repository root)::

        r = run("scenarios/callback_roundtrip.toml")
        [d.rip for d in r.detections]   # ['ntdll!ZwCallbackReturn+0x14']
    """
    return build(scenario).run()
