"""``emu plot FILE -o timeline.png|.svg [--graph [--default-run]]``: a scenario's timeline (or state graph).

With ``--graph``, a scenario with choices is explored and every option is drawn
(``--default-run``: only the run that takes each choice's default).

For people without Jupyter. Needs matplotlib (the ``[notebooks]`` extra); the file is
written atomically (a temporary file in the same directory, then a rename), and the
same scenario gives a byte-identical file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emu.cli.exit_codes import EXIT_INPUT

FORMATS = ("png", "svg")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``plot`` command to ``emu``'s subparsers (``build_parser``'s ``sub``)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "plot", help="draw a scenario's timeline (or --graph: its state graph) as .png or .svg"
    )
    p.add_argument("scenario")
    p.add_argument("-o", "--output", required=True, help="timeline.png or timeline.svg")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument(
        "--graph",
        action="store_true",
        help="draw the state graph instead of the timeline: every option's (explored) when the scenario has choices",
    )
    p.add_argument(
        "--default-run", action="store_true", help="with --graph: draw only the default run's graph, not every option"
    )
    p.set_defaults(func=cmd_plot)
    return p


def _write_atomic(path: Path, fig: Any, fmt: str) -> None:
    from emu.views.viz import save_figure
    from emu.writing import write_atomic_with

    write_atomic_with(path, lambda f: save_figure(fig, f, fmt))


def cmd_plot(args: argparse.Namespace) -> int:
    """Run the scenario and write the picture; exit codes as for ``emu graph``."""
    out = Path(args.output)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        sys.stderr.write(f"{args.output}: unknown picture format '{out.suffix}' (expected .png or .svg)\n")
        return EXIT_INPUT
    try:
        from emu.views import viz
    except ImportError as e:  # matplotlib is an optional extra
        sys.stderr.write(f"emu plot needs matplotlib ({e}); install it with: pip install 'emu[notebooks]'\n")
        return EXIT_INPUT
    from emu.cli.main import _finish
    from emu.engine import run
    from emu.scenario import load_scenario
    from emu.writing import refuse_overwrite

    refuse_overwrite(out, getattr(args, "force", False))
    r = run(load_scenario(args.scenario, getattr(args, "allow_path", [])))
    if args.graph and not getattr(args, "default_run", False):
        from emu.exploration.explorer import explore

        exp = explore(r.scenario)
        if exp.forks:  # the scenario has choices: one run shows only the default of each
            _write_atomic(out, viz.state_graph(exp.graph, name=r.scenario.name), fmt)
            incomplete = "" if exp.complete else f", stopped by the {exp.stopped_by} budget"
            sys.stdout.write(
                f"wrote {out} (explored state graph: {exp.states} states, {exp.graph.lean.number_of_edges()} "
                f"transitions, {exp.paths} paths{incomplete})\n"
            )
            return _finish(r, sys.stderr)
    fig = viz.state_graph(r) if args.graph else viz.timeline(r)
    _write_atomic(out, fig, fmt)
    what = "state graph" if args.graph else "timeline"
    sys.stdout.write(f"wrote {out} ({what}: {len(r.trace)} transitions, {len(r.detections)} detection(s))\n")
    return _finish(r, sys.stderr)
