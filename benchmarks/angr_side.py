"""The angr side of ``bench_angr.py``, run by an interpreter that has angr (its own virtualenv).

angr brings its own pinned releases (its Unicorn extra, z3, capstone), so it does not share
emu's environment: ``bench_angr.py`` starts this script with ``--angr-python`` and hands it the
function's machine code as hex. This file imports nothing but the standard library until angr
itself, so a wrong interpreter or a bad argument ends with one line on stderr and exit status 2.

Protocol (lines on stdin and stdout): once angr is imported it prints one JSON line
``{"ready": ..., "versions": ...}``; then, for each ``run`` line it reads, it explores the
function once from a fresh ``angr.Project`` and prints one JSON line with the figures; at the
end of its input it exits.

One run:

``setup``
    ``angr.Project`` over the bytes as a blob at ``--base``, and a Microsoft x64 call state
    entering at ``--base`` with RCX = ``--buffer`` (RDX = ``--size``), the ``--size`` bytes
    there one symbolic bitvector named ``Buffer``. The return address is angr's default for a
    call state, where a returning path ends ("deadended").
``explore``
    ``simulation_manager(state).run()``: every path, until none is active.
``paths``
    The deadended states: each is one way out of the function. For each, the returned EAX and
    one input that reaches it (``Buffer[0:4]`` as a little-endian number, from angr's solver).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from typing import Any


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--code", required=True, help="the function's machine code, hex")
    ap.add_argument("--base", type=lambda s: int(s, 0), required=True, help="where the code is loaded and entered")
    ap.add_argument("--buffer", type=lambda s: int(s, 0), required=True, help="the symbolic buffer's address (RCX)")
    ap.add_argument("--size", type=int, required=True, help="the symbolic buffer's length in bytes (RDX)")
    args = ap.parse_args(argv)
    try:
        args.blob = bytes.fromhex(args.code)
    except ValueError as e:
        ap.error(f"--code: expected hex bytes ({e})")
    if not args.blob:
        ap.error("--code: expected at least one byte")
    if not 4 <= args.size <= 4096:
        ap.error(f"--size: expected 4..4096 bytes, not {args.size}")
    return args


def explore_once(angr: Any, claripy: Any, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    project = angr.Project(
        io.BytesIO(args.blob),
        main_opts={"backend": "blob", "arch": "amd64", "base_addr": args.base, "entry_point": args.base},
        auto_load_libs=False,
    )
    cc = angr.calling_conventions.SimCCMicrosoftAMD64(project.arch)
    state = project.factory.call_state(args.base, args.buffer, args.size, cc=cc)
    buffer = claripy.BVS("Buffer", args.size * 8)
    state.memory.store(args.buffer, buffer)
    t1 = time.perf_counter()
    simgr = project.factory.simulation_manager(state)
    simgr.run()
    t2 = time.perf_counter()
    # Buffer's first four bytes, little-endian: BVS bits run from the first byte (most significant).
    top = args.size * 8 - 1
    message = claripy.Reverse(buffer[top : top - 31])
    cases = sorted([s.solver.eval(s.regs.eax), s.solver.eval(message)] for s in simgr.deadended)
    other = {name: len(states) for name, states in simgr.stashes.items() if name != "deadended" and states}
    return {"setup": t1 - t0, "explore": t2 - t1, "paths": len(simgr.deadended), "cases": cases, "other": other}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        import angr
        import claripy
    except ImportError as e:
        print(f"angr_side.py: angr is not importable by {sys.executable} ({e})", file=sys.stderr)
        return 2
    logging.disable(logging.CRITICAL)  # angr logs that its own Unicorn support is absent: not wanted here
    print(json.dumps({"ready": True, "versions": f"angr {angr.__version__}, python {sys.version.split()[0]}"}))
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip() != "run":
            print(f"angr_side.py: expected 'run' on stdin, not {line.strip()!r}", file=sys.stderr)
            return 2
        print(json.dumps(explore_once(angr, claripy, args)))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
