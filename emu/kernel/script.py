"""A running scripted service (a scenario's ``script``): its steps, taken one at a time.

The kernel steps a :class:`ScriptActivation` with what the last request got back (an option, a
callback's result, a symbolic value) and gets the next request or the final status.
"""

from __future__ import annotations

from emu.errors import KernelError, ModelBug
from emu.kernel.objects import ReceiveMessage, ReleaseMutant, ReplyMessage, SendMessage, SetEvent, Wait
from emu.kernel.result import use_output
from emu.kernel.services import (
    CallbackResult,
    ChoiceStep,
    Request,
    ScriptReturn,
    ScriptStep,
    Sent,
    ServiceContext,
    ServiceSpec,
    UserCallback,
)
from emu.kernel.symbolic import Symbolic, SymbolicReturn
from emu.kernel.user_write import ScriptWrite, join_remark, write_step

# Steps a script hands to the kernel as they are (a callback, an object request).
_HANDED_TO_KERNEL = (UserCallback, Wait, SetEvent, ReleaseMutant, SendMessage, ReceiveMessage, ReplyMessage)


class ScriptActivation:
    """A running scripted service: a stack of (steps, index) positions. Forking copies it."""

    __slots__ = ("args", "ctx", "last", "pending", "pending_symbolic", "remark", "spec", "stack")

    def __init__(
        self, spec: ServiceSpec, stack: list[tuple[tuple[ScriptStep, ...], int]], ctx: ServiceContext | None = None,
        args: list[int] | None = None,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.stack = stack
        self.ctx = ctx
        self.args = args or []  # the raw arguments (R10, RDX, R8, R9, then the stack's)
        self.last: CallbackResult | None = None
        self.pending: ChoiceStep | None = None
        self.pending_symbolic: UserCallback | SymbolicReturn | ScriptWrite | None = None  # asked for a value
        self.remark = ""  # for the trace at the service's return: its writes, probe or copy

    def step(self, value: Sent) -> Request | int:
        sym = self.pending_symbolic
        if sym is not None:
            if not isinstance(value, int):
                name = sym.name if isinstance(sym, SymbolicReturn) else sym.symbolic
                raise ModelBug(f"service {self.spec.name} asked for symbolic {name} and got {value!r}")
            self.pending_symbolic = None
            if isinstance(sym, SymbolicReturn):
                return value & 0xFFFF_FFFF
            if not isinstance(sym, ScriptWrite):
                return UserCallback(
                    sym.api, value.to_bytes(len(sym.data), "little"), sym.by_depth, sym.message, sym.symbolic
                )
            write_step(self, sym, value)  # the symbolic bytes' value: write them and go on
            value = None
        if value is None:
            pass  # the first step, or after a symbolic write: nothing to take in
        elif type(value) is CallbackResult:
            self.last = value
        elif isinstance(value, str):
            if self.pending is None:
                # The kernel hands an option only to the activation whose choice is pending.
                raise ModelBug(f"service {self.spec.name} got option {value!r} but asked for no choice")
            self.stack.append((self.pending.branch(value), 0))
            self.pending = None
        elif isinstance(value, CallbackResult):
            self.last = value
        stack = self.stack
        while True:
            steps, i = stack[-1]
            if i >= len(steps):
                if len(stack) == 1:
                    raise KernelError(f"service {self.spec.name}: its script ended without a return step")
                stack.pop()  # an option's steps are done: continue after the choice
                continue
            stack[-1] = (steps, i + 1)
            st = steps[i]
            # The common steps first (a plain callback, a status, None): none is of the kinds below.
            kind = type(st)
            if kind is UserCallback and not st.symbolic:  # type: ignore[union-attr]
                return st  # type: ignore[return-value]
            if st is None:
                return self.last.status if self.last is not None else 0
            if kind is int:
                return st  # type: ignore[return-value]
            if isinstance(st, UserCallback) and st.symbolic:
                self.pending_symbolic = st
                return Symbolic(st.symbolic, 8 * len(st.data), "data", (), int.from_bytes(st.data, "little"))
            if isinstance(st, SymbolicReturn):
                self.pending_symbolic = st
                return st.request()
            if isinstance(st, ScriptWrite):
                req = write_step(self, st)  # probe, then write (or ask for the symbolic bytes' value)
                if req is not None:
                    return req
                continue
            if isinstance(st, _HANDED_TO_KERNEL):
                return st
            if isinstance(st, ChoiceStep):
                self.pending = st
                return st.request()
            if st is None:
                return self.last.status if self.last is not None else 0
            if isinstance(st, ScriptReturn):
                return self._use_output(st)
            return st

    def _use_output(self, st: ScriptReturn) -> int:
        last = self.last
        status = st.status if st.status is not None else (last.status if last is not None else 0)
        if last is None or self.ctx is None:
            return status
        done = use_output(st.output, last.result, last.length, self.ctx.probe_limit, self.ctx.probe_read)
        self.remark = join_remark(self.remark, done.remark)
        return done.status if done.status is not None else status

    def fork(self) -> ScriptActivation:
        twin = ScriptActivation(self.spec, list(self.stack), self.ctx, self.args)
        twin.last, twin.pending, twin.pending_symbolic = self.last, self.pending, self.pending_symbolic
        twin.remark = self.remark
        return twin

    def position(self) -> tuple[object, ...]:
        """What identifies this activation's progress (for state digests)."""
        last = None if self.last is None else (self.last.status, self.last.output)
        stack = self.stack
        at = (stack[0][1],) if len(stack) == 1 else tuple([i for _, i in stack])
        out = (self.spec.name, at, len(stack), last)
        return out if self.pending_symbolic is None else (*out, self.pending_symbolic)
