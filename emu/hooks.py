"""Hooks on a run at emu's level: instructions, memory, transitions and thread switches.

A :class:`Hooks` collects callbacks; give it to a run (``emu.run(scenario, hooks=hooks)``
or ``emu.api.build(scenario, hooks=hooks)``). Each callback gets one :class:`Hit`
saying what happened, and may record a line into the trace (:meth:`Hit.note`, kept in
``run.trace.notes``) or stop the run cleanly (:meth:`Hit.stop`: ``run.stop == "hook"``,
the reason is a note)::

    hooks = Hooks()

    @hooks.instruction("app!main")
    def at_main(hit):
        hit.note(f"main entered, rcx = {hit.register('rcx'):#x}")

    @hooks.transition("callback")
    def first_callback(hit):
        hit.stop(f"callback api {hit.transition.api}")

What can be hooked:

- ``instruction(at)``: an instruction starting at an address or in a range (Unicorn's
  code hook, registered on that range only);
- ``read(at)``, ``write(at)``, ``fetch(at)``: user code reading, writing or executing
  memory in a range (accesses that start in it). ``write`` also sees the kernel model's
  writes to user memory (a service's output, the callout frame KiUserCallbackDispatcher
  finds, an exception's records), and ``read`` its reads of user memory (a service's
  arguments past the fourth and what it reads through its context, a callback's output
  buffer when the service copies it (NtCallbackReturn itself only stores the pointer and
  length: WRK ke/amd64/callout.asm), NtContinue's CONTEXT, NtRaiseException's records, the faulting
  instruction the kernel decodes), with ``hit.by_kernel`` set; Unicorn's own fetch hook
  never fires, so a fetch is each instruction executed in the range;
- ``transition(*kinds)``: each record of those kinds (all when none are named) as the
  kernel model appends it: syscall, sysret, callback, callback_return, exception, block,
  exit, continue, unwind, fault;
- ``thread_switch()``: another thread going on the CPU.

Addresses are integers or ``"module!symbol"``; a range is ``(begin, end)`` (end
excluded), a ``range``, or a module's name (its whole image). An instruction hook that
stops the run leaves RIP at its instruction, not yet run. Hooks cost nothing while none is attached: each kind of hook is
registered only when one of that kind is given. Instruction and fetch hooks are bound to
their range when Unicorn translates code; a read or write hook makes Unicorn check user
code's memory accesses against its range as they happen, which costs something even where
the range is never touched. A callback that raises stops the run with
``run.stop == "hook"`` and one line naming it (``run.error``), the trace so far kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import TYPE_CHECKING, Literal, TypeAlias

from unicorn import Uc

from emu.errors import ExtensionError
from emu.loader.image import find_symbol
from emu.records import record
from emu.trace import T_KIND, TraceNote, Transition
from emu.vocabulary import KINDS

if TYPE_CHECKING:
    from emu.engine import Process
    from emu.kernel import KThread
    from emu.loader.image import Image

__all__ = ["Halt", "Hit", "Hooks"]

HitKind = Literal["instruction", "read", "write", "fetch", "transition", "thread_switch"]
Address: TypeAlias = "int | str"
Where: TypeAlias = "Address | range | tuple[Address, Address]"
Callback = Callable[["Hit"], None]


@record
class Halt:
    """Why a run should stop for its hooks: a clean stop (``reason``) or a hook's failure."""

    halted: bool = False
    reason: str | None = None
    by: str = ""
    failure: ExtensionError | None = None


@record(frozen=True)
class _Entry:
    """One registered hook: what it watches, the callback, and where it applies."""

    kind: HitKind
    func: Callback
    where: Where | None = None
    kinds: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return getattr(self.func, "__qualname__", None) or repr(self.func)


class Hooks:
    """Callbacks to attach to a run; the decorators return the function unchanged."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def _add(self, entry: _Entry) -> Callback:
        if not callable(entry.func):
            raise ExtensionError("hook", f"{entry.kind} hook: {entry.func!r} is not callable")
        self._entries.append(entry)
        return entry.func

    def instruction(self, at: Where) -> Callable[[Callback], Callback]:
        """Call the function before each instruction at ``at`` (an address or a range) runs."""
        return lambda f: self._add(_Entry("instruction", f, at))

    def read(self, at: Where) -> Callable[[Callback], Callback]:
        """Call the function when user code, or the kernel model, reads memory in ``at``."""
        return lambda f: self._add(_Entry("read", f, at))

    def write(self, at: Where) -> Callable[[Callback], Callback]:
        """Call the function when user code, or the kernel model, writes memory in ``at``."""
        return lambda f: self._add(_Entry("write", f, at))

    def fetch(self, at: Where) -> Callable[[Callback], Callback]:
        """Call the function for each instruction fetched (executed) from ``at``."""
        return lambda f: self._add(_Entry("fetch", f, at))

    def transition(self, *kinds: str) -> Callable[[Callback], Callback]:
        """Call the function after each transition of ``kinds`` (every kind when none is given) is recorded."""
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ExtensionError("hook", f"transition hook: unknown kind {unknown[0]!r} (kinds: {', '.join(KINDS)})")
        return lambda f: self._add(_Entry("transition", f, None, frozenset(kinds or KINDS)))

    def thread_switch(self) -> Callable[[Callback], Callback]:
        """Call the function when another thread is about to go on the CPU."""
        return lambda f: self._add(_Entry("thread_switch", f))

    def attach(self, process: Process) -> Attached:
        """Register the hooks on a built process (before it runs)."""
        return Attached(self._entries, process)


@record
class Hit:
    """What a hook is called with: the kind of event and where, and the run to act on.

    ``address``/``size``: the instruction, or the memory accessed; ``data``: the bytes
    read, or about to be written; ``by_kernel``: a read or write the kernel model makes;
    ``transition``: the record just appended; ``thread``: the thread's id (for a switch,
    the one going on the CPU, and ``previous`` the one leaving it).
    """

    kind: HitKind
    hook: str
    thread: int | None
    address: int = 0
    size: int = 0
    data: bytes = b""
    by_kernel: bool = False
    transition: Transition | None = None
    previous: int | None = None
    _attached: Attached | None = field(default=None, repr=False)

    def _run(self) -> Attached:
        if self._attached is None:
            raise ExtensionError("hook", f"hook {self.hook}: this hit is not attached to a run")
        return self._attached

    @property
    def rip(self) -> int:
        """The user RIP the event happened at: the transition's, else the CPU's now."""
        if self.transition is not None:
            return self.transition.rip
        return self._run().process.machine.register("rip") or 0

    def note(self, text: str) -> None:
        """Record one line into the trace (``run.trace.notes``)."""
        self._run().note(self.hook, text, self.rip)

    def stop(self, reason: str = "") -> None:
        """End the run cleanly once the current instruction or kernel step is done."""
        self._run().stop(self.hook, reason or f"{self.kind} hook", self.rip)

    def register(self, name: str) -> int:
        """A register of the CPU now (``"rip"``, ``"rcx"``, ...)."""
        value = self._run().process.machine.register(name)
        if value is None:
            raise ExtensionError("hook", f"hook {self.hook}: no register named {name!r}")
        return value

    def read(self, address: int, size: int) -> bytes:
        """User memory now (raises if it is not mapped)."""
        return self._run().process.machine.read(address, size)

    def symbol(self, address: int) -> str:
        return self._run().process.trace.symbolize(address)


def _bounds(where: Where, resolve: Callable[[Address], int], images: list[Image]) -> tuple[int, int]:
    if isinstance(where, str) and "!" not in where:
        image = next((img for img in images if img.name.lower() == where.lower()), None)
        if image is not None:
            return image.base, image.end
    if isinstance(where, range):
        return where.start, where.stop
    if isinstance(where, tuple):
        begin, end = resolve(where[0]), resolve(where[1])
        if end <= begin:
            raise ExtensionError("hook", f"hook range {begin:#x}..{end:#x} is empty (end is excluded)")
        return begin, end
    at = resolve(where)
    return at, at + 1


class Attached:
    """Hooks registered on one process: they call back, note and stop through it."""

    def __init__(self, entries: list[_Entry], process: Process) -> None:
        self.process = process
        self.halt: Halt = process.halt
        machine, kernel = process.machine, process.kernel
        transitions = [e for e in entries if e.kind == "transition"]
        switches = [e for e in entries if e.kind == "thread_switch"]
        # An explorer sends notes where its graph keeps them (emu.exploration.hooked).
        self.sink: Callable[[str, str, int, bool], None] | None = None
        self._in_transition = False
        kernel_writes: list[tuple[_Entry, int, int]] = []
        kernel_reads: list[tuple[_Entry, int, int]] = []
        for e in entries:
            if e.where is None:
                continue
            begin, end = _bounds(e.where, self._resolve, process.images)
            if e.kind in ("instruction", "fetch"):
                machine.add_code_hook(begin, end, self._code_hook(e))
            elif e.kind in ("read", "write"):
                machine.add_memory_hook(e.kind == "write", begin, end, self._memory_hook(e))
                (kernel_writes if e.kind == "write" else kernel_reads).append((e, begin, end))
        if transitions:
            before = process.kernel.recorder.observe
            self._transitions = transitions

            def observe(sid: int, thread: KThread) -> None:
                if before is not None:
                    before(sid, thread)
                self._on_transition()

            kernel.recorder.observe = observe
        if switches:
            kernel.on_switch = lambda prev, nxt: self._call_all(switches, "thread_switch", nxt.tid, previous=prev.tid)
        if kernel_writes:
            machine.write_watch = lambda address, data: self._on_kernel_access(kernel_writes, "write", address, data)
        if kernel_reads:
            machine.read_watch = lambda address, data: self._on_kernel_access(kernel_reads, "read", address, data)

    def _resolve(self, at: Address) -> int:
        if isinstance(at, int):
            return at
        addr = find_symbol(self.process.images, at)
        if addr is not None:
            return addr
        raise ExtensionError("hook", f"hook address {at!r} names no symbol in the loaded images")

    # --- what the hooks do to the run -----------------------------------------------------
    def note(self, by: str, text: str, rip: int) -> None:
        if self.sink is not None:
            self.sink(by, text, rip, self._in_transition)
            return
        trace = self.process.trace
        trace.notes.append(TraceNote(len(trace.raw_transitions), self._current(), rip, by, text))

    def stop(self, by: str, reason: str, rip: int) -> None:
        if self.halt.halted:
            return
        self.note(by, f"stopped: {reason}", rip)
        self.halt.halted, self.halt.reason, self.halt.by = True, reason, by
        self.process.machine.request_stop()

    def _call(self, entry: _Entry, hit: Hit) -> None:
        if self.halt.halted:
            return  # the run is ending: later events are not the hooks' business
        hit._attached = self
        try:
            entry.func(hit)
        except Exception as e:
            rip = hit.rip
            first = str(e).splitlines()[0] if str(e) else ""
            message = (
                f"hook {hit.hook} ({entry.kind}) raised {type(e).__name__}{': ' + first if first else ''} "
                f"at {self.process.trace.symbolize(rip)}"
            )
            self.note(hit.hook, message, rip)
            self.halt.halted, self.halt.failure = True, ExtensionError("hook", message)
            self.process.machine.request_stop()

    def _call_all(self, entries: list[_Entry], kind: HitKind, tid: int | None, **fields: object) -> None:
        for e in entries:
            self._call(e, Hit(kind, e.name, tid, **fields))  # type: ignore[arg-type]

    def _current(self) -> int | None:
        cur = self.process.kernel.current
        return None if cur is None else cur.tid

    # --- the callbacks each source calls ------------------------------------------------------
    def _code_hook(self, entry: _Entry) -> Callable[[Uc, int, int, object], None]:
        def hook(uc: Uc, address: int, size: int, user_data: object) -> None:
            self._call(entry, Hit(entry.kind, entry.name, self._current(), address, size))

        return hook

    def _memory_hook(self, entry: _Entry) -> Callable[[Uc, int, int, int, int, object], None]:
        def hook(uc: Uc, access: int, address: int, size: int, value: int, user_data: object) -> None:
            if entry.kind == "write":
                data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            else:
                data = self.process.machine.read(address, size)
            self._call(entry, Hit(entry.kind, entry.name, self._current(), address, size, data))

        return hook

    def _on_kernel_access(
        self, entries: list[tuple[_Entry, int, int]], kind: HitKind, address: int, data: bytes
    ) -> None:
        end = address + len(data)
        for e, begin, stop in entries:
            if address < stop and begin < end:
                self._call(e, Hit(kind, e.name, self._current(), address, len(data), bytes(data), True))

    def _typed_last(self) -> Transition:
        trace = self.process.trace
        return trace.raw_transition(len(trace.raw_transitions) - 1).typed(trace.symbolize)

    def _on_transition(self) -> None:
        trace = self.process.trace
        kind = trace.raw_transitions[-1][T_KIND]
        self._in_transition = True
        try:
            for e in self._transitions:
                if kind in e.kinds:
                    # The trace's own typed record, built once and kept: the run's view reuses it.
                    # An explorer drops records as it goes: there, a record of its own.
                    record = trace.transitions[-1] if self.sink is None else self._typed_last()
                    self._call(e, Hit("transition", e.name, record.thread, record.rip, 0, transition=record))
        finally:
            self._in_transition = False
