"""The explorer's symbolic side: where symbolic values enter, which branches depend on them,
and which concrete inputs take the other sides.

Each path runs concretely on Unicorn with one value per symbolic variable (its *witness*). At a
symbolic request the kernel suspends as at a choice and the explorer forks; the path goes on
with the witness's value (first: the declared default), and the value's register or bytes are
tainted. While anything is tainted, :class:`~emu.symbolic.execute.Executor` follows the code.
At each decision (a branch, or an address/target that depends on a symbolic value) past the
path's fixed prefix, the solver is asked for an input that takes another side under the same
path condition; such an input becomes a work item that restarts from the fork where the first
variable whose value changes entered, replays the known states up to that decision, and goes on
from there (directed, concolic search: each feasible side of each decision once).

A state's identity adds, once a path has symbolic variables, its path condition and what its
tainted locations hold (their concrete bytes are left out of the digest), so one node is one
symbolic state: every input satisfying its path condition reaches it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import z3

from emu import interrupts
from emu.context import REGISTER_NAMES
from emu.kernel.symbolic import Symbolic
from emu.symbolic.execute import Executor
from emu.symbolic.kernel_reads import stack_arguments, symbolic_runs
from emu.symbolic.regs import GPR
from emu.symbolic.store import SYSRET_CLOBBERS, Expr, Step, Store, Var
from emu.symbolic.text import condition, path_condition

if TYPE_CHECKING:
    from emu.graph import StateGraph
    from emu.kernel import KThread
    from emu.trace import RawState

MAX_TARGETS = 16  # other values looked for at a symbolic address or jump target
QUERY_SECONDS = 2.0  # at most, per solver query (and never past the solver_time budget)
_CTX_INDEX = {r: i for i, r in enumerate(REGISTER_NAMES)}  # a register's place in a state's context


@dataclass(frozen=True)
class Pick:
    """A work item's answer to a symbolic request: the value, and the plan of the path it starts."""

    name: str
    value: int
    fork: int  # the fork (driver index) this item restarts from
    witness: tuple[tuple[str, int], ...]
    until: int  # replay known states until this decision is taken (-1: nothing to replay)
    expect: tuple[int, int] | None = None  # (decision index, site) the planned side is taken at

    def __str__(self) -> str:
        return f"{self.name}={self.value:#x}"


def witness_json(vars_: tuple[Var, ...] | list[Var], values: dict[str, int]) -> dict[str, str]:
    """A witness for output: statuses as hex numbers, inputs as hex bytes."""
    out: dict[str, str] = {}
    for v in vars_:
        if v.name in values:
            val = values[v.name]
            out[v.name] = f"{val:#010x}" if v.where == "status" else val.to_bytes(v.size, "little").hex()
    return out


class Driver:
    def __init__(self, explorer: Any, solver_time: float) -> None:
        self.explorer = explorer
        self.machine = explorer.machine
        self.trace = explorer.trace
        self.kernel = explorer.kernel
        self.exec = Executor(self.machine, self._branch, self._fix, self._concretize)
        self.forks: list[Any] = []
        self.queued: list[tuple[Any, Pick]] = []
        self.solver_time = solver_time
        self.spent = 0.0
        self.queries = 0
        self.reports: dict[tuple[str, int, str], str] = {}  # (state digest, site, message) -> kind
        self.conditions: dict[str, tuple[Step, ...]] = {}
        self.texts: dict[str, str] = {}  # path conditions found by parallel workers, as text (emu.symbolic.shipping)
        self.witnesses: dict[str, tuple[tuple[str, int], ...]] = {}
        self.var_info: dict[str, Var] = {}
        self._pairs: tuple[tuple[Var, ...], list[tuple[Expr, Expr]]] = ((), [])
        self.machine.kernel_read_watch = self._model_read

    def _model_read(self, address: int, size: int) -> None:
        """The kernel model reads user memory (a probe or copy, a service's read, a CONTEXT)."""
        if self.store.mem:
            rip = self.machine.regs.read(("rip",))[0]
            self.kernel_read(address, size, "read by the kernel model", rip)

    @property
    def store(self) -> Store:
        return self.exec.store

    # --- forks ----------------------------------------------------------------------------
    def save(self) -> Store:
        self.exec.fill()
        return self.store.copy()

    def load(self, saved: Store | None) -> None:
        self.exec._unfilled.clear()
        self.exec.store = saved.copy() if saved is not None else Store()
        self.exec.sync_hook(False)

    # --- the kernel's side ------------------------------------------------------------------
    def answer(self, thread: KThread, req: Symbolic) -> int | None:
        """KernelHooks.symbolic: name the value (a step that runs again gets a new name) and suspend."""
        st = self.store
        n = st.counts.get(req.name, 0) + 1
        st.counts[req.name] = n
        name = req.name if n == 1 else f"{req.name}#{n}"
        st.asked = Var(name, req.where, req.bits // 8, req.default, -1, req.domain, req.address)
        return None

    def at_request(self, fork: Any) -> Pick:
        """The explorer forked at a symbolic request: go on with this path's witness value."""
        st = self.store
        var = st.asked
        if var is None:
            raise RuntimeError("a symbolic request with no value asked")
        self.forks.append(fork)
        value = st.witness.get(var.name, var.value)
        return Pick(var.name, value, len(self.forks) - 1, tuple(sorted(st.witness.items())), st.replay_until, st.expect)

    def begin(self, pick: Pick) -> int:
        """Before the kernel resumes with ``pick.value`` (the fork is restored)."""
        st = self.store
        asked = st.asked
        if asked is None:
            raise RuntimeError("resumed a symbolic request that was not asked")
        var = replace(asked, value=pick.value, fork=pick.fork)
        self.var_info.setdefault(var.name, var)
        st.asked = None
        st.witness = dict(pick.witness)
        st.witness[var.name] = pick.value
        st.replay_until, st.expect = pick.until, pick.expect
        st.vars = (*st.vars, var)
        pending = self.kernel.pending_choice
        if var.where == "write":
            # The service writes the bytes as soon as it resumes (emu.kernel.user_write): they
            # are symbolic from that moment, for the kernel model's later reads too.
            raw = pick.value.to_bytes(var.size, "little")
            for i, s in enumerate(var.syms):
                st.mem[var.at + i] = (s, raw[i])
        else:
            st.intro = (var, pending.tid if pending is not None else -1)
        self.explorer._replaying = st.replay_until >= st.decisions
        return pick.value

    def replaying(self) -> bool:
        """Is the path still replaying known states (up to the decision its pick changes)?"""
        st = self.store
        return st.replay_until >= st.decisions

    def finish_segment(self) -> None:
        """A segment ended: a path planned to take another side must have reached that decision
        (or be waiting at a symbolic request on the way); otherwise the run went elsewhere."""
        st = self.store
        pending = self.kernel.pending_choice
        if st.replay_until >= st.decisions and not (pending is not None and isinstance(pending.choice, Symbolic)):
            site = st.expect[1] if st.expect is not None else -1
            self._report(site, f"the run ended before decision {st.replay_until}, where it was to take another side")
            st.replay_until = -1

    def on_state(self, sid: int, thread: KThread, raw: RawState) -> tuple[tuple[int, ...], bytes, bytes]:
        """A state was recorded: update the taint for the crossing; the context, stack and extra
        bytes its digest is made of (tainted values masked)."""
        ex = self.exec
        ex.fill()
        st = self.store
        tr = self.trace.raw_transitions[-1] if self.trace.raw_transitions else None
        kind = tr[1] if tr is not None and tr[4] == sid else None
        ctx, stack = raw.context, raw.stack
        masked_regs = dict(st.regs)
        if kind == "syscall":
            self._enter_kernel(thread, raw)
            masked_regs = st.saved.get((thread.tid, raw.depth), {})
        elif kind == "sysret":
            st.regs = {k: v for k, v in st.saved.pop((thread.tid, raw.depth), {}).items() if k not in SYSRET_CLOBBERS}
            st.flags = None
            self._introduce(thread, "sysret")
            masked_regs = dict(st.regs)
        elif kind in ("callback", "exception", "continue", "unwind", "exit", "fault"):
            if kind == "exception" and st.regs:
                self._concretize(
                    [(e, c) for e, c in st.regs.values() if c is not None], raw.context[16], "exception dispatch"
                )
            st.regs, st.flags = {}, None
            self._introduce(thread, kind)
            masked_regs = {}
        self._prune(thread, raw)
        ex.sync_hook(self.machine in interrupts.running)
        if not st.vars:
            return ctx, stack, b""
        if masked_regs:
            c = list(ctx)
            for r in masked_regs:
                if r in _CTX_INDEX:
                    c[_CTX_INDEX[r]] = 0
            ctx = tuple(c)
        rsp = raw.context[4]
        if st.mem and stack:
            b = bytearray(stack)
            for a in st.mem:
                if rsp <= a < rsp + len(b):
                    b[a - rsp] = 0
            stack = bytes(b)
        extra = repr(
            (
                sorted((r, e.sexpr()) for r, (e, _) in masked_regs.items()),
                sorted((a, e.sexpr()) for a, (e, _) in st.mem.items()),
                [s.cond.sexpr() for s in st.pc],
            )
        ).encode()
        return ctx, stack, extra

    def seen(self, digest: str) -> None:
        """The state just observed has this digest: keep its condition and a witness."""
        st = self.store
        self.conditions.setdefault(digest, st.pc)
        w = tuple(sorted((v.name, v.value) for v in st.vars))
        old = self.witnesses.get(digest)
        if old is None or w < old:
            self.witnesses[digest] = w

    def _enter_kernel(self, thread: KThread, raw: RawState) -> None:
        """A system call: the kernel model reads some registers as plain numbers; the rest of the
        user context waits in the trap frame until the call returns."""
        st = self.store
        ssn = raw.context[0] & 0xFFFF_FFFF
        name = self.kernel.names.get(ssn)
        read = ["rax"]
        if name == "NtCallbackReturn":
            read += ["r10", "rdx", "r8"]  # Result, ResultLength, Status (WRK ke/amd64/callout.asm)
        else:
            spec = self.kernel.registry.get(name) if name else None
            if spec is not None and spec.script is None:
                read += ["r10", "rdx", "r8", "r9"][: len(spec.arg_types)]
        used = [(st.regs[r][0], raw.context[_CTX_INDEX[r]]) for r in read if r in st.regs]
        if used:
            self._concretize(used, raw.context[16], f"the kernel model reads {', '.join(read)} at {name}")
        if st.mem:
            self._kernel_reads_at_entry(name, raw)
        st.saved[(thread.tid, raw.depth)] = dict(st.regs)
        st.regs, st.flags = {}, None

    def _kernel_reads_at_entry(self, name: str | None, raw: RawState) -> None:
        """User memory the kernel model reads for this call before the service runs: arguments
        5+ on the stack, and NtCallbackReturn's record of the callback's Result."""
        ctx = raw.context
        if name == "NtCallbackReturn":
            # The kernel records what Result held (emu.kernel.record record_output) and hands
            # it to the service, which may probe and copy it (emu.kernel.result).
            length = ctx[_CTX_INDEX["rdx"]] & 0xFFFF_FFFF
            n = min(length, self.kernel.profile.callback_output_limit)
            self.kernel_read(ctx[_CTX_INDEX["r10"]], n, "the callback's Result at NtCallbackReturn", ctx[16])
            return
        spec = self.kernel.registry.get(name) if name else None
        if spec is not None:
            count = len(spec.arg_types) if spec.script is None else spec.script_args
            at, size = stack_arguments(ctx[4], count)
            self.kernel_read(at, size, f"arguments 5-{count} of {name}", ctx[16])

    def kernel_read(self, address: int, size: int, what: str, site: int = -1) -> None:
        """The kernel model reads ``size`` bytes at ``address``: fix the symbolic ones to the
        run's values (emu.symbolic.kernel_reads)."""
        st = self.store
        runs = symbolic_runs(st.mem, address, size, self.machine.read)
        # Bytes fixed already (NtCallbackReturn's record, then the service's copy) are not news.
        fixed = [s.cond for s in st.pc if s.kind == "fixed"]
        runs = [r for r in runs if not any(z3.eq(c, r[1] == r[2]) for c in fixed)]
        if not runs:
            return
        used = [(e, v) for _, e, v in runs]
        where = ", ".join(f"{a:#x} (+{e.size() // 8})" for a, e, _ in runs)
        self._concretize(used, site, f"the kernel model reads symbolic bytes at {where}: {what}")

    def _introduce(self, thread: KThread, kind: str) -> None:
        """The thread's first state after a symbolic request: a status arrives in RAX at the
        sysret, an input in the callout's buffer at the callback. Any other crossing (the
        kernel refused the callback, the thread ended) leaves the value unused."""
        st = self.store
        if st.intro is None or st.intro[1] != thread.tid:
            return
        var, _ = st.intro
        st.intro = None
        if var.where == "status" and kind == "sysret":
            # The concrete status went into EAX, zero-extended (emu.kernel.core sysret).
            rax = self.machine.regs.read(("rax",))[0]
            if rax == var.value:
                st.regs["rax"] = (z3.ZeroExt(32, var.expr()), rax)
            return
        if var.where != "data" or kind != "callback" or not thread.callback_stack:
            return
        buffer = thread.callback_stack[-1].buffer
        data = self.machine.read(buffer, var.size)
        for i, s in enumerate(var.syms):
            st.mem[buffer + i] = (s, data[i])

    def _prune(self, thread: KThread, raw: RawState) -> None:
        """Bytes below the thread's RSP are dead (the x64 ABI has no red zone)."""
        st = self.store
        if not st.mem:
            return
        rsp = raw.context[4]
        lo = thread.stack_limit
        dead = [a for a in st.mem if lo <= a < rsp]
        for a in dead:
            del st.mem[a]

    # --- decisions --------------------------------------------------------------------------
    def _here(self) -> str:
        return self.explorer._last or ""

    def _report(self, site: int, message: str, kind: str = "incomplete") -> None:
        where = self.trace.symbolize(site) if site >= 0 else ""
        self.reports.setdefault((self._here(), site, f"{where}: {message}" if where else message), kind)
        self.store.notes = (*self.store.notes, message)

    def _holds(self, cond: Any) -> bool:
        """Does ``cond`` hold for this path's values (the run's concrete inputs)?"""
        vars_ = self.store.vars
        if self._pairs[0] != vars_:
            self._pairs = (vars_, [p for v in vars_ for p in v.values()])
        pairs = self._pairs[1]
        return bool(z3.is_true(z3.simplify(z3.substitute(cond, *pairs)))) if pairs else True

    def _decide(self, site: int) -> tuple[int, bool]:
        """Count a decision; (its index, whether its other sides are this path's to look for)."""
        st = self.store
        i = st.decisions
        st.decisions += 1
        if st.expect is not None and st.expect[0] == i and st.expect[1] != site:
            self._report(site, f"the run diverged: decision {i} was planned at {self.trace.symbolize(st.expect[1])}")
        if i >= st.replay_until and self.explorer._replaying:
            self.explorer._replaying = False
        # A parallel worker on its way down a coordinator's path: the coordinator asked here.
        return i, i > st.replay_until and not self.explorer._descending

    def _branch(self, cond: Any, site: int, text: str) -> None:
        st = self.store
        if not self._holds(cond):
            self._report(site, f"{text}: the concrete run disagrees with the symbolic condition {condition(cond)}")
            return
        i, mine = self._decide(site)
        if mine:
            model = self._solve([*self._pc(), z3.Not(cond)], site, text)
            if model is not None:
                self._enqueue(model, i, site)
        st.pc = (*st.pc, Step(cond, site, text))

    def _fix(self, e: Expr, value: int, site: int, text: str) -> None:
        st = self.store
        bits = e.size()
        value &= (1 << bits) - 1
        i, mine = self._decide(site)
        if mine:
            others: list[Any] = [e != value]
            for _ in range(MAX_TARGETS):
                model = self._solve([*self._pc(), *others], site, text)
                if model is None:
                    break
                v = model.eval(e, model_completion=True).as_long()
                self._enqueue(model, i, site)
                others.append(e != v)
            else:
                self._report(site, f"{text}: more than {MAX_TARGETS} other values; the rest are not explored")
        st.pc = (*st.pc, Step(e == value, site, text, "target"))

    def _concretize(self, used: list[tuple[Expr, int]], site: int, text: str) -> None:
        st = self.store
        for e, v in used:
            st.pc = (*st.pc, Step(e == (v & ((1 << e.size()) - 1)), site, text, "fixed"))
        self._report(site, f"{text}: symbolic value(s) fixed to the concrete run's; other values not explored")

    def _pc(self) -> list[Any]:
        return [s.cond for s in self.store.pc] + self.store.assumptions()

    def _solve(self, conds: list[Any], site: int, text: str) -> Any:
        left = self.solver_time - self.spent
        if left <= 0:
            self._report(site, f"{text}: the solver_time budget is spent; the other side is not explored")
            return None
        s = z3.Solver()
        s.set("timeout", max(1, int(min(left, QUERY_SECONDS) * 1000)))
        s.add(*conds)
        t = time.perf_counter()
        r = s.check()
        self.spent += time.perf_counter() - t
        self.queries += 1
        if r == z3.sat:
            return s.model()
        if r == z3.unknown:
            self._report(site, f"{text}: the solver gave up ({s.reason_unknown()}); the other side is not explored")
        return None

    def _enqueue(self, model: Any, i: int, site: int) -> None:
        st = self.store
        new: dict[str, int] = dict(st.witness)
        first: Var | None = None
        for v in st.vars:
            syms = v.syms
            if len(syms) == 1:
                m = model[syms[0]]
                val = m.as_long() if m is not None else v.value
            else:
                raw = bytearray(v.value.to_bytes(v.size, "little"))
                for k, s in enumerate(syms):
                    m = model[s]
                    if m is not None:
                        raw[k] = m.as_long()
                val = int.from_bytes(raw, "little")
            new[v.name] = val
            if first is None and val != v.value:
                first = v
        if first is None:
            return
        pick = Pick(first.name, new[first.name], first.fork, tuple(sorted(new.items())), i, (i, site))
        self.queued.append((self.forks[first.fork], pick))

    # --- results ----------------------------------------------------------------------------
    def annotate(self, graph: Any) -> None:
        """Give every node its path condition and a witness (graph attributes)."""
        cache: dict[int, str] = {}
        for _, a in graph.nodes(data=True):
            d = a.get("digest")
            pc = self.conditions.get(d)
            if (pc is None and d not in self.texts) or not self.witnesses.get(d):
                continue
            a["path_condition"] = path_condition([s.cond for s in pc], cache) if pc is not None else self.texts[d]
            a["witness"] = " ".join(f"{k}={v}" for k, v in witness_json(self._vars(d), dict(self.witnesses[d])).items())

    def _vars(self, d: str) -> list[Var]:
        return [self.var_info[name] for name, _ in self.witnesses.get(d, ()) if name in self.var_info]

    def summary(
        self, graph: StateGraph, faults: list[tuple[str, str]], name: Callable[[str], str]
    ) -> dict[str, object]:
        """Variables, incomplete reports, and each pending, deadlocked or faulting state's
        condition and witness; ``name`` gives a digest's node id."""
        lean = graph.lean
        reports = sorted(
            ({"state": name(d), "message": m} for (d, _, m) in self.reports),
            key=lambda r: (_order(r["state"]), r["message"]),
        )

        def described(nodes: list[str]) -> list[dict[str, object]]:
            out: list[dict[str, object]] = []
            for n in nodes:
                a = lean.nodes[n]
                d = a.get("digest")
                w = witness_json(self._vars(d), dict(self.witnesses.get(d, ())))
                out.append({"state": n, "reached_when": a.get("path_condition", "true"), "witness": w})
            return out

        deadlocks = [n for n, a in lean.nodes(data=True) if "deadlock" in a]
        return {
            "variables": sorted(self.var_info),
            "incomplete": len(reports),
            "reports": reports,
            "pending": described(graph.pending()),
            "deadlocks": described(deadlocks),
            "faults": described(sorted({r for r, _ in faults}, key=_order)),
        }


def _order(name: str) -> tuple[int, str]:
    return (int(name[1:]), name) if name[1:].isdigit() else (1 << 62, name)


__all__ = ["GPR", "Driver", "Pick", "witness_json"]
