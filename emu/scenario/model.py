"""The scenario as data: frozen dataclasses, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from emu.profile import Profile
from emu.scenario.reader import _line_of


@dataclass(frozen=True)
class ModuleSpec:
    """A module assembled from the scenario: ``code`` (rx) and optional ``data`` (rw)."""

    name: str
    code: str
    data: str = ""


@dataclass(frozen=True)
class CallbackStep:
    """Call back into user mode: KernelCallbackTable[api](data); ``by_depth`` picks api by callback depth."""

    api: int
    data: bytes = b""
    kind: Literal["callback"] = "callback"
    by_depth: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReturnStep:
    """Finish the service. ``status`` is an NTSTATUS, or None for the last callback's status."""

    status: int | None
    kind: Literal["return"] = "return"


@dataclass(frozen=True)
class ChoiceStep:
    """The kernel chooses between named alternatives (each a tuple of steps); a run takes ``default``."""

    name: str
    default: str
    options: tuple[tuple[str, tuple[Step, ...]], ...]
    kind: Literal["choice"] = "choice"


@dataclass(frozen=True)
class ObjectStep:
    """Use a kernel object or another thread: ``wait`` (object), ``set``/``release`` (object), ``send`` (thread)."""

    kind: Literal["wait", "set", "release", "send"]
    target: str  # an object's name, or for send the receiving thread's name
    timeout: bool = False  # wait: the wait may expire (a choice when exploring)
    api: int = 0  # send: the callback the receiver runs
    data: bytes = b""


Step = CallbackStep | ReturnStep | ChoiceStep | ObjectStep


@dataclass(frozen=True)
class ServiceScript:
    name: str
    steps: tuple[Step, ...]
    ssn: int | None = None


@dataclass(frozen=True)
class Budgets:
    """Limits on a run; hitting one stops it with BudgetExceeded (exit code 3)."""

    # Instructions per run (or per segment between two choices when exploring). None: not
    # counted, since Unicorn's counting slows user code about 2.5x; wall_time still bounds it.
    instructions: int | None = None
    wall_time: float = 20.0  # per run, or for a whole exploration
    callback_depth: int = 1024
    states: int = 1_000_000  # states recorded by a run, or distinct states found by an exploration
    choice_depth: int = 256  # exploration: choices along one path
    output_bytes: int = 256 << 20  # bytes of user stack kept with the recorded states
    memory: int = 1 << 30  # bytes mapped into the address space (images, stacks, [[memory]])
    # Exploration: the process's resident memory (RSS), checked as it goes; saved forks hold
    # copies of dirty pages, so a wide exploration grows until this stops it.
    process_memory: int = 640 << 20  # resident memory an exploration may add to the process
    # Exploration: options waiting on the work list. Past it, breadth-first exploration goes on
    # depth-first (newest first), which adds about choice_depth x (options - 1) more; at twice
    # the budget plus choice_depth it stops.
    frontier: int = 1 << 16


@dataclass(frozen=True)
class Expectation:
    """One ``[[expect]]`` entry: a ``kind`` and its value, with where it was written."""

    kind: str
    value: Any
    index: int
    line: int | None = None


@dataclass(frozen=True)
class MemorySpec:
    """Extra memory mapped at a fixed address (zero-filled)."""

    name: str
    start: int
    size: int
    perms: str


@dataclass(frozen=True)
class PeSpec:
    """A PE file to load: its resolved path, module name and optional base address."""

    path: str
    name: str
    base: int | None = None


@dataclass(frozen=True)
class ThreadSpec:
    """A thread: where it starts, its argument and name, and how it starts (``start``).

    ``start``: "rtl" runs ntdll's RtlUserThreadStart(entry, argument) first, as Windows
    does; "entry" starts at the entry itself, as if called by kernel32!BaseThreadInitThunk;
    "auto" (the default) is "rtl" unless a foreign ntdll's RtlUserThreadStart cannot reach
    the entry in emu (see :mod:`emu.loader.startup`), then "entry".
    """

    name: str
    entry: str
    argument: int = 0
    start: Literal["auto", "rtl", "entry"] = "auto"


@dataclass(frozen=True)
class ObjectSpec:
    """A kernel object the threads share, reachable by a fixed handle."""

    kind: Literal["event", "mutex"]
    name: str
    handle: int
    signaled: bool = False
    manual_reset: bool = False
    owner: str | None = None  # mutex: the thread that owns it at the start


@dataclass(frozen=True)
class Scenario:
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
    start_dump: str | None = None  # [start] dump: a minidump the run starts from (emu.dump.start), resolved

    def line_of(self, *path: str | int) -> int | None:
        return _line_of(self.source, path)


EXPECT_KINDS: dict[str, str] = {
    "detections": "an integer: how many states the detector reports",
    "detection": "a table {index, rip, return_address, depth, api}",
    "exit_status": "an NTSTATUS: the thread's exit status",
    "max_depth": "an integer: the deepest callback nesting reached",
    "sysret": "a table {service, status}: some return from that service carried that status",
    "callback_output": "a table {api, data}: some callback for api returned exactly these bytes",
    "transitions": "a table {kind = count}: how many transitions of each kind",
    "fault": "a string: the run stops with an error whose message contains it",
    "deadlock": "true or false: the run ends with threads waiting on each other",
    "wait_chain": "a string: some wait chain of the run's end contains it",
    "truths": "a table {observer, seed, waiting_in_callback}: states where each ground truth holds that the "
    "observer (kernel-debugger, the default, or user-context) can see",
    "explored_truths": "a table {observer, seed, waiting_in_callback}: the same over the explored graph's nodes",
    "explored_states": "an integer: distinct states `emu explore` finds",
    "explored_merges": "an integer: states `emu explore` reaches along more than one edge",
    "explored_pending": "an integer: callback-return pending states `emu explore` finds",
    "explored_deadlocks": "an integer: deadlocked states `emu explore` finds",
    "explored_wait_chain": "a string: some explored state's wait chain contains it",
}
EXPLORE_KINDS = frozenset(k for k in EXPECT_KINDS if k.startswith("explored_"))

# Where scenario memory may go: below the images, away from emu's own layout (stacks and
# allocations start at 4 GiB, images near 0x7FFA_0000_0000).
MEMORY_MIN, MEMORY_MAX = 0x10000, 0x1_0000_0000
