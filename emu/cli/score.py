"""``emu score FILE... --detector module:function``: a detector's confusion matrix against the ground truth.

The detector is host Python the user names on the command line (``mydetectors:rip_only``,
``path/to/file.py:rule``); it is imported, never read from a scenario, so scenario files
still never run code. ``--observer`` and ``--truth`` choose whose view is scored against which
ground truth (:mod:`emu.detection.observers`); an unknown name is exit 2 with the valid ones. Exit codes: 0 the detector matches the ground truth on every state,
1 it does not (each miss is named), 2 invalid input (a scenario, or a detector that cannot be
imported or called).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from emu.cli.exit_codes import EXIT_EXPECT as EXIT_MISMATCH
from emu.cli.exit_codes import EXIT_INPUT, EXIT_OK
from emu.detection.observers import KERNEL_DEBUGGER, OBSERVERS, SEED, TRUTHS, check_observer, check_truth
from emu.errors import EmuError, ModelBug

DEFAULT_DETECTOR = "emu.detection.signals:combined_detector"


class DetectorSpecError(EmuError):
    """``--detector`` names nothing callable: says what was tried and why it failed, in one line."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "score", help="score a detector (module:function) against the ground truth on every state of scenarios"
    )
    s.add_argument("scenarios", nargs="+", metavar="FILE", help="scenario files or folders of them")
    s.add_argument(
        "--detector",
        default=DEFAULT_DETECTOR,
        metavar="MODULE:FUNCTION",
        help=f"a callable taking a ThreadView, truthy when the --truth holds (default {DEFAULT_DETECTOR}); "
        "MODULE may be a dotted name (importable from the current folder) or a .py file",
    )
    s.add_argument("--explore", action="store_true", help="score every node of the explored state graphs")
    s.add_argument(
        "--observer",
        default=KERNEL_DEBUGGER,
        metavar="NAME",
        help=f"whose view the detector gets: {' or '.join(OBSERVERS)} (default {KERNEL_DEBUGGER}); "
        "states that observer cannot see are not scored",
    )
    s.add_argument(
        "--truth",
        default=SEED,
        metavar="NAME",
        help=f"the ground truth to compare with: {' or '.join(TRUTHS)} (default {SEED})",
    )
    s.add_argument("--json", action="store_true", help="machine-readable report")
    s.set_defaults(func=cmd_score)


def load_detector(spec: str) -> Callable[..., object]:
    """Import ``module:function`` (or ``file.py:function``); the current folder is importable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise DetectorSpecError(
            f"--detector {spec!r}: expected MODULE:FUNCTION, e.g. emu.detection.signals:naive_detector"
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise DetectorSpecError(f"--detector {spec!r}: {path} is not a file")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            if loader is None or loader.loader is None:
                raise DetectorSpecError(f"--detector {spec!r}: cannot load {path}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            cwd = str(Path.cwd())
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)  # like `python -m`: the user's own modules next to them
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(cwd)
    except DetectorSpecError:
        raise
    except Exception as e:  # the user's module failed to import: say so in one line
        raise DetectorSpecError(
            f"--detector {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}"
        ) from None
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise DetectorSpecError(f"--detector {spec!r}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise DetectorSpecError(f"--detector {spec!r}: {attr} is a {type(target).__name__}, not a callable")
    return target


def cmd_score(args: argparse.Namespace) -> int:
    from emu.detection.score import score

    try:
        detector = load_detector(args.detector)
        check_observer(args.observer)
        check_truth(args.truth)
        report = score(
            detector, args.scenarios, explore=args.explore, allow=getattr(args, "allow_path", []),
            observer=args.observer, truth=args.truth,
        )  # fmt: skip
    except EmuError as e:
        sys.stderr.write(f"{e}\n")
        return EXIT_INPUT
    except ModelBug:
        raise  # emu's own broken invariant, not the detector's: a traceback, as for any bug
    except Exception as e:  # the user's detector raised: one line, with the state it raised on
        notes = [n.removeprefix("emu.score: ") for n in getattr(e, "__notes__", [])]
        where = f" ({notes[-1]})" if notes else ""
        sys.stderr.write(f"--detector {args.detector!r} raised {type(e).__name__}: {e}{where}\n")
        return EXIT_INPUT
    report.detector = args.detector
    if args.json:
        import json  # here: only --json needs it

        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(str(report) + "\n")
    return EXIT_OK if report.perfect else EXIT_MISMATCH
