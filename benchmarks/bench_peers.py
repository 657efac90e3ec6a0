"""emu's syscall loop against Qiling's, in one interpreter on the same Unicorn.

``emu syscall round trip``
    An emu scenario whose ``main`` loops N times over a raw ``mov eax, 0xF; mov r10, rcx;
    syscall`` (NtClose in win10-22h2) served by a scripted ``NtClose`` returning 0, with the
    trace recorded: one op = a ``syscall`` + ``sysret`` transition pair, checked in the trace.
    (``bench_roundtrip.syscall_inline_text``.)

``qiling getpid loop``
    Qiling has no Windows system-call layer (its Windows support is API hooks on DLL exports),
    so the nearest equivalent is its Linux x86-64 one: the same loop with ``mov eax, 39``
    (``getpid``), run as shellcode by ``Qiling(code=..., archtype=X8664, ostype=LINUX)`` and
    served by Qiling's own Python ``getpid`` handler; it ends with ``exit``. Only ``ql.run()``
    is timed.

Both run in one child interpreter, interleaved, so they share the Unicorn build and the
load. That interpreter is ``--qiling-python``, by default ``.venv-qiling/bin/python`` at the
repository root when it exists (Qiling's own dependencies stay out of emu's environment)::

    python -m venv --system-site-packages .venv-qiling && .venv-qiling/bin/pip install qiling==1.4.6

The figure is emu's round trips per second over Qiling's, per run; the goal is in ``goals.py``.

Run::

    python benchmarks/bench_peers.py [--n N] [--runs R] [--qiling-python PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import measuring
from goals import VS_QILING
from measuring import ROOT, Row

VENV_PYTHON = ROOT / ".venv-qiling" / "bin" / "python"
INSTALL = "python -m venv --system-site-packages .venv-qiling && .venv-qiling/bin/pip install qiling==1.4.6"


def qiling_loop(n: int) -> tuple[float, int]:
    """Seconds for N getpid system calls served by Qiling's Linux layer, and N."""
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks
    from qiling import Qiling
    from qiling.const import QL_ARCH, QL_OS, QL_VERBOSE

    source = f"mov ebx, {n:#x}; l: mov eax, 39; syscall; dec ebx; jnz l; mov eax, 60; xor edi, edi; syscall"
    code, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(source, 0)
    ql = Qiling(code=bytes(code), archtype=QL_ARCH.X8664, ostype=QL_OS.LINUX, verbose=QL_VERBOSE.DISABLED)
    t0 = time.perf_counter()
    ql.run()
    dt = time.perf_counter() - t0
    if ql.arch.regs.rbx != 0:
        raise SystemExit(f"qiling: the loop stopped early (rbx = {ql.arch.regs.rbx:#x})")
    return dt, n


def _child(n: int, runs: int) -> dict[str, object]:
    """In the Qiling interpreter: emu's loop and Qiling's, interleaved."""
    import qiling
    import unicorn
    from bench_roundtrip import emu_run, syscall_inline_text

    emu, ql = measuring.paired(
        runs, lambda: emu_run(syscall_inline_text(n), "NtClose", n, False), lambda: qiling_loop(n)
    )
    return {
        "emu": [dt for dt, _ in emu],
        "qiling": [dt for dt, _ in ql],
        "versions": f"qiling {qiling.__version__}, unicorn {unicorn.__version__}",
        "python": sys.executable,
    }


def find_python(requested: str | None) -> tuple[str | None, str]:
    """(an interpreter that imports qiling, "") or (None, why there is none)."""
    return measuring.find_peer_python("qiling", "Qiling", requested, VENV_PYTHON, INSTALL, timeout=120)


def measure_qiling(n: int, runs: int, python: str | None = None) -> Row:
    """emu's syscall round trips per second over Qiling's getpid loop, per run, in one child."""
    found, why = find_python(python)
    if found is None:
        return Row(VS_QILING, "x", why_not=why)
    r = measuring.run_child(["bench_peers.py", "--child", "--n", str(n), "--runs", str(runs)], python=found)
    ratios = [q / e for e, q in zip(r["emu"], r["qiling"])]
    emu_us, ql_us = (statistics.median(r[k]) / n * 1e6 for k in ("emu", "qiling"))
    detail = f"emu {emu_us:.2f} µs, Qiling {ql_us:.2f} µs per system call ({r['versions']}); N = {n:,}"
    return Row(VS_QILING, "x", ratios, detail=detail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=20000, help="loop iterations (ops) per run (default 20000)")
    ap.add_argument("--runs", type=int, default=measuring.MIN_RUNS, help="runs per measurement; the median is kept")
    ap.add_argument("--qiling-python", default=None, help="interpreter that can import qiling")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the measuring child's mode
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be positive")
    runs = measuring.check_runs(args.runs)
    if args.child:
        print(json.dumps(_child(args.n, runs)))
        return 0
    measuring.print_header(f"N = {args.n}, median of {runs} interleaved runs in one child interpreter")
    measuring.print_rows([measure_qiling(args.n, runs, args.qiling_python)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
