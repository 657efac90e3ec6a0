"""Ctrl-C reaches guest code: a real SIGINT to an ``emu`` process spinning in ``jmp $``."""

from __future__ import annotations

import os
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


def _interrupt(tmp_path: Path, *args: str) -> tuple[int, str, str, float]:
    """Start ``emu ARGS spin.toml``, SIGINT it while the guest spins; (exit code, out, err, seconds to the message)."""
    scenario = tmp_path / "spin.toml"
    scenario.write_text(LOOP)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "emu.cli", *args, str(scenario)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    # Wait until the guest spins: the Ctrl-C watcher and the wall-time watchdog are threads of
    # their own, so three threads mean the run has started (imports alone may take seconds on a
    # loaded machine, and a Ctrl-C during imports is a different case).
    deadline = time.monotonic() + 60
    while len(os.listdir(f"/proc/{proc.pid}/task")) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    waited = time.monotonic() - sent
    out, rest = proc.communicate(timeout=30)
    return proc.returncode, out, first + rest, waited


@pytest.mark.parametrize("command", [["run"], ["detect"], ["explore", "--no-progress"]])
def test_ctrl_c_stops_guest_code_and_exits_130(tmp_path: Path, command: list[str]) -> None:
    code, out, err, waited = _interrupt(
        tmp_path, *command, *(["-o", str(tmp_path / "g.json")] if command[0] == "explore" else [])
    )
    assert "Traceback" not in err
    assert code == 130, err
    # The wall-time budget is 60 s: the message this soon means the interrupt stopped the CPU
    # (measured: a few milliseconds; the bound leaves room for a loaded machine).
    assert waited < 2.0, waited
    if command[0] == "explore":
        # The partial summary, and no half-done graph file.
        assert out.startswith("spin: 1 states, 0 transitions")
        assert "  incomplete: interrupted by Ctrl-C, 0 option(s) unexplored" in out
        assert err.strip() == f"emu explore: interrupted ({tmp_path / 'g.json'} not written)"
        assert not (tmp_path / "g.json").exists()
    else:
        assert err.strip() == f"emu {command[0]}: interrupted"


def test_a_long_run_on_a_terminal_says_it_is_still_running(tmp_path: Path) -> None:
    import pty

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
