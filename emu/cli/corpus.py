"""``emu corpus SCENARIO... -o DIR [--explore] [--force]``: dumps and ground truth for detectors in any language."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emu.cli.exit_codes import EXIT_OK
from emu.scenario import load_scenario


def add_parser(sub: Any) -> None:
    """Register ``emu corpus`` on the ``emu`` command's subparsers."""
    c = sub.add_parser(
        "corpus",
        help="write one minidump per state of each scenario, and labels.json with each dump's ground truth",
    )
    c.add_argument("scenarios", nargs="+", metavar="SCENARIO")
    c.add_argument("-o", "--output", required=True, metavar="DIR", help="the folder to write (made if missing)")
    c.add_argument("--explore", action="store_true", help="one dump per state of the explored graph (n0, n1, ...)")
    c.add_argument("--force", action="store_true", help="write into a folder that already holds files")
    c.set_defaults(func=cmd_corpus)


def cmd_corpus(args: argparse.Namespace) -> int:
    from emu.dump.corpus import write_corpus  # the dump writer and the explorer: loaded when used

    scenarios = [load_scenario(p, getattr(args, "allow_path", [])) for p in args.scenarios]
    out = Path(args.output)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")

    labels = write_corpus(scenarios, out, explore=args.explore, force=args.force, progress=say)
    sys.stdout.write(f"wrote {len(labels)} dumps and {out / 'labels.json'}\n")
    return EXIT_OK
