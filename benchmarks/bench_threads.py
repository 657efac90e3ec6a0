"""Exploring in parallel: states per second in 1 process, N worker processes and Ray.

The scenario is generated: T threads each take and release two mutexes R times (in one
order, so no deadlock), which gives many interleavings at every wait and release (the
default, 4 threads x 1 round, takes seconds, not a fraction of one); or, with ``--tree K``,
one thread making K two-way choices in a row (2^K paths, no merges). Figures are states
(distinct, in the graph) per second of wall time, the median of ``--runs`` interleaved runs,
and the ratio against the single process. Every timing includes starting the workers; for
Ray it includes starting the local Ray instance too (``ray.init``), which is shown apart as
well. The graphs are checked byte-identical before any figure is printed. Forks are shown
per way: more forks in parallel than in one process is work done twice.

``measure_parallel`` gives ``run_all.py`` its row (the 2^16 tree, worker processes); the
goal is in ``goals.py``.

Run::

    python benchmarks/bench_threads.py [--threads T] [--rounds R] [--tree K] [--workers N] [--runs R] [--no-ray]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import measuring
from goals import PARALLEL
from measuring import Row

from emu.exploration.explorer import explore
from emu.exploration.parallel import explore_parallel
from emu.exploration.result import Exploration
from emu.scenario import Scenario, parse_scenario


def scenario(threads: int, rounds: int) -> Scenario:
    body = []
    for _ in range(rounds):
        for handle in (0x100, 0x104):
            body.append(f"    mov ecx, {handle:#x}\n    xor edx, edx\n    xor r8d, r8d\n    call NtWaitForSingleObject")
            body.append(f"    mov ecx, {handle:#x}\n    xor edx, edx\n    call NtReleaseMutant")
    code = "t_main:\n    sub rsp, 0x28\n" + "\n".join(body) + "\n    xor eax, eax\n    add rsp, 0x28\n    ret\n"
    threads_toml = "".join(f'[[thread]]\nname = "t{i}"\nentry = "app!t_main"\n\n' for i in range(threads))
    text = f'''
[scenario]
name = "interleavings"
[budgets]
states = 5000000
wall_time = 600
[[module]]
name = "app"
code = """
{code}
"""
{threads_toml}
[[object]]
kind = "mutex"
name = "A"
handle = 0x100
[[object]]
kind = "mutex"
name = "B"
handle = 0x104
'''
    return parse_scenario(text, "bench_threads")


@dataclass(frozen=True)
class Outcome:
    """What a benchmark keeps of one exploration: not the exploration (a big graph held across
    runs would grow the heap, and the garbage collector's work, under the later runs)."""

    seconds: float
    states: int
    forks: int
    merges: int
    graph: bytes  # a digest of the GraphML export (first run only; empty after)


def timed(fn: Callable[[], Exploration], keep_graph: bool) -> Outcome:
    gc.collect()
    t0 = time.perf_counter()
    exp = fn()
    dt = time.perf_counter() - t0
    graph = hashlib.blake2b(exp.graph.to_graphml().encode()).digest() if keep_graph else b""
    return Outcome(dt, exp.states, exp.forks, exp.merges, graph)


def with_ray(sc: Scenario, workers: int, starts: list[float]) -> Exploration:
    """Explore on a fresh local Ray instance (its start-up is part of the cost); notes ``ray.init``'s seconds."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    starts.append(time.perf_counter() - t0)
    try:
        return explore_parallel(sc, workers=workers, backend="ray")
    finally:
        ray.shutdown()


def run_ways(runs: int, ways: list[Callable[[], Exploration]]) -> list[list[Outcome]]:
    """Each way ``runs`` times, interleaved (in reverse order every other round, as
    :func:`measuring.paired`); the graphs of the first runs are checked byte-identical."""
    series: list[list[Outcome]] = [[] for _ in ways]
    for i in range(runs):
        for out, way in measuring.alternate(list(zip(series, ways)), i):
            out.append(timed(way, keep_graph=i == 0))
    if len({out[0].graph for out in series}) != 1:
        raise SystemExit("the graphs differ: parallel exploration is broken")
    return series


def seconds(series: list[Outcome]) -> float:
    return statistics.median(o.seconds for o in series)


def measure_parallel(k: int, runs: int, workers: int = 2) -> Row:
    """1 process's time over ``workers`` processes' on the 2^k tree, per interleaved run (graphs checked once)."""
    from bench_explore import tree

    sc = parse_scenario(tree(k), "tree")
    one, many = run_ways(runs, [lambda: explore(sc), lambda: explore_parallel(sc, workers=workers)])
    speedups = [a.seconds / b.seconds for a, b in zip(one, many)]
    detail = (
        f"2^{k} tree, {one[0].states:,} states: 1 process {seconds(one):.2f} s ({one[0].forks:,} forks),"
        f" {workers} workers {seconds(many):.2f} s ({many[0].forks:,} forks), graphs identical"
    )
    return Row(PARALLEL, "x", speedups, detail=detail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=measuring.MIN_RUNS, help="runs per way; the median is kept")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--tree", type=int, default=0, help="instead: one thread, K two-way choices in a row (2^K paths)")
    a = p.parse_args(argv)
    runs = measuring.check_runs(a.runs)
    if a.tree:
        from bench_explore import tree

        sc = parse_scenario(tree(a.tree), "tree")
        what = f"2^{a.tree} choice tree"
    else:
        sc = scenario(a.threads, a.rounds)
        what = f"{a.threads} threads x {a.rounds} round(s)"
    measuring.print_header(f"{what}; median of {runs} interleaved runs")
    names = ["1 process", f"{a.workers} worker processes"]
    ways: list[Callable[[], Exploration]] = [lambda: explore(sc), lambda: explore_parallel(sc, workers=a.workers)]
    starts: list[float] = []
    if not a.no_ray:
        names.append(f"Ray, {a.workers} workers (local, start-up included)")
        ways.append(lambda: with_ray(sc, a.workers, starts))
    results = run_ways(runs, ways)
    one = results[0][0]
    t1 = seconds(results[0])
    print(f"{what}: {one.states:,} states, {one.forks:,} forks, {one.merges:,} merges (graphs identical)")
    print(f"{'how':<44} {'seconds':>8} {'states/s':>10} {'forks':>8} {'vs 1 process':>13}")
    for name, series in zip(names, results):
        t = seconds(series)
        print(f"{name:<44} {t:>8.2f} {series[0].states / t:>10,.0f} {series[0].forks:>8,} {t1 / t:>12.2f}x")
    if starts:
        print(f"(Ray's start-up: {statistics.median(starts):.2f} s of each Ray run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
