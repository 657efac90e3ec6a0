"""``emu run`` from a cold interpreter: wall time, and the share of it spent importing.

Each run starts a fresh ``python -m emu.cli run scenarios/callback_roundtrip.toml`` (the
README's first command) and times it from the parent, to the child's exit. Beside it, the
same command under ``python -X importtime`` gives the time spent in imports (the sum of
the top-level entries of Python's own import log, the log's overhead included), and the
heaviest third-party packages; and ``python -c pass`` gives the interpreter's own start.
The runs are interleaved and the medians kept; the goal is in ``goals.py``.

Every child may cache compiled bytecode, as after ``pip install`` (which compiles it) and as
Python does by default: the cache lives in a temporary directory (``PYTHONPYCACHEPREFIX``,
so the checkout stays clean), filled by one untimed run first, even when this process was
started with ``PYTHONDONTWRITEBYTECODE``. The detail line also gives, for comparison, the
cold start with ``PYTHONDONTWRITEBYTECODE=1`` and no cache prefix: the checkout's own modules
compiled from source at every start (unless a ``__pycache__`` beside them holds them).

Run::

    python benchmarks/bench_startup.py [--runs R] [--scenario PATH]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import measuring
from goals import COLD_START
from measuring import ROOT, Row

SCENARIO = ROOT / "scenarios" / "callback_roundtrip.toml"


_CACHE: list[str] = []  # the bytecode cache directory, made on first use


def _env(cached: bool) -> dict[str, str]:
    env = measuring.child_env()
    if cached:
        if not _CACHE:
            _CACHE.append(tempfile.mkdtemp(prefix="emu-bench-pycache-"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = _CACHE[0]
    else:  # as the checkout runs when nothing may write bytecode: its own modules compiled each time
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def _run(args: list[str], cached: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=_env(cached), check=False
    )
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{' '.join(args)}: exit {out.returncode}: {tail[0]}")
    return out


def cold_start(scenario: Path, cached: bool = True) -> float:
    """Seconds from starting ``python -m emu.cli run SCENARIO`` to its exit (``cached``: with
    compiled bytecode from earlier runs, else compiling every module from source)."""
    t0 = time.perf_counter()
    _run(["-m", "emu.cli", "run", str(scenario)], cached)
    return time.perf_counter() - t0


def _import_log(args: list[str]) -> list[tuple[float, int, str]]:
    """(cumulative seconds, nesting depth, module) for each entry of ``python -X importtime ARGS``'s log."""
    entries = []
    for line in _run(["-X", "importtime", *args]).stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit():  # not the header line
            stripped = name.lstrip()
            entries.append((int(cumulative) / 1e6, (len(name) - len(stripped) - 1) // 2, stripped))
    return entries


_STARTUP: set[str] = set()


def import_times(scenario: Path) -> tuple[float, dict[str, float]]:
    """Seconds ``emu run`` spends importing, and each top-level package's share of it.

    Counted: the log's top-level entries (nested ones are inside their parent's time), less
    the modules a bare interpreter imports at start-up (``site``, ``encodings``...).
    """
    if not _STARTUP:
        _STARTUP.update(name for _, depth, name in _import_log(["-c", "pass"]) if depth == 0)
    total = 0.0
    packages: dict[str, float] = {}
    for seconds, depth, name in _import_log(["-m", "emu.cli", "run", str(scenario)]):
        if depth == 0 and name not in _STARTUP:
            total += seconds
        if "." not in name and name not in _STARTUP and not name.startswith("_"):
            packages[name] = max(packages.get(name, 0.0), seconds)
    return total, packages


def interpreter_start() -> float:
    t0 = time.perf_counter()
    _run(["-c", "pass"])
    return time.perf_counter() - t0


def measure_cold_start(runs: int, scenario: Path = SCENARIO) -> Row:
    """``emu run``'s cold start per run; imports and the bare interpreter beside it."""
    cold_start(scenario)  # untimed: fills the bytecode cache, as installing does
    cold, imports, bare, compiling = measuring.paired(
        runs, lambda: cold_start(scenario), lambda: import_times(scenario), lambda: interpreter_start(),
        lambda: cold_start(scenario, cached=False),
    )  # fmt: skip
    imported = statistics.median(t for t, _ in imports)
    share = imported / statistics.median(cold)
    heaviest: dict[str, list[float]] = {}
    for _, packages in imports:
        for name, t in packages.items():
            heaviest.setdefault(name, []).append(t)
    top = sorted(((statistics.median(ts), n) for n, ts in heaviest.items() if n != "emu"), reverse=True)[:3]
    detail = (
        f"imports {imported:.3f} s ({share:.0%} of it; heaviest: {', '.join(f'{n} {t:.3f} s' for t, n in top)});"
        f" the bare interpreter starts in {statistics.median(bare):.3f} s; with no bytecode written"
        f" (PYTHONDONTWRITEBYTECODE=1) {statistics.median(compiling):.3f} s; `emu run {scenario.relative_to(ROOT)}`"
    )
    return Row(COLD_START, "s", cold, detail=detail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=measuring.MIN_RUNS, help="runs; the median is kept")
    ap.add_argument("--scenario", type=Path, default=SCENARIO, help="the scenario `emu run` runs")
    args = ap.parse_args(argv)
    runs = measuring.check_runs(args.runs)
    measuring.print_header(f"median of {runs} interleaved runs")
    measuring.print_rows([measure_cold_start(runs, args.scenario.resolve())])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
