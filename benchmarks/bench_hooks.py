"""What emu's hooks (``emu.hooks``) cost: nothing when none is given, and how much when some are.

Workloads (bench_roundtrip's scenarios): ``syscall``, ``main`` looping N times over ``call
NtClose`` (a scripted service returning 0: the kernel model's hot path); ``callback``,
``main`` looping N times over ``call NtUserMessageCall``, whose script calls back (api 2)
and returns the callback's status. Only ``Process.run()`` is timed.

In one process, the runs interleaved, the median kept, each as a ratio to the run with no
hooks:

``idle hooks``
    an instruction hook on an address the run never reaches, a write hook on a range
    nobody writes (the kernel model's writes are then filtered through it), a thread-switch
    hook (one thread: never called);
``transition hook``
    one hook called for every transition (a counter);
``instruction hook``
    one hook on the loop's ``call`` instruction, called N times.

``--baseline REV`` also times the no-hook run of the same emu at git revision REV (e.g. the
commit before hooks existed), in child interpreters started in turn with this checkout's,
and prints this checkout's time over the baseline's: zero hooks should keep that speed.

Run::

    python benchmarks/bench_hooks.py [--n N] [--runs R] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import measuring
from bench_roundtrip import callback_text, syscall_stub_text

from emu.api import build
from emu.hooks import Hit, Hooks
from emu.scenario import parse_scenario

WORKLOADS: dict[str, Callable[[int], str]] = {"syscall": syscall_stub_text, "callback": callback_text}

# The child: time Process.run() of one scenario text with no hooks, with the emu on its path.
CHILD = """
import json, sys, time
from emu.engine import build
from emu.scenario import parse_scenario
text = sys.stdin.read()
best = []
for _ in range(int(sys.argv[1])):
    p = build(parse_scenario(text, "bench.toml"))
    t = time.perf_counter()
    r = p.run()
    best.append(time.perf_counter() - t)
    assert r.error is None, r.error
print(json.dumps(sorted(best)[len(best) // 2]))
"""


def _idle() -> Hooks:
    hooks = Hooks()
    hooks.instruction(0x10)(lambda hit: None)
    hooks.write((0x20, 0x30))(lambda hit: None)
    hooks.thread_switch()(lambda hit: None)
    return hooks


def _transitions(counter: list[int]) -> Hooks:
    hooks = Hooks()

    @hooks.transition()
    def count(hit: Hit) -> None:
        counter[0] += 1

    return hooks


def _at_call(counter: list[int]) -> Hooks:
    hooks = Hooks()

    @hooks.instruction("app!loop_top")
    def count(hit: Hit) -> None:
        counter[0] += 1

    return hooks


def timed(text: str, hooks: Hooks | None) -> float:
    process = build(parse_scenario(text, "bench.toml"), hooks=hooks)
    start = time.perf_counter()
    r = process.run()
    elapsed = time.perf_counter() - start
    if r.error is not None:
        raise SystemExit(f"bench_hooks: the run failed: {r.error}")
    return elapsed


def measure(workload: str, n: int, runs: int) -> dict[str, float]:
    """Median ratios to the no-hook run, and the no-hook run's µs per loop iteration."""
    text = WORKLOADS[workload](n)
    counter = [0]
    none, idle, trans, instr = measuring.paired(
        runs,
        lambda: timed(text, None),
        lambda: timed(text, _idle()),
        lambda: timed(text, _transitions(counter)),
        lambda: timed(text, _at_call(counter)),
    )
    return {
        "us_per_op": statistics.median(none) / n * 1e6,
        "idle hooks": statistics.median(i / b for i, b in zip(idle, none)),
        "transition hook": statistics.median(t / b for t, b in zip(trans, none)),
        "instruction hook": statistics.median(h / b for h, b in zip(instr, none)),
    }


def _export(rev: str, into: Path) -> Path:
    """The tree of git revision ``rev`` (its emu package), unpacked into ``into``."""
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(measuring.ROOT), "archive", rev, "emu"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def versus_baseline(rev: str, workload: str, n: int, runs: int) -> list[float]:
    """This checkout's no-hook time over ``rev``'s, per pair of child runs (started in turn)."""
    text = WORKLOADS[workload](n)

    def child(tree: Path) -> float:
        env = dict(measuring.child_env(), PYTHONPATH=str(tree))
        done = subprocess.run(
            [sys.executable, "-c", CHILD, "3"], input=text, capture_output=True, text=True, env=env, check=True
        )
        return float(json.loads(done.stdout.strip().splitlines()[-1]))

    with tempfile.TemporaryDirectory() as tmp:
        base = _export(rev, Path(tmp))
        head, old = measuring.paired(runs, lambda: child(measuring.ROOT), lambda: child(base))
    return [h / o for h, o in zip(head, old)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=20000, help="loop iterations per run (default 20000)")
    ap.add_argument("--runs", type=int, default=measuring.MIN_RUNS, help="runs per figure; the median is kept")
    ap.add_argument("--baseline", metavar="REV", help="also compare the no-hook run with emu at this git revision")
    args = ap.parse_args(argv)
    n, runs = args.n, measuring.check_runs(args.runs)
    if n < 1:
        ap.error("--n must be positive")
    measuring.print_header(f"N = {n}, median of {runs} interleaved runs; ratios to the same run with no hooks")
    for workload in WORKLOADS:
        figures = measure(workload, n, runs)
        print(f"{workload:<9} no hooks {figures.pop('us_per_op'):.2f} µs per iteration")
        for name, ratio in figures.items():
            print(f"{'':<9} {name:<17} {ratio:.3f}×")
        if args.baseline:
            ratios = versus_baseline(args.baseline, workload, n, runs)
            print(
                f"{'':<9} {'no hooks vs ' + args.baseline:<17} {statistics.median(ratios):.3f}× "
                f"[{min(ratios):.3f}..{max(ratios):.3f}] (this checkout's time / the baseline's)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
