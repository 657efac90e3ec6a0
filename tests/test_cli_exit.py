"""The emu command as its own process: what it prints, and how it exits, whatever it loaded.

The command skips the interpreter's last garbage collection (``gc.freeze`` once the work is
done), except after LIEF was used, whose bindings would report at exit, on stderr, every object
left to the exit. Both ways the output and the exit status are the command's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from real_ntdll import install_real_scenarios

ROOT = Path(__file__).resolve().parent.parent


def _emu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emu.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
    )  # fmt: skip


def test_a_run_of_assembled_modules_prints_its_report_and_nothing_else() -> None:
    done = _emu("run", "scenarios/callback_roundtrip.toml")
    assert done.returncode == 0
    assert done.stderr == ""
    assert done.stdout.endswith("thread exit status: 0x00001234\nexpectations: 4 of 4 hold\n")


def test_a_run_that_loads_pe_files_with_lief_ends_as_quietly() -> None:
    install_real_scenarios()  # the real ntdll, win32u and the compiled test DLL
    done = _emu("run", "scenarios/real/roundtrip.toml")
    assert done.returncode == 0, done.stderr
    assert "leaked" not in done.stderr
    assert all(": note: " in line for line in done.stderr.splitlines())  # the run's own notes only
    last = done.stdout.splitlines()[-1]
    assert last.startswith("expectations: ") and last.endswith(" hold")
