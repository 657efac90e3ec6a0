"""Fetch a real third-party ntdll (Wine's PE ntdll.dll and win32u.dll, from Debian's libwine
package) and build the compiled callbacks DLL, into scenarios/real/bin/, where the scenarios
in scenarios/real/ load them. Needs apt-get (run `apt-get update` once) and mingw-w64.

    python scripts/fetch_real_ntdll.py

Set EMU_REAL_NTDLL_DIR to a folder with ntdll.dll and win32u.dll to use another build.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from real_ntdll import install_real_scenarios, wine_dlls  # noqa: E402


def main() -> int:
    print(f"real DLLs from {wine_dlls()}")
    for f in sorted(install_real_scenarios().iterdir()):
        print(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
