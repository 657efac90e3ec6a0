"""``emu dump FILE --state ID -o OUT.dmp``, ``emu detect --dump OUT.dmp`` and ``emu run --from-dump``.

A dump holds every thread of the process as it is at the state (the state's own thread
first), the process's memory then and emu's kernel model (so ``emu run --from-dump OUT.dmp
FILE`` goes on from it), and ``emu detect --dump`` reports each thread that sits at
ZwCallbackReturn, with its thread id. Both print one line per problem and return exit code 2 for invalid input (a missing or
malformed file, an unknown state, an output that exists without ``--force``), like the
rest of the ``emu`` command.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.api import Run, run
from emu.cli.exit_codes import EXIT_INPUT, EXIT_OK
from emu.cli.python import add_python_options, with_python
from emu.errors import DumpError, EmuError
from emu.scenario import Scenario, load_scenario
from emu.trace import State
from emu.writing import refuse_overwrite

if TYPE_CHECKING:  # the dump reader and writer, the detector and the explorer load when a command uses them
    from emu.detection.view import Detection


def add_parser(sub: Any) -> None:
    """Register ``emu dump`` on the ``emu`` command's subparsers."""
    d = sub.add_parser(
        "dump", help="write a minidump of one state: every thread's CONTEXT and stack, modules and image memory"
    )
    d.add_argument("scenario")
    d.add_argument(
        "--state",
        required=True,
        help="a state id from `emu run` (s3 or 3) or `emu explore` (n3), or 'pending' (the first one)",
    )
    d.add_argument("-o", "--output", required=True, help="the .dmp file to write")
    d.add_argument("--force", action="store_true", help="overwrite an existing output file")
    d.add_argument(
        "--full", action="store_true", help="full memory: whole stacks and the scenario's memory regions too"
    )
    add_python_options(d)
    d.set_defaults(func=cmd_dump)


def find_state(r: Run, spec: str) -> State:
    """The state ``spec`` names: ``s3`` or ``3`` (a state of the run), ``n3`` (a node of
    ``emu explore``'s graph, when the run passes through it), or ``pending`` (the first)."""
    from emu.views.explain import state_number

    states = r.trace.states
    where = f"{r.scenario.path}: --state {spec!r}"
    if spec == "pending":
        for s in states:
            if s.pending:
                return s
        raise DumpError(f"{where}: no state of this run is pending at ZwCallbackReturn")
    sid = state_number(spec)
    if sid is None:
        raise DumpError(f"{where}: expected a state id like s3 or 3 (emu run), n3 (emu explore), or 'pending'")
    if spec[:1] in ("n", "N"):
        return _run_state_of_node(r, sid, where)
    if sid >= len(states):
        raise DumpError(f"{where}: the run has {len(states)} states (s0 to s{len(states) - 1})")
    return states[sid]


def _run_state_of_node(r: Run, number: int, where: str) -> State:
    """The run's state equal to node ``n<number>`` of the explored graph (everything but the id)."""
    from emu.exploration.explorer import Explorer
    from emu.views.explain import find_node

    exp = Explorer(r.scenario).run()
    try:
        node = find_node(exp, f"n{number}")
    except KeyError as e:
        raise DumpError(f"{where}: {e.args[0]}") from None
    target = exp.graph.state(node)
    for s in r.trace.states:
        if s.thread == target.thread and s[2:] == target[2:]:
            return s
    raise DumpError(
        f"{where}: the default run does not pass through n{number} (emu dump writes states of `emu run`; "
        "`emu explain` shows how to reach it)"
    )


def cmd_dump(args: argparse.Namespace) -> int:
    from emu.dump import write_minidump
    from emu.dump.live import capture_state
    from emu.dump.write import threads_at

    try:
        out = Path(args.output)
        refuse_overwrite(out, args.force)
        r = run(with_python(load_scenario(args.scenario, getattr(args, "allow_path", [])), args))
        state = find_state(r, args.state)
        # The run again, to the state: the dump then holds the process's bytes and kernel model as they were.
        again, live = capture_state(r.scenario, state.id)
        data = write_minidump(again, again.trace.state(state.id), out, full=getattr(args, "full", False), live=live)
        threads = len(threads_at(r, state))
    except EmuError as e:
        sys.stderr.write(f"{e}\n")
        return EXIT_INPUT
    sym = r.symbolize
    sys.stdout.write(
        f"wrote {out} ({len(data)} bytes): state s{state.id} ({state.mode} mode), rip {sym(state.rip)}, "
        f"{threads} thread{'s' if threads != 1 else ''}, {len(r.images)} modules\n"
    )
    return EXIT_OK


def detect_dump(path: str | Path) -> list[Detection]:
    """Run the ZwCallbackReturn detector on every thread of a minidump (``state`` is None)."""
    from emu.detection.view import detect_callback_return_pending
    from emu.dump import read_minidump

    return [d for v in read_minidump(path).threads() if (d := detect_callback_return_pending(v)) is not None]


def cmd_detect_dump(args: argparse.Namespace) -> int:
    """``emu detect --dump FILE [--json]``: one line (or JSON object, with ``thread``: its id) per thread at ZwCallbackReturn."""
    try:
        dets = detect_dump(args.dump)
    except EmuError as e:
        sys.stderr.write(f"{e}\n")
        return EXIT_INPUT
    if getattr(args, "json", False):
        import json  # here: only --json needs it

        sys.stdout.write(json.dumps([d.as_dict() for d in dets], indent=2) + "\n")
        return EXIT_OK
    for d in dets:
        sys.stdout.write(
            f"thread {d.thread:#x}: {d.rip}  [rsp] -> {d.return_address}  depth {d.depth}  api {d.api_number}\n"
        )
    if not dets:
        sys.stdout.write(f"no thread is at ZwCallbackReturn in {args.dump}\n")
    return EXIT_OK


def from_dump(scenario: Scenario, dump: str) -> Scenario:
    """``emu run --from-dump DUMP SCENARIO``: the scenario's services and budgets, starting from the dump.

    The scenario's expectations describe a run from its own start, so they are not checked
    (a scenario with ``[start] dump`` states expectations for a run from a dump).
    """
    return dataclasses.replace(scenario, start_dump=dump, expectations=())
