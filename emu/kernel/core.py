"""The kernel model: system call dispatch, services, callbacks into user mode, NtCallbackReturn.

Entered from the machine's ``syscall`` (or ``int 2Eh``) hook. Applies the
architectural effects Unicorn leaves out, runs the service for the SSN, and leaves
the CPU either where the service returns (sysret) or at KiUserCallbackDispatcher
(callback). Each crossing goes to the :class:`~emu.kernel.record.Recorder`; choices go
to the caller's :class:`~emu.kernel.hooks.KernelHooks`; stepping a service past its first
request and resuming suspended kernel work are :mod:`emu.kernel.driving`; threads waiting
and switching are :mod:`emu.kernel.sched`; saving and loading for forks are :mod:`emu.kernel.fork`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from emu.context import REGISTER_NAMES, KTrapFrame, UserContext
from emu.errors import EmuError, ModelBug, UnimplementedService
from emu.kernel import driving, exception, port_io, sched
from emu.kernel.callout import entry_maker, prepare_callout
from emu.kernel.driving import drive
from emu.kernel.hooks import KernelHooks
from emu.kernel.objects import ObjectTable
from emu.kernel.record import Recorder
from emu.kernel.services import (
    Activation,
    CallbackResult,
    ScriptActivation,
    ServiceRegistry,
    ServiceSpec,
    UserCallback,
)
from emu.kernel.thread import CallbackFrame, KThread, PendingChoice, ThreadServiceContext
from emu.kernel.user_read import kernel_read, record_output
from emu.machine import Machine
from emu.profile import Profile
from emu.trap import Trap
from emu.winnt import (
    STATUS_INVALID_SYSTEM_SERVICE,
    STATUS_NO_CALLBACK_ACTIVE,
)

NT_CALLBACK_RETURN = "NtCallbackReturn"
_ALL = REGISTER_NAMES
_SYSRET = ("rax", "rcx", "r11")
_VIA = {"syscall": "", "int 2Eh": "entered via int 2Eh"}
# Services that change the thread's whole context rather than return a status (emu.kernel.exception).
_CONTEXT_SERVICES = {
    "NtContinue": exception.nt_continue,
    "NtRaiseException": exception.nt_raise_exception,
    "NtTerminateProcess": exception.nt_terminate_process,
}


_context = tuple.__new__  # a UserContext from 18 register values, without _make's length check
_NO_OUTPUT = record_output(None, 0, 0, 0)[1]  # type: ignore[arg-type]  # what the trace says of an empty result


def _everywhere(name: str | None) -> bool:
    return True


class Kernel:
    """System service dispatch and callback stacks.

    Register values travel as plain tuples on the hot path (a syscall whose service
    returns at once); ``UserContext`` tuples are built only where a callback needs one.
    """

    def __init__(
        self, machine: Machine, profile: Profile, registry: ServiceRegistry, recorder: Recorder, dispatcher: int,
        callback_depth_budget: int | None = None, ssn_table: dict[str, int] | None = None,
        hooks: KernelHooks | None = None,
    ) -> None:  # fmt: skip
        self.machine = machine
        self.profile = profile
        self.registry = registry
        self.recorder = recorder
        self.trace = recorder.trace
        self.dispatcher = dispatcher
        self.callback_depth_budget = callback_depth_budget
        self.hooks = hooks or KernelHooks()
        # The service table: from the loaded ntdll's code when there is one, else the profile.
        self.ssn_table: dict[str, int] = dict(ssn_table if ssn_table is not None else profile.ssn)
        self.names: dict[int, str] = {ssn: name for name, ssn in sorted(self.ssn_table.items())}
        self.threads: dict[int, KThread] = {}
        self._multithreaded = False
        # Services that do nothing but return a status (scripted), by name: the fast path.
        self._constants: dict[str, int] = {
            n: c for n in registry.names() if (spec := registry.get(n)) is not None and (c := spec.constant) is not None
        }
        # The same, without NtCallbackReturn (always served by the kernel): the syscall hook's fast path.
        self._returns = {n: c for n, c in self._constants.items() if n != NT_CALLBACK_RETURN}
        # Scripted services that do more than return a status and take no stack arguments, by
        # name: served by the syscall hook without _dispatch's checks (all of them pass).
        self._scripts: dict[str, ServiceSpec] = {
            n: spec
            for n in registry.names()
            if (spec := registry.get(n)) is not None and spec.script is not None and spec.constant is None
            and spec.script_args <= 4 and n != NT_CALLBACK_RETURN
        }  # fmt: skip
        self.current: KThread | None = None
        self.max_depth = 0
        self.user_writes = 0  # bumped by service writes: a sysret state may reuse the entry's stack bytes
        self.pending_choice: PendingChoice | None = None  # a service suspended at a Choice (exploration)
        self.objects = ObjectTable()
        self.next_thread: KThread | None = None  # chosen to run after the current one stopped
        self.deadlock: list[str] = []  # wait chains, when no thread can run but some wait
        # Services at whose entry another thread may go first (the engine names the shared ones).
        self.visible: Callable[[str | None], bool] = _everywhere
        self._entry_len = 2  # bytes Unicorn adds to a RIP written in the current hook
        self._read_all = machine.regs.reader(_ALL)
        # The syscall hook's own access: one C call each, no Python frame (emu.machine.RegisterFile.bound).
        self._fill_all, _, self._all_vals = machine.regs.bound(_ALL)
        # The same array as 64-bit integers: ``tolist`` builds the list without ctypes' per-item calls.
        self._all_list = memoryview(self._all_vals).cast("B").cast("Q").tolist
        _, self._put_sysret, self._sysret_vals = machine.regs.bound(_SYSRET)
        _, self._put_all, self._all_out = machine.regs.bound(_ALL)
        self._overflow: dict[int, str | None] = {}  # callback depth -> kernel_stack_overflow's answer (profile fixed)
        # Per set of XMM registers scrubbed: the write entering KiUserCallbackDispatcher, and its array.
        self._put_entry: dict[tuple[int, ...], tuple[Callable[[], object], Any]] = {}
        # Callout frames by (RSP, RIP, RFLAGS, api, input), "stack" convention only (see _callback).
        self._places: dict[tuple[Any, ...], Any] = {}
        # Callback results by value: frozen, so one object serves every equal result.
        self._results: dict[tuple[int, bytes, int, int], CallbackResult] = {}
        self._cache_places = profile.dispatcher == "stack"
        self._entry_of = entry_maker(profile, dispatcher)  # a cached frame's entry registers, from the trap's
        self._write_sysret = machine.regs.writer(_SYSRET)
        self._write_rax = machine.regs.writer(("rax",))
        # Faults become Windows exceptions ("deliver") or stop the run ("stop", [machine] exceptions).
        self.exceptions = "deliver"
        self.exception_dispatcher: int | None = None  # the loaded ntdll's KiUserExceptionDispatcher
        # Called with (previous, next) when another thread goes on the CPU (emu.hooks); None: no cost.
        self.on_switch: Callable[[KThread, KThread], None] | None = None
        machine.install(self.on_syscall, self.on_interrupt, handles_errors=True)
        port_io.install(machine)
        machine.exception_handler = self.on_trap

    # --- threads ------------------------------------------------------------------------
    def add_thread(self, thread: KThread) -> None:
        thread.name = thread.name or f"thread{thread.tid}"
        thread.service_ctx = ThreadServiceContext(self, thread)
        self.set_threads({**self.threads, thread.tid: thread})
        self.recorder.initial(thread)

    def set_threads(self, threads: dict[int, KThread]) -> None:
        self.threads = threads
        self._multithreaded = len(threads) > 1
        self.recorder.attach(threads)

    # --- entry --------------------------------------------------------------------------
    def on_syscall(self, uc: object = None, user_data: object = None) -> None:
        """The `syscall` hook, registered with Unicorn as it is (emu.machine.Machine.install): what it
        raises is handed to the machine, which stops the CPU and raises it from run()."""
        try:
            self._fill_all()
            vals: list[int] = self._all_list()
            # Intel SDM vol. 2B SYSCALL: RCX <- RIP of the next instruction, R11 <- RFLAGS.
            rip = vals[16] + 2
            vals[1] = vals[16] = rip
            vals[11] = vals[17]
            self._entry_len = 2  # Unicorn adds the instruction length to a RIP written here
            regs = tuple(vals)
            thread = self.current
            if not self._multithreaded and thread is not None:
                ssn = vals[0] & 0xFFFF_FFFF
                name = self.names.get(ssn)
                if self.recorder.observe is None:  # (these two record without an observer's look)
                    status = self._returns.get(name)  # type: ignore[arg-type]
                    if status is not None:
                        # The hot path: a service that only returns a status, one thread, nobody
                        # watching. SYSRET puts RAX = status and the SYSCALL clobbers back (RCX,
                        # R11); the user state after it has the stack bytes the entry state has.
                        thread.trap_frame = None
                        self._sysret_vals[:] = (status, rip, regs[11])
                        self._put_sysret()
                        self.recorder.syscall_sysret(thread, regs, name, ssn, status)  # type: ignore[arg-type]
                        return
                    if name == NT_CALLBACK_RETURN and thread.callback_stack:
                        thread.trap_frame = None
                        self._return_from_callback(thread, regs, ssn)
                        return
                if name is not None and name != NT_CALLBACK_RETURN and name not in _CONTEXT_SERVICES:
                    # What _enter does for any other service when one thread runs: record the
                    # entry (observed, when watched), then dispatch.
                    thread.trap_frame = None
                    self.recorder.entered("syscall", thread, "kernel", regs, name, ssn, None, "")
                    spec = self._scripts.get(name)
                    if spec is None:
                        self._dispatch(thread, regs, "syscall", ssn, name)
                        return
                    self._run_script(thread, regs, spec)
                    return
            self._enter(regs, "syscall")
        except BaseException as e:
            self.machine.hook_failed(e)

    def _run_script(self, thread: KThread, regs: tuple[int, ...], spec: ServiceSpec) -> None:
        """What :meth:`_dispatch` does for a scripted service of ``_scripts`` entered by
        `syscall` (its checks all pass for those), without them."""
        act = ScriptActivation(spec, [(spec.script, 0)], thread.service_ctx, [regs[10], regs[2], regs[8], regs[9]])  # type: ignore[list-item]
        self._start(thread, regs, "syscall", spec.name, act)

    def _return_from_callback(self, thread: KThread, regs: tuple[int, ...], ssn: int) -> None:
        """NtCallbackReturn completing a frame, one thread, nobody watching (the syscall hook's
        second fast path): what :meth:`_callback_return`, :meth:`_complete_callback`,
        :meth:`_drive` and :meth:`_sysret_resumed` do, in one call when the service that
        called back then returns a status at once; anything else carries on in :meth:`_drive`."""
        top = thread.callback_stack[-1]
        act = top.activation
        # As _complete_callback (WRK ke/amd64/callout.asm NtCallbackReturn).
        result_ptr, length, status = regs[10], regs[2] & 0xFFFF_FFFF, regs[8] & 0xFFFF_FFFF
        if length:
            output, detail = record_output(self.machine, result_ptr, length, self.profile.callback_output_limit)
        else:
            output, detail = b"", _NO_OUTPUT
        trap = top.trap
        back = tuple(trap.ctx)
        # The seed's state (the user side sits at ZwCallbackReturn), then back in the service.
        resuming = (act.position(), status, output, result_ptr, length)
        stack = self.recorder.callback_returned(
            thread, regs, NT_CALLBACK_RETURN, ssn, back, status, detail, output, resuming
        )
        key = (status, output, result_ptr, length)
        result = self._results.get(key)
        if result is None:
            result = CallbackResult(status, output, result_ptr, length)
            if len(self._results) >= 64:
                self._results.clear()
            self._results[key] = result
        writes = self.user_writes
        req = act.step(result)
        if not isinstance(req, int) or act.remark:
            drive(self, thread, act, trap, None, True, req)
            return
        # As _sysret_resumed: the service's own syscall's trap frame comes back, RAX = status.
        v = [*back]
        v[0] = req
        regs = tuple(v)
        v[16] -= self._entry_len  # RIP, as Unicorn will advance it
        self._all_out[:] = v
        self._put_all()
        service = act.spec.name
        if writes == self.user_writes:  # nothing written: the stack at RSP is the one just recorded
            self.recorder.sysret_over(thread, regs, service, self.ssn_table.get(service), req, stack)
            return
        self.recorder.sysret(thread, regs, service, self.ssn_table.get(service), req, "")

    def on_interrupt(self, uc: object, intno: int, user_data: object = None) -> None:
        vals = tuple(self._read_all())  # RIP is already past the `int` instruction
        self._entry_len = 0
        if intno == 0x2E:
            # KiSystemService: the legacy entry ntdll takes when KUSER_SHARED_DATA.SystemCall
            # is set (Win10 stub shape); INT/IRETQ leave RCX and R11 alone (Intel SDM).
            self._enter(vals, "int 2Eh")
            return
        # A CPU exception (#DE, #DB, #GP) or an `int n` other than 2Eh: the exception module
        # turns it into a Windows exception once the CPU has stopped (outside this hook).
        rip = vals[16]
        self.machine.raise_trap(Trap("interrupt", rip, f"interrupt {intno:#x} at {self.trace.symbolize(rip)}", intno))

    def on_trap(self, trap: Trap) -> bool:
        """A fault in user code (from the machine, outside any hook): see emu.kernel.exception."""
        self._entry_len = 0
        return exception.on_trap(self, trap)

    @property
    def entry_len(self) -> int:
        """Bytes Unicorn adds to a RIP written in the current hook (2 in a `syscall` hook)."""
        return self._entry_len

    def sysret_status(self, thread: KThread, regs: tuple[int, ...], via: str, status: int, service: str) -> None:
        """Return from a system call whose entry is recorded with only a status."""
        self._sysret_now(thread, regs, via, status, service, "")

    def _enter(self, regs: tuple[int, ...], via: str) -> None:
        thread = self.current
        if thread is None:
            raise ModelBug("system call with no current thread")
        ssn = regs[0] & 0xFFFF_FFFF
        name = self.names.get(ssn)
        thread.trap_frame = None
        if name == NT_CALLBACK_RETURN:
            self._callback_return(thread, regs, via, ssn)
            return
        if name in _CONTEXT_SERVICES and self.registry.get(name) is None:
            _CONTEXT_SERVICES[name](self, thread, regs, via, ssn)
            return
        self.recorder.syscall(thread, regs, name, ssn, name, False, _VIA[via])
        if self._multithreaded:
            if sched.yield_at_entry(self, thread, regs, via, name):
                return
        elif via == "syscall" and name is not None:
            status = self._constants.get(name)
            if status is not None:
                # The hot path: a service that only returns a status, one thread. SYSRET
                # puts RAX = status and the SYSCALL clobbers back (RCX, R11); the user
                # state after it has the stack bytes the entry state has.
                self._write_sysret((status, regs[1], regs[11]))
                stack = self.recorder.stack_of(thread.state_id)
                self.recorder.sysret(thread, (status, *regs[1:]), name, ssn, status, "", stack)
                return
        self._dispatch(thread, regs, via, ssn, name)

    def _dispatch(
        self, thread: KThread, regs: tuple[int, ...], via: str, ssn: int | None = None, name: str | None = None
    ) -> None:
        """Run the service for a system call whose entry is already recorded."""
        if ssn is None:
            ssn = regs[0] & 0xFFFF_FFFF
            name = self.names.get(ssn)
        if name == NT_CALLBACK_RETURN:
            if not thread.callback_stack:
                # NtCallbackReturn with no callback on the thread (ReactOS, Wine): served from its entry.
                self._sysret_now(thread, regs, via, STATUS_NO_CALLBACK_ACTIVE, name, "", reuse_stack=True)
                return
            self._complete_callback(thread, regs)
            return
        if name is None:
            # KiSystemCall64: an SSN beyond the service table's limit fails the call.
            self._sysret_now(thread, regs, via, STATUS_INVALID_SYSTEM_SERVICE, None, "")
            return
        spec = self.registry.get(name)
        if spec is None and name in _CONTEXT_SERVICES:
            _CONTEXT_SERVICES[name](self, thread, regs, via, ssn, False)
            return
        if spec is None:
            raise UnimplementedService(ssn, name)
        constant = self._constants.get(name)
        if constant is not None:
            # A scripted service that only returns a status: no activation needed.
            self._sysret_now(thread, regs, via, constant, name, "", reuse_stack=True)
            return
        args = [regs[10], regs[2], regs[8], regs[9]]
        extra = len(spec.arg_types) - 4 if spec.script is None else spec.script_args - 4
        if extra > 0:
            # Arguments 5+ sit above the return address and the 0x20 shadow space.
            raw = kernel_read(self.machine, regs[4] + 0x28, 8 * extra) or bytes(8 * extra)
            args += [int.from_bytes(raw[i : i + 8], "little") for i in range(0, 8 * extra, 8)]
        self._start(thread, regs, via, name, spec.activate(thread.service_ctx, args))  # type: ignore[arg-type]

    def _start(
        self, thread: KThread, regs: tuple[int, ...], via: str, name: str, act: Activation | ScriptActivation
    ) -> None:
        """Run a new activation to its first request: a status returned at once goes back by
        sysret; a callback enters KiUserCallbackDispatcher; anything else is driven."""
        writes = self.user_writes
        req = act.step(None)
        if isinstance(req, int) and writes == self.user_writes:
            # The common case: the service returns at once and wrote nothing, so the
            # user-mode state after sysret has the stack bytes the entry state has.
            self._sysret_now(thread, regs, via, req, name, "", reuse_stack=True)
            return
        trap = KTrapFrame(_context(UserContext, regs), via)
        if type(req) is UserCallback and self._callback(thread, act, trap, req, "") is None:
            return  # in KiUserCallbackDispatcher (what _drive would do first, one frame fewer)
        drive(self, thread, act, trap, None, False, req)

    # --- returning to user mode ------------------------------------------------------
    def _sysret_now(
        self, thread: KThread, regs: tuple[int, ...], via: str, status: int, service: str | None,
        note: str, reuse_stack: bool = False,
    ) -> None:  # fmt: skip
        """Return to the instruction after the entry: only RAX (and the SYSCALL clobbers RCX/R11) change."""
        if via == "syscall":
            self._write_sysret((status, regs[1], regs[11]))
        else:
            self._write_rax((status,))
        ssn = self.ssn_table.get(service) if service else None
        stack = self.recorder.stack_of(thread.state_id) if reuse_stack else None
        self.recorder.sysret(thread, (status,) + regs[1:], service, ssn, status, note, stack)

    def _sysret_resumed(self, thread: KThread, trap: KTrapFrame, status: int, service: str, note: str) -> None:
        """Return from a service that called back: its own syscall's trap frame is restored
        (ReactOS NtCallbackReturn restores Thread->TrapFrame), RAX = status."""
        v = [*trap.ctx]
        v[0] = status  # RAX
        regs = tuple(v)
        v[16] -= self._entry_len  # RIP, as Unicorn will advance it
        self._all_out[:] = v
        self._put_all()
        self.recorder.sysret(thread, regs, service, self.ssn_table.get(service), status, note)

    # --- callbacks ----------------------------------------------------------------------
    def _callback(
        self, thread: KThread, act: Activation | ScriptActivation, trap: KTrapFrame, req: UserCallback, note: str
    ) -> tuple[int, str] | None:
        """Enter KiUserCallbackDispatcher, or say why KeUserModeCallback fails: (status, reason)."""
        depth = len(thread.callback_stack)
        if req.by_depth:
            req = UserCallback(req.api_at(depth), req.data, message=req.message)
        ctx, api, data, machine = trap.ctx, req.api, req.data, self.machine
        # The same frame from the same RSP, RIP, RFLAGS, input and depth: checked, laid out and probed once.
        key = (ctx[4], ctx[16], ctx[17], api, data, depth)
        cache = self._cache_places and type(data) is bytes
        place = self._places.get(key) if cache else None
        if place is None or place[4] is not machine.regions or place[5] != thread.stack_limit:
            got = prepare_callout(self, thread, ctx, api, bytes(data), depth)
            if len(got) == 2:
                return got  # refused: (status, reason)
            place = got
            if cache:
                if len(self._places) >= 64:
                    self._places.clear()
                self._places[key] = place
            out = place[0]
            entry = out.entry
        else:
            out = place[0]
            # The registers depend on every trap register: derived anew (the cache holds the
            # "stack" convention's layouts only).
            entry = self._entry_of(ctx, out.frame)
        slot = place[6]
        if slot is not None and machine.cow is None and machine.write_watch is None:
            slot[0][slot[1] : slot[2]] = place[3]  # as machine.write would, without its search
        else:
            machine.write(place[2], place[3])
        cbs = thread.callback_stack
        name = act.spec.name
        # The frames as a state records them (emu.kernel.record), from the one below when it has them.
        under = cbs[-1].chain if cbs else ()
        chain = None if under is None else (*under, (api, name))
        cbs.append(CallbackFrame(act, trap, api, out.frame, req.message, out.buffer, chain))
        if depth >= self.max_depth:
            self.max_depth = depth + 1
        put = place[1]
        values = put[1]
        values[:] = entry
        values[16] -= self._entry_len  # RIP, as Unicorn will advance it
        put[0]()  # the registers, and the XMM registers the kernel scrubs, in one C call
        self.recorder.entered("callback", thread, "user", entry, name, None, api, note)
        return None

    def _callback_return(self, thread: KThread, regs: tuple[int, ...], via: str, ssn: int) -> None:
        if not thread.callback_stack:
            # NtCallbackReturn with no callback on the thread (ReactOS, Wine).
            self.recorder.syscall(thread, regs, NT_CALLBACK_RETURN, ssn, NT_CALLBACK_RETURN, False, _VIA[via])
            self._sysret_now(thread, regs, via, STATUS_NO_CALLBACK_ACTIVE, NT_CALLBACK_RETURN, "", reuse_stack=True)
            return
        service = thread.callback_stack[-1].activation.spec.name
        # The seed's state: the user side sits at ZwCallbackReturn while the kernel completes the callback.
        self.recorder.syscall(thread, regs, NT_CALLBACK_RETURN, ssn, service, True, _VIA[via])
        if self._multithreaded and sched.yield_at_entry(self, thread, regs, via, NT_CALLBACK_RETURN):
            return
        self._complete_callback(thread, regs)

    def _complete_callback(self, thread: KThread, regs: tuple[int, ...]) -> None:
        top = thread.callback_stack.pop()
        service = top.activation.spec.name
        # WRK ke/amd64/callout.asm NtCallbackReturn: store the Result pointer and length for
        # KeUserModeCallback's caller and return the callback's Status unchanged; copying is
        # the caller's business (emu.kernel.result). The trace keeps what the bytes held now.
        result_ptr, length, status = regs[10], regs[2] & 0xFFFF_FFFF, regs[8] & 0xFFFF_FFFF
        if length:
            output, detail = record_output(self.machine, result_ptr, length, self.profile.callback_output_limit)
        else:
            output, detail = b"", _NO_OUTPUT
        thread.resuming = (top.activation.position(), status, output, result_ptr, length)
        self.recorder.callback_return(thread, tuple(top.trap.ctx), service, status, top.api, detail, output)
        result = CallbackResult(status, output, result_ptr, length)
        drive(self, thread, top.activation, top.trap, result, resumed=True)

    def _exit(self, thread: KThread, status: int, service: str) -> None:
        thread.terminated = True
        thread.exit_status = status
        sched.abandon(self, thread)
        regs = self.recorder.context_of(thread.state_id)
        self.recorder.exit(thread, regs, service, self.ssn_table.get(service), status)
        sched.reschedule(self, thread)

    def record_fault(self, thread: KThread, error: EmuError) -> None:
        thread.terminated = True
        self.recorder.fault(thread, tuple(self.machine.regs.context()), str(error))

    # --- threads switching (the rules are emu.kernel.sched; the work is emu.kernel.driving) -
    def continue_thread(self, thread: KThread) -> None:
        """Put a thread on the CPU (outside any hook) and carry on with its kernel work, if any."""
        driving.continue_thread(self, thread)

    def resume(self, option: str | int) -> None:
        """Continue the suspended service with ``option`` (a symbolic request: a value) (outside any hook)."""
        driving.resume(self, option)
