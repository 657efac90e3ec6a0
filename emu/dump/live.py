"""Capture the process at recorded states while it runs: its memory and its kernel model, as a dump needs them.

A state record keeps the thread's registers and live stack, which is what detectors read.
A dump that another run can start from needs more: every byte the process has then (data
sections written during the run, the callout frames, the scenario's own memory) and the
kernel model's side (callback stacks, a system call entered but not yet served, waits,
objects). Runs are deterministic, so :func:`capture` runs the scenario again and, at each
state ``want`` names, hands a :class:`LiveState` to ``sink`` before the kernel goes on.

Example::

    got = {}
    r = capture(load_scenario("scenarios/callback_roundtrip.toml"), lambda sid: sid == 3,
                lambda process, live: got.setdefault(live.state, live))
    write_minidump(r, r.trace.state(3), "s3.dmp", live=got[3])   # holds EmuKernelStream too
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emu.context import KTrapFrame, UserContext
from emu.dump.kernel_stream import Json, live_doc, thread_doc
from emu.engine import Process, RunResult
from emu.errors import DumpError
from emu.kernel import KernelHooks
from emu.kernel.core import _VIA
from emu.kernel.hooks import take_default
from emu.kernel.objects import ObjectTable
from emu.kernel.services import CallbackResult, Choice
from emu.kernel.thread import CallbackFrame, KThread, Suspended
from emu.trace import T_KIND

if TYPE_CHECKING:
    from emu.scenario import Scenario

VIA_OF_DETAIL = {detail: via for via, detail in _VIA.items()}  # the syscall record's detail names its entry


@dataclass(frozen=True)
class LiveRegion:
    """One mapped region of the machine and its bytes then (empty for a no-access guard page)."""

    start: int
    size: int
    perms: str
    label: str
    data: bytes


@dataclass(frozen=True)
class LiveState:
    """The whole process at one recorded state."""

    state: int
    kind: str  # the transition into the state ("initial" for a thread's first record)
    memory: tuple[LiveRegion, ...]
    kernel: Json  # the EmuKernelStream document (emu.dump.kernel_stream)
    objects: ObjectTable


Sink = Callable[[Process, LiveState], None]


def provisional_run(process: Process) -> RunResult:
    """The run so far, as a RunResult (what the dump writer reads: trace, images, threads)."""
    k = process.kernel
    return RunResult(process.scenario, process.trace, process.images, dict(k.threads), system=process.describe())


class _Capturer:
    def __init__(self, want: Callable[[int], bool], sink: Sink) -> None:
        self.want = want
        self.sink = sink
        self.process: Process | None = None
        self.frames: dict[int, list[CallbackFrame]] = {}  # each thread's callback stack at its latest state

    def observe(self, sid: int, thread: KThread) -> None:
        process = self.process
        if process is None:
            return
        kind = str(process.trace.raw_transitions[-1][T_KIND])
        before = self.frames.get(thread.tid, [])
        popped = before[-1] if kind == "callback_return" and before else None
        self.frames[thread.tid] = list(thread.callback_stack)
        if self.want(sid):
            self.sink(process, take(process, sid, thread, kind, popped))


def take(process: Process, sid: int, thread: KThread | None, kind: str, popped: CallbackFrame | None) -> LiveState:
    """The process now, at state ``sid`` of ``thread`` (None: before anything ran)."""
    kernel, trace, machine = process.kernel, process.trace, process.machine
    raw = trace.raw_state(sid)
    docs = []
    for t in sorted(kernel.threads.values(), key=lambda t: t.tid):
        s = t.suspended
        if t is thread and kind == "syscall":
            # Recorded at the entry, before the service runs: the kernel serves it next.
            detail = trace.raw_transition(-1).detail
            s = Suspended("entry", KTrapFrame(UserContext._make(raw.context), VIA_OF_DETAIL.get(detail, "syscall")))
        elif t is thread and kind == "callback_return" and popped is not None and t.resuming is not None:
            # NtCallbackReturn popped the frame; the service that called back resumes with the result next.
            _, status, output, result, length = t.resuming
            data = bytes(output) if isinstance(output, bytes) else b""
            wake = CallbackResult(int(str(status)), data, int(str(result)), int(str(length)))
            s = Suspended("blocked", popped.trap, popped.activation, True, "", (), False, wake, True)
        own = trace.raw_state(t.state_id)
        docs.append(thread_doc(t, own.service, own.pending, s))
    p = process.profile
    state: Json = {"id": sid, "kind": kind, "thread": raw.thread}
    if kind == "fault":
        state["fault"] = trace.raw_transition(-1).detail  # the run stopped there, with this error
    if thread is not None and thread.raising is not None:
        # A fault recorded in the kernel: the exception it raises is delivered next.
        state["raising"] = {"record": thread.raising[0].hex(), "fast_fail": thread.raising[1]}
    profile: Json = {"name": process.scenario.profile.name, "dispatcher": p.dispatcher, "ssn": dict(kernel.ssn_table)}
    current = None if thread is None or kernel.current is None else kernel.current.tid
    memory = tuple(
        LiveRegion(r.start, r.size, r.perms, r.label, machine.read(r.start, r.size) if r.perms else b"")
        for r in machine.regions
    )
    doc = live_doc(kernel, state, profile, docs, current)
    doc["traps"] = [[t.address, t.label, t.importer, t.reason] for t in process.traps.traps]
    return LiveState(sid, kind, memory, doc, kernel.objects.copy())


def capture(
    scenario: Scenario, want: Callable[[int], bool], sink: Sink,
    choose: Callable[[KThread, Choice], str | None] = take_default, built: Callable[[Process], None] | None = None,
) -> RunResult:  # fmt: skip
    """Run ``scenario`` again and give ``sink`` the process at every state ``want`` names.

    ``choose`` answers the kernel's choices (by default each takes its default, as
    :func:`emu.api.run` does); the run is the same as the original, state for state.
    ``built`` is told the process before it runs (``want`` may read its trace).
    """
    cap = _Capturer(want, sink)
    process = Process(scenario, hooks=KernelHooks(choose=choose, observe=cap.observe))
    cap.process = process
    if built is not None:
        built(process)
    for sid in range(len(process.trace.raw_states)):  # each thread's first record: nothing has run yet
        if want(sid):
            sink(process, take(process, sid, None, "initial", None))
    return process.run()


def capture_state(scenario: Scenario, state_id: int) -> tuple[RunResult, LiveState]:
    """The run again, and the process captured at ``state_id`` (a state of that run).

    Raises:
        DumpError: the run has no such state.
    """
    got: list[LiveState] = []
    r = capture(scenario, lambda sid: sid == state_id, lambda process, live: got.append(live))
    if not got:
        raise DumpError(f"{scenario.path}: the run has {len(r.trace.raw_states)} states, no s{state_id}")
    return r, got[0]
