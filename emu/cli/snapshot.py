"""``emu snapshot FILE --state ID|--to SYMBOL -o OUT`` writes a session's snapshot file;
``emu run FILE --from-snapshot OUT`` goes on from it.

``emu snapshot`` runs the scenario in a :class:`~emu.session.Session` until the state is
recorded (``--state s3``, or ``3``, as ``emu run`` numbers states) or until the CPU is about
to execute a symbol (``--to app!on_message``, ``--to ntdll!ZwCallbackReturn+0x14``), and
saves :meth:`Session.snapshot <emu.session.Session.snapshot>` there. The kernel model
records a state in the middle of a system call; the CPU stops at the next instruction
boundary, so ``--state`` snapshots the first point after the state where the CPU can stop
(the line printed says which state is the latest then). Bad input is one line and exit 2:
a state the run never records, a symbol no image has or the run never reaches, an output
that exists without ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.cli.exit_codes import EXIT_OK
from emu.cli.python import add_python_options, with_python
from emu.errors import SnapshotError
from emu.writing import refuse_overwrite

if TYPE_CHECKING:  # the session and its dump machinery load when a snapshot is used, not on every `emu run`
    from emu.api import Run
    from emu.scenario import Scenario


def from_snapshot(scenario: Scenario, path: str | Path) -> Run:
    """The run of ``scenario`` with everything up to the snapshot taken from the file, the rest run now.

    Raises SnapshotError (one line, exit 2) for a file of another scenario or emu version."""
    from emu.session import Session
    from emu.session_snapshot import Snapshot

    snap = Snapshot.load(path)
    session = Session(scenario)
    session.restore(snap)
    return session.finish()


def add_parser(sub: Any) -> None:
    """Register ``emu snapshot`` on the ``emu`` command's subparsers."""
    p = sub.add_parser(
        "snapshot",
        help="run to a state or a symbol and write a snapshot file (emu run --from-snapshot goes on from it)",
    )
    p.add_argument("scenario")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--state", help="a state id from `emu run` (s3 or 3): snapshot once it is recorded")
    where.add_argument(
        "--to", metavar="SYMBOL", help="module!symbol[+0xoff] or an address: snapshot before it executes"
    )
    p.add_argument("-o", "--output", required=True, help="the snapshot file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    add_python_options(p)
    p.set_defaults(func=cmd_snapshot)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from emu.scenario import load_scenario
    from emu.session import Session

    refuse_overwrite(args.output, args.force)
    scenario = with_python(load_scenario(args.scenario, args.allow_path), args)
    session = Session(scenario)
    where = (
        f"{scenario.path}: --state {args.state!r}" if args.state is not None else f"{scenario.path}: --to {args.to!r}"
    )
    if args.state is not None:
        wanted = _state(args.state, where)
        session.run_to_state(wanted)
        count = len(session.trace.raw_states)
        if count <= wanted:
            raise SnapshotError(
                f"{where}: the run records {count} states (s0 to s{count - 1}) and ends ({session.stop})"
            )
    else:
        try:
            address = session.address(int(args.to, 0) if args.to[:1].isdigit() else args.to)
        except (KeyError, ValueError) as e:
            raise SnapshotError(f"{where}: {e.args[0] if isinstance(e, KeyError) else 'not a number'}") from None
        session.run_to(address)
        if session.done or session.regs.rip != address:
            raise SnapshotError(f"{where}: the run ends ({session.stop}) without executing it")
    if session.done:
        raise SnapshotError(f"{where}: the run ends ({session.stop}) there; nothing would go on from a snapshot")
    session.snapshot().save(args.output)
    latest = len(session.trace.raw_states) - 1
    sys.stdout.write(
        f"wrote {args.output}: after s{latest} ({session.position} transitions), "
        f"thread {session.thread.tid} at {session.symbol(session.regs.rip)}\n"
    )
    return EXIT_OK


def _state(spec: str, where: str) -> int:
    from emu.views.explain import state_number

    number = state_number(spec)
    if number is None or spec[:1] in ("n", "N"):
        raise SnapshotError(f"{where}: expected a state id of the run, like s3 or 3 (as `emu run` prints them)")
    return number
