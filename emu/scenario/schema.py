"""The JSON Schema of scenario files, made from the same tables the reader uses.

The schema checks a file's structure: its tables and keys, value types, integer bounds, the
words a key allows, the one kind per ``[[expect]]``. What needs more than the file itself
(labels the assembly defines, names of threads and objects, PE files on disk, a scenario's
own consistency such as overlapping ``[[memory]]``) is left to the reader, whose one-line
errors stay the reference.

Editors validate TOML with it through taplo (the Even Better TOML extension): a
``#:schema`` comment at the top of a file, or a ``.taplo.toml`` rule. The shipped copy is
``emu/data/scenario.schema.json``; regenerate it after changing the model with::

    python -m emu.scenario.schema            # writes emu/data/scenario.schema.json
    python -m emu.scenario.schema --check    # exit 1 if the shipped copy is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from emu.scenario.keys import JSON
from emu.scenario.layout import TOP, definitions

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "scenario.schema.json"
DRAFT = "http://json-schema.org/draft-07/schema#"  # draft-07: what taplo and most editors read


def scenario_schema() -> JSON:
    """The schema as a JSON object (plain dicts and lists, in a fixed order)."""
    return {
        "$schema": DRAFT,
        "title": "emu scenario",
        "description": "A scenario for emu, the Windows x64 user/kernel transition lab (TOML).",
        **TOP.schema(),
        "definitions": definitions(),
    }


def schema_text() -> str:
    """The schema as the shipped file holds it: two-space indented JSON, one newline at the end."""
    return json.dumps(scenario_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emu.scenario.schema", description=__doc__.splitlines()[0])
    ap.add_argument("output", nargs="?", type=Path, default=SHIPPED, help="where to write (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = ap.parse_args(argv)
    text = schema_text()
    if args.check:
        try:
            current = args.output.read_text(encoding="utf-8")
        except OSError as e:
            print(f"{args.output}: cannot read ({e.strerror or e})", file=sys.stderr)
            return 1
        if current != text:
            print(f"{args.output}: stale; regenerate with python -m emu.scenario.schema", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
