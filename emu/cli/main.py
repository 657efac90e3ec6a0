"""The ``emu`` command.

Exit codes (:mod:`emu.cli.exit_codes`): 0 every expectation holds; 1 an expectation failed
(named); 2 invalid input (scenario, assembly, arguments, a file that cannot be read or
written); 3 the run stopped on a budget or a fault (named, with the RIP as a symbol), or
memory ran out; 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from emu import __version__, interrupts
from emu.api import Run, run
from emu.cli import corpus as cli_corpus
from emu.cli import debug as cli_debug
from emu.cli import dump as cli_dump
from emu.cli import explore as cli_explore
from emu.cli import image as cli_image
from emu.cli import plot as cli_plot
from emu.cli import score as cli_score
from emu.cli import snapshot as cli_snapshot
from emu.cli.exit_codes import EXIT_EXPECT, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED
from emu.cli.python import add_python_options, with_python
from emu.errors import BudgetExceeded, EmuError, ScenarioError
from emu.scenario import Scenario, load_scenario
from emu.writing import refuse_overwrite, write_atomic


def _transition_rows(r: Run) -> list[dict[str, object]]:
    from emu.detection.observers import WAITING_IN_CALLBACK, is_true, statuses

    known = statuses(r.trace)
    names = {t.tid: t.name for t in r.threads.values()}
    rows: list[dict[str, object]] = []
    for t in r.trace:
        src = r.trace.state(t.src)
        dst = r.trace.state(t.dst)
        status = known[t.dst]
        rows.append({
            "step": t.step,
            "kind": t.kind,
            "thread": t.thread,
            "from": src.mode,
            "to": dst.mode,
            "service": t.service,
            "ssn": t.ssn,
            "rip": t.rip_symbol,
            "rip_address": f"{t.rip:#x}",
            "rsp": t.rsp_symbol,
            "rsp_address": f"{t.rsp:#x}",
            "depth": t.depth,
            "api": t.api,
            "status": t.status_name or None,
            "pending": dst.pending,
            "waiting_in_callback": is_true(WAITING_IN_CALLBACK, dst, status),
            "thread_state": status.state,
            "wait_reason": status.wait_reason,
            "detail": t.detail or None,
            "woke": [names.get(tid, f"thread{tid}") for tid in t.woke],
        })  # fmt: skip
    return rows


def _report(r: Run) -> dict[str, object]:
    return {
        "scenario": r.scenario.name,
        "profile": r.scenario.profile.name,
        "system": r.system,
        "thread_starts": list(r.trace.thread_starts),
        "transitions": _transition_rows(r),
        "detections": [d.as_dict() for d in r.detections],
        "truths": _truths(r),
        "expectations": [{"where": o.where, "passed": o.passed, "message": o.message} for o in r.outcomes],
        "exit_status": None if r.exit_status is None else f"{r.exit_status:#010x}",
        "stopped": None if r.error is None else {"by": r.stop, "message": str(r.error)},
    }


def _truths(r: Run) -> dict[str, dict[str, int]]:
    """Per ground truth, how many states it holds in, and in how many of those each observer sees the thread."""
    from emu.detection.observers import OBSERVERS, TRUTHS, is_true, statuses, visible

    known = statuses(r.trace)
    pairs = list(zip(r.trace.states, known, strict=True))
    return {
        t: {o: sum(1 for s, st in pairs if is_true(t, s, st) and visible(o, s, st)) for o in OBSERVERS} for t in TRUTHS
    }


def _print_table(r: Run, out: TextIO, verbose: bool = False) -> None:
    out.write(f"{r.scenario.name} ({r.system or r.scenario.profile.title})\n")
    if verbose or r.scenario.ntdll is not None or r.scenario.start_dump is not None:
        for line in r.trace.thread_starts:
            out.write(f"start {line}\n")
    names = {t.tid: t.name for t in r.threads.values()}
    many = len(names) > 1
    who = f"{'thread':<8} " if many else ""
    header = f"{'step':>4}  {who}{'kind':<15} {'from':<6} -> {'to':<6}  {'service':<22} {'user rip':<42} {'depth':>5}  status"
    out.write(header + "\n" + "-" * len(header) + "\n")
    for row in _transition_rows(r):
        who = f"{names.get(int(str(row['thread'])), '?'):<8} " if many else ""
        mark = "  <- callback-return pending (seed)" if row["pending"] else ""
        if row["waiting_in_callback"]:
            mark += f"  <- waiting in callback: {row['thread_state']} ({row['wait_reason']})"
        if row["detail"]:
            mark += f"  ({row['detail']})"
        if row["woke"]:
            mark += f"  <- wakes {', '.join(map(str, row['woke']))}: Ready"  # type: ignore[call-overload]
        line = (
            f"{row['step']:>4}  {who}{row['kind']:<15} {row['from']:<6} -> {row['to']:<6}  {row['service'] or '':<22} "
            f"{row['rip']:<42} {row['depth']:>5}  {row['status'] or ''}{mark}"
        )
        out.write(line.rstrip() + "\n")
    out.write("\nground truths:\n")
    for name, counts in _truths(r).items():
        out.write(
            f"  {name:<20} {counts['kernel-debugger']:>3} state(s); a user-context observer "
            f"(GetThreadContext, a suspend, a minidump) can see {counts['user-context']}\n"
        )
    out.write(
        f"\ndetections ({len(r.detections)}): the thread at ZwCallbackReturn while the kernel completes the callback\n"
    )
    for d in r.detections:
        out.write(
            f"  state s{d.state}: rip {d.rip}, [rsp] -> {d.return_address}, depth {d.depth}, api {d.api_number}\n"
        )
    for chain in r.deadlock:
        out.write(f"\ndeadlock: {chain}")
    if r.deadlock:
        out.write("\n")
    if r.exit_status is not None:
        from emu.winnt import status_name

        out.write(f"\nthread exit status: {status_name(r.exit_status)}\n")
    passed = sum(o.passed for o in r.outcomes)
    out.write(f"expectations: {passed} of {len(r.outcomes)} hold\n")


def _finish(r: Run, err: TextIO, verbose: bool = False) -> int:
    for note in r.notes:
        err.write(f"{r.scenario.path}: note: {note}\n")
    for line in r.details if verbose else ():
        err.write(f"{r.scenario.path}: detail: {line}\n")
    failed = [o for o in r.outcomes if not o.passed]
    for o in failed:
        err.write(f"{r.scenario.path}: expectation failed: {o.where}: {o.message}\n")
    expected_stop = any(o.expectation.kind == "fault" and o.passed for o in r.outcomes)
    if r.deadlock and not any(o.expectation.kind == "deadlock" and o.passed for o in r.outcomes):
        for chain in r.deadlock:
            err.write(f"{r.scenario.path}: deadlock: {chain}\n")
        return EXIT_STOPPED
    if r.error is not None and not expected_stop:
        err.write(f"{r.scenario.path}: stopped by {r.stop}: {r.error}\n")
        return EXIT_STOPPED
    if r.error is not None:
        err.write(f"{r.scenario.path}: stopped by {r.stop} (as expected): {r.error}\n")
    return EXIT_EXPECT if failed else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    scenario = with_python(load_scenario(args.scenario, args.allow_path), args)
    expected = bool(scenario.expectations)
    if args.from_dump:
        scenario = cli_dump.from_dump(scenario, args.from_dump)
    if args.from_snapshot:
        r = cli_snapshot.from_snapshot(scenario, args.from_snapshot)
    elif args.witness:
        r = _run_witness(scenario, args.witness)
    else:
        r = run(scenario)
    if args.from_dump and expected:
        r.notes.append(
            f"from {args.from_dump}: the scenario's [[expect]] entries describe a run from its start; not checked"
        )
    if args.json:
        import json  # here: only --json needs it

        sys.stdout.write(json.dumps(_report(r), indent=2) + "\n")
    else:
        _print_table(r, sys.stdout, args.verbose)
    return _finish(r, sys.stderr, args.verbose)


def _run_witness(scenario: Scenario, items: list[str]) -> Run:
    """A run whose symbolic values take a witness's values (emu.symbolic.witness)."""
    from emu.api import build
    from emu.symbolic.witness import WitnessError, parse_witness, witness_hooks

    try:
        hooks, answer = witness_hooks(parse_witness(items))
    except WitnessError as e:
        raise ScenarioError(scenario.path, "--witness", str(e)) from None
    r = Run.of(build(scenario, hooks).run())
    if answer.errors:
        raise ScenarioError(scenario.path, "--witness", "; ".join(answer.errors))
    if answer.unused():
        raise ScenarioError(
            scenario.path, "--witness", f"the run asked for no value named {', '.join(answer.unused())}"
        )
    return r


def cmd_detect(args: argparse.Namespace) -> int:
    if args.dump and args.scenario:
        sys.stderr.write(
            f"emu detect: give a scenario file or --dump FILE.dmp, not both ({args.scenario} and {args.dump})\n"
        )
        return EXIT_INPUT
    if args.dump:
        return cli_dump.cmd_detect_dump(args)
    if not args.scenario:
        sys.stderr.write("emu detect: give a scenario file, or --dump FILE.dmp\n")
        return EXIT_INPUT
    from emu.detection.observers import check_observer
    from emu.detection.view import detect_run

    check_observer(args.observer)
    r = run(with_python(load_scenario(args.scenario, args.allow_path), args))
    found = r.detections if args.observer == "kernel-debugger" else detect_run(r, observer=args.observer)
    dets = [d.as_dict() for d in found]
    if args.json:
        import json  # here: only --json needs it

        sys.stdout.write(json.dumps(dets, indent=2) + "\n")
    else:
        for d in found:
            sys.stdout.write(f"s{d.state}: {d.rip}  [rsp] -> {d.return_address}  depth {d.depth}  api {d.api_number}\n")
        if not dets:
            seen = "" if args.observer == "kernel-debugger" else f" a {args.observer} observer can see"
            sys.stdout.write(f"no thread is at ZwCallbackReturn in any state{seen}\n")
    return _finish(r, sys.stderr)


def cmd_graph(args: argparse.Namespace) -> int:
    out = Path(args.output)
    refuse_overwrite(out, args.force)
    r = run(with_python(load_scenario(args.scenario, args.allow_path), args))
    write_atomic(out, r.graph.render(out))
    sys.stdout.write(f"wrote {out} ({len(r.graph)} states, {r.graph.lean.number_of_edges()} transitions)\n")
    return _finish(r, sys.stderr)


ALLOW_HELP = "let scenarios read files under DIR too (by default only under the scenario's own folder)"


def build_parser(run_only: bool = False) -> argparse.ArgumentParser:
    """The ``emu`` parser; ``run_only``: with the ``run`` subcommand alone (``emu run ...`` needs
    no other, and building the others' help texts is a measurable share of a cold start)."""
    p = argparse.ArgumentParser(
        prog="emu",
        description="Windows x64 user/kernel transitions on Unicorn: syscalls, kernel callbacks, ZwCallbackReturn.",
    )
    p.add_argument("--version", action="version", version=f"emu {__version__}")
    p.add_argument(
        "--allow-path",
        action="append",
        default=[],
        metavar="DIR",
        help=ALLOW_HELP,
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a scenario: transitions, detections, expectations")
    r.add_argument("scenario")
    r.add_argument("--json", action="store_true", help="machine-readable report")
    r.add_argument(
        "-v", "--verbose", action="store_true", help="also list what was read from the images (SSNs, conventions)"
    )
    r.add_argument(
        "--from-dump", metavar="FILE.dmp",
        help="start from a minidump (its memory, modules, threads and emu's kernel state); the scenario's services serve what comes next",
    )  # fmt: skip
    r.add_argument(
        "--from-snapshot", metavar="SNAP",
        help="go on from a snapshot file of this scenario (emu.Session.snapshot().save): the report is the whole run, its start included",
    )  # fmt: skip
    r.add_argument(
        "--witness", action="append", default=[], metavar="NAME=VALUE",
        help="a value for a symbolic declaration (as `emu explore --json` lists them); repeatable",
    )  # fmt: skip
    add_python_options(r)
    r.set_defaults(func=cmd_run)
    if not run_only:
        _add_other_commands(sub)
    for (
        command
    ) in sub.choices.values():  # `emu run --allow-path DIR FILE` works as well as `emu --allow-path DIR run FILE`
        command.add_argument(
            "--allow-path", action="append", default=[], metavar="DIR", dest="allow_path_after", help=ALLOW_HELP
        )
    return p


def _add_other_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("detect", help="report states where the thread is at ZwCallbackReturn (the seed's state)")
    d.add_argument("scenario", nargs="?")
    d.add_argument("--json", action="store_true")
    d.add_argument("--dump", metavar="FILE.dmp", help="detect in a minidump instead of running a scenario")
    d.add_argument(
        "--observer",
        default="kernel-debugger",
        metavar="NAME",
        help="kernel-debugger (every state, the default) or user-context (only the states GetThreadContext, "
        "a suspend or a minidump writer can catch, with the base trap frame's context)",
    )
    add_python_options(d)
    d.set_defaults(func=cmd_detect)
    g = sub.add_parser("graph", help="export the state graph (.graphml, .json, .dot)")
    g.add_argument("scenario")
    g.add_argument("-o", "--output", required=True)
    g.add_argument("--force", action="store_true", help="overwrite an existing output file")
    add_python_options(g)
    g.set_defaults(func=cmd_graph)
    cli_explore.add_parsers(sub)
    cli_image.add_parser(sub)
    cli_plot.add_parser(sub)
    cli_dump.add_parser(sub)
    cli_corpus.add_parser(sub)
    cli_score.add_parser(sub)
    cli_debug.add_parser(sub)
    cli_snapshot.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    """The ``emu`` command; every subcommand runs inside :func:`guarded`."""
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] == "run":
        args, extra = build_parser(run_only=True).parse_known_args(argv)
        if extra:  # reported by the whole parser, its usage line naming every subcommand
            args = build_parser().parse_args(argv)
    else:
        args = build_parser().parse_args(argv)
    args.allow_path = [*args.allow_path, *getattr(args, "allow_path_after", [])]
    if argv is None:  # the process's own command line: emu owns the process and its signals
        interrupts.install()
    code = guarded(args.func, args, args.command)
    if argv is None and "lief" not in sys.modules:
        # The process ends now. Its last garbage collection would walk every object the run made
        # (a fifth of a short run's time) to free memory the exit frees anyway; at-exit handlers
        # still run, and every file emu writes is closed before this point. (Not after LIEF was
        # used: its bindings list at exit, on stderr, the objects no collection freed.)
        gc.freeze()
    return code


def guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, command: str) -> int:
    """Run one subcommand; whatever escapes it becomes one line on stderr and an exit code.

    EmuError: its own line (2, or 3 for a budget); OSError: the file and the reason (2);
    RecursionError: input nested too deeply (2); MemoryError: out of memory (3);
    KeyboardInterrupt: "interrupted" (130). What was recorded before is printed by the
    subcommand itself where it can (``explore`` prints its partial summary).
    """
    note = None
    if command not in ("explore", "debug") and sys.stderr.isatty():  # explore: its own progress line; debug: waits
        note = threading.Timer(STILL_RUNNING, _still_running, (command,))
        note.daemon = True
        note.start()
    try:
        code: int = func(args)
        return code
    except BudgetExceeded as e:
        sys.stderr.write(f"{e}\n")
        return EXIT_STOPPED
    except EmuError as e:
        sys.stderr.write(f"{e}\n")
        return EXIT_INPUT
    except BrokenPipeError:  # pragma: no cover - `emu run ... | head`
        return EXIT_OK
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"emu {command}: {where}{e.strerror or e}\n")
        return EXIT_INPUT
    except RecursionError:
        sys.stderr.write(f"emu {command}: the input is nested too deeply to read\n")
        return EXIT_INPUT
    except MemoryError:
        sys.stderr.write(f"emu {command}: out of memory (lower the scenario's budgets)\n")
        return EXIT_STOPPED
    except KeyboardInterrupt:
        sys.stderr.write(f"emu {command}: interrupted\n")
        return EXIT_INTERRUPTED
    finally:
        if note is not None:
            note.cancel()


STILL_RUNNING = 2.0  # seconds before a terminal user hears that the command is still busy


def _still_running(command: str) -> None:
    sys.stderr.write(
        f"emu {command}: still running after {STILL_RUNNING:g} s (the scenario's wall_time budget, "
        "20 s by default, stops it; Ctrl-C stops it now)\n"
    )
    sys.stderr.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
