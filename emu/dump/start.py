"""Start a run from a minidump: its memory, modules and threads, then the kernel model with the scenario's services.

``[start] dump = "x.dmp"`` in a scenario, or ``emu run --from-dump x.dmp SCENARIO``, builds a
:class:`DumpProcess` instead of the scenario's own process:

- memory: every committed region of the dump's MemoryInfoList, mapped with its protection
  and filled from the dump's memory ranges (zeros where the dump holds no bytes); without a
  MemoryInfoList, the memory ranges themselves (``rwx`` inside modules, ``rw`` elsewhere).
  KUSER_SHARED_DATA comes from the dump, or from the scenario's profile when the dump has
  none;
- modules: the ModuleList, named from emu's own module stream or from the PE export
  directory in memory (:mod:`emu.dump.modules`);
- threads: each MINIDUMP_THREAD's CONTEXT and TEB (the stack bounds from the TEB's NT_TIB);
- the kernel side: from ``EmuKernelStream`` (:mod:`emu.dump.kernel_stream`) when emu wrote
  the dump — callback stacks, a system call entered but not yet served (the seed's state:
  NtCallbackReturn about to complete the callback), waits, events and mutants — so the run
  goes on exactly as the original would have. A dump from elsewhere has no such stream:
  every thread starts at its context with nothing pending in the kernel (a note says so),
  with the scenario's [[object]]s as declared.

Services come from the scenario, so the next system call a dumped thread makes is served
by the scenario; the profile (SSNs, dispatcher convention) from the stream, else from the
scenario and the dump's ntdll code.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from emu.context import KTrapFrame, UserContext
from emu.dump.format import MEM_COMMIT
from emu.dump.kernel_stream import KernelDoc
from emu.dump.read import DumpThread, read_minidump
from emu.engine import Process, RunResult
from emu.errors import BudgetExceeded, DumpError, EmuError, ImageError, MachineFault, UnimplementedImport
from emu.hooks import Halt
from emu.kernel import Kernel, KernelHooks, KThread, Recorder, ServiceRegistry, sched
from emu.kernel.exception import deliver
from emu.kernel.objects import Event, Mutant
from emu.kernel.thread import ThreadServiceContext
from emu.loader.image import PAGE, Image, Symbolizer, page_align
from emu.loader.stubs import guess_dispatcher_convention, service_table
from emu.machine import Machine
from emu.ntcontext import EXCEPTION_RECORD_SIZE, Context, ExceptionRecord
from emu.process_services import registry_for
from emu.scenario import Scenario
from emu.services import Services, bind, services_for
from emu.trace import Trace
from emu.winnt import KUSER_SHARED_DATA, TEB_STACK_BASE, TEB_STACK_LIMIT

# The state's thread goes on at once (after "exception" in the kernel, the kernel delivers it first).
RUNNING_KINDS = ("syscall", "sysret", "callback", "callback_return", "exception", "continue", "unwind")


class DumpProcess(Process):
    """A process built from a minidump, ready to run under the scenario's kernel model."""

    def __init__(
        self, scenario: Scenario, dump: str | Path, hooks: KernelHooks | None = None, services: Services | None = None
    ) -> None:
        self.scenario = scenario
        self.hooks = hooks or KernelHooks()
        self.halt = Halt()
        self.notes: list[str] = []
        self.details: list[str] = []
        self.dump_path = str(dump)
        view = read_minidump(dump)
        self.view = view
        if not view.thread_records:
            self._fail("ThreadListStream", "the dump lists no thread to run")
        doc = KernelDoc(view.kernel_stream, lambda m: self._fail("EmuKernelStream", m)) if view.kernel_stream else None
        self.doc = doc
        self.machine = Machine()
        self.images: list[Image] = [m.image for m in view.modules]
        self.foreign = doc is None
        ntdll = next((img for img in self.images if img.name.lower() == "ntdll"), None)
        if ntdll is None:
            self._fail("ModuleListStream", "no module named ntdll: the kernel model needs its KiUserCallbackDispatcher")
        self.ntdll = ntdll
        self.trace = Trace(symbolize=Symbolizer([]))
        self._map_memory()
        registry, shared = self._services()
        ssn_table = self._profile()
        where = f"{Path(self.dump_path).name}'s service table"
        shared = set(
            bind(registry, frozenset(shared), services_for(scenario, services), scenario, ssn_table, where, self.notes)
        )
        dispatcher = self.ntdll.export("KiUserCallbackDispatcher")
        if dispatcher is None:
            self._fail("ModuleListStream", "ntdll exports no KiUserCallbackDispatcher (every callback enters it)")
        b = scenario.budgets
        recorder = Recorder(self.trace, self.machine, b.states if self.hooks.budget_states else None, b.output_bytes,
                            self.hooks.observe)  # fmt: skip
        self.kernel = Kernel(
            self.machine, self.profile, registry, recorder, dispatcher, b.callback_depth, ssn_table, self.hooks
        )
        self.kernel.visible = lambda name: name in shared
        # The built-in ntdll's traps are found by its labels in EmuModulesStream; its vectored
        # handler lists are in its .data, so the dump's memory carries them.
        self._deliver_exceptions()
        self.stack_regions: list[tuple[int, int, str]] = []
        self._first: list[tuple[KThread, UserContext, str | None, bool]] = []  # each thread's first record
        threads = self._threads_from_doc(doc, registry) if doc is not None else self._threads_at_contexts()
        self._start_thread(doc, threads)
        sym = Symbolizer(self.images, self.stack_regions)
        self.trace.symbolize = sym
        self.machine.symbolize = sym
        self.trace.thread_starts = [
            f"{t.name}: from {Path(self.dump_path).name}, {t.mode} mode at {sym(ctx.rip)}"
            + (f", depth {len(t.callback_stack)}" if t.callback_stack else "")
            for t, ctx in threads
        ]
        unbound = next((img for img in self.images if img.name.lower() == "unbound"), None)
        if unbound is not None:
            self.machine.add_code_hook(unbound.base, unbound.end, self._unbound_hit)

    # --- building -------------------------------------------------------------------
    def _fail(self, stream: str, what: str) -> NoReturn:
        raise DumpError(f"{self.dump_path}: {stream}: {what}")

    def _map_memory(self) -> None:
        view, m = self.view, self.machine
        committed = [r for r in view.regions if r.state == MEM_COMMIT]
        for r in committed:
            if r.base % PAGE or r.size % PAGE:
                self._fail("MemoryInfoListStream", f"region {r.base:#x}+{r.size:#x} is not whole pages")
            m.map(r.base, r.size, r.perms, self._label(r.base))
        loose = 0
        for start, data in view.memory:
            # Ranges outside every committed region (or a dump without MemoryInfoList): map their pages.
            page = start & ~(PAGE - 1)
            end = page_align(start + len(data))
            while page < end:
                if m.region_at(page) is None:
                    run_end = page
                    while run_end < end and m.region_at(run_end) is None:
                        run_end += PAGE
                    inside = any(img.contains(page) for img in self.images)
                    m.map(page, run_end - page, "rwx" if inside else "rw", self._label(page))
                    loose += 1
                    page = run_end
                else:
                    region = m.region_at(page)
                    page = region.end if region is not None else page + PAGE
            m.write(start, data)
        self._label_guard_pages()
        if loose and view.regions:
            self.notes.append(f"{loose} memory range(s) of the dump lie outside its MemoryInfoList: mapped read-write")
        elif loose:
            self.notes.append("the dump has no MemoryInfoList: protections are guessed (rwx in modules, rw elsewhere)")
        if m.region_at(KUSER_SHARED_DATA) is None:
            self._map_kuser()
            self.notes.append(f"the dump holds no KUSER_SHARED_DATA: {self.scenario.profile.name}'s is mapped")
        mapped = sum(r.size for r in m.regions)
        if mapped > self.scenario.budgets.memory:
            raise BudgetExceeded(
                "memory", self.scenario.budgets.memory, f"{self.dump_path}: {mapped} bytes mapped", "bytes"
            )

    def _label_guard_pages(self) -> None:
        """A thread's stack guard page (PAGE_GUARD right below its TEB's StackLimit) is named as
        the original run named it, so that touching it is a stack overflow again."""
        m = self.machine
        for i, t in enumerate(self.view.thread_records):
            if not m.readable(t.teb + TEB_STACK_LIMIT, 8):
                continue
            guard = m.region_at(m.read_u64(t.teb + TEB_STACK_LIMIT) - PAGE)
            if guard is not None and any(r.guard and r.base == guard.start for r in self.view.regions):
                m.protect(guard.start, guard.size, "", f"thread {i} stack guard")

    def _label(self, address: int) -> str:
        img = next((i for i in self.images if i.contains(address)), None)
        if img is not None:
            return f"{img.name} image"
        for i, t in enumerate(self.view.thread_records):
            if t.teb <= address < t.teb + PAGE:
                return f"thread {i} TEB"
        return "dump memory"

    def _services(self) -> tuple[ServiceRegistry, set[str]]:
        """The scenario's services, as :class:`~emu.engine.Process` registers them."""
        registry, shared = registry_for(self.scenario, {t.name: i for i, t in enumerate(self.scenario.threads)})
        return registry, set(shared)

    def _profile(self) -> dict[str, int]:
        """The service table and dispatcher convention: the stream's, else the dump's ntdll code, else the profile."""
        s, doc = self.scenario, self.doc
        explicit = {n: x.ssn for n, x in s.services.items() if x.ssn is not None}
        self.profile = s.profile
        if doc is not None:
            if doc.profile_name != s.profile.name:
                self.notes.append(f"the dump was made under profile {doc.profile_name}; its service numbers are used")
            self.profile = s.profile.with_overrides(dispatcher=doc.dispatcher)
            return {**doc.ssn, **explicit}
        table = dict(s.profile.ssn)
        try:
            table.update(service_table(self.ntdll))
        except ImageError as e:
            self.notes.append(f"the dump's ntdll stubs cannot be read ({e}); {s.profile.name}'s numbers are used")
        guess = guess_dispatcher_convention(self.ntdll)
        if guess.convention != "unknown" and "dispatcher" not in s.profile_overrides:
            self.profile = s.profile.with_overrides(dispatcher=guess.convention)
        return {**table, **explicit}

    def _threads_from_doc(self, doc: KernelDoc, registry: ServiceRegistry) -> list[tuple[KThread, UserContext]]:
        by_teb = {t.teb: t for t in self.view.thread_records}
        out: list[tuple[KThread, UserContext]] = []
        seen: set[int] = set()
        for i, d in enumerate(doc.threads):
            w = f"threads[{i}]"
            index, teb = doc.number(d, "index", w), doc.number(d, "teb", w)
            if index in {t.tid for t, _ in out}:
                doc.fail(f"{w}.index {index} appears twice")
            entry = doc.context(d.get("entry_context"), f"{w}.entry_context")
            dumped = by_teb.get(teb)
            terminated = doc.flag(d, "terminated", w)
            if dumped is None and not terminated:
                doc.fail(f"{w}: a live thread (TEB {teb:#x}) that ThreadListStream does not list")
            ctx = dumped.context if dumped is not None else entry
            if dumped is not None:
                seen.add(teb)
            t = KThread(index, teb, doc.number(d, "stack_base", w), doc.number(d, "stack_limit", w), entry)
            t.name = doc.text(d, "name", w)
            t.service_ctx = ThreadServiceContext(self.kernel, t)
            t.started, t.terminated = doc.flag(d, "started", w), terminated
            status = d.get("exit_status")
            t.exit_status = None if status is None else doc.number(d, "exit_status", w)
            t.callback_stack = doc.frames(d, w, registry, t.service_ctx)
            susp = doc.suspended(d.get("suspended"), f"{w}.suspended", registry, t.service_ctx)
            if susp is not None:  # the dump's CONTEXT is the user context the kernel returns to
                susp.trap = KTrapFrame(ctx, susp.trap.via)
            t.suspended = susp
            if not t.started:
                t.entry_context = ctx
            mode = doc.choice(d, "mode", ("user", "kernel", "exited"), w)
            service = d.get("service")
            t.mode = "user" if mode == "user" else "kernel" if mode == "kernel" else "exited"
            out.append((t, ctx))
            self.stack_regions.append((t.stack_limit, t.stack_base, f"stack{index}"))
            self._first.append((t, ctx, service if isinstance(service, str) else None, doc.flag(d, "pending", w)))
        missing = [t.thread_id for t in self.view.thread_records if t.teb not in seen]
        if missing:
            doc.fail(f"thread {missing[0]:#x} of ThreadListStream has no entry in the stream")
        self.kernel.objects = doc.objects()
        self.kernel.max_depth = doc.max_depth
        return out

    def _threads_at_contexts(self) -> list[tuple[KThread, UserContext]]:
        """A dump without emu's stream: every thread at its context, started, nothing pending in the kernel."""
        self.notes.append(
            f"{Path(self.dump_path).name} has no EmuKernelStream (not written by emu): every thread starts at its "
            "context with no callback, system call or wait pending in the kernel"
        )
        out: list[tuple[KThread, UserContext]] = []
        for i, rec in enumerate(self.view.thread_records):
            limit, base = self._stack_bounds(rec)
            t = KThread(i, rec.teb, base, limit, rec.context)  # not started: it starts at its context
            t.name = self.scenario.threads[i].name if i < len(self.scenario.threads) else f"thread{i}"
            t.service_ctx = ThreadServiceContext(self.kernel, t)
            self.stack_regions.append((limit, base, f"stack{i}"))
            out.append((t, rec.context))
            self._first.append((t, rec.context, None, False))
        tids = {t.name: t.tid for t, _ in out}
        for o in self.scenario.objects:
            owner = tids.get(o.owner) if o.owner else None
            self.kernel.objects.objects[o.handle] = (
                Event(o.name, o.manual_reset, o.signaled) if o.kind == "event" else Mutant(o.name, owner, int(owner is not None))
            )  # fmt: skip
        return out

    def _stack_bounds(self, rec: DumpThread) -> tuple[int, int]:
        """(StackLimit, StackBase) from the TEB's NT_TIB, else the committed region around RSP."""
        m = self.machine
        if m.readable(rec.teb + TEB_STACK_BASE, 0x10):
            base, limit = m.read_u64(rec.teb + TEB_STACK_BASE), m.read_u64(rec.teb + TEB_STACK_LIMIT)
            if limit <= rec.context.rsp < base:
                return limit, base
        r = m.region_at(rec.context.rsp)
        return (r.start, r.end) if r is not None else (rec.context.rsp, rec.context.rsp)

    def _start_thread(self, doc: KernelDoc | None, threads: list[tuple[KThread, UserContext]]) -> None:
        """Record each thread's first state, then pick the thread that runs first, as the original would."""
        k = self.kernel
        k.set_threads({t.tid: t for t, _ in threads})
        for t, ctx, service, pending in self._first:
            k.recorder.restored(t, t.mode, tuple(ctx), service, pending)
        self.idle = False
        if doc is None:
            self.thread = threads[0][0]  # the thread the dump is of (emu writes it first)
            return
        if doc.kind == "initial":
            self.thread = next((t for t, _ in threads if not t.terminated), threads[0][0])
            return
        own = k.threads.get(doc.state_thread)
        if own is None:
            doc.fail(f"state.thread {doc.state_thread} is not one of the threads")
        if doc.kind not in RUNNING_KINDS:
            # Blocked, exited or faulted: the scheduler picks who runs next, as it did then.
            sched.reschedule(k, own)
            self.idle = k.next_thread is None
            self.thread = k.next_thread or own
            return
        self.thread = own
        if own.started and own.suspended is None:  # in user mode: it goes on from its context
            self.machine.regs.set_context(next(c for t, c in threads if t is own))

    def _unbound_hit(self, uc: object, address: int, size: int, user_data: object) -> None:
        trap = self.doc.traps.get(address) if self.doc is not None else None
        if trap is not None:
            raise UnimplementedImport(*trap)
        raise UnimplementedImport(self.trace.symbolize(address), "", "an import bound to a trap when the dump was made")

    # --- running --------------------------------------------------------------------
    def describe(self) -> str:
        return f"from {Path(self.dump_path).name}; {self.profile.title}"

    def run(self) -> RunResult:
        ended = self._ended()
        if ended is not None:
            return ended
        if self.doc is not None and self.doc.raising is not None:
            self._deliver_raised(*self.doc.raising)
        return super().run()

    def start(self) -> RunResult | None:
        """Set the run going as :meth:`run` does, without running any code (a Session, a
        debugger): the stopped run when the dump is of one that ended there, else None and
        the first thread on the CPU (a fault recorded but not yet delivered is delivered first)."""
        ended = self._ended()
        if ended is None:
            if self.doc is not None and self.doc.raising is not None:
                self._deliver_raised(*self.doc.raising)
            self.kernel.continue_thread(self.thread)
        return ended

    def _ended(self) -> RunResult | None:
        if self.doc is not None and self.doc.kind == "fault":
            # The run the dump comes from stopped at this fault; so does this one.
            return self._stopped("fault", MachineFault(self.doc.fault or "the dumped thread faulted"))
        if self.idle:
            return self._stopped("deadlock" if self.kernel.deadlock else "exit", None)
        return None

    def _deliver_raised(self, record: bytes, fast_fail: bool) -> None:
        """The dump is of a fault the kernel has recorded but not yet delivered: deliver it now,
        as the original run did next (emu.kernel.exception.deliver)."""
        k, thread = self.kernel, self.thread
        if len(record) != EXCEPTION_RECORD_SIZE:
            self._fail(
                "EmuKernelStream", f"state.raising.record is {len(record)} bytes, expected {EXCEPTION_RECORD_SIZE}"
            )
        k.current = thread
        self.machine.set_gs_base(thread.teb)
        ext = self.machine.extended_state()
        ctx = Context(self.machine.regs.context(), ext.xmm, ext.mxcsr, x87=ext.x87)
        deliver(k, thread, ExceptionRecord.from_bytes(record), ctx, fast_fail)

    def _stopped(self, stop: str, error: EmuError | None) -> RunResult:
        k = self.kernel
        return RunResult(
            self.scenario, self.trace, self.images, dict(k.threads), error=error, max_depth=k.max_depth, stop=stop,
            deadlock=list(k.deadlock), notes=list(self.notes), details=list(self.details), system=self.describe(),
        )  # fmt: skip
