"""Regenerate ``docs/timeline.png``, the README's picture: the timeline of ``scenarios/nested_callbacks.toml``.

Run from anywhere: ``python scripts/make_readme_picture.py`` (needs the ``[notebooks]``
extra). The picture is deterministic, so rerunning it with the same matplotlib leaves
the file unchanged; ``--check`` exits 1 instead of writing when the file is out of date.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import emu
from emu.views import viz

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "nested_callbacks.toml"
OUTPUT = ROOT / "docs" / "timeline.png"
DPI = 150  # sharp on high-density screens, still legible when GitHub scales it to the page


def render() -> bytes:
    """The README picture as PNG bytes."""
    buf = io.BytesIO()
    viz.save_figure(viz.timeline(emu.run(SCENARIO)), buf, "png", dpi=DPI)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/timeline.png is not up to date")
    args = parser.parse_args(argv)
    png = render()
    if args.check:
        current = OUTPUT.read_bytes() if OUTPUT.exists() else b""
        if current != png:
            sys.stderr.write(f"{OUTPUT.relative_to(ROOT)} is out of date: run python scripts/make_readme_picture.py\n")
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUTPUT.with_name(f".{OUTPUT.name}.tmp")
    tmp.write_bytes(png)
    tmp.replace(OUTPUT)  # atomic: a reader never sees half a picture
    sys.stdout.write(f"wrote {OUTPUT.relative_to(ROOT)} ({len(png)} bytes)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
