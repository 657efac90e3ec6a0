"""Exploration spread over worker processes, locally or on a Ray cluster, with the same graph.

The coordinator explores breadth-first until enough options wait on its work list, then
hands them out as option paths from the start. Each worker builds its own machine from
the scenario, replays its paths (one option per choice) and explores everything below
them. Workers return states by digest and edges by their digest endpoints; the union is
the same set of nodes and edges a single process finds, and the export numbers nodes by
a canonical walk, so the files are byte-identical.

Workers share which choice states are taken (:mod:`emu.exploration.claims`): before
forking at a choice, a worker claims the state in a seen-set split into shards by digest;
only the first claimant forks it, so a state reached below two paths is forked once, as
in one process. The shards live in the coordinating process (served to worker processes
by a manager thread) or, on Ray, in actors, one shard per worker.

With symbolic values, a path's symbolic steps are the coordinator's picks (a value and the
whole witness); a worker saves every fork on its way down, since an input found later may
restart from any of them (:mod:`emu.exploration.descend`), and sends back each state's path
condition as text and its witness (:mod:`emu.symbolic.shipping`).

Ray is optional: ``backend="ray"`` uses an existing cluster (``ray.init(address=...)``
done by the caller) or starts a local one.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import multiprocessing
import pickle
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from emu.context import UserContext
from emu.errors import EmuError, ExtensionError
from emu.exploration.canonical import EdgeKey, name_faults, node_name, node_order
from emu.exploration.claims import RaySeenSet, SeenServer, SeenSet, SeenShard
from emu.exploration.explorer import Explorer
from emu.exploration.result import Exploration, Strategy
from emu.hooks import Hooks
from emu.scenario import Scenario, load_scenario
from emu.services import Services, reference, services_for
from emu.trace import State

if TYPE_CHECKING:
    from emu.symbolic.driver import Pick

Backend = Literal["processes", "ray"]


class BackendUnavailable(EmuError):
    """The chosen backend cannot run here (Ray is not installed)."""


@dataclass(frozen=True)
class Part:
    """What one worker found (picklable: plain data); its states and edges packed by :func:`pack`."""

    found: bytes
    deadlocks: dict[str, list[str]]
    chains: dict[str, list[str]]
    faults: list[tuple[str, str]]  # (state digest, message)
    forks: int
    paths: int
    forked_states: int
    unexplored: int
    stopped_by: str | None
    cpu: float = 0.0  # the worker's CPU seconds for this job (exploring and building this part)
    wall: float = 0.0  # its wall-clock seconds
    claim_wait: float = 0.0  # wall-clock seconds spent waiting for the seen-set's answers
    symbolic: dict[str, Any] | None = None  # the symbolic side's findings (emu.symbolic.shipping)


def explore_prefixes(
    scenario: Scenario, strategy: Strategy, prefixes: list[tuple[str | Pick, ...]], seen: SeenSet | None = None
) -> Part:
    """A worker's job: explore below each option path (a module-level function, so it pickles);
    ``seen``: the seen-set shared with the other workers."""
    wall, cpu = time.perf_counter(), time.process_time()
    ex = Explorer(scenario, strategy)
    claims = None
    if seen is not None:
        ex.claims = claims = Timed(seen.connect())
    gc_was_enabled = gc.isenabled()
    gc.disable()  # nothing cyclic is made here; a collection would walk every state found
    try:
        res = ex.run(prefixes=prefixes, graph=False)
        part = Part(
            pack(ex.nodes, list(ex.edges)), ex.deadlocks, ex.chains, list(ex.fault_digests),
            res.forks, res.paths, res.forked_states, res.unexplored, res.stopped_by,
            time.process_time() - cpu, time.perf_counter() - wall, 0.0 if claims is None else claims.waited,
            _export(ex),
        )  # fmt: skip
    finally:
        if gc_was_enabled:
            gc.enable()
    # Freeing the machine and its trace after the result is sent, not before: a worker's
    # previous explorer goes when the next job starts (or the worker exits).
    _last[:] = [ex]
    return part


_last: list[Explorer] = []


class Timed:
    """A claim function that adds up the wall-clock time its answers took (a worker's idle time)."""

    def __init__(self, claim: Callable[[list[str]], list[bool]]) -> None:
        self.claim = claim
        self.waited = 0.0

    def __call__(self, digests: list[str]) -> list[bool]:
        t = time.perf_counter()
        won = self.claim(digests)
        self.waited += time.perf_counter() - t
        return won


def _export(ex: Explorer) -> dict[str, Any] | None:
    if ex.symbolic is None:
        return None
    from emu.symbolic.shipping import export  # z3 is loaded only for symbolic scenarios

    return export(ex.symbolic)


def explore_parallel(
    scenario: Scenario | str | Path,
    workers: int = 2,
    backend: Backend = "processes",
    strategy: Strategy = "bfs",
    split_factor: int = 4,
    *,
    services: Services | None = None,
    hooks: Hooks | None = None,
) -> Exploration:
    """Explore with ``workers`` processes (or Ray tasks); the graph equals :func:`emu.exploration.explorer.explore`'s.

    ``services`` go to the workers by reference (:func:`emu.services.reference`): a
    ``"package.module:name"``, or a registry an importable module holds. ``hooks`` run in
    one process only: given with workers, they are refused in one line.
    """
    if workers < 1:
        raise ValueError(f"workers must be 1 or more, not {workers}")
    if hooks is not None and len(hooks):
        raise ExtensionError("hook", "hooks run in this process: explore with one worker (no workers=, no --workers)")
    if backend == "ray":
        _require_ray()
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    if services is not None:
        scenario = _with_services(scenario, reference(services))
    start = time.perf_counter()
    pool = _Pool(workers) if backend == "processes" else None  # its workers start while the head runs
    gc_was_enabled = gc.isenabled()
    try:
        coordinator = Explorer(scenario, strategy)
        head = coordinator.run(split=max(2, workers * split_factor), graph=False)
        # (Symbolic values' picks sort by their text; equal ones keep the work list's order.)
        prefixes = sorted(coordinator.frontier, key=lambda path: [str(option) for option in path])
        # Jobs of a few paths each, handed to whichever worker is free (paths lead to subtrees of
        # very different sizes); each finished job is merged while the others still run.
        jobs = max(1, min(len(prefixes), workers * split_factor))
        chunks = [prefixes[i::jobs] for i in range(jobs) if prefixes[i::jobs]]
        gc.disable()  # merging allocates many small objects, none of them cyclic garbage

        def absorb(part: Part) -> None:
            _absorb(coordinator, part)

        if not chunks:
            parts: list[Part] = []
        elif pool is not None:
            parts = pool.run(scenario, strategy, chunks, coordinator.fork_nodes, absorb)
        else:
            parts = _run_ray(scenario, strategy, chunks, coordinator.fork_nodes, absorb)
        graph = coordinator._graph()
    finally:
        if pool is not None:
            pool.close()
        if gc_was_enabled:
            gc.enable()
    result = Exploration(scenario, strategy, graph)
    result.forks = head.forks + sum(p.forks for p in parts)
    result.paths = head.paths + sum(p.paths for p in parts)
    result.forked_states = head.forked_states + sum(p.forked_states for p in parts)
    result.unexplored = head.unexplored + sum(p.unexplored for p in parts)
    result.stopped_by = head.stopped_by or next((p.stopped_by for p in parts if p.stopped_by), None)
    result.deadlocks = sorted((node_name(graph, d) for d in coordinator.deadlocks), key=node_order)
    # Faults are kept by state digest until here: node ids exist only in the merged graph.
    result.faults = name_faults(graph, coordinator.fault_digests + [f for p in parts for f in p.faults])
    if coordinator.symbolic is not None:
        result.symbolic = coordinator.symbolic.summary(graph, result.faults, lambda d: node_name(graph, d))
    result.elapsed = time.perf_counter() - start
    return result


def _with_services(scenario: Scenario, ref: str) -> Scenario:
    """The scenario with the caller's services added to its ``[python]`` ones, as every worker loads them."""
    if scenario.python_services and not scenario.allow_python:
        services_for(scenario)  # refused in one line naming --allow-python, as a single process would
    return dataclasses.replace(scenario, python_services=(*scenario.python_services, ref), allow_python=True)


_CONTEXT = State._fields.index("context")


def pack(nodes: dict[str, State], edges: list[EdgeKey]) -> bytes:
    """States (by digest) and edges as one pickle of plain tuples, the context a plain tuple too.

    A named tuple pickles through its class's reduction, a plain one in C: this takes about
    half the time of pickling the states as they are, on the worker's critical path."""
    c = _CONTEXT
    rows = [(*s[:c], tuple(s.context), *s[c + 1 :]) for s in nodes.values()]
    return pickle.dumps((list(nodes), rows, edges), protocol=pickle.HIGHEST_PROTOCOL)


def unpack(found: bytes) -> tuple[dict[str, State], list[EdgeKey]]:
    """:func:`pack`'s states and edges back: equal to what was packed, field for field."""
    digests, rows, edges = pickle.loads(found)
    c, new, state, context = _CONTEXT, tuple.__new__, State, UserContext
    states = [new(state, (*r[:c], new(context, r[c]), *r[c + 1 :])) for r in rows]
    return dict(zip(digests, states, strict=True)), edges


def _absorb(coordinator: Explorer, part: Part) -> None:
    """A worker's states and edges into the coordinator's (a union: the order does not matter)."""
    found, edges = unpack(part.found)
    nodes = coordinator.nodes
    for d, state in found.items():
        nodes.setdefault(d, state)
    coordinator.edges.update(dict.fromkeys(edges))
    coordinator.deadlocks.update(part.deadlocks)
    coordinator.chains.update(part.chains)
    if coordinator.symbolic is not None and part.symbolic is not None:
        from emu.symbolic.shipping import absorb  # z3 is loaded only for symbolic scenarios

        absorb(coordinator.symbolic, part.symbolic)


def _warm() -> None:
    """A no-op job: a worker imports emu (the slow part of its start) before the real work."""
    import emu.exploration.explorer  # noqa: F401


class _Pool:
    """Worker processes, started at once, and the seen-set they share."""

    def __init__(self, workers: int) -> None:
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context())
        self.warming: list[Future[None]] = [self.pool.submit(_warm) for _ in range(workers)]
        self.server: SeenServer | None = None

    def run(
        self, scenario: Scenario, strategy: Strategy, chunks: list[list[tuple[str | Pick, ...]]], taken: list[str],
        absorb: Callable[[Part], None],
    ) -> list[Part]:  # fmt: skip
        """Every chunk's part, in chunk order; each is passed to ``absorb`` as soon as it is back."""
        self.server = SeenServer()
        self.server.shards[0].claim(taken)  # the coordinator's own forks are taken
        seen = self.server.handle
        futures = [self.pool.submit(explore_prefixes, scenario, strategy, chunk, seen) for chunk in chunks]
        for f in as_completed(futures):
            absorb(f.result())
        return [f.result() for f in futures]

    def close(self) -> None:
        # Not waiting for the workers to exit: they only free memory now.
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.server is not None:
            self.server.close()


def _context() -> multiprocessing.context.BaseContext:
    """How worker processes start: forked from a server process that imported emu once, where
    the system has one ("forkserver": each worker starts in milliseconds, and the server stays
    for the next exploration), else a fresh interpreter per worker ("spawn"). Neither inherits
    the coordinator's Unicorn machines: the server is a fresh interpreter that imported emu
    and built nothing."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # "__main__" as by default (the server imports the caller's main module once, not each worker).
    ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


def _require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise BackendUnavailable("backend 'ray' needs Ray installed: pip install 'emu[ray]'")


def _run_ray(
    scenario: Scenario, strategy: Strategy, chunks: list[list[tuple[str | Pick, ...]]], taken: list[str],
    absorb: Callable[[Part], None],
) -> list[Part]:  # fmt: skip
    try:
        import ray
    except ImportError as e:  # an optional extra
        raise BackendUnavailable(f"backend 'ray' needs Ray installed (pip install 'emu[ray]'): {e}") from None
    if not ray.is_initialized():
        ray.init(num_cpus=max(1, len(chunks)), include_dashboard=False, log_to_driver=False)
    # The shards are small actors (no CPU reserved: they answer between the workers' batches).
    shard: Any = ray.remote(num_cpus=0)(SeenShard)
    seen = RaySeenSet(tuple(shard.remote() for _ in chunks))
    seen.connect()(taken)  # the coordinator's own forks are taken
    task: Any = ray.remote(explore_prefixes)
    try:
        refs = [task.remote(scenario, strategy, chunk, seen) for chunk in chunks]
        got: dict[Any, Part] = {}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            got[done[0]] = part = ray.get(done[0])
            absorb(part)
        return [got[r] for r in refs]
    finally:
        for actor in seen.actors:
            ray.kill(actor)
