"""Ctrl-C reaches guest code: a real SIGINT to an ``emu`` process spinning in ``jmp $``."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LOOP = (
    '[scenario]\nname = "spin"\n[budgets]\nwall_time = 60\n'
    '[[module]]\nname = "app"\ncode = "main: jmp main"\n[thread]\nentry = "app!main"\n'
)


def _read_until(fd: int, marker: str, seconds: float) -> str:
    """Read a terminal's output until ``marker`` shows up (or the time is up, or it closes)."""
    got = b""
    end = time.monotonic() + seconds
    while marker.encode() not in got and time.monotonic() < end:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            got += chunk
    return got.decode(errors="replace").replace("\r\n", "\n")


def _interrupt(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """Run ``emu ARGS spin.toml`` with stderr on a terminal; once the guest spins, SIGINT it.

    Returns (exit code, stdout, stderr); ``benchmarks/bench_budgets.py`` times the interrupt.
    The guest is known to spin when the command says it is still running (run, detect) or
    shows its first progress line (explore): both come after the imports and the build.
    """
    scenario = tmp_path / "spin.toml"
    scenario.write_text(LOOP)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "emu.cli", *args, str(scenario)], stdout=subprocess.PIPE, stderr=slave, env=env
    )
    os.close(slave)
    try:
        marker = "exploring" if args[0] == "explore" else "still running"
        before = _read_until(master, marker, 50)
        assert marker in before, before
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        after = _read_until(master, "interrupted", 30)
        out, _ = proc.communicate(timeout=30)
        after += _read_until(master, "\0", 1)
    finally:
        os.close(master)
    return proc.returncode, out.decode(), before + after


@pytest.mark.parametrize("command", [["run"], ["detect"], ["explore"]])
def test_ctrl_c_stops_guest_code_and_exits_130(tmp_path: Path, command: list[str]) -> None:
    code, out, err = _interrupt(
        tmp_path, *command, *(["-o", str(tmp_path / "g.json")] if command[0] == "explore" else [])
    )
    assert "Traceback" not in err
    # Exit 130, not 3: the interrupt stopped the spinning CPU; the wall-time budget (60 s) would
    # have stopped it later with exit 3 and "stopped by budget" (and after this test's 30 s wait).
    assert code == 130, err
    assert "stopped by budget" not in err
    if command[0] == "explore":
        # The partial summary, and no half-done graph file.
        assert out.startswith("spin: 1 states, 0 transitions")
        assert "  incomplete: interrupted by Ctrl-C, 0 option(s) unexplored" in out
        assert err.rstrip().endswith(f"emu explore: interrupted ({tmp_path / 'g.json'} not written)")
        assert not (tmp_path / "g.json").exists()
    else:
        assert err.rstrip().endswith(f"emu {command[0]}: interrupted")


def test_a_long_run_on_a_terminal_says_it_is_still_running(tmp_path: Path) -> None:
    scenario = tmp_path / "spin.toml"
    scenario.write_text(LOOP.replace("wall_time = 60", "wall_time = 4"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "emu.cli", "run", str(scenario)], stdout=subprocess.PIPE, stderr=slave, env=env
    )
    os.close(slave)
    proc.communicate(timeout=60)
    err = b""
    try:
        while chunk := os.read(master, 4096):
            err += chunk
    except OSError:  # the terminal closed with the process
        pass
    os.close(master)
    text = err.decode().replace("\r\n", "\n")
    assert proc.returncode == 3
    assert "emu run: still running after 2 s (the scenario's wall_time budget, 20 s by default, stops it;" in text
    assert text.rstrip().endswith("stopped by budget: budget 'wall_time' exceeded (limit 4 s) at app!main")
