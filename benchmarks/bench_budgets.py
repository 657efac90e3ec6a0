"""How promptly emu's bounds act: wall-time budgets, progress lines, Ctrl-C, and runaway parses.

The tests assert *which* bound stops a run (``tests/test_explore_bounds.py``,
``tests/test_interrupt.py``, ``tests/test_explore.py``); the times are measured here, since a
loaded machine makes any timed assertion flaky. Each figure is one measurement (these are
seconds-long runs; repeat the command to see the spread).

``exploration wall_time``
    40 binary kernel choices that never merge (2^40 states) under ``wall_time = 3``: the
    elapsed time, graph building included, against the budget (target: within 10 %).
``runaway exploration``
    A choice followed by ``jmp $`` under ``wall_time = 0.3``: how long until it stops.
``progress``
    The same 40 choices under ``wall_time = 2``: seconds to the first progress line, and the
    mean interval between updates (target: at once, then about every 0.1 s).
``Ctrl-C``
    ``emu run`` on a guest spinning in ``jmp $``, stderr on a terminal: seconds from SIGINT to
    the "interrupted" line (the wall-time budget is 60 s).
``corrupted PE headers``
    300 loads of ``scenarios/pe/bin/ntdll.dll`` with 1-4 random header bytes changed (built by
    ``python scripts/build_pe_scenarios.py``; skipped without it): the slowest and mean load.

Run::

    python benchmarks/bench_budgets.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import pty
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emu.errors import ImageError
from emu.exploration.explorer import Explorer
from emu.loader.pe import load_pe
from emu.scenario import parse_scenario

ROOT = Path(__file__).resolve().parent.parent

FORTY = """
[scenario]
name = "forty_choices"
[budgets]
wall_time = {wall}
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
steps = [{{ kind = "choice", name = "r", options = {{ ok = [{{ kind = "return", status = 0 }}], bad = [{{ kind = "return", status = 0xC0000008 }}] }} }}]
"""

SPIN_CHOICE = """
[scenario]
name = "spin"
[budgets]
instructions = 1000000000000
wall_time = 0.3
[[module]]
name = "app"
code = "main:\\n sub rsp, 0x28\\n call NtYieldExecution\\nspin:\\n jmp spin"
[thread]
entry = "app!main"
[services.NtYieldExecution]
steps = [{ kind = "choice", name = "bit", options = { zero = [{ kind = "return", status = 0 }], one = [{ kind = "return", status = 1 }] } }]
"""

SPIN = (
    '[scenario]\nname = "spin"\n[budgets]\nwall_time = 60\n'
    '[[module]]\nname = "app"\ncode = "main: jmp main"\n[thread]\nentry = "app!main"\n'
)


def exploration_wall_time() -> None:
    exp = Explorer(parse_scenario(FORTY.format(wall=3), "forty.toml")).run()
    print(
        f"exploration wall_time   {exp.elapsed:6.2f} s for a 3 s budget ({exp.elapsed / 3 - 1:+.1%}; target <= +10 %)"
    )
    print(f"                        stopped by {exp.stopped_by}, {exp.states:,} states")
    exp = Explorer(parse_scenario(SPIN_CHOICE, "spin.toml")).run()
    print(f"runaway exploration     {exp.elapsed:6.2f} s for a 0.3 s budget (stopped by {exp.stopped_by})")


class _Stamped(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[tuple[float, str]] = []

    def write(self, s: str) -> int:
        self.stamps.append((time.perf_counter(), s))
        return super().write(s)


def progress() -> None:
    explorer = Explorer(parse_scenario(FORTY.format(wall=2), "forty.toml"))
    stream = _Stamped()
    explorer.progress = stream
    start = time.perf_counter()
    explorer.run()
    first = stream.stamps[0][0] - start
    updates = [t for t, s in stream.stamps if "queued" in s]
    gaps = [b - a for a, b in itertools.pairwise(updates)]
    mean = sum(gaps) / len(gaps) if gaps else float("nan")
    print(f"progress                first line after {first * 1000:.1f} ms; {len(updates)} updates, every {mean:.3f} s")


def ctrl_c() -> None:
    with tempfile.TemporaryDirectory() as d:
        scenario = Path(d) / "spin.toml"
        scenario.write_text(SPIN)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "emu.cli", "run", str(scenario)], stdout=subprocess.PIPE, stderr=slave, env=env
        )
        os.close(slave)
        try:
            _read_until(master, "still running", 50)
            time.sleep(0.3)
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            got = _read_until(master, "interrupted", 30)
            waited = time.monotonic() - sent
            proc.communicate(timeout=30)
        finally:
            os.close(master)
    shown = f"{waited * 1000:.1f} ms" if "interrupted" in got else "no 'interrupted' line"
    print(f"Ctrl-C                  {shown} from SIGINT to the message (exit {proc.returncode})")


def _read_until(fd: int, marker: str, seconds: float) -> str:
    got, end = b"", time.monotonic() + seconds
    while marker.encode() not in got and time.monotonic() < end:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    return got.decode(errors="replace")


def corrupted_headers(count: int) -> None:
    dll = ROOT / "scenarios" / "pe" / "bin" / "ntdll.dll"
    if not dll.is_file():
        print("corrupted PE headers    skipped: build the DLLs with python scripts/build_pe_scenarios.py")
        return
    raw, rng, times = dll.read_bytes(), random.Random(4), []
    for _ in range(count):
        bad = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(0, 0x400)] = rng.randrange(256)
        t0 = time.perf_counter()
        with contextlib.suppress(ImageError):
            load_pe(bytes(bad), name="fuzz")
        times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    print(f"corrupted PE headers    {count} loads: mean {mean * 1000:.2f} ms, slowest {max(times) * 1000:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loads", type=int, default=300, help="corrupted PE loads")
    a = p.parse_args(argv)
    exploration_wall_time()
    progress()
    ctrl_c()
    corrupted_headers(a.loads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
