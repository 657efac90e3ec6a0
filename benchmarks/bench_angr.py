"""Paths found and time: emu's symbolic exploration beside angr's, on the same x86-64 function.

The function is a window procedure's switch on its message number (Buffer[0:4]), five ways out,
no calls (angr knows no Windows system calls or callbacks, so the comparison is on plain code)::

    mov eax, dword ptr [rcx]
    cmp eax, 0x0F / je / cmp eax, 0x10 / je / cmp eax, 0x02 / je / cmp eax, 0x12 / je
    ... each case returns its own value

The same bytes on both sides: they are assembled here once, handed to angr as hex, and checked
equal to what emu's loader put at ``app!wndproc``. The same entry and input: the function is
entered with RCX pointing at 16 symbolic bytes. The same notion of a path: one way out of the
function, with one input that takes it; both sides must find the five cases (WM_PAINT 0x0F,
WM_CLOSE 0x10, WM_DESTROY 0x02, WM_QUIT 0x12, any other message), else the run fails.

``emu``
    The bytes are the callback (api 2) of a scenario whose service passes a 16-byte symbolic
    input (so emu also runs the caller, the system call and the callback round trip around
    them). *setup*: parsing the scenario and building the machine (``Explorer(...)``);
    *explore*: ``Explorer.run()``. Paths: the exploration's end states, each with its witness.
``angr`` (in its own interpreter: ``benchmarks/angr_side.py``)
    *setup*: ``angr.Project`` over the bytes as a blob and a Microsoft x64 call state;
    *explore*: ``simulation_manager(state).run()``. Paths: the deadended states, each with an
    input from angr's solver.

Each run builds everything afresh on both sides; the runs are interleaved (emu, then angr, R
times; angr's interpreter stays up between its runs, its import is not timed) and the medians
are printed. The two *explore* times are the figures compared; *setup* is printed beside them.

angr pins its own releases, so it lives in its own virtualenv, by default ``.venv-angr`` at the
repository root (``--angr-python`` names another interpreter)::

    python -m venv .venv-angr && .venv-angr/bin/pip install angr==9.2.213 "pycparser<3.12" "bitstring<5"

(pycparser and bitstring are held back: angr 9.2.213 fails to import with pycparser 3.12
and with bitstring 5.) Without angr the angr side says "not measured" and why.

Run::

    python benchmarks/bench_angr.py [--runs R] [--angr-python PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any

import measuring
from measuring import HERE, ROOT

FUNCTION = """
wndproc:
    mov eax, dword ptr [rcx]
    cmp eax, 0x0F
    je paint
    cmp eax, 0x10
    je close
    cmp eax, 0x02
    je destroy
    cmp eax, 0x12
    je quit
    xor eax, eax
    ret
paint:
    mov eax, 1
    ret
close:
    mov eax, 2
    ret
destroy:
    mov eax, 3
    ret
quit:
    mov eax, 4
    ret
"""
BASE = 0x40_0000  # where angr loads the blob (emu's loader picks its own base: the code is position-independent)
BUFFER = 0x80_0000  # the symbolic input's address on angr's side (emu's kernel places the callback's input)
SIZE = 16
# winuser.h message numbers the function compares; any other message is the fifth case.
CASES = {0x0F: "WM_PAINT", 0x10: "WM_CLOSE", 0x02: "WM_DESTROY", 0x12: "WM_QUIT"}
EXPECTED = sorted([*CASES.values(), "other"])
VENV_PYTHON = ROOT / ".venv-angr" / "bin" / "python"
INSTALL = 'python -m venv .venv-angr && .venv-angr/bin/pip install angr==9.2.213 "pycparser<3.12" "bitstring<5"'
RUN_TIMEOUT = 600.0  # seconds for one run on angr's side before the benchmark gives up on it

SCENARIO = '''
[scenario]
name = "bench_angr"

[[module]]
name = "app"
code = """
main:
    sub rsp, 0x28
    call NtUserMessageCall
    add rsp, 0x28
    ret
{function}
"""

[thread]
entry = "app!main"

[kernel_callback_table]
2 = "app!wndproc"

[services.NtUserMessageCall]
steps = [{{ kind = "callback", api = 2, data = {{ symbolic = {size}, name = "Buffer" }} }}, {{ kind = "return", status = "callback" }}]
'''


def function_bytes() -> bytes:
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks

    encoding, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(FUNCTION, BASE)
    return bytes(encoding or [])


def case_name(message: int) -> str:
    return CASES.get(message, "other")


def emu_once(blob: bytes) -> dict[str, Any]:
    """One exploration of the scenario: setup and explore seconds, paths, and each end state's case."""
    from emu.exploration.explorer import Explorer
    from emu.loader.image import find_symbol
    from emu.scenario import parse_scenario

    t0 = time.perf_counter()
    explorer = Explorer(parse_scenario(SCENARIO.format(function=FUNCTION, size=SIZE), "bench_angr"))
    t1 = time.perf_counter()
    address = find_symbol(explorer.process.images, "app!wndproc")
    loaded = explorer.machine.read(address, len(blob)) if address is not None else b""
    if loaded != blob:
        raise SystemExit(f"bench_angr: app!wndproc holds {loaded.hex()}, not the bytes angr gets ({blob.hex()})")
    exp = explorer.run()
    t2 = time.perf_counter()
    lean = exp.graph.lean
    cases = []
    for node, attrs in lean.nodes(data=True):
        if lean.out_degree(node) == 0:
            witness = dict(w.split("=", 1) for w in str(attrs.get("witness", "")).split())
            raw = bytes.fromhex(witness.get("Buffer", "00" * SIZE))
            cases.append(case_name(int.from_bytes(raw[:4], "little")))
    complete = exp.complete and exp.symbolic is not None and exp.symbolic["incomplete"] == 0
    return {"setup": t1 - t0, "explore": t2 - t1, "paths": exp.paths, "cases": sorted(cases), "complete": complete}


class AngrSide:
    """``angr_side.py`` in angr's interpreter, kept up between runs (one ``run`` line per run)."""

    def __init__(self, python: str, blob: bytes) -> None:
        self.python = python
        # A file, not a pipe: angr's output cannot fill it and block the child.
        self.errors: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115  (closed by close())
        cmd = [python, str(HERE / "angr_side.py"), "--code", blob.hex(), "--base", hex(BASE)]
        cmd += ["--buffer", hex(BUFFER), "--size", str(SIZE)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True, cwd=HERE
        )
        self.versions = str(self._reply(RUN_TIMEOUT).get("versions", ""))

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        timer = threading.Timer(timeout, self.proc.kill)  # never a hang: a stuck child is killed
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            self.proc.wait()
            self.errors.seek(0)
            tail = self.errors.read().strip().splitlines()[-1:] or [f"no output (exit {self.proc.returncode})"]
            raise RuntimeError(tail[0])
        reply: dict[str, Any] = json.loads(line)
        return reply

    def run(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        got = self._reply(RUN_TIMEOUT)
        got["cases"] = sorted(case_name(message) for _, message in got["cases"])
        return got

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.errors.close()


def find_python(requested: str | None) -> tuple[str | None, str]:
    """(an interpreter that imports angr, "") or (None, why there is none)."""
    return measuring.find_peer_python("angr", "angr", requested, VENV_PYTHON, INSTALL, timeout=300)


def check(side: str, got: dict[str, Any]) -> None:
    """Both sides must find the same five cases, or the figures compare different work."""
    if got["paths"] != len(EXPECTED) or got["cases"] != EXPECTED or not got.get("complete", True):
        raise SystemExit(f"bench_angr: {side} found {got['paths']} paths, cases {got['cases']}, not {EXPECTED}")


def spread(seconds: list[float]) -> str:
    """Milliseconds: the median, then the smallest and largest in brackets."""
    return f"{statistics.median(seconds) * 1e3:.1f} [{min(seconds) * 1e3:.1f}..{max(seconds) * 1e3:.1f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=measuring.MIN_RUNS, help="interleaved runs; the median is kept")
    ap.add_argument("--angr-python", default=None, help="an interpreter that can import angr (default: .venv-angr)")
    args = ap.parse_args(argv)
    runs = measuring.check_runs(args.runs)
    python, why = find_python(args.angr_python)
    if python is None and args.angr_python is not None:
        print(f"error: --angr-python: {why}", file=sys.stderr)
        return 2
    blob = function_bytes()
    measuring.print_header(
        f"one switch on a {SIZE}-byte symbolic input, five ways out ({len(blob)} bytes of code); "
        f"median of {runs} interleaved runs"
    )
    side: AngrSide | None = None
    emu_runs: list[dict[str, Any]] = []
    angr_runs: list[dict[str, Any]] = []
    try:
        side = AngrSide(python, blob) if python is not None else None
        for _ in range(runs):
            emu_runs.append(emu_once(blob))
            if side is not None:
                angr_runs.append(side.run())
    except RuntimeError as e:
        print(f"error: angr's side failed: {e}", file=sys.stderr)
        return 1
    finally:
        if side is not None:
            side.close()
    med = statistics.median
    print(f"{'':6} {'paths':>5}  {'explore, ms: median [min..max]':<32} {'setup, ms':<24} cases")
    rows = [("emu", emu_runs)] + ([("angr", angr_runs)] if side is not None else [])
    for name, got in rows:
        check(name, got[-1])
        explore, setup = spread([r["explore"] for r in got]), spread([r["setup"] for r in got])
        print(f"{name:6} {got[-1]['paths']:>5}  {explore:<32} {setup:<24} {', '.join(got[-1]['cases'])}")
    if side is None:
        print(f"angr   not measured: {why}")
    else:
        ratio = med(r["explore"] for r in angr_runs) / med(r["explore"] for r in emu_runs)
        print()
        print(f"explore time, angr / emu: {ratio:.2f}x ({side.versions}; {python})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
