"""System services: typed generator functions registered by name in a per-kernel registry.

A service is a function ``(ctx, arg1, arg2, ...)`` whose parameters after ``ctx`` are
annotated with the argument types below. It either returns an NTSTATUS or is a
generator that may ``yield`` requests to the kernel (:class:`UserCallback`,
:class:`TerminateThread`) and finally ``return`` an NTSTATUS::

    registry = ServiceRegistry()

    @registry.syscall("NtUserMessageCall")
    def message_call(ctx, hwnd: HANDLE, msg: ULONG):
        result = yield UserCallback(api=2, data=b"hello")
        return result.status

Registration checks the signature (names, types, duplicates) at once, not at the
first call; building a process checks that each name has a service number there
(:func:`emu.services.bind`). A service that raises stops the run with one line naming it
(:class:`~emu.errors.ExtensionError`), the trace so far kept.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Generator, Sequence
from dataclasses import field
from typing import Any, Protocol

from emu.errors import EmuError, ExtensionError, KernelError, ModelBug
from emu.kernel.objects import (
    Message,
    ObjectRequest,
    ReceiveMessage,
    ReleaseMutant,
    ReplyMessage,
    SendMessage,
    SetEvent,
    Wait,
)
from emu.kernel.result import OutputUse
from emu.kernel.symbolic import Symbolic, SymbolicReturn
from emu.kernel.user_write import ScriptWrite, script_args
from emu.records import record

OBJECT_REQUEST_TYPES = (Wait, SetEvent, ReleaseMutant, SendMessage, ReceiveMessage, ReplyMessage)


# --- argument types (SAL-style: how the raw 64-bit register or stack slot is decoded) ---
class ArgType(int):
    """An argument's type in a service signature; values arrive as plain ints."""

    bits = 64

    @classmethod
    def decode(cls, raw: int) -> int:
        return raw & ((1 << cls.bits) - 1)


class Ptr(ArgType):
    """A user-mode pointer."""


class HANDLE(ArgType):
    pass


class ULONG_PTR(ArgType):
    pass


class ULONG(ArgType):
    bits = 32


class NTSTATUS(ArgType):
    bits = 32


ARG_TYPES: dict[str, type[ArgType]] = {t.__name__: t for t in (Ptr, HANDLE, ULONG_PTR, ULONG, NTSTATUS)}
MAX_ARGS = 16


# --- requests a service yields, and what it gets back -----------------------------------
@record(frozen=True)
class UserCallback:
    """KeUserModeCallback(api, data): run KernelCallbackTable[api](data) in user mode.

    ``by_depth``, when given, picks the api by the thread's current callback depth
    (``by_depth[depth]``, the last entry for deeper levels): one service, different
    callbacks as it re-enters itself.
    """

    api: int
    data: bytes = b""
    by_depth: tuple[int, ...] = ()
    message: int | None = None  # the sent message this callback delivers (win32k's SendMessage)
    symbolic: str = ""  # the name of a symbolic input (``data`` holds its default bytes)

    def api_at(self, depth: int) -> int:
        return self.by_depth[min(depth, len(self.by_depth) - 1)] if self.by_depth else self.api


@record(frozen=True)
class CallbackResult:
    """What a callback gave back through NtCallbackReturn (or the failure to call back).

    ``status`` is the callback's Status, unchanged; ``result``/``length`` are the Result
    pointer and length NtCallbackReturn stores for KeUserModeCallback's caller (WRK
    ``ke/amd64/callout.asm`` NtCallbackReturn). ``output`` is what those bytes held when
    NtCallbackReturn ran (empty if they were not readable): a record for the trace, not a
    copy the kernel made. A service that wants the bytes probes and copies them itself
    (:func:`emu.kernel.result.use_output`).
    """

    status: int
    output: bytes = b""
    result: int = 0
    length: int = 0


@record(frozen=True)
class TerminateThread:
    """End the calling thread with an exit status; the service never resumes."""

    status: int


class ServiceContext(Protocol):
    """What a service may touch: the calling thread's user memory and identity."""

    thread_id: int
    probe_limit: int  # MM_USER_PROBE_ADDRESS of the modelled build

    def read(self, address: int, size: int) -> bytes: ...

    def probe_read(self, address: int, size: int) -> bytes | None:
        """The bytes, or None where a kernel-mode read would fault."""
        ...

    def write(self, address: int, data: bytes) -> None: ...


@record(frozen=True)
class Choice:
    """Ask the kernel which way to go: one of ``options`` by name.

    A single run takes ``default``; an explorer forks the whole machine here and
    follows every option.
    """

    name: str
    options: tuple[str, ...]
    default: str


Request = UserCallback | TerminateThread | Choice | ObjectRequest | Symbolic
# a callback's or wait's result, a chosen option, a received message, a symbolic value's concrete value
Sent = CallbackResult | str | Message | int | None
ServiceGen = Generator[Request, Any, int]  # what a generator service is, for its return annotation


@record(frozen=True)
class ChoiceStep:
    """A scripted choice: named alternatives, each a tuple of script steps."""

    name: str
    default: str
    options: tuple[tuple[str, tuple[ScriptStep, ...]], ...]

    def request(self) -> Choice:
        return self._request

    @functools.cached_property
    def _request(self) -> Choice:
        """The same (immutable) request at every visit: made once per step."""
        return Choice(self.name, tuple(n for n, _ in self.options), self.default)

    def branch(self, option: str) -> tuple[ScriptStep, ...]:
        for n, steps in self.options:
            if n == option:
                return steps
        raise KernelError(
            f"choice {self.name!r} has no option {option!r} (options: {', '.join(n for n, _ in self.options)})"
        )


@record(frozen=True)
class ScriptReturn:
    """A scripted return that first probes or copies the last callback's result, as win32k
    does: a fault there makes the service return STATUS_ACCESS_VIOLATION instead of ``status``
    (None: the last callback's status)."""

    status: int | None
    output: OutputUse


# A script step: a callback, an object request (wait, set, release, send), a status to
# return, None (return the last callback's status), a return that uses the callback's
# result first, a write into the caller's memory, or a choice between step lists.
ScriptStep = UserCallback | int | None | ScriptReturn | ChoiceStep | ObjectRequest | SymbolicReturn | ScriptWrite


@record(frozen=True)
class ServiceSpec:
    """A registered service: its name, argument types and implementation (a function or a script)."""

    name: str
    func: Callable[..., Any] | None
    arg_types: tuple[type[ArgType], ...]
    arg_names: tuple[str, ...]
    doc: str = ""
    script: tuple[ScriptStep, ...] | None = None

    @property
    def constant(self) -> int | None:
        """The status of a script that does nothing but return it (a fast path for the kernel)."""
        s = self.script
        return s[0] if s is not None and len(s) == 1 and isinstance(s[0], int) else None

    @functools.cached_property
    def script_args(self) -> int:
        """Arguments a script's writes use (0 for a Python service); worked out once."""
        return script_args(self.script) if self.script is not None else 0

    def activate(self, ctx: ServiceContext, raw_args: list[int]) -> Activation | ScriptActivation:
        if self.script is not None:
            return ScriptActivation(self, [(self.script, 0)], ctx, raw_args)
        args = [t.decode(a) for t, a in zip(self.arg_types, raw_args)]
        return Activation(self, _JournalContext(ctx), args)


class _JournalContext:
    """A service's view of user memory that records what it read, so a replay sees the same bytes."""

    def __init__(self, ctx: ServiceContext, replay: list[bytes | None] | None = None) -> None:
        self._ctx = ctx
        self.thread_id = ctx.thread_id
        self.probe_limit = ctx.probe_limit
        self.reads: list[bytes | None] = []
        self._replay = replay or []
        self.replaying = replay is not None

    def read(self, address: int, size: int) -> bytes:
        data = self._journal(lambda: self._ctx.read(address, size))
        return data if data is not None else b""

    def probe_read(self, address: int, size: int) -> bytes | None:
        return self._journal(lambda: self._ctx.probe_read(address, size))

    def _journal(self, fresh: Callable[[], bytes | None]) -> bytes | None:
        n = len(self.reads)
        data = self._replay[n] if self.replaying and n < len(self._replay) else fresh()
        self.reads.append(data)
        return data

    def write(self, address: int, data: bytes) -> None:
        if self.replaying:
            return  # the restored memory already holds what the original run wrote
        self._ctx.write(address, data)


_REQUEST_TYPES = (UserCallback, TerminateThread, Choice, Symbolic, *OBJECT_REQUEST_TYPES)  # what a service may yield


@record
class Activation:
    """One running instance of a Python service: a generator plus what was sent into it.

    ``sent`` is the journal of values the generator received and ``ctx.reads`` the
    bytes it read; with the arguments they rebuild the activation by replay when a
    run forks (writes are not repeated: the restored memory already holds them).
    ``requests`` are what it yielded: a replay that yields anything else is refused (the
    generator's own Python state is never saved, so it must follow from the journal).
    """

    spec: ServiceSpec
    ctx: _JournalContext
    args: list[int]
    sent: list[Sent] = field(default_factory=list)
    requests: list[object] = field(default_factory=list)
    _gen: Generator[Any, Any, Any] | None = None
    _done: bool = False
    remark: str = ""  # a Python service says nothing extra for the trace

    def step(self, value: Sent) -> Request | int:
        """Advance: returns the next request, or the final NTSTATUS."""
        if self._gen is None:
            func = self.spec.func
            if func is None:
                raise KernelError(f"service {self.spec.name} has no implementation")
            try:
                out = func(self.ctx, *self.args)
            except (EmuError, ModelBug):
                raise
            except Exception as e:
                raise _failed(self.spec.name, e) from e
            if not inspect.isgenerator(out):
                self._done = True
                return _status(self.spec.name, out)
            self._gen = out
        gen: Generator[Any, Any, Any] = self._gen
        self.sent.append(value)
        try:
            req = gen.send(value) if len(self.sent) > 1 else next(gen)
        except StopIteration as stop:
            self._done = True
            return _status(self.spec.name, stop.value)
        except (EmuError, ModelBug):
            raise
        except Exception as e:
            raise _failed(self.spec.name, e) from e
        if not isinstance(req, _REQUEST_TYPES):
            raise KernelError(
                f"service {self.spec.name} yielded {req!r}; expected UserCallback, Choice or TerminateThread"
            )
        self.requests.append(req)
        return req

    def fork(self) -> Activation:
        """A twin at the same point, rebuilt by replaying the journal into a fresh generator."""
        return Activation.replay(self.spec, self.ctx._ctx, self.args, self.sent, self.ctx.reads, self.requests)

    @classmethod
    def replay(
        cls,
        spec: ServiceSpec,
        ctx: ServiceContext,
        args: Sequence[int],
        sent: Sequence[Sent],
        reads: Sequence[bytes | None],
        requests: Sequence[object] = (),
    ) -> Activation:
        """An activation rebuilt from a journal: a fresh generator is sent ``sent`` again, its
        reads answered from ``reads`` and its writes skipped (the memory already holds them).
        ``requests``: what it yielded then (the objects, or their reprs from a file); a
        replay that yields something else, or ends early, raises ExtensionError naming it."""
        journal = _JournalContext(ctx, list(reads))
        act = cls(spec, journal, list(args))
        for k, value in enumerate(sent):
            got = act.step(value)
            if k < len(requests):
                want = requests[k]
                if (repr(got) != want) if isinstance(want, str) else (got != want):
                    raise _diverged(spec.name, got, want)
        journal.replaying = False
        return act

    def position(self) -> tuple[object, ...]:
        return (self.spec.name, tuple(self.args), tuple(repr(v) for v in self.sent), tuple(self.ctx.reads))


def _diverged(name: str, got: object, want: object) -> ExtensionError:
    """A suspended service rebuilt from its journal (a fork, a snapshot, a dump) went another way."""
    now = f"returned {got:#x}" if isinstance(got, int) else f"yielded {str(got)[:80]}"
    return ExtensionError(
        "service",
        f"service {name} cannot be resumed: replayed from its journal it {now} where it had yielded "
        f"{str(want)[:80]}; a suspended generator is rebuilt from its arguments, what it was sent and what "
        f"it read (its own Python state cannot be saved), so it must not depend on anything else",
    )


def _failed(name: str, e: Exception) -> ExtensionError:
    """A Python service's own exception, as the one line that stops the run."""
    text = str(e).splitlines()[0] if str(e) else ""
    return ExtensionError("service", f"service {name} raised {type(e).__name__}{': ' + text if text else ''}")


def _status(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise KernelError(f"service {name} returned {value!r}; expected an NTSTATUS (int)")
    return value & 0xFFFF_FFFF


class ServiceRegistry:
    """Services by name; one registry per kernel, never a module global."""

    def __init__(self) -> None:
        self._specs: dict[str, ServiceSpec] = {}

    def syscall(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``func`` as the implementation of system service ``name``."""

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name, func)
            return func

        return register

    service = syscall  # the older spelling

    def specs(self) -> list[ServiceSpec]:
        """The registered services, by name."""
        return [self._specs[n] for n in sorted(self._specs)]

    def put(self, spec: ServiceSpec) -> None:
        """Register ``spec`` (from another registry), replacing a service of the same name."""
        self._specs[spec.name] = spec

    def add(self, name: str, func: Callable[..., Any], doc: str = "") -> ServiceSpec:
        if not name.startswith("Nt"):
            raise KernelError(f"service name {name!r} must use the Nt spelling (e.g. 'NtClose')")
        if name in self._specs:
            raise KernelError(f"service {name} is registered twice")
        sig = inspect.signature(func)
        params = list(sig.parameters.values())
        if not params:
            raise KernelError(f"service {name}: first parameter must be the service context")
        try:
            hints = typing.get_type_hints(func)
        except Exception as e:  # unresolved annotation names
            raise KernelError(f"service {name}: cannot resolve argument annotations ({e})") from None
        types: list[type[ArgType]] = []
        names: list[str] = []
        for p in params[1:]:
            if p.kind is p.VAR_POSITIONAL:
                continue
            t = hints.get(p.name)
            if not (isinstance(t, type) and issubclass(t, ArgType)):
                raise KernelError(
                    f"service {name}: parameter {p.name!r} needs an argument type ({', '.join(ARG_TYPES)}), got {t!r}"
                )
            types.append(t)
            names.append(p.name)
        if len(types) > MAX_ARGS:
            raise KernelError(f"service {name}: {len(types)} arguments, at most {MAX_ARGS}")
        spec = ServiceSpec(name, func, tuple(types), tuple(names), doc or (func.__doc__ or "").strip())
        self._specs[name] = spec
        return spec

    def add_script(self, name: str, steps: Sequence[ScriptStep], doc: str = "") -> ServiceSpec:
        """Register a scripted service: callbacks and choices in order, ending with a status (or None)."""
        if name in self._specs:
            raise KernelError(f"service {name} is registered twice")
        if not steps or isinstance(steps[-1], UserCallback):
            raise KernelError(f"service {name}: a script must end with a status to return (or a choice)")
        spec = ServiceSpec(name, None, (), (), doc or f"scripted: {len(steps)} step(s)", tuple(steps))
        self._specs[name] = spec
        return spec

    def get(self, name: str) -> ServiceSpec | None:
        return self._specs.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return sorted(self._specs)


# The running scripted service lives in its own module; it is one of this module's names.
from emu.kernel.script import ScriptActivation  # noqa: E402  (it imports this module's types)

__all__ = ["ScriptActivation"]
