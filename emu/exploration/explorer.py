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

import dataclasses
import gc
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from hashlib import blake2b
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import networkx as nx

from emu.engine import Process
from emu.errors import BudgetExceeded, ExtensionError, KernelError, MachineFault, ModelBug, UnimplementedImport
from emu.exploration.canonical import EdgeKey, canonical_graph, name_faults, node_name, node_order
from emu.exploration.cpu import CpuContexts
from emu.exploration.descend import descend_concrete, descend_symbolic
from emu.exploration.digest import DigestText
from emu.exploration.forks import Fork
from emu.exploration.records import RecordKeeper
from emu.exploration.restoring import owns_threads, restore, stay
from emu.exploration.result import Exploration, Strategy, resident_bytes
from emu.exploration.shared import SharedParts
from emu.graph import StateGraph
from emu.hooks import Hooks
from emu.kernel import KernelHooks, KThread, sched
from emu.kernel.fork import hand_over_kernel, save_kernel
from emu.kernel.hooks import suspend
from emu.kernel.symbolic import Symbolic
from emu.scenario import Scenario, load_scenario
from emu.services import Services
from emu.symbolic import has_symbolic, make_driver
from emu.trace import RawState, State
from emu.watchdog import Watchdog

if TYPE_CHECKING:
    from emu.exploration.hooked import PathHooks
    from emu.symbolic.driver import Driver, Pick

_EMPTY_DIGEST = blake2b(digest_size=12)  # states' digests: 96 bits
CHECK_EVERY = 0.1  # seconds between looks at resident memory (and progress lines)
# Building the canonical graph after the walk costs about 65 µs per state (measured on a
# 2-core VM); the walk stops early enough to leave twice that.
GRAPH_SECONDS_PER_STATE = 130e-6
# With a shared seen-set, choice states are claimed this many at a time (one message each).
CLAIM_BATCH = 64


class Explorer:
    """Runs one scenario's machine through every option of every choice, within budgets."""

    def __init__(
        self, scenario: Scenario, strategy: Strategy = "bfs", progress: TextIO | None = None,
        services: Services | None = None, hooks: Hooks | None = None,
    ) -> None:  # fmt: skip
        if strategy not in ("bfs", "dfs"):
            raise ValueError(f"unknown strategy {strategy!r} (bfs or dfs)")
        self.scenario = scenario
        self.strategy: Strategy = strategy
        self.progress = progress
        # Every choice suspends (the explorer decides); each state is digested as it is recorded;
        # a path stops at a merge; the trace spans every path, so distinct states are budgeted here.
        self.symbolic: Driver | None = None  # symbolic values, when the scenario declares some
        steer = KernelHooks(
            choose=suspend, observe=self._observe, stop=self._at_merge, budget_states=False,
            symbolic=self._answer_symbolic,
        )  # fmt: skip
        self.process = Process(scenario, hooks=steer, services=services)
        self.kernel = self.process.kernel
        self.machine = self.process.machine
        self.trace = self.process.trace
        self.cow = self.machine.enable_cow()
        self._cpu = CpuContexts(self.machine.uc)  # forks' CPU contexts, their equal parts shared
        self._rsp_gs = self.machine.regs.reader(("rsp", "gs_base"))  # read after a restore, in one C call
        self.root: str | None = None  # the start state's digest
        self._count = 0  # states observed (the trace's state ids are 0 .. _count - 1)
        # Trace records are dropped once no saved fork nor live thread names them (only the
        # digests, nodes and edges are kept).
        self.records = RecordKeeper(self.trace, self.kernel)
        self._shared = SharedParts()  # register values and stacks shared between nodes
        self._last: str | None = None  # the latest state of the path being run
        self._known: set[str] = set()  # states some finished segment went through
        self.deadlocks: dict[str, list[str]] = {}  # state -> wait chains, where no thread can run
        self.frontier: list[tuple[str | Pick, ...]] = []  # option paths left for other workers (run(split=...))
        self._replaying = False
        self._descending = False  # replaying a worker's option path: no merges, no new work
        self._route: tuple[str | Pick, ...] = ()  # the next fork's Fork.route (symbolic values)
        self.chains: dict[str, list[str]] = {}  # state -> wait chains, wherever some thread waits
        self.nodes: dict[str, State] = {}
        self.edges: dict[EdgeKey, None] = {}
        self._tails: dict[tuple[object, ...], tuple[object, ...]] = {}  # edges' transitions, shared
        self._segment_seen: set[str] = set()
        self._merged_at: int | None = None
        self._stacks = tuple((t.stack_limit, t.stack_base) for t in self.kernel.threads.values())
        self._text = DigestText()  # the digested texts, memoised
        self._deadline = 0.0
        self._next_check = 0.0  # when to look at memory and write progress next
        self._rss_base = 0  # the process's resident memory when the exploration began
        self.fault_digests: list[tuple[str, str]] = []  # (state digest, message), after run()
        self.fork_nodes: list[str] = []  # the states forked at, in order
        # Parallel workers: a shared seen-set of choice states (see emu.exploration.parallel).
        # Given a batch of digests it answers, for each, whether this caller is the first.
        self.claims: Callable[[list[str]], list[bool]] | None = None
        self._unclaimed: list[tuple[Fork, list[Any]]] = []
        # The fork the machine is still in (saved, nothing run since): its next option needs no restore.
        self._in_place: Fork | None = None
        if has_symbolic(scenario):
            self.symbolic = make_driver(self, scenario)
        self.hooks: PathHooks | None = None  # emu-level hooks, on every path (emu.exploration.hooked)
        if hooks is not None and len(hooks):
            from emu.exploration.hooked import PathHooks

            self.hooks = PathHooks(self, hooks)

    def _answer_symbolic(self, thread: KThread, request: Symbolic) -> int | None:
        return self.symbolic.answer(thread, request) if self.symbolic is not None else request.default

    # --- state identity -------------------------------------------------------------
    def _at_merge(self) -> bool:
        return self._merged_at is not None

    def _observe(self, sid: int, thread: KThread) -> None:
        raw = self.trace.raw_states[sid]  # RawState layout
        # tid, mode, registers; then depth, service, api, pending, callback frames; then the
        # stack from RSP up (bytes below RSP are dead: the x64 ABI has no red zone); then every
        # thread's kernel side (waits, callback stacks), the objects, and the live stacks of the
        # threads that are not moving: the whole process is the state, hashed as one text.
        text, kernel, symbolic = self._text, self.kernel, self.symbolic
        if symbolic is None and len(kernel.threads) == 1:  # the memoised head, the registers as words
            head, words = text.state_parts(raw)
            whole = b"".join((head, words, raw[4], text.kernel_of(kernel, thread), self.cow.digest(self._stacks)))
        else:
            if symbolic is None:
                parts = text.state_parts(raw)
                parts.append(raw[4])
            else:  # symbolic values: their locations masked, the path condition added
                context, stack, extra = symbolic.on_state(sid, thread, RawState._make(raw))
                rest = (raw[6], raw[7], raw[8], raw[9], raw[10])
                parts = [repr((raw[1], raw[2], context, rest)).encode(), stack, extra]
            parts.append(text.kernel_of(kernel, thread))
            if len(kernel.threads) > 1:
                parts += [self._stack_of(other) for other in kernel.threads.values() if other is not thread]
            parts.append(self.cow.digest(self._stacks))
            whole = b"".join(parts)
        h = _EMPTY_DIGEST.copy()  # (a copy costs less than the constructor's keyword parsing)
        h.update(whole)
        d = h.hexdigest()
        if symbolic is not None:
            symbolic.seen(d)
        if self._count != sid:
            raise ModelBug(f"explorer lost track of states ({self._count} observed before state {sid})")
        self._count += 1
        if self._merged_at is not None:
            return  # past a merge: the rest of this path is explored elsewhere
        nodes = self.nodes
        if d not in nodes:
            nodes[d] = self._shared.state(raw)  # its parts shared with other nodes' equal ones
            if len(kernel.threads) > 1:
                chains = sched.wait_chains(kernel)
                if chains:
                    self.chains[d] = chains
        last = self._last
        if last is not None:
            t = self.trace.raw_transitions[-1]  # RawTransition layout
            # (src, dst, (kind, service, ssn, status, api, detail)): one tuple per distinct transition
            tail = (t[1], t[5], t[6], t[10], t[11], t[12])
            self.edges[(last, d, self._tails.setdefault(tail, tail))] = None
        self._last = d
        seen = self._segment_seen
        if (d in seen or d in self._known) and not (self._replaying or self._descending):
            self._merged_at = sid  # a known state: its future is explored elsewhere
            self.machine.request_stop()
        seen.add(d)

    def _stack_of(self, t: KThread) -> bytes:
        ctx = t.suspended.trap.ctx if t.suspended is not None else (None if t.started else t.entry_context)
        if ctx is None or t.terminated or not t.stack_limit <= ctx.rsp < t.stack_base:
            return b""
        return self.machine.read(ctx.rsp, t.stack_base - ctx.rsp)

    # --- the walk ---------------------------------------------------------------------
    def run(
        self, prefixes: list[tuple[str | Pick, ...]] | None = None, split: int | None = None, graph: bool = True
    ) -> Exploration:
        """Explore, from the start or (``prefixes``) below the states those option paths lead to.

        ``split``: stop widening once that many options wait on the work list and leave
        them, as option paths from the start, in ``self.frontier`` (for parallel workers).
        ``graph=False``: leave the result's graph empty (a parallel worker's nodes and edges
        are merged, and the graph built, by the coordinator).
        """
        b = self.scenario.budgets
        start = time.perf_counter()
        self._deadline = start + b.wall_time
        result = Exploration(self.scenario, self.strategy, StateGraph(nx.DiGraph()))
        gc_was_enabled = gc.isenabled()
        gc.disable()
        watchdog = Watchdog(self.machine, b.wall_time)
        self._next_check = start
        # The budget is on what the exploration adds: a test runner or a notebook kernel that
        # already holds hundreds of MiB must not stop an exploration before it starts.
        self._rss_base = resident_bytes()
        if self.progress is not None:
            self.progress.write(f"\rexploring {self.scenario.name}: starting ")
            self.progress.flush()
        try:
            watchdog.__enter__()
            # Each thread's initial state was recorded as it was added: together they are the start.
            first = len(self.trace.raw_states) - 1
            self._count = first
            self._observe(first, self.process.thread)
            self.root = self._last
            self._known.add(self._last or "")
            if prefixes is None:
                self.kernel.continue_thread(self.process.thread)
                work: deque[tuple[Fork, str]] = deque()
                self._segment(result)
                self._after_segment(result, work, 0, ())
                self.records.forget(0)
                self._walk(result, work, split)
            else:
                root = Fork(
                    self._cpu.save(), self.cow.take(), save_kernel(self.kernel), 0, self._last or "", (),
                    self.symbolic.save() if self.symbolic is not None else None,
                )  # fmt: skip
                self.records.hold(root.records)  # every prefix starts here: never released
                for prefix in prefixes:
                    self._descend(result, root, prefix)
            if self.machine.watchdog_fired and result.stopped_by is None:
                result.stopped_by = "wall_time"
        except KeyboardInterrupt:
            # Ctrl-C: keep what was found; the graph below holds every state recorded so far.
            result.stopped_by = "interrupted"
        finally:
            watchdog.__exit__()
        # The walk's own tables (seen states, digest texts, shared parts): their memory goes to the graph.
        self._known, self._text, self._shared = set(), DigestText(), SharedParts()
        try:
            if graph:
                result.graph = self._graph()
        finally:
            if gc_was_enabled:
                gc.enable()
        self.fault_digests = list(result.faults)  # by digest: parallel workers are merged by digest
        result.faults = name_faults(result.graph, self.fault_digests)
        result.deadlocks = sorted((node_name(result.graph, d) for d in self.deadlocks), key=node_order)
        if self.hooks is not None:
            result.hook_stops = self.hooks.named_stops(result.graph)
        if self.symbolic is not None and graph:  # (a parallel worker's findings are summed up by the coordinator)
            g = result.graph
            result.symbolic = self.symbolic.summary(g, result.faults, lambda d: node_name(g, d))
        result.elapsed = time.perf_counter() - start
        return result

    def _walk(self, result: Exploration, work: deque[tuple[Fork, Any]], split: int | None = None) -> None:
        b = self.scenario.budgets
        while work or self._unclaimed:
            if self._unclaimed and (not work or len(self._unclaimed) >= CLAIM_BATCH):
                self._settle(result, work)
                continue
            if split is not None and len(work) >= split:
                routes = self.symbolic is not None  # (without symbolic values the path is the route)
                self.frontier = [(fork.route if routes else fork.path) + (option,) for fork, option in work]
                return
            if len(self.nodes) >= b.states:
                result.stopped_by = "states"
                break
            now = time.perf_counter()
            # Leave time to build the graph from what was found, so the whole run keeps its budget.
            if self.machine.watchdog_fired or now + len(self.nodes) * GRAPH_SECONDS_PER_STATE > self._deadline:
                result.stopped_by = "wall_time"
                break
            if now >= self._next_check:
                self._next_check = now + CHECK_EVERY
                if resident_bytes() - self._rss_base > b.process_memory:
                    result.stopped_by = "process_memory"
                    break
                self._report(result, work)
            if len(work) >= 2 * b.frontier + b.choice_depth:  # depth-first growth is past any sane width
                result.stopped_by = "frontier"
                break
            # Past the frontier budget, go on depth-first: the newest options first.
            fork, option = work.popleft() if self.strategy == "bfs" and len(work) < b.frontier else work.pop()
            named = fork.records  # read first: the fork's last restore hands its saved threads over
            try:
                if fork is self._in_place:
                    stay(self, fork)  # the machine is still in its state (emu.exploration.restoring)
                else:
                    self._restore(fork)
                self._in_place = None
                mark = len(self.trace.raw_states)
                if not self._resume(result, option, fork.node):
                    self._replaying = False
                    continue
                self._segment(result)
                if self.symbolic is not None:
                    self.symbolic.finish_segment()
                self._replaying = False
                result.forked_states += len(self.trace.raw_states) - mark
                if self.symbolic is not None:
                    self._route = fork.route + (option,)
                self._after_segment(result, work, fork.depth + 1, fork.path + (str(option),))
                self.records.forget(mark)
                fork.left[0] -= 1
                if not fork.left[0]:
                    self.records.release(named)
            except KeyboardInterrupt:
                result.unexplored += len(work) + 1  # the option being followed is not finished either
                raise
        result.unexplored += len(work) + sum(len(options) for _, options in self._unclaimed)

    def _descend(self, result: Exploration, root: Fork, prefix: tuple[str | Pick, ...]) -> None:
        """Replay ``prefix`` (one option per choice) from the start, then explore everything below."""
        if self.symbolic is not None:
            descend_symbolic(self, result, root, prefix)
        else:
            descend_concrete(self, result, root, prefix)

    def _resume(self, result: Exploration, option: str | Pick, node: str) -> bool:
        """Continue the suspended service with ``option`` (a symbolic value's side: a Pick);
        False when it fails there (a fault of the path)."""
        try:
            if isinstance(option, str):
                self.kernel.resume(option)
            elif self.symbolic is not None:
                self.kernel.resume(self.symbolic.begin(option))
        except (KernelError, ExtensionError) as e:
            result.faults.append((node, str(e)))
            return False
        return True

    def _segment(self, result: Exploration) -> None:
        """Run the process (every thread, in turn) until a choice, the end of the path, a merge or a fault."""
        thread = self.kernel.current or self.process.thread
        try:
            outcome = self.process.drive(None)  # wall time: the exploration's Watchdog
            if outcome == "deadlock" and self._merged_at is None and self._last is not None:
                self.deadlocks[self._last] = list(self.kernel.deadlock)
        except MachineFault as e:
            self.kernel.record_fault(self.kernel.current or thread, e)
            result.faults.append((self._last or "", str(e)))
        except UnimplementedImport as e:
            self.kernel.record_fault(self.kernel.current or thread, e)
            result.faults.append((self._last or "", str(e)))
        except (BudgetExceeded, KernelError, ExtensionError) as e:
            result.faults.append((self._last or "", str(e)))
        if not (self._replaying or self._descending):
            self._known.update(self._segment_seen)
        if self.hooks is not None:
            self.hooks.segment_done(result)

    def _after_segment(
        self, result: Exploration, work: deque[tuple[Fork, Any]], depth: int, path: tuple[str, ...]
    ) -> None:
        sym = self.symbolic
        if sym is not None and sym.queued:  # inputs that take other sides of symbolic decisions
            work.extend(sym.queued)
            sym.queued.clear()
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
        # With a shared seen-set, a state is forked once the set says it is this worker's; not
        # while a path replays known states up to its symbolic decision (one process forks there too).
        claim = self.claims is not None and not (sym is not None and sym.replaying())
        # Unless hooks or symbolic values keep state of their own, the next option is followed
        # after a load (a restore, or _stay): the kernel model is handed over, not copied. (A fork
        # waiting for its claim is never stayed in: the walk restores some fork before running on.)
        keep = self.hooks is None and sym is None and owns_threads(self)
        fork = Fork(
            self._cpu.save(), self.cow.take(), hand_over_kernel(self.kernel) if keep else save_kernel(self.kernel),
            depth, self._last or "", path, sym.save() if sym is not None else None, route=self._route,
        )  # fmt: skip
        new_layer = self.cow.took_new  # (a layer take() returned again is counted where it was made)
        self.records.hold(fork.records)
        if self.hooks is not None:
            self.hooks.forked(fork)
        options: list[Any]
        if sym is not None and isinstance(pending.choice, Symbolic):
            # The solver adds this fork's other sides later: its count never reaches zero, so the
            # records it names are kept.
            fork.left[0] = -1
            options = [sym.at_request(fork)]  # this path's value first
        else:
            options = list(pending.choice.options)
            fork.left[0] = len(options)
        if claim:
            self._unclaimed.append((fork, options))
            return
        self._add_fork(result, work, fork, options, new_layer)
        if keep:
            self._in_place = fork

    def _add_fork(
        self, result: Exploration, work: deque[tuple[Fork, Any]], fork: Fork, options: Sequence[str | Pick],
        new_layer: bool = True,
    ) -> None:  # fmt: skip
        result.forks += 1
        if new_layer:
            result.snapshot_bytes += fork.memory.own_bytes
        self.fork_nodes.append(fork.node)
        work.extend((fork, o) for o in (options if self.strategy == "bfs" else reversed(options)))

    def _settle(self, result: Exploration, work: deque[tuple[Fork, str]]) -> None:
        """Claim the waiting choice states in the shared seen-set, in one message: follow the
        options of those this worker won; another worker follows the rest (the same future)."""
        waiting, self._unclaimed = self._unclaimed, []
        assert self.claims is not None
        won = self.claims([fork.node for fork, _ in waiting])
        for (fork, options), mine in zip(waiting, won, strict=True):
            if mine:
                self._add_fork(result, work, fork, options)
            else:
                result.paths += 1  # the path ends at a state explored elsewhere: a merge
                self.records.release(fork.records)

    def _restore(self, fork: Fork) -> None:
        restore(self, fork)

    def _report(self, result: Exploration, work: deque[tuple[Fork, str]]) -> None:
        if self.progress is not None:
            mib = resident_bytes() >> 20
            self.progress.write(
                f"\rexploring: {len(self.nodes)} states, {result.forks} forks, {len(work)} queued, {mib} MiB "
            )
            self.progress.flush()

    # --- the canonical graph ----------------------------------------------------------
    def _graph(self) -> StateGraph:
        if self.progress is not None:
            self.progress.write("\r" + " " * 72 + "\r")
        graph = canonical_graph(
            self.root, self.nodes, self.edges, self.deadlocks, self.chains, self.trace.symbolize, consume=True
        )
        self.nodes = {}  # the graph holds every state record now (the edges table went the same way)
        if self.symbolic is not None:
            self.symbolic.annotate(graph.lean)
        if self.hooks is not None:
            self.hooks.annotate(graph)
        return graph


def explore(
    scenario: Scenario | str | Path, strategy: Strategy = "bfs", progress: bool | TextIO = False, *,
    services: Services | None = None, allow_python: bool = False, hooks: Hooks | None = None, workers: int = 1,
) -> Exploration:  # fmt: skip
    """Explore every option of every choice in a scenario (a Scenario or a path).

    ``progress=True`` writes a progress line to stderr when it is a terminal. ``services``
    add Python system services (:mod:`emu.services`); they fork with the machine at each
    choice. ``allow_python`` lets the scenario's ``[python]`` table load Python. ``hooks``
    (:class:`emu.hooks.Hooks`) fire on every path; their notes and stops land in the graph
    (:mod:`emu.exploration.hooked`). ``workers`` > 1 explores in that many processes
    (:func:`emu.exploration.parallel.explore_parallel`: the same graph; services go by reference,
    hooks are refused).
    """
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario, allow_python=allow_python)
    elif allow_python:
        scenario = dataclasses.replace(scenario, allow_python=True)
    if workers > 1:
        from emu.exploration.parallel import explore_parallel

        return explore_parallel(scenario, workers, strategy=strategy, services=services, hooks=hooks)
    stream: TextIO | None
    if progress is True:
        stream = sys.stderr if sys.stderr.isatty() else None
    elif progress is False:
        stream = None
    else:
        stream = progress
    return Explorer(scenario, strategy, stream, services, hooks).run()
