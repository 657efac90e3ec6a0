"""``emu debug FILE --gdb HOST:PORT``: build a scenario and serve it to GDB (:mod:`emu.debug`).

The process waits at its first instruction for a client (``target remote HOST:PORT``). When
the client kills it, detaches (the run then goes on to its end) or the run ends, the
transitions recorded so far are printed as ``emu run`` prints them.
"""

from __future__ import annotations

import argparse
import sys

from emu.cli.exit_codes import EXIT_INPUT, EXIT_OK
from emu.cli.python import add_python_options, with_python

DEFAULT_ADDRESS = "127.0.0.1:1234"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("debug", help="serve a scenario to GDB (remote protocol): break, step across syscalls")
    d.add_argument("scenario")
    d.add_argument(
        "--gdb", default=DEFAULT_ADDRESS, metavar="[HOST]:PORT",
        help=f"where to listen (default {DEFAULT_ADDRESS}; a bare :PORT listens on 127.0.0.1 only; port 0 picks a free one)",
    )  # fmt: skip
    d.add_argument("--once", action="store_true", help="end when the first client disconnects")
    add_python_options(d)
    d.set_defaults(func=cmd_debug)


def parse_address(text: str) -> tuple[str, int] | None:
    """``HOST:PORT``, ``:PORT`` (loopback) or ``[v6]:PORT`` as (host, port); None if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 0xFFFF:
        return None
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    return host, int(port)


def cmd_debug(args: argparse.Namespace) -> int:
    address = parse_address(args.gdb)
    if address is None:
        sys.stderr.write(f"emu debug: --gdb {args.gdb!r}: expected [HOST]:PORT with PORT 0..65535 (e.g. :1234)\n")
        return EXIT_INPUT
    from emu.api import Run, build  # the stub and its sockets load when a client is served, not on every `emu` start
    from emu.debug.gdbstub import serve
    from emu.debug.target import DebugTarget
    from emu.scenario import load_scenario

    scenario = with_python(load_scenario(args.scenario, args.allow_path), args)
    target = DebugTarget(build(scenario))

    def log(line: str) -> None:
        sys.stderr.write(f"emu debug: {line}\n")
        sys.stderr.flush()

    try:
        how = serve(target, address[0], address[1], log, once=args.once)
    except OSError as e:
        sys.stderr.write(f"emu debug: cannot listen on {args.gdb}: {e.strerror or e}\n")
        return EXIT_INPUT
    from emu.cli.main import _finish, _print_table

    r = Run.of(target.result())
    _print_table(r, sys.stdout)
    if target.ended is None:
        rip = target.process.trace.symbolize(target.rip())
        log(f"{how} by gdb at {rip}: the run did not end, expectations not checked")
        return EXIT_OK
    return _finish(r, sys.stderr)
