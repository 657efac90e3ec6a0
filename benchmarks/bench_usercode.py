"""User code between transitions: the same compute loop under emu and on a bare Unicorn instance.

The loop (no system calls) mixes arithmetic with loads and stores on the stack::

    mov ecx, N
    xor eax, eax
    mov edx, 1
  l:
    add rax, rcx
    imul rdx, rax, 3
    xor rax, rdx
    mov qword ptr [rsp - 0x40], rax
    add rax, qword ptr [rsp - 0x40]
    rol rax, 7
    dec ecx
    jnz l

8 instructions per iteration; with the default N = 1,000,000 about 8·10^6 instructions.
keystone assembles it once; both sides run exactly these bytes (emu gets them as ``.byte``
lines in ``main``, which then returns, so the thread exits through RtlUserThreadStart and
NtTerminateThread).

``raw unicorn``
    ``emu_start(begin, end)`` on a machine with the code page and a stack, no hooks.
``raw unicorn + count/timeout`` (informational)
    The same, started the way ``emu.machine.Machine.run`` starts Unicorn, with an
    instruction budget (``count=``) and a timeout: Unicorn counts instructions with a
    per-instruction hook of its own when ``count`` is set.
``emu``
    ``Process.run()`` of the scenario (built beforehand, untimed), with the default
    budgets raised so that none is hit; the run is checked to exit with the loop's value.

Each measurement runs in a fresh interpreter, repeated, the best kept. The speed column is
instructions per second of the loop; the target is emu ≥ 0.9x raw Unicorn's speed.

Run::

    python benchmarks/bench_usercode.py [--n N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

TARGET = 0.9
PER_ITERATION = 8
CODE_BASE = 0x0100_0000
STACK_BASE = 0x0200_0000
STACK_SIZE = 0x10000
MEASUREMENTS = ("raw", "raw_counted", "emu", "emu_default")


def loop_source(n: int) -> str:
    return (
        f"mov ecx, {n:#x}; xor eax, eax; mov edx, 1; "
        "l: add rax, rcx; imul rdx, rax, 3; xor rax, rdx; mov qword ptr [rsp - 0x40], rax; "
        "add rax, qword ptr [rsp - 0x40]; rol rax, 7; dec ecx; jnz l"
    )


def loop_bytes(n: int) -> bytes:
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks

    code, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(loop_source(n), CODE_BASE)
    return bytes(code)


def expected_rax(n: int) -> int:
    """What the loop leaves in RAX (EAX is what emu's thread exits with)."""
    mask = (1 << 64) - 1
    rax, rcx = 0, n
    while rcx:
        rax = (rax + rcx) & mask
        rdx = (rax * 3) & mask
        rax ^= rdx
        rax = (rax + rax) & mask
        rax = ((rax << 7) | (rax >> 57)) & mask
        rcx -= 1
    return rax


# --- measurements (each runs in a fresh interpreter) --------------------------------------------
def _measure_raw(n: int, counted: bool) -> float:
    from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
    from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RSP

    blob = loop_bytes(n)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(CODE_BASE, 0x1000, UC_PROT_ALL)
    uc.mem_write(CODE_BASE, blob)
    uc.mem_map(STACK_BASE, STACK_SIZE, UC_PROT_ALL)
    uc.reg_write(UC_X86_REG_RSP, STACK_BASE + STACK_SIZE - 0x100)
    t0 = time.perf_counter()
    if counted:
        uc.emu_start(CODE_BASE, CODE_BASE + len(blob), timeout=600 * 1_000_000, count=PER_ITERATION * n + 100_000)
    else:
        uc.emu_start(CODE_BASE, CODE_BASE + len(blob))
    dt = time.perf_counter() - t0
    if uc.reg_read(UC_X86_REG_RAX) != expected_rax(n):
        raise SystemExit("raw unicorn: the loop computed a wrong value")
    return dt


def _measure_emu(n: int, counted: bool = True) -> float:
    import gc

    from emu.engine import build
    from emu.scenario import parse_scenario

    blob = loop_bytes(n)
    body = "\n".join(f"    .byte {', '.join(f'{b:#04x}' for b in blob[i : i + 16])}" for i in range(0, len(blob), 16))
    text = f'''
[scenario]
name = "bench_usercode"
profile = "win10-22h2"

[budgets]
{f"instructions = {PER_ITERATION * n + 100_000}" if counted else ""}
wall_time = 600

[[module]]
name = "app"
code = """
main:
{body}
    ret
"""

[thread]
entry = "app!main"
'''
    process = build(parse_scenario(text, "bench"))
    gc.collect()
    t0 = time.perf_counter()
    r = process.run()
    dt = time.perf_counter() - t0
    if r.error is not None or r.stop != "exit":
        raise SystemExit(f"emu: the run stopped ({r.stop}): {r.error}")
    if r.exit_status != expected_rax(n) & 0xFFFF_FFFF:
        raise SystemExit(f"emu: exit status {r.exit_status:#x}, expected {expected_rax(n) & 0xFFFF_FFFF:#x}")
    return dt


def measure(name: str, n: int, repeat: int) -> dict[str, float | int | str]:
    runs = []
    for _ in range(repeat):
        if name == "raw":
            runs.append(_measure_raw(n, False))
        elif name == "raw_counted":
            runs.append(_measure_raw(n, True))
        elif name == "emu_default":
            runs.append(_measure_emu(n, counted=False))
        else:
            runs.append(_measure_emu(n))
    return {"name": name, "seconds": min(runs), "instructions": PER_ITERATION * n}


# --- driver -------------------------------------------------------------------------------------------
def run_child(name: str, n: int, repeat: int) -> float:
    args = [sys.executable, str(Path(__file__).resolve()), "--measure", name, "--n", str(n), "--repeat", str(repeat)]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{name}: the measurement failed: {tail[0]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=1_000_000, help="loop iterations (default 1000000, 8 instructions each)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept (default 3)")
    ap.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)  # the child's mode
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 0xFFFF_FFFF or args.repeat < 1:
        ap.error("--n must be in 1..0xffffffff and --repeat positive")
    if args.measure:
        print(json.dumps(measure(args.measure, args.n, args.repeat)))
        return 0

    import unicorn

    instructions = PER_ITERATION * args.n
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"unicorn  {unicorn.__version__}")
    print(f"loop: {args.n:,} iterations x {PER_ITERATION} instructions = {instructions:,} instructions, no syscalls")
    print(f"best of {args.repeat}, one fresh interpreter per measurement")
    print()
    rows = [
        ("raw unicorn (emu_start, no hooks)", run_child("raw", args.n, args.repeat)),
        ("raw unicorn + count/timeout (info)", run_child("raw_counted", args.n, args.repeat)),
        ("emu (instruction budget set)", run_child("emu", args.n, args.repeat)),
        ("emu (default budgets)", run_child("emu_default", args.n, args.repeat)),
    ]
    raw = rows[0][1]
    w = max(len(name) for name, _ in rows)
    print(f"{'measurement':<{w}}  {'seconds':>8}  {'M instr/s':>9}  {'speed vs raw':>12}")
    print(f"{'-' * w}  {'-' * 8}  {'-' * 9}  {'-' * 12}")
    for name, seconds in rows:
        print(f"{name:<{w}}  {seconds:>8.3f}  {instructions / seconds / 1e6:>9.1f}  {raw / seconds:>11.2f}x")
    print()
    speed = raw / rows[3][1]  # default budgets: what a user gets
    verdict = "met" if speed >= TARGET else "NOT met"
    print(f"target: emu >= {TARGET:.1f}x raw Unicorn's speed on user code: {speed:.2f}x, {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
