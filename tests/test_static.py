"""The code stays typed (mypy --strict) and linted (ruff), as the style guide asks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_ruff_is_clean(root: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "emu", "tests", "benchmarks"], cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_is_clean(root: Path) -> None:
    # The package and its tests, as pyproject.toml's [tool.mypy] files says.
    out = subprocess.run([sys.executable, "-m", "mypy", "emu", "tests"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
