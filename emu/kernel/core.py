"""The kernel model: system call entry and exit, callbacks into user mode, NtCallbackReturn.

Entered from the machine's ``syscall`` (or ``int 2Eh``) hook. Applies the
architectural effects Unicorn leaves out, runs the service for the SSN, and leaves
the CPU either where the service returns (sysret) or at KiUserCallbackDispatcher
(callback). Every crossing is recorded in the trace as a transition between states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from unicorn import UcError

from emu.context import KTrapFrame, UserContext
from emu.errors import BudgetExceeded, EmuError, KernelError, MachineFault, UnimplementedService
from emu.kernel import sched
from emu.kernel.objects import (
    Mutant,
    ObjectTable,
    ReceiveMessage,
    ReleaseMutant,
    ReplyMessage,
    SendMessage,
    SetEvent,
    Wait,
)
from emu.kernel.services import (
    Activation,
    CallbackResult,
    Choice,
    Request,
    ScriptActivation,
    Sent,
    ServiceRegistry,
    TerminateThread,
    UserCallback,
)
from emu.machine import Machine
from emu.profile import Profile
from emu.trace import Mode, Trace, TransitionKind
from emu.winnt import (
    KGDT64_R3_CODE,
    KGDT64_R3_DATA,
    STATUS_ACCESS_VIOLATION,
    STATUS_INVALID_SYSTEM_SERVICE,
    STATUS_NO_CALLBACK_ACTIVE,
    STATUS_STACK_OVERFLOW,
    UCALLOUT_API_NUMBER,
    UCALLOUT_BUFFER,
    UCALLOUT_FRAME_SIZE,
    UCALLOUT_LENGTH,
    UCALLOUT_MF_EFLAGS,
    UCALLOUT_MF_RIP,
    UCALLOUT_MF_RSP,
    UCALLOUT_MF_SEGCS,
    UCALLOUT_MF_SEGSS,
    status_name,
)

NT_CALLBACK_RETURN = "NtCallbackReturn"
STACK_CAPTURE_LIMIT = 0x10000  # bytes of user stack kept per state
_ALL = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")  # fmt: skip
_SYSRET = ("rax", "rcx", "r11")
OBJECT_REQUESTS = (Wait, SetEvent, ReleaseMutant, SendMessage, ReceiveMessage, ReplyMessage)
_VIA = {"syscall": "", "int 2Eh": "entered via int 2Eh"}


@dataclass
class CallbackFrame:
    """One KeUserModeCallback in progress (an entry of KTHREAD.CallbackStack)."""

    activation: Activation | ScriptActivation
    trap: KTrapFrame  # the user context of the syscall whose service called back
    api: int
    user_frame: int  # address of the UCALLOUT_FRAME on the user stack
    message_id: int | None = None  # the sent message this callback handles, if any


@dataclass(frozen=True)
class PendingChoice:
    """A service suspended at a Choice, waiting for the explorer to pick an option."""

    tid: int
    activation: Activation | ScriptActivation | None  # None: a scheduling choice
    trap: KTrapFrame | None
    resumed: bool
    note: str
    choice: Choice
    at_entry: bool = False  # a scheduling choice at this thread's system call entry


@dataclass
class KThread:
    """A thread as the kernel model sees it. Several may exist; one runs at a time."""

    tid: int
    teb: int
    stack_base: int
    stack_limit: int
    entry_context: UserContext
    callback_stack: list[CallbackFrame] = field(default_factory=list)
    mode: Mode = "user"
    state_id: int = 0
    terminated: bool = False
    exit_status: int | None = None
    trap_frame: KTrapFrame | None = None
    context: UserContext | None = None  # saved user context while not on the CPU
    service_ctx: ThreadServiceContext | None = None
    # In kernel mode after a callback returned: what the resuming service is about to get
    # (its position, the status and output). Part of the state's identity when exploring.
    resuming: tuple[object, ...] | None = None
    name: str = ""
    started: bool = False
    suspended: sched.Suspended | None = None  # kernel work off the CPU (see emu.kernel.sched)

    @property
    def running(self) -> bool:
        """On the CPU (or about to be): started, not suspended, not finished."""
        return self.started and self.suspended is None and not self.terminated


class ThreadServiceContext:
    """What a service sees: the calling thread's id and user memory."""

    def __init__(self, kernel: Kernel, thread: KThread) -> None:
        self._kernel = kernel
        self.thread_id = thread.tid

    def read(self, address: int, size: int) -> bytes:
        return self._kernel.machine.read(address, size)

    def write(self, address: int, data: bytes) -> None:
        self._kernel.user_writes += 1
        self._kernel.machine.write(address, data)


class Kernel:
    """System service dispatch, callback stacks and the trace of every crossing.

    Register values travel as plain lists on the hot path (a syscall whose service
    returns at once); ``UserContext`` tuples are built only where a callback needs one.
    """

    def __init__(
        self,
        machine: Machine,
        profile: Profile,
        registry: ServiceRegistry,
        trace: Trace,
        dispatcher: int,
        callback_depth_budget: int | None = None,
        ssn_table: dict[str, int] | None = None,
        state_budget: int | None = None,
        output_budget: int | None = None,
    ) -> None:
        self.machine = machine
        self.profile = profile
        self.registry = registry
        self.trace = trace
        self.dispatcher = dispatcher
        self.callback_depth_budget = callback_depth_budget
        # The service table: from the loaded ntdll's code when there is one, else the profile.
        self.ssn_table: dict[str, int] = dict(ssn_table if ssn_table is not None else profile.ssn)
        self.names: dict[int, str] = {ssn: name for name, ssn in sorted(self.ssn_table.items())}
        self.threads: dict[int, KThread] = {}
        self._multithreaded = False
        # Services that do nothing but return a status (scripted), by name: the fast path.
        self._constants: dict[str, int] = {
            n: c for n in registry.names() if (spec := registry.get(n)) is not None and (c := spec.constant) is not None
        }
        self.current: KThread | None = None
        self.max_depth = 0
        self.state_budget = state_budget
        self.output_budget = output_budget
        self.output_bytes = 0
        self.user_writes = 0  # bumped by service writes: a sysret state may reuse the entry's stack bytes
        # How a Choice is answered: an option name, or None to suspend (exploration).
        self.choose: Callable[[KThread, Choice], str | None] = lambda thread, choice: choice.default
        self.pending_choice: PendingChoice | None = None
        self.objects = ObjectTable()
        self.next_thread: KThread | None = None  # chosen to run after the current one stopped
        self.deadlock: list[str] = []  # wait chains, when no thread can run but some wait
        self.visible: Callable[[str | None], bool] = lambda name: True
        # Called with (state id, thread) after each recorded state (exploration computes digests).
        self.observer: Callable[[int, KThread], None] | None = None
        self._entry_len = 2  # bytes Unicorn adds to a RIP written in the current hook
        self._read_all = machine.regs.reader(_ALL)
        self._write_sysret = machine.regs.writer(_SYSRET)
        self._write_rax = machine.regs.writer(("rax",))
        machine.install(self.on_syscall, self.on_interrupt)

    # --- threads ------------------------------------------------------------------------
    @property
    def state_budget(self) -> int | None:
        return self._state_budget

    @state_budget.setter
    def state_budget(self, value: int | None) -> None:
        self._state_budget = value
        self._state_limit = value if value is not None else 1 << 62  # one int compare on the hot path

    @property
    def output_budget(self) -> int | None:
        return self._output_budget

    @output_budget.setter
    def output_budget(self, value: int | None) -> None:
        self._output_budget = value
        self._output_limit = value if value is not None else 1 << 62

    def add_thread(self, thread: KThread) -> None:
        thread.name = thread.name or f"thread{thread.tid}"
        self.threads[thread.tid] = thread
        self._multithreaded = len(self.threads) > 1
        thread.service_ctx = ThreadServiceContext(self, thread)
        thread.state_id = len(self.trace.raw_states)
        self.trace.raw_states.append((
            thread.state_id, thread.tid, "user", tuple(thread.entry_context),
            self._capture(thread, thread.entry_context.rsp), thread.stack_base, 0, None, None, False, (),
        ))  # fmt: skip

    # --- entry --------------------------------------------------------------------------
    def on_syscall(self, uc: object = None, user_data: object = None) -> None:
        vals = self._read_all()
        # Intel SDM vol. 2B SYSCALL: RCX <- RIP of the next instruction, R11 <- RFLAGS.
        rip = vals[16] + 2
        vals[1] = vals[16] = rip
        vals[11] = vals[17]
        self._entry_len = 2  # Unicorn adds the instruction length to a RIP written here
        self._enter(tuple(vals), "syscall")

    def on_interrupt(self, uc: object, intno: int, user_data: object = None) -> None:
        vals = tuple(self._read_all())  # RIP is already past the `int` instruction
        self._entry_len = 0
        if intno == 0x2E:
            # KiSystemService: the legacy entry ntdll takes when KUSER_SHARED_DATA.SystemCall
            # is set (Win10 stub shape); INT/IRETQ leave RCX and R11 alone (Intel SDM).
            self._enter(vals, "int 2Eh")
            return
        what = "breakpoint (int3)" if intno == 3 else f"interrupt {intno:#x}"
        rip = vals[16]
        where = self.trace.symbolize(rip - (1 if intno == 3 else 2))
        raise MachineFault(f"{what} at {where}", rip, where)

    def _enter(self, regs: tuple[int, ...], via: str) -> None:
        thread = self.current
        if thread is None:
            raise KernelError("system call with no current thread")
        ssn = regs[0] & 0xFFFF_FFFF
        name = self.names.get(ssn)
        thread.trap_frame = None
        if name == NT_CALLBACK_RETURN:
            self._callback_return(thread, regs, via, ssn)
            return
        self._record("syscall", thread, "kernel", regs, name, ssn, None, None, name, False, _VIA[via], b"", None)
        if self._multithreaded:
            if self._schedule_at_entry(thread, regs, via, name):
                return
        elif via == "syscall" and name is not None:
            status = self._constants.get(name)
            if status is not None:
                # The hot path: a service that only returns a status, one thread. SYSRET
                # puts RAX = status and the SYSCALL clobbers back (RCX, R11); the user
                # state after it has the stack bytes the entry state has.
                self._write_sysret((status, regs[1], regs[11]))
                stack = self.trace.raw_states[thread.state_id][4]
                self._record(
                    "sysret", thread, "user", (status, *regs[1:]), name, ssn, status, None, None, False, "", b"", stack
                )
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
            self._complete_callback(thread, regs, via, ssn)
            return
        if name is None:
            # KiSystemCall64: an SSN beyond the service table's limit fails the call.
            self._sysret_now(thread, regs, via, STATUS_INVALID_SYSTEM_SERVICE, None, "")
            return
        spec = self.registry.get(name)
        if spec is None:
            raise UnimplementedService(ssn, name)
        constant = self._constants.get(name)
        if constant is not None:
            # A scripted service that only returns a status: no activation needed.
            self._sysret_now(thread, regs, via, constant, name, "", reuse_stack=True)
            return
        args = [regs[10], regs[2], regs[8], regs[9]]
        extra = len(spec.arg_types) - 4 if spec.script is None else 0
        if extra > 0:
            # Arguments 5+ sit above the return address and the 0x20 shadow space.
            raw = self._read_user(regs[4] + 0x28, 8 * extra) or bytes(8 * extra)
            args += [int.from_bytes(raw[i : i + 8], "little") for i in range(0, 8 * extra, 8)]
        act = spec.activate(thread.service_ctx, args)  # type: ignore[arg-type]
        writes = self.user_writes
        req = act.step(None)
        if isinstance(req, int) and writes == self.user_writes:
            # The common case: the service returns at once and wrote nothing, so the
            # user-mode state after sysret has the stack bytes the entry state has.
            self._sysret_now(thread, regs, via, req, name, "", reuse_stack=True)
            return
        self._drive(thread, act, KTrapFrame(UserContext._make(regs), via), None, False, req)

    # --- service driving ----------------------------------------------------------------
    def _drive(
        self, thread: KThread, act: Activation | ScriptActivation, trap: KTrapFrame,
        value: Sent, resumed: bool, first: Request | int | None = None, note: str = "",
    ) -> None:  # fmt: skip
        req = first if first is not None else act.step(value)
        while True:
            if isinstance(req, Choice):
                option = self.choose(thread, req)
                if option is None:
                    # Suspend here: the explorer forks the machine and resumes with each option.
                    self.pending_choice = PendingChoice(thread.tid, act, trap, resumed, note, req)
                    self.machine.request_stop()
                    return
                req = act.step(option)
                continue
            if isinstance(req, int):
                if resumed:
                    self._sysret_resumed(thread, trap, req, act.spec.name, note)
                else:
                    self._sysret_now(thread, trap.ctx, trap.via, req, act.spec.name, note)
                return
            if isinstance(req, TerminateThread):
                self._exit(thread, req.status, act.spec.name)
                return
            if isinstance(req, OBJECT_REQUESTS):
                done, value = sched.handle_request(self, thread, req)
                if not done:
                    on = sched.waits_on(thread, req, self)
                    timeout = isinstance(req, Wait) and req.timeout
                    self._block(thread, act, trap, resumed, note, on, timeout)
                    return
                req = act.step(value)
                continue
            depth = len(thread.callback_stack)
            failure: CallbackResult | None
            if depth >= self.profile.callback_depth_limit:
                # KeUserModeCallback cannot grow the kernel stack any further.
                failure = CallbackResult(STATUS_STACK_OVERFLOW)
                why = f"depth limit {self.profile.callback_depth_limit}"
            else:
                if self.callback_depth_budget is not None and depth >= self.callback_depth_budget:
                    raise BudgetExceeded(
                        "callback_depth", self.callback_depth_budget, self.trace.symbolize(trap.ctx.rip)
                    )
                failure = self._callback(thread, act, trap, req, note)
                if failure is None:
                    return
                why = "the callout frame does not fit on the user stack"
            note = (
                note + "; " if note else ""
            ) + f"callback api {req.api} refused: {status_name(failure.status)} ({why})"
            req = act.step(failure)

    def _sysret_now(
        self, thread: KThread, regs: tuple[int, ...], via: str, status: int, service: str | None,
        note: str, reuse_stack: bool = False,
    ) -> None:  # fmt: skip
        """Return to the instruction after the entry: only RAX (and the SYSCALL clobbers RCX/R11) change."""
        if via == "syscall":
            self._write_sysret((status, regs[1], regs[11]))
        else:
            self._write_rax((status,))
        user = (status,) + regs[1:]
        ssn = self.ssn_table.get(service) if service else None
        stack = self.trace.raw_states[thread.state_id][4] if reuse_stack else None
        self._record("sysret", thread, "user", user, service, ssn, status, None, None, False, note, b"", stack)

    def _sysret_resumed(self, thread: KThread, trap: KTrapFrame, status: int, service: str, note: str) -> None:
        """Return from a service that called back: its own syscall's trap frame is restored
        (ReactOS NtCallbackReturn restores Thread->TrapFrame), RAX = status."""
        ctx = trap.ctx._replace(rax=status)
        self.machine.regs.set_context(ctx._replace(rip=ctx.rip - self._entry_len))
        ssn = self.ssn_table.get(service)
        self._record("sysret", thread, "user", tuple(ctx), service, ssn, status, None, None, False, note, b"", None)

    def _callback(
        self, thread: KThread, act: Activation | ScriptActivation, trap: KTrapFrame, req: UserCallback, note: str
    ) -> CallbackResult | None:
        """Enter KiUserCallbackDispatcher; returns a failure result instead if the frame cannot be built."""
        if req.by_depth:
            req = UserCallback(req.api_at(len(thread.callback_stack)), req.data, message=req.message)
        data = bytes(req.data)
        old = trap.ctx.rsp
        # ReactOS KeUserModeCallback (ntoskrnl/ke/amd64/usercall.c): the input goes to
        # ALIGN_DOWN(OldRsp - Length, 16) - 8 and the UCALLOUT_FRAME right below it, so
        # the frame (and RSP at the dispatcher) is 16-byte aligned.
        buffer = ((old - len(data)) & ~0xF) - 8
        frame = buffer - UCALLOUT_FRAME_SIZE
        lowest = frame if self.profile.dispatcher == "stack" else frame - 8
        if lowest < thread.stack_limit or not self.machine.readable(lowest, old - lowest):
            # ProbeForWrite of the frame fails: KeUserModeCallback returns the exception code.
            return CallbackResult(STATUS_ACCESS_VIOLATION)
        block = bytearray(UCALLOUT_FRAME_SIZE)
        for off, val, size in (
            (UCALLOUT_BUFFER, buffer, 8), (UCALLOUT_LENGTH, len(data), 4), (UCALLOUT_API_NUMBER, req.api, 4),
            (UCALLOUT_MF_RIP, trap.ctx.rip, 8), (UCALLOUT_MF_SEGCS, KGDT64_R3_CODE, 8),
            (UCALLOUT_MF_EFLAGS, trap.ctx.rflags, 8), (UCALLOUT_MF_RSP, old, 8), (UCALLOUT_MF_SEGSS, KGDT64_R3_DATA, 8),
        ):  # fmt: skip
            block[off : off + size] = (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self.machine.write(frame, bytes(block) + data)
        if self.profile.dispatcher == "stack":
            user = trap.ctx._replace(rsp=frame, rip=self.dispatcher)
        else:
            # "registers" convention: entered like a call, ECX = api, RDX = buffer, R8D = length.
            self.machine.write_u64(frame - 8, 0)
            user = trap.ctx._replace(rsp=frame - 8, rip=self.dispatcher, rcx=req.api, rdx=buffer, r8=len(data))
        thread.callback_stack.append(CallbackFrame(act, trap, req.api, frame, req.message))
        self.max_depth = max(self.max_depth, len(thread.callback_stack))
        self.machine.regs.set_context(user._replace(rip=self.dispatcher - self._entry_len))
        name = act.spec.name
        self._record("callback", thread, "user", tuple(user), name, None, None, req.api, name, False, note, b"", None)
        return None

    def _callback_return(self, thread: KThread, regs: tuple[int, ...], via: str, ssn: int) -> None:
        if not thread.callback_stack:
            # NtCallbackReturn with no callback on the thread (ReactOS, Wine).
            self._record(
                "syscall",
                thread,
                "kernel",
                regs,
                NT_CALLBACK_RETURN,
                ssn,
                None,
                None,
                NT_CALLBACK_RETURN,
                False,
                _VIA[via],
                b"",
                None,
            )
            self._sysret_now(thread, regs, via, STATUS_NO_CALLBACK_ACTIVE, NT_CALLBACK_RETURN, "", reuse_stack=True)
            return
        top = thread.callback_stack[-1]
        service = top.activation.spec.name
        # The seed's state: the user side waits at ZwCallbackReturn while the kernel completes the callback.
        self._record(
            "syscall", thread, "kernel", regs, NT_CALLBACK_RETURN, ssn, None, None, service, True, _VIA[via], b"", None
        )
        if self._schedule_at_entry(thread, regs, via, NT_CALLBACK_RETURN):
            return
        self._complete_callback(thread, regs, via, ssn)

    def _complete_callback(self, thread: KThread, regs: tuple[int, ...], via: str, ssn: int) -> None:
        top = thread.callback_stack[-1]
        service = top.activation.spec.name
        thread.callback_stack.pop()
        result_ptr, length, status = regs[10], regs[2] & 0xFFFF_FFFF, regs[8] & 0xFFFF_FFFF
        detail = ""
        output = b""
        if length:
            n = min(length, self.profile.callback_output_limit)
            if n < length:
                detail = f"output truncated to the model's limit of {n:#x} bytes; "
            got = self._read_user(result_ptr, n)
            if got is None:
                # The kernel's copy of the result faults: the caller gets the exception code.
                status, detail = STATUS_ACCESS_VIOLATION, f"result buffer {result_ptr:#x} is not readable; "
            else:
                output = got
        detail += f"{len(output)} byte(s) of output"
        thread.resuming = (top.activation.position(), status, output)
        self._record(
            "callback_return",
            thread,
            "kernel",
            tuple(top.trap.ctx),
            service,
            None,
            status,
            top.api,
            service,
            False,
            detail,
            output,
            None,
        )
        self._drive(thread, top.activation, top.trap, CallbackResult(status, output), resumed=True)

    def _exit(self, thread: KThread, status: int, service: str) -> None:
        thread.terminated = True
        thread.exit_status = status
        for handle, m in self.objects.objects.items():
            if isinstance(m, Mutant) and m.owner == thread.tid:
                # The owner ended: the mutant is abandoned and passes on (MS docs, "Mutex Objects";
                # Windows reports STATUS_ABANDONED_WAIT_0 to the next owner, the model success).
                m.owner, m.count = None, 0
                sched.satisfy_waiters(self, handle)
        regs = self.trace.raw_states[thread.state_id][3]
        self._record(
            "exit",
            thread,
            "exited",
            regs,
            service,
            self.ssn_table.get(service),
            status,
            None,
            None,
            False,
            "",
            b"",
            None,
        )
        self._reschedule(thread)

    # --- several threads --------------------------------------------------------------
    def _block(
        self, thread: KThread, act: Activation | ScriptActivation, trap: KTrapFrame, resumed: bool, note: str,
        on: tuple[object, ...], timeout: bool,
    ) -> None:  # fmt: skip
        """The thread waits: off the CPU until an object, a message or a reply wakes it."""
        thread.suspended = sched.Suspended("blocked", trap, act, resumed, note, on, timeout)
        what = self._describe_wait(on)
        service = act.spec.name
        self._record(
            "block", thread, "kernel", tuple(trap.ctx), service, None, None, None, service, False, what, b"", None
        )
        self._reschedule(thread)

    def _describe_wait(self, on: tuple[object, ...]) -> str:
        if on and on[0] == "object":
            return f"waits on {self.objects.name(int(str(on[1])))}"
        if on and on[0] == "reply":
            return "waits for the reply to a sent message"
        return "waits for a sent message"

    def _reschedule(self, stopped: KThread) -> None:
        """The running thread stopped (blocked or exited): choose who runs next, or note a deadlock."""
        self.machine.request_stop()
        self.next_thread = None
        choice = sched.schedule_choice(self, None, at_entry=False)
        if choice is None:
            waiting = [t for t in self.threads.values() if t.suspended is not None and not t.terminated]
            if waiting:
                self.deadlock = sched.wait_chains(self)
            return
        option = self.choose(stopped, choice)
        if option is None:
            self.pending_choice = PendingChoice(stopped.tid, None, None, False, "", choice)
            return
        self._take(option)

    def _schedule_at_entry(self, thread: KThread, regs: tuple[int, ...], via: str, name: str | None) -> bool:
        """At a visible entry, another thread may go first (exploration); True if this one yields."""
        if len(self.threads) < 2 or not self.visible(name):
            return False
        choice = sched.schedule_choice(self, thread, at_entry=True)
        if choice is None:
            return False
        trap = KTrapFrame(UserContext._make(regs), via)
        option = self.choose(thread, choice)
        if option is None:
            self.pending_choice = PendingChoice(thread.tid, None, trap, False, "", choice, at_entry=True)
            self.machine.request_stop()
            return True
        if option == thread.name:
            return False
        thread.suspended = sched.Suspended("entry", trap)
        self.machine.request_stop()
        self._take(option)
        return True

    def _take(self, option: str) -> None:
        """Make the thread an option names the next to run (``name times out``: its wait expires first)."""
        name = option.removesuffix(sched.TIMES_OUT)
        target = next((t for t in self.threads.values() if t.name == name), None)
        if target is None:
            raise KernelError(f"no thread named {name!r} to schedule")
        if option.endswith(sched.TIMES_OUT):
            sched.time_out(self, target)
        self.next_thread = target

    def continue_thread(self, thread: KThread) -> None:
        """Put a thread on the CPU (outside any hook) and carry on with its kernel work, if any."""
        self.current = thread
        self.next_thread = None
        self._entry_len = 0
        self.machine.set_gs_base(thread.teb)
        if not thread.started:
            thread.started = True
            self.machine.regs.set_context(thread.entry_context)
            return
        s = thread.suspended
        if s is None:
            return
        thread.suspended = None
        self.machine.regs.set_context(s.trap.ctx)
        if s.kind == "entry":
            self._dispatch(thread, tuple(s.trap.ctx), s.trap.via)
        elif s.activation is not None:
            self._drive(thread, s.activation, s.trap, s.wake, s.resumed, None, s.note)

    def record_fault(self, thread: KThread, error: EmuError) -> None:
        thread.terminated = True
        regs = tuple(self.machine.regs.context())
        self._record("fault", thread, "exited", regs, None, None, None, None, None, False, str(error), b"", None)

    # --- recording ----------------------------------------------------------------------
    def _read_user(self, address: int, size: int) -> bytes | None:
        try:
            return self.machine.read(address, size)
        except UcError:
            return None

    def _capture(self, thread: KThread, rsp: int) -> bytes:
        """The user stack from RSP to its base (capped), as a debugger could read it."""
        if not thread.stack_limit <= rsp < thread.stack_base:
            return b""
        return self._read_user(rsp, min(thread.stack_base - rsp, STACK_CAPTURE_LIMIT)) or b""

    def _record(
        self, kind: TransitionKind, thread: KThread, mode: Mode, regs: tuple[int, ...], name: str | None,
        ssn: int | None, status: int | None, api: int | None, service: str | None, pending: bool,
        detail: str, data: bytes, stack: bytes | None,
    ) -> None:  # fmt: skip
        """Append one state and the transition into it (plain tuples; see Trace)."""
        trace = self.trace
        sid = len(trace.raw_states)
        cbs = thread.callback_stack
        depth = len(cbs)
        top_api = cbs[-1].api if cbs else None
        if service is None and cbs and mode == "user":
            service = cbs[-1].activation.spec.name
        if sid >= self._state_limit and self.state_budget is not None:
            raise BudgetExceeded("states", self.state_budget, trace.symbolize(regs[16]))
        if stack is None:
            stack = self._capture(thread, regs[4])
            self.output_bytes += len(stack)
            if self.output_bytes > self._output_limit and self.output_budget is not None:
                raise BudgetExceeded("output_bytes", self.output_budget, trace.symbolize(regs[16]))
        frames = tuple([(f.api, f.activation.spec.name) for f in cbs]) if cbs else ()
        trace.raw_states.append(
            (sid, thread.tid, mode, regs, stack, thread.stack_base, depth, service, top_api, pending, frames)
        )
        trace.raw_transitions.append(
            (len(trace.raw_transitions), kind, thread.tid, thread.state_id, sid, name, ssn, regs[16], regs[4], depth, status, api, detail, data)
        )  # fmt: skip
        thread.state_id = sid
        thread.mode = mode
        if thread.resuming is not None and kind != "callback_return":
            thread.resuming = None
        if self.observer is not None:
            self.observer(sid, thread)

    # --- forking ------------------------------------------------------------------------
    def resume(self, option: str) -> None:
        """Continue the suspended service with ``option`` (outside any hook: RIP is written as is)."""
        pending = self.pending_choice
        if pending is None:
            raise KernelError("no choice is pending")
        self.pending_choice = None
        thread = self.threads[pending.tid]
        self._entry_len = 0
        if pending.activation is None:  # a scheduling choice
            if pending.at_entry and pending.trap is not None:
                if option == thread.name:
                    self.current = thread
                    self._dispatch(thread, tuple(pending.trap.ctx), pending.trap.via)
                    return
                thread.suspended = sched.Suspended("entry", pending.trap)
            self._take(option)
            return
        self.current = thread
        if pending.trap is None:
            raise KernelError("a suspended service lost its trap frame")
        self._drive(thread, pending.activation, pending.trap, option, pending.resumed, None, pending.note)

    def save(self) -> KernelState:
        """Everything the kernel model knows, copied so the original may go on changing."""
        p = self.pending_choice
        if p is not None and p.activation is not None:
            p = dataclasses.replace(p, activation=p.activation.fork())
        return KernelState(
            {tid: _copy_thread(t) for tid, t in self.threads.items()},
            None if self.current is None else self.current.tid,
            self.max_depth,
            p,
            self.objects.copy(),
            None if self.next_thread is None else self.next_thread.tid,
            list(self.deadlock),
        )

    def load(self, state: KernelState) -> None:
        """Make ``state`` current (copied again, so one saved state can be loaded many times)."""
        self.threads = {tid: _copy_thread(t) for tid, t in state.threads.items()}
        self._multithreaded = len(self.threads) > 1
        for t in self.threads.values():
            t.service_ctx = ThreadServiceContext(self, t)
        self.current = None if state.current is None else self.threads[state.current]
        self.max_depth = state.max_depth
        p = state.pending_choice
        if p is not None and p.activation is not None:
            p = dataclasses.replace(p, activation=p.activation.fork())
        self.pending_choice = p
        self.objects = state.objects.copy()
        self.next_thread = None if state.next_thread is None else self.threads[state.next_thread]
        self.deadlock = list(state.deadlock)

    def digest_key(self, thread: KThread) -> tuple[object, ...]:
        """The kernel-model part of a state's identity: every thread's callback stack, wait and fate, and the objects."""
        threads = []
        for t in self.threads.values():
            frames = tuple(
                (f.api, f.user_frame, tuple(f.trap.ctx), f.activation.position(), f.message_id)
                for f in t.callback_stack
            )
            waiting = None if t.suspended is None else t.suspended.key()
            entry = None if t.started else tuple(t.entry_context)
            threads.append((t.tid, t.mode, t.started, t.terminated, t.exit_status, frames, waiting, entry, t.resuming))
        pending = None
        if self.pending_choice is not None:
            p = self.pending_choice
            pos = p.activation.position() if p.activation is not None else None
            pending = (p.tid, p.choice, pos, p.resumed, p.at_entry)
        nxt = None if self.next_thread is None else self.next_thread.tid
        return (thread.tid, tuple(threads), pending, self.objects.key(), nxt)


@dataclass(frozen=True)
class KernelState:
    """A saved kernel model: threads (callback stacks, waits), the current thread, a pending choice, objects."""

    threads: dict[int, KThread]
    current: int | None
    max_depth: int
    pending_choice: PendingChoice | None
    objects: ObjectTable = field(default_factory=ObjectTable)
    next_thread: int | None = None
    deadlock: list[str] = field(default_factory=list)


def _copy_thread(t: KThread) -> KThread:
    frames = [dataclasses.replace(f, activation=f.activation.fork()) for f in t.callback_stack]
    s = t.suspended
    if s is not None:
        s = dataclasses.replace(s, activation=None if s.activation is None else s.activation.fork())
    return dataclasses.replace(t, callback_stack=frames, service_ctx=None, suspended=s)
