"""Exploration spread over worker processes, locally or on a Ray cluster, with the same graph.

The coordinator explores breadth-first until enough options wait on its work list, then
hands them out as option paths from the start. Each worker builds its own machine from
the scenario, replays its paths (one option per choice) and explores everything below
them. Workers return states by digest and edges by their digest endpoints; the union is
the same set of nodes and edges a single process finds, and the export numbers nodes by
a canonical walk, so the files are byte-identical. (Workers do not share which states
they have already seen, so a state below two paths is explored twice: more work, the
same graph.)

Ray is optional: ``backend="ray"`` uses an existing cluster (``ray.init(address=...)``
done by the caller) or starts a local one.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from emu.errors import EmuError, ScenarioError
from emu.exploration.explorer import Exploration, Explorer, Strategy, _node_order, name_faults
from emu.scenario import Scenario, load_scenario
from emu.symbolic import has_symbolic
from emu.trace import State

Backend = Literal["processes", "ray"]


class BackendUnavailable(EmuError):
    """The chosen backend cannot run here (Ray is not installed)."""


@dataclass(frozen=True)
class Part:
    """What one worker found (picklable: plain data)."""

    nodes: dict[str, State]
    edges: list[tuple[object, ...]]
    deadlocks: dict[str, list[str]]
    chains: dict[str, list[str]]
    faults: list[tuple[str, str]]  # (state digest, message)
    forks: int
    paths: int
    forked_states: int
    unexplored: int
    stopped_by: str | None


def explore_prefixes(scenario: Scenario, strategy: Strategy, prefixes: list[tuple[str, ...]]) -> Part:
    """A worker's job: explore below each option path (a module-level function, so it pickles)."""
    ex = Explorer(scenario, strategy)
    res = ex.run(prefixes=prefixes)
    return Part(
        dict(ex.nodes), list(ex.edges), dict(ex.deadlocks), dict(ex.chains), list(ex.fault_digests),
        res.forks, res.paths, res.forked_states, res.unexplored, res.stopped_by,
    )  # fmt: skip


def explore_parallel(
    scenario: Scenario | str | Path,
    workers: int = 2,
    backend: Backend = "processes",
    strategy: Strategy = "bfs",
    split_factor: int = 4,
) -> Exploration:
    """Explore with ``workers`` processes (or Ray tasks); the graph equals :func:`emu.exploration.explorer.explore`'s."""
    if workers < 1:
        raise ValueError(f"workers must be 1 or more, not {workers}")
    if backend == "ray":
        _require_ray()
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    if has_symbolic(scenario):
        # Work items at symbolic values restart from forks inside a worker: they cannot be
        # handed to another process as option paths.
        raise ScenarioError(scenario.path, "services", "symbolic values are explored with one worker (no --workers)")
    start = time.perf_counter()
    coordinator = Explorer(scenario, strategy)
    head = coordinator.run(split=max(2, workers * split_factor))
    prefixes = sorted(coordinator.frontier)
    if not prefixes:
        return head
    chunks = [prefixes[i::workers] for i in range(workers) if prefixes[i::workers]]
    parts = _run_ray(scenario, strategy, chunks) if backend == "ray" else _run_processes(scenario, strategy, chunks)
    for part in parts:
        for d, state in part.nodes.items():
            coordinator.nodes.setdefault(d, state)
        for key in part.edges:
            coordinator.edges[key] = None
        coordinator.deadlocks.update(part.deadlocks)
        coordinator.chains.update(part.chains)
    graph = coordinator._graph()
    result = Exploration(scenario, strategy, graph)
    result.forks = head.forks + sum(p.forks for p in parts)
    result.paths = head.paths + sum(p.paths for p in parts)
    result.forked_states = head.forked_states + sum(p.forked_states for p in parts)
    result.unexplored = head.unexplored + sum(p.unexplored for p in parts)
    result.stopped_by = head.stopped_by or next((p.stopped_by for p in parts if p.stopped_by), None)
    result.deadlocks = sorted((Explorer._name(graph, d) for d in coordinator.deadlocks), key=_node_order)
    # Faults are kept by state digest until here: node ids exist only in the merged graph.
    result.faults = name_faults(graph, coordinator.fault_digests + [f for p in parts for f in p.faults])
    result.elapsed = time.perf_counter() - start
    return result


def _run_processes(scenario: Scenario, strategy: Strategy, chunks: list[list[tuple[str, ...]]]) -> list[Part]:
    # "spawn": a fresh interpreter per worker, so no Unicorn state is inherited across fork().
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(chunks), mp_context=ctx) as pool:
        futures = [pool.submit(explore_prefixes, scenario, strategy, chunk) for chunk in chunks]
        return [f.result() for f in futures]


def _require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise BackendUnavailable("backend 'ray' needs Ray installed: pip install 'emu[ray]'")


def _run_ray(scenario: Scenario, strategy: Strategy, chunks: list[list[tuple[str, ...]]]) -> list[Part]:
    try:
        import ray
    except ImportError as e:  # an optional extra
        raise BackendUnavailable(f"backend 'ray' needs Ray installed (pip install 'emu[ray]'): {e}") from None
    if not ray.is_initialized():
        ray.init(num_cpus=max(1, len(chunks)), include_dashboard=False, log_to_driver=False)
    task: Any = ray.remote(explore_prefixes)
    return list(ray.get([task.remote(scenario, strategy, chunk) for chunk in chunks]))
