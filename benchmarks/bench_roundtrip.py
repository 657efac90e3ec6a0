"""Round-trip cost of emu's kernel model against a bare Unicorn syscall hook.

What is measured (all in one process, each measurement repeated and the best kept):

``bare hook``
    A bare Unicorn x86-64 machine runs ``mov ebx, N; l: mov eax, 5; syscall; dec ebx;
    jnz l`` with a ``UC_HOOK_INSN`` syscall hook that reads RAX and writes RAX
    (``uc.reg_read`` / ``uc.reg_write``). One op = one ``syscall`` handled in Python.
    This is the floor: the cost of getting from emulated code into a Python hook and
    back.

``bare hook + count/timeout``
    The same, but started the way ``emu.machine.Machine.run`` starts Unicorn
    (``emu_start(..., timeout=..., count=...)``). Informational: it separates the
    cost of Unicorn's instruction counting / timer from the cost of emu's Python.

``emu syscall (inline)``
    An emu scenario whose ``main`` loops N times over a raw inline
    ``mov eax, 0xF; mov r10, rcx; syscall`` (NtClose's number in win10-22h2), served by
    a scripted ``NtClose`` that returns 0. One op = one completed round trip, i.e. a
    ``syscall`` + ``sysret`` transition pair recorded in ``run.trace.transitions``.
    Like for like with the bare loop.

``emu syscall (call NtClose)``
    The same round trip through ``call NtClose`` (the built-in ntdll stub, win10 shape:
    ``mov r10, rcx; mov eax, N; test byte [7FFE0308h], 1; jne; syscall; ret``).

``emu callback round trip``
    ``main`` loops N times over ``call NtUserMessageCall``, whose scripted service does
    ``{ kind = "callback", api = 2 }`` then ``{ kind = "return", status = "callback" }``
    with KernelCallbackTable[2] a function returning 0. One op = syscall + callback
    (KiUserCallbackDispatcher) + NtCallbackReturn + sysret.

Scenarios are built as TOML text, parsed with ``emu.scenario.parse_scenario`` and built
with ``emu.engine.build``; only ``Process.run()`` is timed (``time.perf_counter``), not
parsing, assembling or mapping. Each emu run is checked: no error, exit status 0 and the
expected number of transitions.

The ratio column is emu cost / bare-hook cost per op (how many times slower than the
bare hook). Target: emu's syscall round trip at most 2.0x the bare hook.

Run::

    python benchmarks/bench_roundtrip.py [--n N] [--repeat R]
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import unicorn
from keystone import KS_ARCH_X86, KS_MODE_64, Ks
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn.x86_const import UC_X86_INS_SYSCALL, UC_X86_REG_RAX

from emu.engine import build
from emu.scenario import parse_scenario

TARGET_RATIO = 2.0
CODE_BASE = 0x0100_0000


# --- 1. bare Unicorn ------------------------------------------------------------------------
def _bare_machine(n: int) -> tuple[Uc, int, int]:
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    code, _ = ks.asm(f"mov ebx, {n:#x}; l: mov eax, 5; syscall; dec ebx; jnz l; nop", CODE_BASE)
    blob = bytes(code)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(CODE_BASE, 0x1000, UC_PROT_ALL)
    uc.mem_write(CODE_BASE, blob)
    calls = [0]

    def hook(uc: Uc, user_data: object) -> None:
        rax = uc.reg_read(UC_X86_REG_RAX)
        uc.reg_write(UC_X86_REG_RAX, rax ^ 0x100)
        calls[0] += 1

    uc.hook_add(UC_HOOK_INSN, hook, None, 1, 0, UC_X86_INS_SYSCALL)
    uc._bench_calls = calls  # type: ignore[attr-defined]
    return uc, CODE_BASE, CODE_BASE + len(blob)


def bare_hook(n: int, emu_like: bool = False) -> tuple[float, int]:
    """Seconds for N hooked syscalls on a bare machine, and the hook count."""
    uc, begin, until = _bare_machine(n)
    if emu_like:
        # As emu.machine.Machine.run starts Unicorn: a timeout and an instruction budget.
        t0 = time.perf_counter()
        uc.emu_start(begin, until, timeout=600 * 1_000_000, count=64 * n + 100_000)
        dt = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        uc.emu_start(begin, until)
        dt = time.perf_counter() - t0
    ops = uc._bench_calls[0]  # type: ignore[attr-defined]
    if ops != n:
        raise SystemExit(f"bare hook: expected {n} syscalls, the hook saw {ops}")
    return dt, ops


# --- 2./3. emu scenarios ----------------------------------------------------------------------
def _scenario_text(name: str, n: int, body: str, services: str, extra_code: str = "", table: str = "") -> str:
    return f'''
[scenario]
name = "{name}"
profile = "win10-22h2"

[budgets]
instructions = {64 * n + 100_000}
wall_time = 600

[[module]]
name = "app"
code = """
main:                         ; entered by call: RSP = 8 mod 16
    push rbx                  ; RSP = 0 mod 16; RBX (nonvolatile) is the loop counter
    sub rsp, 0x20             ; shadow space, RSP still 0 mod 16
    mov ebx, {n:#x}
loop_top:
{body}
    dec ebx
    jnz loop_top
    xor eax, eax
    add rsp, 0x20
    pop rbx
    ret
{extra_code}
"""

[thread]
entry = "app!main"
{table}
{services}
'''


def syscall_inline_text(n: int) -> str:
    body = "    xor ecx, ecx\n    mov eax, 0xF              ; NtClose (win10-22h2)\n    mov r10, rcx\n    syscall"
    return _scenario_text("bench_syscall_inline", n, body, _NTCLOSE)


def syscall_stub_text(n: int) -> str:
    body = "    xor ecx, ecx\n    call NtClose"
    return _scenario_text("bench_syscall_stub", n, body, _NTCLOSE)


def callback_text(n: int) -> str:
    body = "    xor ecx, ecx\n    mov edx, 0x000F\n    call NtUserMessageCall"
    extra = "on_message:\n    xor eax, eax\n    ret"
    table = '[kernel_callback_table]\nsize = 4\n2 = "app!on_message"\n'
    services = (
        "[services.NtUserMessageCall]\n"
        'steps = [{ kind = "callback", api = 2 }, { kind = "return", status = "callback" }]\n'
    )
    return _scenario_text("bench_callback", n, body, services, extra, table)


_NTCLOSE = '[services.NtClose]\nsteps = [{ kind = "return", status = 0 }]\n'


def emu_run(text: str, service: str, n: int, callbacks: bool) -> tuple[float, int]:
    """Build the scenario (untimed), time Process.run(), check the trace; (seconds, ops)."""
    scenario = parse_scenario(text, "bench")
    process = build(scenario)
    gc.collect()
    t0 = time.perf_counter()
    r = process.run()
    dt = time.perf_counter() - t0
    if r.error is not None or r.stop != "exit":
        raise SystemExit(f"{scenario.name}: run stopped ({r.stop}): {r.error}")
    if r.exit_status != 0:
        raise SystemExit(f"{scenario.name}: exit status {r.exit_status:#x}, expected 0")
    ops = sum(1 for t in r.trace.transitions if t.kind == "sysret" and t.service == service)
    kinds = r.trace.kinds()
    want = {"syscall": n * (2 if callbacks else 1) + 1, "sysret": n, "exit": 1}
    if callbacks:
        want |= {"callback": n, "callback_return": n}
    got = {k: kinds.get(k, 0) for k in want}
    if ops != n or got != want:
        raise SystemExit(f"{scenario.name}: expected transitions {want} and {n} ops, got {kinds} and {ops} ops")
    return dt, ops


# --- driver -----------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    seconds: float
    ops: int

    @property
    def per_op(self) -> float:
        return self.seconds / self.ops

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds


def best_of(repeat: int, name: str, fn: Callable[[], tuple[float, int]]) -> Result:
    runs = [fn() for _ in range(repeat)]
    dt, ops = min(runs)
    return Result(name, dt, ops)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=20000, help="loop iterations (ops) per run (default 20000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept (default 3)")
    args = ap.parse_args(argv)
    n, repeat = args.n, args.repeat
    if n < 1 or repeat < 1:
        ap.error("--n and --repeat must be positive")

    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"unicorn  {unicorn.__version__}")
    print(f"N = {n}, best of {repeat}")
    print()

    bare = best_of(repeat, "bare hook (reg_read+reg_write RAX)", lambda: bare_hook(n))
    results = [
        bare,
        best_of(repeat, "bare hook + count/timeout (info)", lambda: bare_hook(n, emu_like=True)),
        best_of(
            repeat, "emu syscall round trip (inline)", lambda: emu_run(syscall_inline_text(n), "NtClose", n, False)
        ),
        best_of(
            repeat, "emu syscall round trip (call NtClose)", lambda: emu_run(syscall_stub_text(n), "NtClose", n, False)
        ),
        best_of(repeat, "emu callback round trip", lambda: emu_run(callback_text(n), "NtUserMessageCall", n, True)),
    ]

    w = max(len(r.name) for r in results)
    print(f"{'name':<{w}}  {'ops/s':>12}  {'µs/op':>9}  {'ratio vs bare':>13}")
    print(f"{'-' * w}  {'-' * 12}  {'-' * 9}  {'-' * 13}")
    for r in results:
        ratio = r.per_op / bare.per_op
        print(f"{r.name:<{w}}  {r.ops_per_s:>12,.0f}  {r.per_op * 1e6:>9.2f}  {ratio:>12.2f}x")
    print()
    inline = results[2]
    ratio = inline.per_op / bare.per_op
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"target: emu syscall round trip <= {TARGET_RATIO:.1f}x the bare hook (inline: {ratio:.2f}x, {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
