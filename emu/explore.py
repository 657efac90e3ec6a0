"""Exploration: follow every way the kernel can answer, forking the whole machine at each choice.

A scripted service may ``choose`` (callback or not, success or failure, nest deeper
or stop). A single run takes the stated default; :func:`explore` suspends the
service at each choice, saves the machine (CPU context, copy-on-write memory pages,
kernel model), and follows each option from a restored copy, breadth-first or
depth-first. States are identified by a canonical digest of registers, live stack,
memory that differs from the initial image, and the kernel model, so paths that meet
merge into one node, and a path stops where it reaches a state already known (its
future is already being explored: the machine is deterministic).

Exports are independent of the exploration order: nodes are numbered by a canonical
breadth-first walk from the start with edges in sorted order.
"""

from __future__ import annotations

import gc
import hashlib
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import networkx as nx

from emu.engine import Process
from emu.errors import BudgetExceeded, KernelError, MachineFault
from emu.graph import EdgeInfo, StateGraph
from emu.kernel.core import KernelState, KThread
from emu.machine import Watchdog
from emu.scenario import Scenario, load_scenario
from emu.snapshot import PageSnapshot
from emu.trace import State

Strategy = Literal["bfs", "dfs"]


@dataclass(frozen=True)
class Fork:
    """A machine saved at a choice point."""

    cpu: Any  # unicorn UcContext
    memory: PageSnapshot
    kernel: KernelState
    depth: int  # choices taken on the way here


@dataclass
class Exploration:
    """What an exploration found, and whether it finished."""

    scenario: Scenario
    strategy: Strategy
    graph: StateGraph
    forks: int = 0
    paths: int = 0
    stopped_by: str | None = None  # a budget's name when exploration did not finish
    unexplored: int = 0  # options left on the work list when a budget stopped it
    faults: list[tuple[str, str]] = field(default_factory=list)  # (node, message)
    elapsed: float = 0.0
    forked_states: int = 0  # states recorded after a fork (each came from a restored copy)
    snapshot_bytes: int = 0  # memory held by page snapshots (dirty pages only)

    @property
    def states(self) -> int:
        return len(self.graph)

    @property
    def merges(self) -> int:
        """States reached along more than one distinct edge."""
        return len(self.graph.merges())

    @property
    def pending(self) -> list[str]:
        return self.graph.pending()

    @property
    def complete(self) -> bool:
        return self.stopped_by is None

    def summary(self) -> dict[str, object]:
        return {
            "scenario": self.scenario.name,
            "strategy": self.strategy,
            "states": self.states,
            "transitions": self.graph.lean.number_of_edges(),
            "merges": self.merges,
            "pending": len(self.pending),
            "forks": self.forks,
            "paths": self.paths,
            "complete": self.complete,
            "stopped_by": self.stopped_by,
            "unexplored": self.unexplored,
            "faults": [{"node": n, "message": m} for n, m in self.faults],
        }


class Explorer:
    """Runs one scenario's machine through every option of every choice, within budgets."""

    def __init__(self, scenario: Scenario, strategy: Strategy = "bfs", progress: TextIO | None = None) -> None:
        if strategy not in ("bfs", "dfs"):
            raise ValueError(f"unknown strategy {strategy!r} (bfs or dfs)")
        self.scenario = scenario
        self.strategy: Strategy = strategy
        self.progress = progress
        self.process = Process(scenario)
        self.kernel = self.process.kernel
        self.machine = self.process.machine
        self.trace = self.process.trace
        self.kernel.choose = lambda thread, choice: None  # always suspend: the explorer decides
        self.kernel.state_budget = None  # the trace spans every path here; distinct states are budgeted below
        self.kernel.observer = self._observe
        self.cow = self.machine.enable_cow()
        self.digests: list[str] = []  # digest of each raw state currently in the trace
        self.nodes: dict[str, State] = {}
        self.edges: dict[tuple[object, ...], None] = {}
        self._segment_seen: set[str] = set()
        self._merged_at: int | None = None
        self._stacks = [(t.stack_limit, t.stack_base) for t in self.kernel.threads.values()]
        self._deadline = 0.0

    # --- state identity -------------------------------------------------------------
    def _observe(self, sid: int, thread: KThread) -> None:
        raw = self.trace.raw_states[sid]
        h = hashlib.blake2b(digest_size=12)
        # tid, mode, registers; then the stack from RSP up (bytes below RSP are dead: the
        # x64 ABI has no red zone); then depth, service, api, pending, callback frames.
        h.update(repr((raw[1], raw[2], raw[3], raw[6:])).encode())
        h.update(raw[4])
        h.update(repr(self.kernel.digest_key(thread)).encode())
        h.update(self.cow.digest(self._stacks))
        d = h.hexdigest()
        if len(self.digests) != sid:
            raise KernelError(f"explorer lost track of states ({len(self.digests)} digests for state {sid})")
        self.digests.append(d)
        if self._merged_at is None and (d in self.nodes or d in self._segment_seen):
            self._merged_at = sid  # a known state: its future is explored elsewhere
            self.machine.request_stop()
        self._segment_seen.add(d)

    # --- the walk ---------------------------------------------------------------------
    def run(self) -> Exploration:
        b = self.scenario.budgets
        start = time.perf_counter()
        self._deadline = start + b.wall_time
        result = Exploration(self.scenario, self.strategy, StateGraph(nx.DiGraph()))
        thread = self.process.thread
        gc_was_enabled = gc.isenabled()
        gc.disable()
        watchdog = Watchdog(self.machine, b.wall_time)
        try:
            watchdog.__enter__()
            self._observe(0, thread)
            self.kernel.current = thread
            self.machine.set_gs_base(thread.teb)
            self.machine.regs.set_context(thread.entry_context)
            work: deque[tuple[Fork, str]] = deque()
            self._segment(result, 0, 0, run_cpu=True)
            self._after_segment(result, work, 0)
            while work:
                if len(self.nodes) >= b.states:
                    result.stopped_by = "states"
                    break
                if self.machine.watchdog_fired or time.perf_counter() > self._deadline:
                    result.stopped_by = "wall_time"
                    break
                fork, option = work.popleft() if self.strategy == "bfs" else work.pop()
                self._restore(fork)
                mark, mark_t = len(self.trace.raw_states), len(self.trace.raw_transitions)
                self.kernel.resume(option)
                run_cpu = self._merged_at is None and self.kernel.pending_choice is None
                self._segment(result, mark, mark_t, run_cpu)
                result.forked_states += len(self.trace.raw_states) - mark
                self._after_segment(result, work, fork.depth + 1)
            result.unexplored += len(work)
            if self.machine.watchdog_fired and result.stopped_by is None:
                result.stopped_by = "wall_time"
        finally:
            watchdog.__exit__()
            if gc_was_enabled:
                gc.enable()
        result.graph = self._graph()
        result.faults = [(self._name(result.graph, d), m) for d, m in result.faults]
        result.elapsed = time.perf_counter() - start
        return result

    def _segment(self, result: Exploration, n_states: int, n_trans: int, run_cpu: bool) -> None:
        """Run the CPU (unless the kernel already stopped), then add the new states and edges."""
        thread = self.kernel.current
        if thread is None:
            raise KernelError("no current thread to explore")
        if run_cpu and not thread.terminated:
            b = self.scenario.budgets
            rip = self.machine.regs.read(("rip",))[0]
            try:
                info = self.machine.run(rip, b.instructions, None)  # wall time: the run's Watchdog
                if info.reason != "requested" and not thread.terminated:
                    where = self.trace.symbolize(self.machine.regs.read(("rip",))[0])
                    if info.reason == "timeout":
                        raise BudgetExceeded("wall_time", f"{b.wall_time:g} s", where)
                    raise BudgetExceeded("instructions", b.instructions, where)
            except MachineFault as e:
                self.kernel.record_fault(thread, e)
                result.faults.append((self.digests[-1], str(e)))
            except (BudgetExceeded, KernelError) as e:
                result.faults.append((self.digests[-1], str(e)))
        self._absorb(n_states, n_trans)

    def _absorb(self, n_states: int, n_trans: int) -> None:
        last = self._merged_at if self._merged_at is not None else len(self.trace.raw_states) - 1
        states = self.trace.states
        for sid in range(n_states, last + 1):
            self.nodes.setdefault(self.digests[sid], states[sid])
        for raw in self.trace.raw_transitions[n_trans:]:
            src, dst = raw[3], raw[4]
            if dst > last:
                break
            # (src, dst, kind, service, ssn, status, api, detail)
            self.edges[(self.digests[src], self.digests[dst], raw[1], raw[5], raw[6], raw[10], raw[11], raw[12])] = None

    def _after_segment(self, result: Exploration, work: deque[tuple[Fork, str]], depth: int) -> None:
        pending = self.kernel.pending_choice
        if self._merged_at is not None or pending is None:
            result.paths += 1
            self._merged_at = None
            self._segment_seen.clear()
            return
        self._segment_seen.clear()
        if depth >= self.scenario.budgets.choice_depth:
            # Too deep: this path stops here; the others go on.
            result.stopped_by = result.stopped_by or "choice_depth"
            result.unexplored += len(pending.choice.options)
            self.kernel.pending_choice = None
            return
        fork = Fork(
            self.machine.uc.context_save(),
            self.cow.take(),
            self.kernel.save(),
            depth,
        )
        result.forks += 1
        result.snapshot_bytes += fork.memory.own_bytes
        options = list(pending.choice.options)
        work.extend((fork, o) for o in (options if self.strategy == "bfs" else reversed(options)))
        self._report(result, work)

    def _restore(self, fork: Fork) -> None:
        self.machine.uc.context_restore(fork.cpu)
        self.cow.restore(fork.memory)
        self.kernel.load(fork.kernel)
        # The next segment will almost surely push onto the stack: open its page now
        # rather than taking a copy-on-write fault and restarting the CPU for it.
        rsp = self.machine.regs.read(("rsp",))[0]
        self.cow.prefault(rsp - 0x100, 0x100)
        # The trace only grows: the restored thread's state id still names the fork's state.
        self._merged_at = None
        self._segment_seen.clear()

    def _report(self, result: Exploration, work: deque[tuple[Fork, str]]) -> None:
        if self.progress is not None and result.forks % 64 == 0:
            self.progress.write(f"\rexploring: {len(self.nodes)} states, {result.forks} forks, {len(work)} queued ")
            self.progress.flush()

    # --- the canonical graph ----------------------------------------------------------
    def _graph(self) -> StateGraph:
        if self.progress is not None:
            self.progress.write("\r" + " " * 72 + "\r")
        sym = self.trace.symbolize
        out_edges: dict[str, list[tuple[object, ...]]] = {}
        for key in self.edges:
            out_edges.setdefault(str(key[0]), []).append(key)
        root = self.digests[0] if self.digests else None
        order: dict[str, int] = {}
        queue = deque([root] if root else [])
        if root:
            order[root] = 0
        while queue:
            d = queue.popleft()
            for key in sorted(out_edges.get(d, []), key=lambda k: (_edge_sort(k), self._label(str(k[1])), str(k[1]))):
                dst = str(key[1])
                if dst not in order:
                    order[dst] = len(order)
                    queue.append(dst)
        g = nx.DiGraph()
        for d, i in sorted(order.items(), key=lambda kv: kv[1]):
            g.add_node(f"n{i}", state=self.nodes[d], digest=d)
        for key in sorted(self.edges, key=lambda k: (order[str(k[0])], order[str(k[1])], _edge_sort(k))):
            kind, service, ssn, status, api, detail = key[2:]
            info = EdgeInfo(str(kind), service, ssn, status, api, str(detail or ""))  # type: ignore[arg-type]
            u, v = f"n{order[str(key[0])]}", f"n{order[str(key[1])]}"
            if g.has_edge(u, v):
                # Two different transitions between the same two states: keep the first
                # (in canonical order) and say so.
                g.edges[u, v]["also"] = g.edges[u, v].get("also", ()) + (info,)
                continue
            g.add_edge(u, v, edge=info)
        return StateGraph(g, sym)

    def _label(self, d: str) -> str:
        s = self.nodes[d]
        return f"{s.mode}|{s.depth}|{s.rip:#x}"

    @staticmethod
    def _name(graph: StateGraph, digest: str) -> str:
        for n, a in graph.lean.nodes(data=True):
            if a.get("digest") == digest:
                return str(n)
        return digest


def _edge_sort(key: tuple[object, ...]) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in key[2:])


def explore(scenario: Scenario | str, strategy: Strategy = "bfs", progress: bool | TextIO = False) -> Exploration:
    """Explore every option of every choice in a scenario (a Scenario or a path).

    ``progress=True`` writes a progress line to stderr when it is a terminal.
    """
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    stream: TextIO | None
    if progress is True:
        stream = sys.stderr if sys.stderr.isatty() else None
    elif progress is False:
        stream = None
    else:
        stream = progress
    return Explorer(scenario, strategy, stream).run()
