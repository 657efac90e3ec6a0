"""emu's round trips against a bare Unicorn hook and against Qiling, one fresh interpreter per measurement.

What is measured (each in its own ``python`` process, repeated, the best kept):

``bare hook``
    A bare Unicorn x86-64 machine runs ``mov ebx, N; l: mov eax, 5; syscall; dec ebx; jnz l``
    with a ``UC_HOOK_INSN`` syscall hook that reads and writes RAX. One op = one ``syscall``
    handled in Python: the floor for any Python kernel model on Unicorn.
    (``bench_roundtrip.bare_hook``.)

``emu syscall round trip``
    An emu scenario whose ``main`` loops N times over a raw ``mov eax, 0xF; mov r10, rcx;
    syscall`` (NtClose in win10-22h2) served by a scripted ``NtClose`` returning 0, with the
    trace recorded: one op = a ``syscall`` + ``sysret`` transition pair, checked in the trace.
    (``bench_roundtrip.syscall_inline_text``.)

``emu callback round trip``
    ``call NtUserMessageCall`` whose script calls back KernelCallbackTable[2] and returns
    its status: one op = syscall + callback (KiUserCallbackDispatcher) + NtCallbackReturn
    + sysret. (``bench_roundtrip.callback_text``.)

``qiling getpid loop``
    Qiling has no Windows system-call layer (its Windows support is API hooks on DLL exports),
    so the nearest equivalent is its Linux x86-64 one: the same loop as the bare hook with
    ``mov eax, 39`` (``getpid``), run as shellcode by ``Qiling(code=..., archtype=X8664,
    ostype=LINUX)`` and served by Qiling's own Python ``getpid`` handler; it ends with
    ``exit``. Only ``ql.run()`` is timed. Qiling is run by ``--qiling-python`` (default: this
    interpreter), so it can live in its own virtualenv if its pins conflict with emu's.

Only the run is timed (``time.perf_counter``), not parsing, assembling or mapping. The ratio
column is cost per op relative to the bare hook; the throughput line compares emu's syscall
round trip with Qiling's getpid loop. Targets: emu's syscall round trip at most 1.5x the bare
hook's cost per op, and at least 5x Qiling's throughput.

Run::

    python benchmarks/bench_peers.py [--n N] [--repeat R] [--qiling-python PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TARGET_VS_BARE = 1.5
TARGET_VS_QILING = 5.0
HERE = Path(__file__).resolve().parent
MEASUREMENTS = ("bare", "emu_syscall", "emu_callback", "qiling")


# --- measurements (each runs in a fresh interpreter) --------------------------------------------
def _measure_bare(n: int) -> tuple[float, int]:
    sys.path.insert(0, str(HERE))
    from bench_roundtrip import bare_hook

    return bare_hook(n)


def _measure_emu(n: int, callbacks: bool) -> tuple[float, int]:
    sys.path.insert(0, str(HERE))
    from bench_roundtrip import callback_text, emu_run, syscall_inline_text

    if callbacks:
        return emu_run(callback_text(n), "NtUserMessageCall", n, True)
    return emu_run(syscall_inline_text(n), "NtClose", n, False)


def _measure_qiling(n: int) -> tuple[float, int]:
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


def measure(name: str, n: int, repeat: int) -> dict[str, float | int | str]:
    """Best of ``repeat`` runs of one measurement, in this process."""
    runs = []
    for _ in range(repeat):
        if name == "bare":
            runs.append(_measure_bare(n))
        elif name == "emu_syscall":
            runs.append(_measure_emu(n, False))
        elif name == "emu_callback":
            runs.append(_measure_emu(n, True))
        else:
            runs.append(_measure_qiling(n))
    seconds, ops = min(runs)
    return {"name": name, "seconds": seconds, "ops": ops, "python": sys.executable}


# --- driver -------------------------------------------------------------------------------------------
@dataclass
class Result:
    label: str
    seconds: float
    ops: int

    @property
    def per_op(self) -> float:
        return self.seconds / self.ops

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds


def run_child(python: str, name: str, n: int, repeat: int) -> dict[str, float | int | str]:
    args = [python, str(Path(__file__).resolve()), "--measure", name, "--n", str(n), "--repeat", str(repeat)]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{name}: the measurement failed ({python}): {tail[0]}")
    result: dict[str, float | int | str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def qiling_python(requested: str | None) -> tuple[str, str] | None:
    """(interpreter, "qiling X on unicorn Y") for the interpreter that runs Qiling, or None if it cannot import it."""
    python = requested or sys.executable
    probe = subprocess.run(
        [python, "-c", "import qiling, unicorn; print(qiling.__version__, unicorn.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0 or len(probe.stdout.split()) != 2:
        return None
    q, u = probe.stdout.split()
    return python, f"{q} on unicorn {u}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=20000, help="loop iterations (ops) per run (default 20000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept (default 3)")
    ap.add_argument("--qiling-python", default=None, help="interpreter that can import qiling (default: this one)")
    ap.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)  # the child's mode
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeat < 1:
        ap.error("--n and --repeat must be positive")
    if args.measure:
        print(json.dumps(measure(args.measure, args.n, args.repeat)))
        return 0

    import unicorn

    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"unicorn  {unicorn.__version__}")
    print(f"N = {args.n}, best of {args.repeat}, one fresh interpreter per measurement")
    found = qiling_python(args.qiling_python)
    qpython = found[0] if found else None
    if found is None:
        where = args.qiling_python or sys.executable
        print(f"qiling   not installed for {where} (pip install qiling, or pass --qiling-python PATH)")
    else:
        print(f"qiling   {found[1]} ({found[0]})")
    print()

    rows: list[Result] = []
    for label, name in [
        ("bare hook (reg_read+reg_write RAX)", "bare"),
        ("emu syscall round trip (trace on)", "emu_syscall"),
        ("emu callback round trip", "emu_callback"),
    ]:
        r = run_child(sys.executable, name, args.n, args.repeat)
        rows.append(Result(label, float(r["seconds"]), int(r["ops"])))
    qiling: Result | None = None
    if qpython is not None:
        r = run_child(qpython, "qiling", args.n, args.repeat)
        qiling = Result("qiling getpid loop (Linux x86-64)", float(r["seconds"]), int(r["ops"]))
        rows.append(qiling)

    bare, emu_syscall = rows[0], rows[1]
    w = max(len(row.label) for row in rows)
    print(f"{'measurement':<{w}}  {'ops/s':>12}  {'µs/op':>9}  {'cost vs bare':>12}")
    print(f"{'-' * w}  {'-' * 12}  {'-' * 9}  {'-' * 12}")
    for row in rows:
        print(
            f"{row.label:<{w}}  {row.ops_per_s:>12,.0f}  {row.per_op * 1e6:>9.2f}  {row.per_op / bare.per_op:>11.2f}x"
        )
    print()
    ratio = emu_syscall.per_op / bare.per_op
    verdict = "met" if ratio <= TARGET_VS_BARE else "NOT met"
    print(f"target: emu syscall round trip <= {TARGET_VS_BARE:.1f}x the bare hook's cost: {ratio:.2f}x, {verdict}")
    if qiling is None:
        print(
            f"target: emu syscall round trip >= {TARGET_VS_QILING:.0f}x Qiling's throughput: not measured (qiling not installed)"
        )
    else:
        speedup = emu_syscall.ops_per_s / qiling.ops_per_s
        verdict = "met" if speedup >= TARGET_VS_QILING else "NOT met"
        print(
            f"target: emu syscall round trip >= {TARGET_VS_QILING:.0f}x Qiling's throughput: {speedup:.2f}x, {verdict}"
            " (Qiling has no Windows syscall layer: its Linux getpid loop stands in)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
