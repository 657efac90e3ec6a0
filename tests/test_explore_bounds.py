"""Exploration is bounded: wall time held, resident memory budgeted, the work list capped, progress at once.

The scenario makes 40 binary kernel choices whose answers the program folds into RBX, so no
two paths ever merge: 2^40 states, far more than any budget allows. Which budget stops an
exploration is asserted here; how close to the budget it stops, and how soon progress shows,
are measured in ``benchmarks/bench_budgets.py`` (timings are not asserted in tests).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from emu.exploration.explorer import Explorer
from emu.exploration.result import resident_bytes
from emu.scenario import parse_scenario

FORTY = """
[scenario]
name = "forty_choices"

[budgets]
{budgets}

[[module]]
name = "app"
code = '''
main:
    push rbx
    push rsi
    sub rsp, 0x28
    xor ebx, ebx
    mov esi, 40
again:
    mov rcx, 0x44
    call NtClose
    test eax, eax
    setnz al
    movzx eax, al
    lea rbx, [rbx*2 + rax]
    dec esi
    jnz again
    mov eax, ebx
    add rsp, 0x28
    pop rsi
    pop rbx
    ret
'''

[thread]
entry = "app!main"

[services.NtClose]
steps = [
    {{ kind = "choice", name = "result", default = "success", options = {{ success = [{{ kind = "return", status = "STATUS_SUCCESS" }}], failure = [{{ kind = "return", status = "STATUS_INVALID_HANDLE" }}] }} }},
]
"""


def _forty(budgets: str) -> Explorer:
    return Explorer(parse_scenario(FORTY.format(budgets=budgets), "forty.toml"))


def test_the_wall_time_budget_stops_the_exploration() -> None:
    exp = _forty("wall_time = 3").run()
    assert exp.stopped_by == "wall_time"
    assert exp.states > 100
    assert not exp.complete and exp.unexplored > 0


def test_resident_memory_stops_a_wide_exploration() -> None:
    # The budget counts what the exploration adds to the process, whatever it held before.
    exp = _forty(f"wall_time = 60\nprocess_memory = {24 << 20}").run()
    assert exp.stopped_by == "process_memory"
    assert not exp.complete and exp.unexplored > 0


def test_the_work_list_stays_near_the_frontier_budget() -> None:
    exp = _forty("wall_time = 2\nfrontier = 16").run()
    assert exp.stopped_by == "wall_time"  # past 16 queued it went on depth-first instead of stopping
    # At most the budget, plus one option per choice along the depth-first path.
    assert exp.unexplored <= 16 + 40 + 1, exp.unexplored
    assert exp.states > 100


class _Counted(io.StringIO):
    """Notes, with each write, how many states the explorer had recorded when it was written."""

    def __init__(self, explorer: Explorer) -> None:
        super().__init__()
        self.explorer = explorer
        self.writes: list[tuple[str, int]] = []

    def write(self, s: str) -> int:
        self.writes.append((s, len(self.explorer.trace.raw_states)))
        return super().write(s)


def test_the_first_progress_line_comes_before_any_work_and_then_updates() -> None:
    explorer = _forty("wall_time = 2")
    stream = _Counted(explorer)
    explorer.progress = stream
    explorer.run()
    first, recorded = stream.writes[0]
    assert first == "\rexploring forty_choices: starting " and recorded == 1  # only the initial state
    updates = [(line, n) for line, n in stream.writes if "queued" in line]
    assert updates and updates[-1][1] > recorded  # lines that follow the exploration as it goes
    assert "MiB" in stream.getvalue()


def test_forty_choices_finish_within_budgets_under_one_gigabyte(tmp_path: Path) -> None:
    scenario = tmp_path / "forty.toml"
    scenario.write_text(FORTY.format(budgets="wall_time = 8"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    # The child writes its own peak RSS to a file: VmHWM of /proc/self/status (KiB), the high-water
    # mark of its own address space. getrusage() would not do: Linux keeps ru_maxrss across fork
    # and exec (the forking test runner's size) and RUSAGE_CHILDREN counts every earlier subprocess.
    peak_file = tmp_path / "peak"
    wrapper = (
        "import runpy, sys\n"
        "sys.argv = ['emu', 'explore', sys.argv[2]]\n"
        "try:\n    runpy.run_module('emu.cli', run_name='__main__')\n"
        "finally:\n"
        "    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
        "    open(sys.argv_peak, 'w').write(hwm[0])\n"
    ).replace("sys.argv_peak", repr(str(peak_file)))
    done = subprocess.run(
        [sys.executable, "-c", wrapper, "-", str(scenario)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert "  incomplete: budget 'wall_time' reached" in done.stdout
    assert done.stderr.strip() == f"{scenario}: exploration stopped by budget 'wall_time'"
    assert 0 < int(peak_file.read_text()) < 1 << 20  # KiB: under 1 GiB


def test_the_memory_budget_ignores_what_the_process_held_before() -> None:
    # A test runner or notebook kernel may already hold more than the budget: here 320 MiB of
    # real, touched memory against a 256 MiB budget on what the exploration adds.
    held = b"\x01" * (320 << 20)
    assert resident_bytes() > 320 << 20
    exp = _forty(f"wall_time = 2\nprocess_memory = {256 << 20}").run()
    assert exp.stopped_by == "wall_time" and exp.states > 100
    del held
