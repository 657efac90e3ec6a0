"""State graph and explorer throughput, memory per state by RSS, and the cost of a first write.

What is measured (each figure the median of ``--runs`` runs):

``explorer``
    ``emu.exploration.explorer.Explorer`` on a generated scenario with K two-way choices in a
    row (2^K paths, no merges), depth-first and breadth-first, each run in a fresh child
    interpreter. Reported: forked states per second (states recorded after a fork, from a
    restored copy of the machine) over the exploration's own elapsed time (the graph
    included), and memory per state: the child's resident set size (RSS, from
    ``/proc/self/statm``) after the exploration, with the explorer and its result still
    alive, minus the RSS just before it, divided by the states found. Peak RSS is shown too.
    The row's figure is the worse of the two strategies. The rate's verdict is judged as µs per
    forked state over the µs of bench_roundtrip's bare hook: the median of three runs in the
    same child before the exploration and three after it (see ``goals.REFERENCE_HOOK_US``).

``first write``
    The same tree (smaller K) where each branch writes one page of a read-write region: a
    64 MiB region against a 64 KiB one, the same pages written. Figure: exploration time per
    first write (each forked segment writes a page its path has not written), in the large
    region; the verdict compares it with the small region's ("no cliff").

``graph from trace`` (informational)
    A run records N callback round trips (5 states each). Timed: building the
    ``StateGraph`` from the recorded trace, once over already materialised records and once
    including turning the raw records into ``State``/``Transition`` tuples.

The goals come from ``goals.py``.

Run::

    python benchmarks/bench_explore.py [--choices K] [--write-choices K] [--n N] [--runs R]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import measuring
from goals import EXPLORE_MEMORY, EXPLORE_RATE, FIRST_WRITE, REFERENCE_HOOK_US
from measuring import Row

from emu.engine import build
from emu.exploration.explorer import Explorer
from emu.exploration.result import resident_bytes
from emu.graph import StateGraph
from emu.scenario import parse_scenario

ROOT = Path(__file__).resolve().parent.parent

CALLBACK_LOOP = """
[scenario]
name = "graph_bench"
[budgets]
instructions = {budget}
wall_time = 600
[[module]]
name = "app"
code = \"\"\"
main:
    push rbx
    sub rsp, 0x20
    mov ebx, {n}
again:
    call NtUserMessageCall
    dec ebx
    jnz again
    xor eax, eax
    add rsp, 0x20
    pop rbx
    ret
on_message:
    xor eax, eax
    ret
\"\"\"
[thread]
entry = "app!main"
[kernel_callback_table]
2 = "app!on_message"
[services.NtUserMessageCall]
steps = [{{ kind = "callback", api = 2 }}, {{ kind = "return", status = "callback" }}]
"""

CHOICES = """
[scenario]
name = "fork_bench"
[budgets]
states = 10000000
wall_time = 1200
process_memory = 17179869184
{memory}
[[module]]
name = "app"
code = \"\"\"
main:
    push rbx
    push rsi
    sub rsp, 0x28
    xor ebx, ebx
next:
    call NtYieldExecution          ; the kernel chooses: status 0 or 1
    {write}
    inc ebx
    cmp ebx, {k}
    jb next
    xor eax, eax
    add rsp, 0x28
    pop rsi
    pop rbx
    ret
\"\"\"
[thread]
entry = "app!main"
[services.NtYieldExecution]
steps = [{{ kind = "choice", name = "bit", options = {{ zero = [{{ kind = "return", status = 0 }}], one = [{{ kind = "return", status = 1 }}] }} }}]
"""
# Keep every path distinct (RSI accumulates the bits), so no two paths merge.
PATH = "lea rsi, [rsi * 2 + rax]"
HOOK_RUNS = 3  # bare hook runs before an exploration, and again after it
LARGE_REGION = 64 << 20
SMALL_REGION = 64 << 10
REGION = '[[memory]]\nname = "big"\nstart = 0x10000000\nsize = {size:#x}\nperms = "rw"'
# One page of the region per branch: address = base + round * 2 pages + bit * 1 page.
WRITE = """mov rsi, rbx
    shl rsi, 13
    shl rax, 12
    add rsi, rax
    mov rcx, 0x10000000
    lea rdx, [rbx + 1]
    mov qword ptr [rcx + rsi], rdx"""


def tree(k: int, region: int | None = None) -> str:
    """The 2^k choice tree's scenario text; with ``region`` bytes mapped, each branch writes one page of it."""
    if region is None:
        return CHOICES.format(k=k, memory="", write=PATH)
    return CHOICES.format(k=k, memory=REGION.format(size=region), write=WRITE)


# --- explorer: rate and RSS per state, in a fresh child -------------------------------------------
def _peak_rss() -> int:
    """VmHWM (the peak resident set) in bytes, 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def explore_child(k: int, strategy: str) -> dict[str, float | int | str | None]:
    """One exploration of the 2^k tree in this (fresh) process: its rate and the RSS it added."""
    explorer = Explorer(parse_scenario(tree(k), "tree"), strategy)  # type: ignore[arg-type]
    # The rate goal's baseline, in this process: the median of HOOK_RUNS bare hook runs before
    # the exploration and as many after (one short run swings with the machine's load).
    hooks = [bare_hook_us() for _ in range(HOOK_RUNS)]
    gc.collect()
    before, peak_before = resident_bytes(), _peak_rss()
    result = explorer.run()
    gc.collect()
    after, peak = resident_bytes(), _peak_rss()
    hooks += [bare_hook_us() for _ in range(HOOK_RUNS)]
    hook = statistics.median(hooks)
    if result.stopped_by is not None:
        raise SystemExit(f"2^{k} tree, {strategy}: stopped by the {result.stopped_by} budget")
    return {
        "strategy": strategy,
        "states": result.states,
        "forked_states": result.forked_states,
        "forks": result.forks,
        "elapsed": result.elapsed,
        "rss_added": after - before,
        "peak_added": max(peak, after) - max(peak_before, before),
        "hook_us": hook,
    }


def bare_hook_us(n: int = 20_000) -> float:
    """µs per op of bench_roundtrip's bare hook (through the binding), run here."""
    from bench_roundtrip import bare_hook

    dt, ops = bare_hook(n)
    return dt / ops * 1e6


def measure_explorer(k: int, runs: int) -> tuple[Row, Row]:
    """Forked states/s and RSS bytes per state on the 2^k tree, DFS and BFS, a fresh child per run."""
    got: dict[str, list[dict[str, float]]] = {"dfs": [], "bfs": []}
    for _ in range(runs):
        for strategy, series in got.items():
            series.append(measuring.run_child(["bench_explore.py", "--child", str(k), strategy]))
    rates = {s: [r["forked_states"] / r["elapsed"] for r in rs] for s, rs in got.items()}
    # The verdict's basis: µs per forked state over the bare hook's µs per op, child by child.
    per_hook = {s: [1e6 / (r["forked_states"] / r["elapsed"]) / r["hook_us"] for r in rs] for s, rs in got.items()}
    per_state = {s: [r["rss_added"] / r["states"] for r in rs] for s, rs in got.items()}
    peak = {s: statistics.median(r["peak_added"] / r["states"] for r in rs) for s, rs in got.items()}
    states = int(got["dfs"][0]["states"])
    slow = min(rates, key=lambda s: statistics.median(rates[s]))
    big = max(per_state, key=lambda s: statistics.median(per_state[s]))
    rate_detail = (
        f"2^{k} tree, {states:,} states; DFS {statistics.median(rates['dfs']):,.0f}/s, BFS {statistics.median(rates['bfs']):,.0f}/s"
        f" (figure: {slow.upper()}, the slower); {statistics.median(per_hook[slow]):.2f}× the bare hook measured"
        f" in the same child ({statistics.median(r['hook_us'] for r in got[slow]):.2f} µs here,"
        f" {REFERENCE_HOOK_US} µs where the goal was set)"
    )
    mem_detail = (
        f"RSS added / states: DFS {statistics.median(per_state['dfs']):,.0f} B, BFS {statistics.median(per_state['bfs']):,.0f} B"
        f" (figure: {big.upper()}, the larger); peak RSS added: DFS {peak['dfs']:,.0f} B, BFS {peak['bfs']:,.0f} B per state"
    )
    return (
        Row(EXPLORE_RATE, "/s", rates[slow], judged=per_hook[slow], detail=rate_detail),
        Row(EXPLORE_MEMORY, "B", per_state[big], detail=mem_detail),
    )


# --- first write to a page of a large region ----------------------------------------------------
def explore_writes(k: int, region: int) -> float:
    """Seconds to explore the 2^k tree whose branches each write a page of a ``region``-byte region."""
    explorer = Explorer(parse_scenario(tree(k, region), "first_write"), "dfs")
    gc.collect()
    t0 = time.perf_counter()
    result = explorer.run()
    dt = time.perf_counter() - t0
    if result.stopped_by is not None:
        raise SystemExit(f"first write, {region:#x}-byte region: stopped by the {result.stopped_by} budget")
    return dt


def measure_first_write(k: int, runs: int) -> Row:
    """Exploration time per first write with a 64 MiB region, judged against a 64 KiB region's."""
    small = max(SMALL_REGION, (2 * k + 1) * 4096)
    large, tiny = measuring.paired(runs, lambda: explore_writes(k, LARGE_REGION), lambda: explore_writes(k, small))
    writes = 2 ** (k + 1) - 2  # every forked segment writes one page its path has not written
    per_write = [t / writes * 1e6 for t in large]
    ratios = [t / s for t, s in zip(large, tiny)]
    detail = (
        f"{writes} first writes on a 2^{k} tree: {statistics.median(per_write):,.0f} µs each with 64 MiB mapped,"
        f" {statistics.median(tiny) / writes * 1e6:,.0f} µs with {small // 1024} KiB"
        f" ({statistics.median(ratios):.2f}×; exploration time per first-writing state)"
    )
    return Row(FIRST_WRITE, "us", per_write, judged=ratios, detail=detail)


# --- graph from a recorded trace (informational) -----------------------------------------------
def graph_bench(n: int, runs: int) -> None:
    text = CALLBACK_LOOP.format(n=n, budget=100 * n + 10_000)
    trace = build(parse_scenario(text, "graph_bench")).run().trace
    states = len(trace.raw_states)
    trace.states, trace.transitions  # noqa: B018 - materialise first

    def timed(t: object) -> float:
        gc.collect()
        t0 = time.perf_counter()
        StateGraph.from_trace(t)  # type: ignore[arg-type]
        return time.perf_counter() - t0

    only = [timed(trace) for _ in range(runs)]
    fresh = [timed(build(parse_scenario(text, "graph_bench")).run().trace) for _ in range(runs)]
    print(
        f"graph from trace ({states:,} states): {states / statistics.median(only):,.0f} states/s;"
        f" {states / statistics.median(fresh):,.0f} states/s including building the records"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--choices", type=int, default=14, help="two-way choices in a row for the explorer (default 14)")
    p.add_argument("--write-choices", type=int, default=6, help="choices in a row for the first-write tree (default 6)")
    p.add_argument("--n", type=int, default=20000, help="callback round trips for the graph benchmark")
    p.add_argument("--runs", type=int, default=measuring.MIN_RUNS, help="runs per measurement; the median is kept")
    p.add_argument("--child", nargs=2, metavar=("K", "STRATEGY"), help=argparse.SUPPRESS)  # a measuring child
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(explore_child(int(a.child[0]), a.child[1])))
        return 0
    runs = measuring.check_runs(a.runs)
    measuring.print_header(f"2^{a.choices} tree, 2^{a.write_choices} first-write tree; median of {runs} runs")
    graph_bench(a.n, runs)
    print()
    rate, memory = measure_explorer(a.choices, runs)
    measuring.print_rows([rate, memory, measure_first_write(a.write_choices, runs)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
