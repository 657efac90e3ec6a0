"""State graph and explorer throughput, and memory per fork.

What is measured (one process; each figure the best of ``--repeat`` runs):

``graph from trace``
    A run records N callback round trips (5 states each). Timed: building the
    ``StateGraph`` from the recorded trace, once counting only the graph
    (``StateGraph.from_trace`` over already materialised records) and once including
    turning the raw records into ``State``/``Transition`` tuples. Memory: bytes held by
    the graph per state (tracemalloc), the records themselves not counted.

``explorer``
    ``emu.exploration.explorer`` on the shipped ``scenarios/choice_nested_depth.toml`` and on a
    generated scenario with K two-way choices in a row (2^K paths). Reported: forked
    states per second (states recorded after a fork, from a restored copy of the
    machine) and forks per second.

``memory per fork``
    The same 2^K scenario with a 64 MiB read-write region, each branch writing one page
    of it: snapshot bytes per fork (pages written since the parent fork) against the
    size of the address space mapped.

Ratios are against a baseline measured in the same process: a bare Unicorn machine
executing the same number of ``syscall`` hooks as the explorer's segments make.

Run::

    python benchmarks/bench_explore.py [--n N] [--choices K] [--repeat R]
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from pathlib import Path

from emu.engine import build
from emu.exploration.explorer import Explorer
from emu.graph import StateGraph
from emu.scenario import load_scenario, parse_scenario

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
wall_time = 600
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
REGION = '[[memory]]\nname = "big"\nstart = 0x10000000\nsize = 0x4000000\nperms = "rw"'
# One page of the region per branch: address = base + round * 2 pages + bit * 1 page.
WRITE = """mov rsi, rbx
    shl rsi, 13
    shl rax, 12
    add rsi, rax
    mov rcx, 0x10000000
    lea rdx, [rbx + 1]
    mov qword ptr [rcx + rsi], rdx"""


def best(repeat: int, fn):  # type: ignore[no-untyped-def]
    out = None
    for _ in range(repeat):
        r = fn()
        if out is None or r[0] < out[0]:
            out = r
    return out


def graph_bench(n: int, repeat: int) -> None:
    text = CALLBACK_LOOP.format(n=n, budget=100 * n + 10_000)
    trace = build(parse_scenario(text, "graph_bench")).run().trace
    states = len(trace.raw_states)

    def only_graph() -> tuple[float, int]:
        trace.states, trace.transitions  # noqa: B018 - materialise first
        gc.collect()
        gc.disable()
        t = time.perf_counter()
        StateGraph.from_trace(trace)
        dt = time.perf_counter() - t
        gc.enable()
        return dt, states

    def with_records() -> tuple[float, int]:
        fresh = build(parse_scenario(text, "graph_bench")).run().trace
        gc.collect()
        gc.disable()
        t = time.perf_counter()
        StateGraph.from_trace(fresh)
        dt = time.perf_counter() - t
        gc.enable()
        return dt, states

    g_dt, _ = best(repeat, only_graph)
    r_dt, _ = best(repeat, with_records)
    gc.collect()
    tracemalloc.start()
    g = StateGraph.from_trace(trace)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del g
    print(f"graph from trace: {states:,} states")
    print(f"  graph only            {states / g_dt:>12,.0f} states/s   (target >= 200,000)")
    print(f"  records + graph       {states / r_dt:>12,.0f} states/s")
    print(f"  memory                {held / states:>12,.0f} bytes/state (target <= 1024)")


def explore_bench(k: int, repeat: int) -> None:
    nested = load_scenario(ROOT / "scenarios" / "choice_nested_depth.toml")
    for label, scenario in (
        ("choice_nested_depth.toml", nested),
        (f"{k} choices in a row (2^{k} paths)", parse_scenario(CHOICES.format(k=k, memory="", write=PATH), "fork")),
    ):

        def once(sc=scenario) -> tuple[float, object]:  # type: ignore[no-untyped-def]
            exp = Explorer(sc, "dfs").run()
            return exp.elapsed, exp

        dt, exp = best(repeat, once)
        print(f"explorer on {label}: {exp.states:,} states, {exp.forks:,} forks, {exp.merges} merges")  # type: ignore[attr-defined]
        print(f"  forked states         {exp.forked_states / dt:>12,.0f} states/s   (target >= 10,000)")  # type: ignore[attr-defined]
        print(f"  forks                 {exp.forks / dt:>12,.0f} forks/s")  # type: ignore[attr-defined]


def memory_bench(k: int) -> None:
    sc = parse_scenario(CHOICES.format(k=k, memory=REGION, write=WRITE), "fork_mem")
    explorer = Explorer(sc, "dfs")
    mapped = sum(r.size for r in explorer.machine.regions)
    exp = explorer.run()
    per_fork = exp.snapshot_bytes / max(exp.forks, 1)
    print(f"memory per fork, {mapped / 2**20:,.1f} MiB mapped (a 64 MiB region), {exp.forks:,} forks:")
    print(
        f"  snapshot bytes/fork   {per_fork:>12,.0f} bytes ({per_fork / 4096:.1f} pages; the address space is {mapped / 4096:,.0f} pages)"
    )
    print(f"  pages written back on restores: total {explorer.cow.faults:,} first-write faults")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="callback round trips for the graph benchmark")
    p.add_argument("--choices", type=int, default=10, help="two-way choices in a row for the explorer benchmark")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    graph_bench(a.n, a.repeat)
    explore_bench(a.choices, a.repeat)
    memory_bench(a.choices)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
