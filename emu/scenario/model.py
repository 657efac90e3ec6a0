"""The scenario as data: frozen dataclasses, no behaviour."""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from emu.profile import Profile
from emu.records import record
from emu.scenario.expectations import Expectation
from emu.scenario.keys import Boolean, Integer, Schema, Seconds, Text, key
from emu.scenario.reader import _ID, _NAME, _line_of

# Where scenario memory may go: below the images, away from emu's own layout (stacks and
# allocations start at 4 GiB, images near 0x7FFA_0000_0000).
MEMORY_MIN, MEMORY_MAX = 0x10000, 0x1_0000_0000
THREAD_STARTS = ("auto", "rtl", "entry")


@record(frozen=True)
class ModuleSpec:
    """A module assembled from the scenario: ``code`` (rx) and optional ``data`` (rw)."""

    name: str = field(metadata=key("a module name", Text(pattern=_NAME.pattern), required=True))
    code: str = field(metadata=key("assembly text", Text(), required=True))
    data: str = field(default="", metadata=key("assembly text (data directives)", Text()))


@record(frozen=True)
class CallbackStep:
    """Call back into user mode: KernelCallbackTable[api](data); ``by_depth`` picks api by callback depth."""

    api: int
    data: bytes = b""
    kind: Literal["callback"] = "callback"
    by_depth: tuple[int, ...] = ()
    symbolic: str = ""  # ``data = { symbolic = N }``: the input's name; ``data`` holds its default bytes


# What a return step may do with the last callback's Result first (emu.kernel.result does it).
OUTPUT_USES: tuple[str, ...] = ("probe", "copy")


@record(frozen=True)
class ReturnStep:
    """Finish the service. ``status`` is an NTSTATUS, or None for the last callback's status.

    ``output`` = "probe" or "copy": first probe (or probe and copy) the last callback's
    Result, as win32k does; a fault makes the service return STATUS_ACCESS_VIOLATION.
    """

    status: int | None
    kind: Literal["return"] = "return"
    output: str = ""
    symbolic: SymbolicStatus | None = None  # ``status = { symbolic = "st" }``: ``status`` is its default


@record(frozen=True)
class SymbolicStatus:
    """A status declared symbolic: its name and the values it may take (empty: any NTSTATUS)."""

    name: str
    domain: tuple[int, ...] = ()


@record(frozen=True)
class ChoiceStep:
    """The kernel chooses between named alternatives (each a tuple of steps); a run takes ``default``."""

    name: str
    default: str
    options: tuple[tuple[str, tuple[Step, ...]], ...]
    kind: Literal["choice"] = "choice"


@record(frozen=True)
class ObjectStep:
    """Use a kernel object or another thread: ``wait`` (object), ``set``/``release`` (object), ``send`` (thread)."""

    kind: Literal["wait", "set", "release", "send"]
    target: str  # an object's name, or for send the receiving thread's name
    timeout: bool = False  # wait: the wait may expire (a choice when exploring)
    api: int = 0  # send: the callback the receiver runs
    data: bytes = b""


@record(frozen=True)
class WriteStep:
    """Write ``data`` into the caller's memory at argument ``arg`` (1-based) + ``offset``, after
    ProbeForWrite (a fault: the service returns STATUS_ACCESS_VIOLATION; emu.kernel.user_write)."""

    arg: int
    data: bytes
    offset: int = 0
    kind: Literal["write"] = "write"
    symbolic: str = ""  # ``data = { symbolic = N }``: the bytes' name; ``data`` holds their default


Step = CallbackStep | ReturnStep | ChoiceStep | ObjectStep | WriteStep


@record(frozen=True)
class ServiceScript:
    """A scripted system service: its name, its steps, and its number if the scenario fixes one."""

    name: str
    steps: tuple[Step, ...]
    ssn: int | None = None


@record(frozen=True)
class Budgets:
    """Limits on a run; hitting one stops it with BudgetExceeded (exit code 3)."""

    # Instructions per run (or per segment between two choices when exploring). None: not
    # counted, since Unicorn's counting slows user code about 2.5x; wall_time still bounds it.
    instructions: int | None = field(default=None, metadata=key("an integer", Integer(1, 10**12)))
    wall_time: float = field(default=20.0, metadata=key("seconds", Seconds(3600)))  # per run, or a whole exploration
    # Exploration with symbolic values: seconds the solver may spend in all (emu.symbolic).
    solver_time: float = field(
        default=10.0, metadata=key("seconds the solver may spend (symbolic values)", Seconds(3600))
    )
    callback_depth: int = field(default=1024, metadata=key("an integer", Integer(1, 1 << 20)))
    # states recorded by a run, or distinct states found by an exploration
    states: int = field(
        default=1_000_000, metadata=key("an integer: states a run records or an exploration finds", Integer(1, 1 << 32))
    )
    # exploration: choices along one path
    choice_depth: int = field(default=256, metadata=key("an integer (exploration)", Integer(1, 1 << 20)))
    output_bytes: int = field(
        default=256 << 20,
        metadata=key("an integer: stack bytes kept with the recorded states", Integer(1, 1 << 40)),
    )
    # bytes mapped into the address space (images, stacks, [[memory]])
    memory: int = field(
        default=1 << 30, metadata=key("an integer: bytes mapped into the address space", Integer(1 << 16, 1 << 40))
    )
    # Exploration: the process's resident memory (RSS), checked as it goes; saved forks hold
    # copies of dirty pages, so a wide exploration grows until this stops it.
    process_memory: int = field(
        default=640 << 20,
        metadata=key(
            "an integer: bytes of resident memory an exploration may add to the process", Integer(1 << 24, 1 << 44)
        ),
    )
    # Exploration: options waiting on the work list. Past it, breadth-first exploration goes on
    # depth-first (newest first), which adds about choice_depth x (options - 1) more; at twice
    # the budget plus choice_depth it stops.
    frontier: int = field(
        default=1 << 16, metadata=key("an integer: options waiting on an exploration's work list", Integer(16, 1 << 32))
    )


@record(frozen=True)
class MemorySpec:
    """Extra memory mapped at a fixed address (zero-filled)."""

    name: str = field(metadata=key("a label", Text(), required=True))
    start: int = field(metadata=key("a page-aligned address", Integer(MEMORY_MIN, MEMORY_MAX), required=True))
    size: int = field(metadata=key("bytes", Integer(1, 1 << 30), required=True))
    perms: str = field(default="rw", metadata=key('"r", "rw", "rx" or "rwx"', Text(words=("r", "rw", "rx", "rwx"))))


@record(frozen=True)
class PeSpec:
    """A PE file to load: its resolved path, module name and optional base address."""

    path: str = field(metadata=key("a PE file, relative to the scenario", Text(), required=True))
    name: str = field(
        metadata=key("the module name (default: the file name without .dll)", Text(pattern=_NAME.pattern))
    )
    base: int | None = field(
        default=None,
        metadata=key(
            "a load address (default: the file's ImageBase)",
            Schema({"type": "integer", "minimum": 0, "maximum": 0x7FFF_FFFF_0000, "multipleOf": 0x1000}),
        ),
    )


@record(frozen=True)
class ThreadSpec:
    """A thread: where it starts, its argument and name, and how it starts (``start``).

    ``start``: "rtl" runs ntdll's RtlUserThreadStart(entry, argument) first, as Windows
    does; "entry" starts at the entry itself, as if called by kernel32!BaseThreadInitThunk;
    "auto" (the default) is "rtl" unless a foreign ntdll's RtlUserThreadStart cannot reach
    the entry in emu (see :mod:`emu.loader.startup`), then "entry".
    """

    name: str = field(metadata=key("the thread's name (default: thread<N>)", Text(pattern=_NAME.pattern)))
    entry: str = field(metadata=key('"module!label" or "label"', Text(pattern=_ID.pattern), required=True))
    argument: int = field(default=0, metadata=key("an integer passed in RDX", Integer()))
    start: Literal["auto", "rtl", "entry"] = field(
        default="auto",
        metadata=key('"auto", "rtl" (through ntdll!RtlUserThreadStart) or "entry"', Text(words=THREAD_STARTS)),
    )


@record(frozen=True)
class ObjectSpec:
    """A kernel object the threads share, reachable by a fixed handle."""

    kind: Literal["event", "mutex"] = field(metadata=key('"event" or "mutex"', Text(words=("event", "mutex")), True))
    name: str = field(metadata=key("a name steps use", Text(), required=True))
    handle: int = field(metadata=key("the handle value code uses (default 0x100 + 4 * index)", Integer(4, 0xFFFF_FFFF)))
    signaled: bool = field(default=False, metadata=key("event: set at the start", Boolean()))
    manual_reset: bool = field(default=False, metadata=key("event: a notification event (stays set)", Boolean()))
    # mutex: the thread that owns it at the start
    owner: str | None = field(default=None, metadata=key("mutex: the thread owning it at the start", Text()))


@record(frozen=True)
class Scenario:
    """A scenario file, parsed and checked: everything a run is built from."""

    path: str
    name: str
    description: str
    profile: Profile
    modules: tuple[ModuleSpec, ...]
    entry: str
    argument: int
    callback_table: dict[int, str]
    callback_table_size: int  # 0 with callback_table_from: as many entries as the exported table holds
    services: dict[str, ServiceScript]
    budgets: Budgets
    expectations: tuple[Expectation, ...]
    system_call: int = 0
    memory: tuple[MemorySpec, ...] = ()
    ntdll: PeSpec | None = None  # a PE ntdll instead of the built-in one
    pe: tuple[PeSpec, ...] = ()  # more PE modules
    unbound_imports: Literal["error", "trap"] = "error"
    threads: tuple[ThreadSpec, ...] = ()  # every thread (the first is ``entry``/``argument``)
    objects: tuple[ObjectSpec, ...] = ()
    callback_table_from: str | None = None  # "module!export": the table is that exported array
    source: str = field(default="", repr=False)
    profile_overrides: frozenset[str] = frozenset()  # [profile] keys the file sets (these beat the images)
    # [machine] preempt_at_callback_return: exploration may let another thread run at
    # NtCallbackReturn's entry (the thread is then Ready, between KiSystemCall64's sti and
    # NtCallbackReturn's cli); off, NtCallbackReturn runs through, as it never waits.
    preempt_at_callback_return: bool = False
    # [machine] exceptions: "deliver" turns a fault into a Windows exception (KiUserExceptionDispatcher);
    # "stop" keeps the old behaviour, the run stops at the first fault.
    exceptions: Literal["deliver", "stop"] = "deliver"
    # [machine] stack_reserve: each stack is [reserve][guard page][committed]; the guard page moves
    # down into the reserve as the stack grows (emu.kernel.exception, MiCheckForUserStackOverflow).
    stack_reserve: int = 0x1000
    start_dump: str | None = None  # [start] dump: a minidump the run starts from (emu.dump.start), resolved
    # [python] services: "package.module:name" of a ServiceRegistry (emu.services). Loading
    # it runs host Python, so a build refuses unless allow_python is set (--allow-python).
    python_services: tuple[str, ...] = ()
    allow_python: bool = False

    def line_of(self, *path: str | int) -> int | None:
        return _line_of(self.source, path)
