"""What ``explore_parallel``'s coordinator does per state, and what its workers send, in CPU time.

The head and the jobs are those ``explore_parallel(workers=W)`` makes; here the jobs run in
turn in this process (one shared seen-set, no pool), so every part can be timed on its own
with ``time.process_time``: figures that hold on a loaded machine, unlike a wall-clock
speed-up. Per distinct state of the graph:

* worker: exploring its jobs, and packing what it found (``parallel.pack``); beside it, the
  same states pickled as the named tuples they are (the message before packing);
* message: bytes sent per state;
* coordinator: unpacking and merging the parts (``parallel._absorb``), then the canonical
  graph (``Explorer._graph``): the serial share that bounds the speed-up;

and the critical path on W free cores: head + the largest worker's share (jobs dealt as the
pool deals them, to whichever worker is free) + the last part's merge + the graph, against one
process exploring the whole tree (its graph included), timed the same way.

Run::

    python benchmarks/bench_coordinator.py [--choices K] [--workers W]
"""

from __future__ import annotations

import argparse
import gc
import heapq
import os
import pickle
import time
from collections.abc import Callable

from bench_explore import tree

from emu.exploration import parallel
from emu.exploration.claims import SeenShard
from emu.exploration.explorer import Explorer
from emu.scenario.parse import parse_scenario


class _Local:
    """The seen-set as the jobs share it, in this process."""

    def __init__(self, shard: SeenShard) -> None:
        self.shard = shard

    def connect(self) -> Callable[[list[str]], list[bool]]:
        return self.shard.claim


def measure(k: int, workers: int) -> dict[str, float]:
    sc = parse_scenario(tree(k), "tree")
    t = time.process_time()
    coordinator = Explorer(sc, "bfs")
    coordinator.run(split=max(2, workers * 4), graph=False)
    head = time.process_time() - t
    prefixes = sorted(coordinator.frontier)
    jobs = max(1, min(len(prefixes), workers * 4))
    chunks = [prefixes[i::jobs] for i in range(jobs) if prefixes[i::jobs]]
    shard = SeenShard()
    shard.claim(coordinator.fork_nodes)
    parts, explore_s, pack_s, plain_dump_s, plain_load_s, sent = [], [], 0.0, 0.0, 0.0, 0
    for chunk in chunks:
        part = parallel.explore_prefixes(sc, "bfs", chunk, _Local(shard))
        found = parallel._last[0]
        gc.disable()  # as in the worker, where packing runs with the collector off
        explore_s.append(part.cpu)  # its packing included
        t = time.process_time()
        parallel.pack(found.nodes, list(found.edges))
        pack_s += time.process_time() - t
        t = time.process_time()
        plain = pickle.dumps((found.nodes, list(found.edges)), protocol=pickle.HIGHEST_PROTOCOL)
        plain_dump_s += time.process_time() - t
        t = time.process_time()
        pickle.loads(plain)
        plain_load_s += time.process_time() - t
        blob = pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL)
        sent += len(blob)
        parts.append(blob)
        gc.enable()
    parallel._last.clear()
    gc.disable()
    merge_s = []
    for blob in parts:
        t = time.process_time()
        parallel._absorb(coordinator, pickle.loads(blob))
        merge_s.append(time.process_time() - t)
    t = time.process_time()
    graph = coordinator._graph()
    graph_s = time.process_time() - t
    gc.enable()
    n = len(graph)
    # Jobs go to whichever worker is free first, in order (as ProcessPoolExecutor hands them out).
    free = [0.0] * workers
    for s in explore_s:
        heapq.heappush(free, heapq.heappop(free) + s)
    critical = head + max(free) + merge_s[-1] + graph_s
    t = time.process_time()
    alone = Explorer(sc, "bfs").run()  # one process, its graph included
    one = time.process_time() - t
    if len(alone.graph) != n:
        raise SystemExit(f"one process found {len(alone.graph)} states, the jobs {n}")
    us = 1e6 / n
    return {
        "states": n,
        "explore_us": sum(explore_s) * us,
        "pack_us": pack_s * us,
        "plain_pickle_us": plain_dump_s * us,
        "plain_unpickle_us": plain_load_s * us,
        "message_bytes": sent / n,
        "merge_us": sum(merge_s) * us,
        "graph_us": graph_s * us,
        "critical_s": critical,
        "one_s": one,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--choices", type=int, default=14, help="K: the 2^K choice tree")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    m = measure(a.choices, a.workers)
    print(f"2^{a.choices} tree, {m['states']:,.0f} states, {a.workers} workers; load {os.getloadavg()[0]:.1f}")
    print(f"worker:      explore {m['explore_us']:.1f} us/state (packing included: {m['pack_us']:.2f} us/state; "
          f"pickling the states as named tuples instead: {m['plain_pickle_us']:.2f})")  # fmt: skip
    print(f"message:     {m['message_bytes']:.0f} B/state")
    print(f"coordinator: unpack + merge {m['merge_us']:.2f} us/state (unpickling named tuples: "
          f"{m['plain_unpickle_us']:.2f}), graph {m['graph_us']:.2f} us/state")  # fmt: skip
    print(f"CPU critical path on {a.workers} free cores: {m['critical_s']:.2f} s against one process's "
          f"{m['one_s']:.2f} s: {m['one_s'] / m['critical_s']:.2f}x (worker start-up and claim waits not included)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
