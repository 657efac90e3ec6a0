"""``emu explore`` and ``emu explain``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from emu.cli.exit_codes import EXIT_EXPECT, EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED
from emu.cli.python import add_python_options, with_python
from emu.errors import ScenarioError
from emu.scenario import load_scenario
from emu.writing import refuse_overwrite, write_atomic

if TYPE_CHECKING:  # the explorer (networkx) is loaded by the commands that use it
    from emu.exploration.explorer import Explorer
    from emu.exploration.result import Exploration


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more (``--workers``)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {value}")
    return value


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser("explore", help="follow every option of every kernel choice; print the state graph's summary")
    e.add_argument("scenario")
    e.add_argument("--strategy", choices=("bfs", "dfs"), default="bfs")
    e.add_argument("-o", "--output", help="also write the graph (.graphml, .json or .dot)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--force", action="store_true", help="overwrite an existing output file")
    e.add_argument("--no-progress", action="store_true", help="no progress line on a terminal")
    e.add_argument(
        "--workers", type=positive_int, default=1, help="explore with this many worker processes (same graph)"
    )
    e.add_argument("--backend", choices=("processes", "ray"), default="processes", help="where workers run")
    add_python_options(e)
    e.set_defaults(func=cmd_explore)
    x = sub.add_parser("explain", help="the transitions from the start to a state, with code and registers")
    x.add_argument("scenario")
    x.add_argument("state", help="a node id from `emu explore` (n4), a digest prefix, or 'pending'")
    add_python_options(x)
    x.set_defaults(func=cmd_explain)


def _explorer(path: str, strategy: str, progress: bool, allow: list[str], args: argparse.Namespace) -> Explorer:
    from emu.exploration.explorer import Explorer

    stream = sys.stderr if progress and sys.stderr.isatty() else None
    scenario = with_python(load_scenario(path, allow), args)
    return Explorer(scenario, "dfs" if strategy == "dfs" else "bfs", stream)


def cmd_explore(args: argparse.Namespace) -> int:
    from emu.expect import check_exploration

    if args.output:
        refuse_overwrite(args.output, args.force)
    if getattr(args, "workers", 1) > 1 or getattr(args, "backend", "processes") == "ray":
        from emu.exploration.parallel import explore_parallel

        scenario = with_python(load_scenario(args.scenario, getattr(args, "allow_path", [])), args)
        exp = explore_parallel(scenario, max(1, args.workers), args.backend, "dfs" if args.strategy == "dfs" else "bfs")
    else:
        exp = _explorer(args.scenario, args.strategy, not args.no_progress, getattr(args, "allow_path", []), args).run()
    outcomes = check_exploration(exp)
    interrupted = exp.stopped_by == "interrupted"
    if args.output and not interrupted:  # a partial graph is not written over the user's file
        write_atomic(args.output, exp.graph.render(args.output))
    summary = exp.summary()
    summary["expectations"] = [{"where": o.where, "passed": o.passed, "message": o.message} for o in outcomes]
    if args.json:
        import json  # here: only --json needs it

        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write(
            f"{exp.scenario.name}: {exp.states} states, {summary['transitions']} transitions, "
            f"{exp.merges} merges, {len(exp.pending)} callback-return pending ({exp.strategy}, "
            f"{exp.forks} forks, {exp.paths} paths)\n"
        )
        for n in exp.pending:
            sys.stdout.write(f"  pending: {n}  {exp.graph.attrs(n)['label']}\n")
            _reached(exp, n)
        for n in exp.deadlocks:
            sys.stdout.write(f"  deadlock: {n}  {exp.graph.attrs(n)['deadlock']}\n")
            _reached(exp, n)
        for node, message in exp.faults:
            sys.stdout.write(f"  stopped at {node}: {message}\n")
        if exp.symbolic is not None:
            for r in exp.symbolic["reports"]:  # type: ignore[attr-defined]
                sys.stdout.write(f"  incomplete at {r['state']}: {r['message']}\n")
        if exp.stopped_by:
            why = "interrupted by Ctrl-C" if interrupted else f"budget '{exp.stopped_by}' reached"
            sys.stdout.write(f"  incomplete: {why}, {exp.unexplored} option(s) unexplored\n")
        sys.stdout.write(f"expectations: {sum(o.passed for o in outcomes)} of {len(outcomes)} hold\n")
    for o in outcomes:
        if not o.passed:
            sys.stderr.write(f"{exp.scenario.path}: expectation failed: {o.where}: {o.message}\n")
    if interrupted:
        wrote = f" ({args.output} not written)" if args.output else ""
        sys.stderr.write(f"emu explore: interrupted{wrote}\n")
        return EXIT_INTERRUPTED
    if exp.stopped_by:
        sys.stderr.write(f"{exp.scenario.path}: exploration stopped by budget '{exp.stopped_by}'\n")
        return EXIT_STOPPED
    return EXIT_EXPECT if any(not o.passed for o in outcomes) else EXIT_OK


def _reached(exp: Exploration, node: str) -> None:
    """With symbolic values: the state's path condition and witness (emu.symbolic)."""
    a = exp.graph.attrs(node)
    if "path_condition" in a:
        sys.stdout.write(f"      reached when {a['path_condition']}; witness: {a.get('witness') or '-'}\n")


def cmd_explain(args: argparse.Namespace) -> int:
    from emu.views.explain import explain, find_node, render

    explorer = _explorer(args.scenario, "bfs", False, getattr(args, "allow_path", []), args)
    exp = explorer.run()
    try:
        node = find_node(exp, args.state)
    except KeyError as e:
        raise ScenarioError(args.scenario, "", str(e.args[0])) from None
    process = explorer.process
    names = {t.tid: t.name for t in process.kernel.threads.values()}
    steps = explain(exp, node, process.images, process.trace.symbolize, names)  # type: ignore[arg-type]
    sys.stdout.write(render(exp, node, steps, process.trace.thread_starts) + "\n")
    return EXIT_OK
