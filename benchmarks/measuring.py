"""What the benchmarks share: medians of runs, one table row per goal, the load, child processes.

Importing this module puts the repository root first on ``sys.path``, so a benchmark measures
the emu checked out beside it, not another installed copy.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from goals import Goal

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIN_RUNS = 5  # medians of at least this many runs, unless a smoke run asks for fewer
VERDICTS = ("met", "not met", "not measured")


@dataclass
class Row:
    """One goal's figure: a value per run (the median is reported), and the verdict's basis.

    ``judged`` holds per-run values the verdict compares with the goal when that is not the
    figure itself (a first-write time judged by its ratio to a small region's).
    """

    goal: Goal
    unit: str  # "x", "/s", "B", "s", "us"
    samples: list[float] = field(default_factory=list)
    judged: list[float] | None = None
    detail: str = ""
    why_not: str | None = None  # set: the row was not measured, and this says why

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def verdict(self) -> str:
        if self.why_not is not None or not self.samples:
            return "not measured"
        basis = statistics.median(self.judged) if self.judged else self.median
        return "met" if self.goal.met(basis) else "not met"

    def figure(self) -> str:
        if self.why_not is not None or not self.samples:
            return f"not measured: {self.why_not or 'no runs'}"
        lo, hi = min(self.samples), max(self.samples)
        return f"{fmt(self.median, self.unit)} [{fmt(lo, self.unit, bare=True)}..{fmt(hi, self.unit, bare=True)}]"

    def as_json(self) -> dict[str, Any]:
        measured = self.why_not is None and bool(self.samples)
        return {
            "key": self.goal.key,
            "metric": self.goal.metric,
            "goal": self.goal.text,
            "unit": self.unit,
            "median": self.median if measured else None,
            "min": min(self.samples) if measured else None,
            "max": max(self.samples) if measured else None,
            "runs": len(self.samples),
            "samples": self.samples,
            "judged_median": statistics.median(self.judged) if measured and self.judged else None,
            "figure": self.figure(),
            "verdict": self.verdict,
            "detail": self.detail,
            "not_measured": self.why_not,
        }


def fmt(value: float, unit: str, bare: bool = False) -> str:
    """A figure in its unit: ``1.95×``, ``27,600/s``, ``3,850 B``, ``0.75 s``, ``31.2 µs``."""
    if unit == "x":
        text, suffix = f"{value:.2f}", "×"
    elif unit == "/s":
        text, suffix = f"{value:,.0f}", "/s"
    elif unit == "B":
        text, suffix = f"{value:,.0f}", " B"
    elif unit == "s":
        text, suffix = f"{value:.3f}", " s"
    elif unit == "us":
        text, suffix = (f"{value:,.0f}" if value >= 100 else f"{value:.2f}"), " µs"
    else:
        text, suffix = f"{value:g}", f" {unit}"
    return text if bare else text + suffix


def paired(runs: int, *fns: Any) -> list[list[Any]]:
    """Call ``fns`` in turn, ``runs`` times: interleaved, so load shifts hit every series alike,
    and in reverse order every other round, so that no series always runs first (after the
    same other one)."""
    out: list[list[Any]] = [[] for _ in fns]
    for i in range(runs):
        for series, fn in alternate(list(zip(out, fns)), i):
            series.append(fn())
    return out


def alternate(items: list[T], round_: int) -> list[T]:
    """``items`` in order on even rounds, reversed on odd ones (:func:`paired`'s order)."""
    return items if round_ % 2 == 0 else items[::-1]


def load_report() -> tuple[tuple[float, float, float], int, str | None]:
    """The 1/5/15-minute load average, the core count, and a warning when load exceeds the cores."""
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    warning = None
    if load[0] > cores:
        warning = f"load {load[0]:.2f} > {cores} cores: other work shares the CPU, figures are pessimistic"
    return load, cores, warning


def print_header(what: str) -> None:
    """The interpreter, Unicorn, the load average (with a warning past the core count), and ``what``."""
    import platform

    import unicorn

    load, cores, warning = load_report()
    print(f"python   {platform.python_version()} ({sys.executable}); unicorn {unicorn.__version__}")
    print(f"load     {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) on {cores} cores")
    if warning:
        print(f"WARNING  {warning}")
    print(what)
    print()


def child_env() -> dict[str, str]:
    """The environment for a child interpreter: this checkout's emu first on its path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_child(args: list[str], python: str | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run ``python args...`` (from benchmarks/); the last stdout line is JSON, returned decoded."""
    cmd = [python or sys.executable, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=child_env(), timeout=timeout, check=False)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{' '.join(args[:2])}: the child failed (exit {out.returncode}): {tail[0]}")
    lines = out.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(args[:2])}: the child printed nothing")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def print_rows(rows: list[Row], file: Any = None) -> None:
    """The table: metric | goal | median [min..max] | verdict, then each row's details."""
    file = file or sys.stdout
    header = ("metric", "goal", "median [min..max]", "verdict")
    cells = [(r.goal.metric, r.goal.text, r.figure(), r.verdict) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)] if cells else []
    if not cells:
        return
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)), file=file)
    print("-+-".join("-" * w for w in widths), file=file)
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)), file=file)
    details = [(r.goal.key, r.detail) for r in rows if r.detail]
    if details:
        print(file=file)
        for key, detail in details:
            print(f"  {key}: {detail}", file=file)


def check_runs(runs: int) -> int:
    """``runs`` itself, or a one-line error and exit status 2 (bad input) when it is below 1."""
    if runs < 1:
        print(f"error: --runs must be 1 or more, not {runs}", file=sys.stderr)
        raise SystemExit(2)
    return runs


def find_peer_python(module: str, label: str, requested: str | None, venv_python: Path, install: str,
                     timeout: float) -> tuple[str | None, str]:  # fmt: skip
    """(an interpreter that imports ``module``, "") or (None, why there is none).

    A peer (Qiling, angr) pins its own dependencies, so it runs in its own interpreter: the one
    asked for, else the repository's venv for it, else this one."""
    candidates = [requested] if requested else [str(venv_python), sys.executable]
    tried = []
    for python in candidates:
        try:
            probe = subprocess.run(
                [python, "-c", f"import {module}"], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append(f"{python} ({e.__class__.__name__})")
            continue
        if probe.returncode == 0:
            return python, ""
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        tried.append(f"{python} ({last})")
    return None, f"{label} is not importable by {' or '.join(tried)}; to install it: {install}"
