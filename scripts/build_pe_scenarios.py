"""Build the DLLs the scenarios in scenarios/pe/ load, with mingw-w64, into scenarios/pe/bin/.

The sources are tests/fixtures/pe/; the build is the tests' own (cached by a hash of the
sources and the compiler version). Run from anywhere:

    python scripts/build_pe_scenarios.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pe_fixtures import build_pe_fixtures  # noqa: E402

BIN = ROOT / "scenarios" / "pe" / "bin"


def main() -> int:
    built = build_pe_fixtures()
    BIN.mkdir(parents=True, exist_ok=True)
    for dll in built.dlls:
        shutil.copyfile(dll, BIN / Path(dll).name)
        print(f"{BIN / Path(dll).name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
