"""Exploring thread interleavings: states per second in 1 process, N worker processes and Ray.

The scenario is generated: T threads each take and release two mutexes R times (in one
order, so no deadlock), which gives many interleavings at every wait and release; or,
with ``--tree K``, one thread making K two-way choices in a row (2^K paths, no merges).
Figures are states (distinct, in the graph) per second of wall time, each the best of
``--repeat`` runs, and the ratio against the single process in the same run. The three
graphs are checked byte-identical before any figure is printed.

Run::

    python benchmarks/bench_threads.py [--threads T] [--rounds R] [--workers N] [--no-ray]
"""

from __future__ import annotations

import argparse
import time

from emu.exploration.explorer import explore
from emu.exploration.parallel import explore_parallel
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


def best(repeat: int, fn):  # type: ignore[no-untyped-def]
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        exp = fn()
        dt = time.perf_counter() - t
        if out is None or dt < out[0]:
            out = (dt, exp)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--tree", type=int, default=0, help="instead: one thread, K two-way choices in a row (2^K paths)")
    a = p.parse_args(argv)
    if a.tree:
        from bench_explore import CHOICES, PATH

        sc = parse_scenario(CHOICES.format(k=a.tree, memory="", write=PATH), "tree")
    else:
        sc = scenario(a.threads, a.rounds)
    dt1, one = best(a.repeat, lambda: explore(sc))
    dtn, many = best(a.repeat, lambda: explore_parallel(sc, workers=a.workers))
    rows = [("1 process", dt1, one), (f"{a.workers} worker processes", dtn, many)]
    if not a.no_ray:
        import ray

        ray.init(num_cpus=a.workers, include_dashboard=False, log_to_driver=False)
        try:
            dtr, viaray = best(a.repeat, lambda: explore_parallel(sc, workers=a.workers, backend="ray"))
        finally:
            ray.shutdown()
        rows.append((f"Ray, {a.workers} workers (local)", dtr, viaray))
    ref = one.graph.to_graphml()
    for _, _, exp in rows:
        if exp.graph.to_graphml() != ref:
            raise SystemExit("the graphs differ: parallel exploration is broken")
    what = f"2^{a.tree} choice tree" if a.tree else f"{a.threads} threads x {a.rounds} round(s)"
    print(f"{what}: {one.states:,} states, {one.forks:,} forks, {one.merges:,} merges (graphs identical)")
    print(f"{'how':<28} {'seconds':>9} {'states/s':>11} {'vs 1 process':>13}")
    for name, dt, exp in rows:
        print(f"{name:<28} {dt:>9.2f} {exp.states / dt:>11,.0f} {dt1 / dt:>12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
