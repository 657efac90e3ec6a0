"""Step a scenario by hand: the research API over one built process.

:func:`emu.run` builds a process and runs it to the end in one call. A :class:`Session`
builds the same process and lets you drive it: a transition at a time (until the kernel
model records the next state), an instruction at a time, to a symbol, to a state or until
a predicate holds; read and write registers and memory on the way; look at the kernel
model (threads, callback stacks, objects); take snapshots and go back to them
(:mod:`emu.session_snapshot`); and finish with the same :class:`~emu.api.Run` that
``emu.run`` returns. Stepping never changes what is recorded: a session stepped to its end
gives the trace ``emu.run`` gives, byte for byte.

>>> import emu
>>> s = emu.Session("scenarios/callback_roundtrip.toml")
>>> [t.kind for t in s.step()]   # NtUserMessageCall enters the kernel, which calls back
['syscall', 'callback']
>>> s.run_to("ntdll!ZwCallbackReturn")
[...]
>>> s.symbol(s.regs.rip)
'ntdll!ZwCallbackReturn'
>>> [(f.api, f.service) for f in s.callback_stack()]
[(2, 'NtUserMessageCall')]
>>> r = s.finish()
>>> [d.rip for d in r.detections]
['ntdll!ZwCallbackReturn+0x14']

A step ends where the CPU can stop: between two instructions. The kernel model handles a
system call in one go, so a service that returns at once records its ``syscall`` and its
``sysret`` in one step, and one that calls back its ``syscall`` and the ``callback``;
:meth:`Session.step` returns every transition it recorded. Budgets apply as in
:func:`emu.run`, except that ``instructions`` counts from where the session last stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from unicorn import UcError

from emu.api import Run, build
from emu.context import REGISTER_NAMES, UserContext
from emu.debug.control import drive_to, step
from emu.dump.start import DumpProcess
from emu.engine import Process, RunResult
from emu.errors import EmuError
from emu.hooks import Hooks
from emu.kernel import KernelHooks, KThread
from emu.kernel.objects import KObject
from emu.loader.image import find_symbol
from emu.scenario import Scenario
from emu.services import Services
from emu.trace import State, Trace, Transition

if TYPE_CHECKING:
    from emu.session_snapshot import Snapshot

__all__ = ["Frame", "Registers", "Session"]

Predicate = Callable[["Session"], bool]


@dataclass(frozen=True)
class Frame:
    """One callback in progress on a thread (KTHREAD.CallbackStack), outermost first.

    ``api``: the KernelCallbackTable index; ``service``: the system service that called back;
    ``user_frame``: the UCALLOUT_FRAME's address on the user stack; ``return_rip``: where the
    service's own system call returns once the callback has completed.
    """

    api: int
    service: str
    user_frame: int
    return_rip: int


class Registers:
    """The CPU's registers, by name: ``regs.rax``, ``regs["r8d"]``, ``regs.rip = 0x...``.

    The 18 of a user context (``rax`` ... ``r15``, ``rip``, ``rflags``) and any other x86
    register Unicorn names (``eax``, ``gs_base``, ``xmm0``) can be read; writes go to the CPU
    at once and are seen by the next instruction the session runs.
    """

    _session: Session

    def __init__(self, session: Session) -> None:
        object.__setattr__(self, "_session", session)

    def __getattr__(self, name: str) -> int:
        return self[name]

    def __setattr__(self, name: str, value: int) -> None:
        self[name] = value

    def _unstarted(self) -> KThread | None:
        """The first thread while it has not run yet: its registers are its entry context."""
        s = self._session
        t = s.thread
        return t if not s.started and not t.started else None

    def __getitem__(self, name: str) -> int:
        m = self._session.process.machine
        name = name.lower()
        if name in REGISTER_NAMES:
            t = self._unstarted()
            if t is not None:
                return int(getattr(t.entry_context, name))
            return int(m.regs.read((name,))[0])
        value = m.register(name)
        if value is None:
            raise KeyError(f"no x86 register named {name!r}")
        return value

    def __setitem__(self, name: str, value: int) -> None:
        m = self._session.process.machine
        name = name.lower()
        t = self._unstarted()
        if t is not None and name in REGISTER_NAMES:
            t.entry_context = t.entry_context._replace(**{name: value & 0xFFFF_FFFF_FFFF_FFFF})
        elif name == "rip":
            m.jump(value)
        elif name in REGISTER_NAMES:
            m.regs.write((name,), (value,))
        else:
            from unicorn import x86_const

            reg = getattr(x86_const, f"UC_X86_REG_{name.upper()}", None)
            if reg is None:
                raise KeyError(f"no x86 register named {name!r}")
            m.uc.reg_write(reg, value)

    def context(self) -> UserContext:
        """All 18 at once, as the trace records them."""
        t = self._unstarted()
        if t is not None:
            return t.entry_context
        ctx: UserContext = self._session.process.machine.regs.context()
        return ctx

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(zip(REGISTER_NAMES, self.context()))

    def __repr__(self) -> str:
        return " ".join(f"{n}={v:#x}" for n, v in self)


class Session:
    """One scenario's process, driven step by step (see the module notes).

    Args:
        scenario: a :class:`~emu.scenario.Scenario` or the path of a scenario file.
        hooks: :class:`~emu.hooks.Hooks` to attach, as :func:`emu.run` does: their notes go to
            ``trace.notes``; a hook's stop (or failure) ends the session's run (``stop == "hook"``).
        services: Python system services (:mod:`emu.services`), as :func:`emu.run` takes them.
        allow_python: let the scenario's ``[python]`` table load Python.

    Raises:
        ScenarioError: the scenario does not load or build (as :func:`emu.run` does).
    """

    def __init__(
        self, scenario: Scenario | str | Path, *, hooks: Hooks | None = None, services: Services | None = None,
        allow_python: bool = False,
    ) -> None:  # fmt: skip
        self._until: Callable[[], bool] | None = None
        steer = KernelHooks(observe=self._observe, stop=self._stop_wanted)
        self.process: Process = build(scenario, steer, services=services, allow_python=allow_python)
        if hooks is not None and len(hooks):
            hooks.attach(self.process)
        self.scenario: Scenario = self.process.scenario
        self.regs = Registers(self)
        self.started = False
        self.error: EmuError | None = None
        self.stop: str | None = None  # why the run ended ("exit", "fault", ...); None while it can go on
        self._result: RunResult | None = None
        self._breakpoints: set[int] = set()
        self.hit: int | None = None  # the breakpoint the last cont() or run_to() stopped at
        self._raised: Exception | None = None  # what a run_until predicate raised, kept until the CPU stops
        self.token = object()  # names this session's in-memory snapshots
        # Copy-on-write page tracking, as the explorer uses it: snapshots keep only written pages.
        self.cow = self.process.machine.enable_cow()

    # --- what the session shows -----------------------------------------------------
    @property
    def trace(self) -> Trace:
        """Everything recorded so far (it grows as the session runs)."""
        return self.process.trace

    @property
    def position(self) -> int:
        """How many transitions are recorded: the next one's step number."""
        return len(self.process.trace)

    @property
    def done(self) -> bool:
        """True once no thread can run any more (or the run stopped on an error)."""
        return self.stop is not None

    @property
    def threads(self) -> dict[int, KThread]:
        """The kernel model's threads by id (KTHREAD: callback stack, wait, fate)."""
        return self.process.kernel.threads

    @property
    def thread(self) -> KThread:
        """The thread on the CPU (or the first one, before the session has started)."""
        return self.process.kernel.current or self.process.thread

    @property
    def state(self) -> State:
        """The current thread's latest recorded state."""
        return self.process.trace.state(self.thread.state_id)

    @property
    def objects(self) -> dict[int, KObject]:
        """The kernel objects (events, mutants) by handle, as they are now."""
        return self.process.kernel.objects.objects

    def callback_stack(self, thread: KThread | int | None = None) -> list[Frame]:
        """A thread's callbacks in progress, outermost first (the current thread by default)."""
        t = self._thread(thread)
        return [Frame(f.api, f.activation.spec.name, f.user_frame, f.trap.ctx.rip) for f in t.callback_stack]

    def _thread(self, thread: KThread | int | None) -> KThread:
        if thread is None:
            return self.thread
        if isinstance(thread, KThread):
            return thread
        return self.process.kernel.threads[thread]

    def symbol(self, address: int) -> str:
        """``module!symbol+0xoff`` for an address."""
        return self.process.trace.symbolize(address)

    def address(self, where: str | int) -> int:
        """The address of ``module!symbol`` (or ``symbol`` in any image, or ``symbol+0xoff``)."""
        if isinstance(where, int):
            return where
        name, plus, off = where.partition("+")
        try:
            extra = int(off, 0) if plus else 0
        except ValueError:
            raise KeyError(f"{where!r}: the offset after '+' is not a number") from None
        hit = find_symbol(self.process.images, name)
        if hit is not None:
            return hit + extra
        raise KeyError(f"{where!r} names no symbol in the loaded images")

    # --- memory -------------------------------------------------------------------------
    def read(self, address: int, size: int) -> bytes:
        """Bytes of user memory. Raises EmuError when some of it is not mapped."""
        try:
            return self.process.machine.read(address, size)
        except UcError:
            raise EmuError(f"cannot read {size} byte(s) at {address:#x}: not mapped") from None

    def write(self, address: int, data: bytes) -> None:
        """Write user memory (whatever its protection, as a debugger does)."""
        try:
            self.process.machine.write(address, data)
        except UcError:
            raise EmuError(f"cannot write {len(data)} byte(s) at {address:#x}: not mapped") from None

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))

    # --- driving ----------------------------------------------------------------------
    def step(self) -> list[Transition]:
        """Run until the kernel model records at least one transition; returns what it recorded."""
        mark = self.position
        return self._go(lambda: self.position > mark)

    def step_instruction(self, count: int = 1) -> list[Transition]:
        """Run ``count`` instructions (fewer if the run ends); returns the transitions they caused.
        A `syscall` is one instruction: the kernel model's whole transition happens inside it; an
        instruction that faults into an exception handler stops at the handler's first instruction;
        a built-in ntdll trap (:mod:`emu.kernel.rtl`) does its work and its ``ret`` in one."""
        mark = self.position
        for _ in range(count):
            if self.done:
                break
            self._go(lambda: False, run=lambda: step(self.process))
        return self.process.trace.transitions[mark:]

    def run_until(self, predicate: Predicate) -> list[Transition]:
        """Run until ``predicate(session)`` holds, asked after each recorded transition (and
        before running at all); returns the transitions recorded on the way. If the predicate
        raises, the session stops at the next instruction boundary and the exception is raised
        from here, the session intact."""
        return self._go(lambda: predicate(self))

    def run_to_state(self, state: int) -> list[Transition]:
        """Run until state ``state`` (the ``s3`` of ``emu run``: give 3) is recorded."""
        return self._go(lambda: len(self.process.trace.raw_states) > state)

    def run_to(self, where: str | int) -> list[Transition]:
        """Run until the CPU is about to execute ``where`` (``module!symbol[+0xoff]`` or an address),
        as a one-time breakpoint does; returns the transitions recorded on the way."""
        address = self.address(where)
        temporary = address not in self._breakpoints
        if temporary:
            self.add_breakpoint(address)
        try:
            return self._to_breakpoint({address})
        finally:
            if temporary:
                self.remove_breakpoint(address)

    # --- breakpoints (what a debugger's "continue" stops at) ------------------------------
    def add_breakpoint(self, where: str | int) -> int:
        """Stop :meth:`cont` before the instruction at ``where``; returns its address. A Unicorn
        exit (:mod:`emu.debug.control`): the CPU stops before any hook of that instruction runs,
        so a breakpoint on one of emu's Python traps leaves the run unchanged."""
        address = self.address(where)
        self._breakpoints.add(address)
        return address

    def remove_breakpoint(self, where: str | int) -> None:
        self._breakpoints.discard(self.address(where))

    @property
    def breakpoints(self) -> list[int]:
        return sorted(self._breakpoints)

    def cont(self) -> list[Transition]:
        """Run until a breakpoint (:attr:`hit` says which) or the end; returns the transitions on the way."""
        return self._to_breakpoint(set(self._breakpoints))

    def _to_breakpoint(self, armed: set[int]) -> list[Transition]:
        self.hit = None
        mark = self.position
        if self.started and not self.done and self.regs.rip in armed:
            # The instruction the session stands on runs first: the CPU would stop on it at once.
            self._go(lambda: False, run=lambda: step(self.process))
            if not self.done and self.regs.rip in armed:
                self.hit = self.regs.rip
        if self.hit is None:
            wall = self.scenario.budgets.wall_time
            self._go(lambda: False, run=lambda: drive_to(self.process, armed, wall))
        return self.process.trace.transitions[mark:]

    def finish(self) -> Run:
        """Run to the end and return the :class:`~emu.api.Run` ``emu.run`` would have returned."""
        self._go(lambda: False)
        if self._result is None:
            self._result = self.process.result(self.error, self.stop or "exit")
        return Run.of(self._result)

    # --- snapshots ----------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Everything needed to come back here: CPU, memory, kernel model, trace position."""
        from emu.session_snapshot import take

        return take(self)

    def restore(self, snap: Snapshot) -> None:
        """Go back to a snapshot of this session (or of one of the same scenario, loaded from a file)."""
        from emu.session_snapshot import restore

        restore(self, snap)

    @cached_property
    def digest(self) -> str:
        """What a snapshot must match to be restored here (:func:`emu.session_snapshot.scenario_digest`)."""
        from emu.session_snapshot import scenario_digest

        return scenario_digest(self.scenario)

    def forget_result(self) -> None:
        """The session went back in time: the next :meth:`finish` builds its Run again."""
        self._result = None

    # --- the machinery --------------------------------------------------------------------
    def _observe(self, sid: int, thread: KThread) -> None:
        if self._stop_wanted():
            self.process.machine.request_stop()

    def _stop_wanted(self) -> bool:
        until = self._until
        if until is None or self._raised is not None:
            return self._raised is not None
        try:
            return until()
        except Exception as e:  # a predicate's own error: stop here, raise it once the kernel is done
            self._raised = e
            return True

    def _start(self) -> None:
        self.started = True
        p = self.process
        if isinstance(p, DumpProcess):
            self._result = p.start()  # None, or the stopped run a dump of one ends where it starts
            if self._result is not None:
                self.error, self.stop = self._result.error, self._result.stop
            return
        p.kernel.continue_thread(p.thread)

    def _go(self, until: Callable[[], bool], run: Callable[[], str] | None = None) -> list[Transition]:
        """Run until ``until()`` holds (asked first, then after each recorded transition), or as
        ``run`` runs the process (:mod:`emu.debug.control`: a step, to a breakpoint)."""
        mark = self.position
        if not self.started:
            self._start()
        if self.done or until():
            return self.process.trace.transitions[mark:]
        self._until = until
        try:
            error, stop = self.process.advance(self.scenario.budgets.wall_time, run=run)
        finally:
            self._until = None
        halt = self.process.halt
        if halt.halted:  # a hook stopped the run, or raised (emu.hooks)
            self.error, self.stop = halt.failure, "hook"
        elif stop == "break":
            self.hit = self.regs.rip
        elif stop not in ("stopped", "choice"):
            self.error, self.stop = error, stop
        raised, self._raised = self._raised, None
        if raised is not None:
            raise raised
        return self.process.trace.transitions[mark:]

    def __repr__(self) -> str:
        where = "not started" if not self.started else self.stop or f"at {self.symbol(self.regs.rip)}"
        return f"<Session {self.scenario.name}: {self.position} transitions, {where}>"
