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

8 instructions per iteration; with the default N = 4,000,000 about 3.2·10^7 instructions
(about 0.2 s a run here: long enough that the machine's swings of a few ms even out).
keystone assembles it once; both sides run exactly these bytes (emu gets them as ``.byte``
lines in ``main``, which then returns, so the thread exits through RtlUserThreadStart and
NtTerminateThread).

``raw unicorn``
    ``emu_start(begin, end)`` on a machine with the code page mapped read+execute and the
    stack read+write, the permissions emu gives a module's code and a thread's stack (a
    read-write-execute stack makes Unicorn check every store for self-modifying code, which
    slows the raw side by about a fifth and flatters emu), no hooks.
``raw unicorn + count/timeout`` (informational)
    The same, started with an instruction budget (``count=``) and a timeout: Unicorn counts
    instructions with a per-instruction hook of its own when ``count`` is set.
``emu``
    ``Process.run()`` of the scenario (built beforehand, untimed), with the default budgets
    (what a user gets), and informationally with an instruction budget set; the run is
    checked to exit with the loop's value.

All in one process, the runs interleaved, the median kept. The figure is raw Unicorn's
time over emu's (emu's speed as a fraction of raw Unicorn's); the goal is in ``goals.py``.

Run::

    python benchmarks/bench_usercode.py [--n N] [--runs R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import measuring
from goals import USER_CODE
from measuring import Row

PER_ITERATION = 8
CODE_BASE = 0x0100_0000
STACK_BASE = 0x0200_0000
STACK_SIZE = 0x10000


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


# --- measurements -------------------------------------------------------------------------------
def _measure_raw(n: int, counted: bool) -> float:
    from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, Uc
    from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RSP

    blob = loop_bytes(n)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(CODE_BASE, 0x1000, UC_PROT_READ | UC_PROT_EXEC)  # a module's .text: "rx"
    uc.mem_write(CODE_BASE, blob)
    uc.mem_map(STACK_BASE, STACK_SIZE, UC_PROT_READ | UC_PROT_WRITE)  # a thread's stack: "rw"
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


def measure_user_code(n: int, runs: int, informational: bool = False) -> Row:
    """Raw Unicorn's time over emu's on the same loop (default budgets), per interleaved run."""
    raw, emu = measuring.paired(runs, lambda: _measure_raw(n, False), lambda: _measure_emu(n, counted=False))
    speeds = [r / e for r, e in zip(raw, emu)]
    instructions = PER_ITERATION * n
    mips = [instructions / statistics.median(series) / 1e6 for series in (raw, emu)]
    detail = f"raw {mips[0]:.0f} M instr/s, emu {mips[1]:.0f} M instr/s; {instructions:,} instructions, no syscalls"
    if informational:
        raw_counted, emu_counted = measuring.paired(
            runs, lambda: _measure_raw(n, True), lambda: _measure_emu(n, counted=True)
        )
        detail += (
            f"; with an instruction budget (Unicorn counts): raw {instructions / statistics.median(raw_counted) / 1e6:.0f},"
            f" emu {instructions / statistics.median(emu_counted) / 1e6:.0f} M instr/s"
        )
    return Row(USER_CODE, "x", speeds, detail=detail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=4_000_000, help="loop iterations (default 4000000, 8 instructions each)")
    ap.add_argument("--runs", type=int, default=measuring.MIN_RUNS, help="runs per measurement; the median is kept")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 0xFFFF_FFFF:
        ap.error("--n must be in 1..0xffffffff")
    runs = measuring.check_runs(args.runs)
    measuring.print_header(f"loop: {args.n:,} iterations x {PER_ITERATION} instructions; median of {runs} runs")
    measuring.print_rows([measure_user_code(args.n, runs, informational=True)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
