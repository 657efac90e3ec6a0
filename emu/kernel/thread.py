"""The kernel model's per-thread data: KTHREAD, its callback stack, work suspended off the CPU, a pending choice."""

from __future__ import annotations

from dataclasses import field
from typing import TYPE_CHECKING, Literal

from emu.context import KTrapFrame, UserContext
from emu.kernel.objects import Message
from emu.kernel.services import Activation, CallbackResult, Choice, ScriptActivation, Sent
from emu.kernel.symbolic import Symbolic
from emu.records import record
from emu.trace import Mode

if TYPE_CHECKING:
    from emu.kernel.core import Kernel


@record
class Suspended:
    """A thread's kernel work that is off the CPU: a system call not yet dispatched, or a wait."""

    kind: Literal["entry", "blocked"]
    trap: KTrapFrame  # the user context to put back on the CPU when it continues
    activation: Activation | ScriptActivation | None = None
    resumed: bool = False
    note: str = ""
    on: tuple[object, ...] = ()  # ("object", handle), ("reply", message id) or ("message",)
    timeout: bool = False
    wake: Sent | Message | None = None
    woken: bool = False
    announced: bool = False  # the wake is on a recorded transition (Transition.woke)

    def key(self) -> tuple[object, ...]:
        pos = self.activation.position() if self.activation is not None else None
        wake = (self.wake.status, self.wake.output) if isinstance(self.wake, CallbackResult) else self.wake
        return (self.kind, tuple(self.trap.ctx), pos, self.resumed, self.on, self.timeout, self.woken, repr(wake))


@record
class CallbackFrame:
    """One KeUserModeCallback in progress (an entry of KTHREAD.CallbackStack)."""

    activation: Activation | ScriptActivation
    trap: KTrapFrame  # the user context of the syscall whose service called back
    api: int
    user_frame: int  # address of the UCALLOUT_FRAME on the user stack
    message_id: int | None = None  # the sent message this callback handles, if any
    buffer: int = 0  # where the callback's input was copied on the user stack
    # (api, service) of every frame from the outermost up to this one, as a state records
    # them: computed by the recorder the first time this frame is on top (emu.kernel.record).
    chain: tuple[tuple[int, str], ...] | None = field(default=None, repr=False, compare=False)


@record(frozen=True)
class PendingChoice:
    """A service suspended at a Choice, waiting for the explorer to pick an option."""

    tid: int
    activation: Activation | ScriptActivation | None  # None: a scheduling choice
    trap: KTrapFrame | None
    resumed: bool
    note: str
    choice: Choice | Symbolic  # Symbolic: the explorer resumes with a concrete value (emu.symbolic)
    at_entry: bool = False  # a scheduling choice at this thread's system call entry


@record
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
    # While the kernel records a fault, before it delivers the exception: the EXCEPTION_RECORD's
    # bytes and whether it is a fast fail (a dump of that state carries them).
    raising: tuple[bytes, bool] | None = None
    name: str = ""
    started: bool = False
    suspended: Suspended | None = None  # kernel work off the CPU (see emu.kernel.sched)

    @property
    def running(self) -> bool:
        """On the CPU (or about to be): started, not suspended, not finished."""
        return self.started and self.suspended is None and not self.terminated


class ThreadServiceContext:
    """What a service sees: the calling thread's id and user memory."""

    def __init__(self, kernel: Kernel, thread: KThread) -> None:
        self._kernel = kernel
        self.thread_id = thread.tid
        self.probe_limit = kernel.profile.user_probe_address

    @property
    def kernel(self) -> Kernel:
        """The kernel model it serves (a forked thread keeps a context of the same kernel)."""
        return self._kernel

    def read(self, address: int, size: int) -> bytes:
        machine = self._kernel.machine
        if machine.kernel_read_watch is not None:  # symbolic bytes the model consumes (emu.symbolic)
            machine.kernel_read_watch(address, size)
        data = machine.read(address, size)
        if machine.read_watch is not None:  # a read hook (emu.hooks): the kernel's reads too
            machine.read_watch(address, data)
        return data

    def probe_read(self, address: int, size: int) -> bytes | None:
        machine = self._kernel.machine
        if not machine.readable(address, size):
            return None
        return self.read(address, size)

    def probe_write(self, address: int, size: int) -> bool:
        """The range is mapped writable (Unicorn's host writes ignore protections: check them)."""
        return self._kernel.machine.mapped_with(address, size, "w")

    def write(self, address: int, data: bytes) -> None:
        self._kernel.user_writes += 1
        self._kernel.machine.write(address, data)
