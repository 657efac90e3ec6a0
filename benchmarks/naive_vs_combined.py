"""Why emu's detector has three signals: the naive rule (RIP symbol only) against the combined one.

Scores both detectors on every state of the hard-case scenarios (``scenarios/hard_*.toml``) and
prints their confusion matrices, the naive detector's misses named, and how long each took::

    python benchmarks/naive_vs_combined.py            # the hard cases
    python benchmarks/naive_vs_combined.py --all      # every shipped scenario
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from emu.detection.score import score
from emu.detection.signals import combined_detector, naive_detector

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every scenario in scenarios/, not only hard_*.toml")
    parser.add_argument("--explore", action="store_true", help="every node of the explored graphs")
    args = parser.parse_args()
    paths = sorted((ROOT / "scenarios").glob("*.toml" if args.all else "hard_*.toml"))
    for title, detector in (("naive (signal a: RIP symbol only)", naive_detector), ("combined", combined_detector)):
        start = time.perf_counter()
        report = score(detector, paths, explore=args.explore)
        elapsed = time.perf_counter() - start
        print(f"== {title}: {report.total.total} states in {elapsed:.2f} s")
        print(report)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
