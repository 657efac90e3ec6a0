"""Round-trip cost of emu's kernel model against a bare Unicorn syscall hook, in one process.

What is measured (all in one process, the runs interleaved, the median kept):

``bare hook (binding)``
    A bare Unicorn x86-64 machine runs ``mov ebx, N; l: mov eax, 5; syscall; dec ebx;
    jnz l`` with a ``UC_HOOK_INSN`` syscall hook that reads RAX and writes RAX through the
    binding (``uc.reg_read`` / ``uc.reg_write``). One op = one ``syscall`` handled in
    Python. The code page is mapped read+execute, as emu maps code.

``bare hook (ctypes)``
    The same, with the hook reading and writing RAX by direct ``uc_reg_read_batch`` /
    ``uc_reg_write_batch`` calls into libunicorn through ctypes (arrays bound once), the
    way emu's own register file reads registers. The lower floor.

``emu syscall (inline)``
    An emu scenario whose ``main`` loops N times over a raw inline
    ``mov eax, 0xF; mov r10, rcx; syscall`` (NtClose's number in win10-22h2), served by
    a scripted ``NtClose`` that returns 0, with the trace recorded. One op = one completed
    round trip, i.e. a ``syscall`` + ``sysret`` transition pair in ``run.trace.transitions``.

``emu syscall (call NtClose)``
    The same round trip through ``call NtClose`` (the built-in ntdll stub).

``emu callback round trip``
    ``main`` loops N times over ``call NtUserMessageCall``, whose scripted service does
    ``{ kind = "callback", api = 2 }`` then ``{ kind = "return", status = "callback" }``
    with KernelCallbackTable[2] a function returning 0. One op = syscall + callback
    (KiUserCallbackDispatcher) + NtCallbackReturn + sysret. The figure is round trips per
    second; the verdict judges a round trip's time over the bare hook's, measured beside it
    (see ``goals.REFERENCE_HOOK_US``).

Scenarios are built as TOML text, parsed with ``emu.scenario.parse_scenario`` and built
with ``emu.engine.build``; only ``Process.run()`` is timed (``time.perf_counter``), not
parsing, assembling or mapping. Each emu run is checked: no error, exit status 0 and the
expected number of transitions. The goals come from ``goals.py``.

Run::

    python benchmarks/bench_roundtrip.py [--n N] [--runs R]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time

import measuring
from goals import CALLBACK_RATE, REFERENCE_HOOK_US, SYSCALL_VS_BARE
from keystone import KS_ARCH_X86, KS_MODE_64, Ks
from measuring import Row
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_EXEC, UC_PROT_READ, Uc
from unicorn.x86_const import UC_X86_INS_SYSCALL, UC_X86_REG_RAX

from emu.engine import build
from emu.scenario import parse_scenario

CODE_BASE = 0x0100_0000


# --- 1. bare Unicorn ------------------------------------------------------------------------
def _binding_hook(calls: list[int]):  # type: ignore[no-untyped-def]
    def hook(uc: Uc, user_data: object) -> None:
        rax = uc.reg_read(UC_X86_REG_RAX)
        uc.reg_write(UC_X86_REG_RAX, rax ^ 0x100)
        calls[0] += 1

    return hook


def _ctypes_hook(uc: Uc, calls: list[int]):  # type: ignore[no-untyped-def]
    from unicorn.unicorn_py3 import unicorn as binding

    lib, handle = binding.uclib, uc._uch
    read, write = lib.uc_reg_read_batch, lib.uc_reg_write_batch
    ids = (ctypes.c_int * 1)(UC_X86_REG_RAX)
    vals = (ctypes.c_uint64 * 1)()
    ptrs = (ctypes.c_void_p * 1)(ctypes.addressof(vals))

    def hook(uc: Uc, user_data: object) -> None:
        read(handle, ids, ptrs, 1)
        vals[0] ^= 0x100
        write(handle, ids, ptrs, 1)
        calls[0] += 1

    hook._keep = (ids, vals, ptrs)  # type: ignore[attr-defined]
    return hook


def bare_hook(n: int, emu_like: bool = False, access: str = "binding") -> tuple[float, int]:
    """Seconds for N hooked syscalls on a bare machine, and the hook count.

    ``access``: ``"binding"`` (``uc.reg_read``/``reg_write``) or ``"ctypes"`` (direct batched
    calls into libunicorn). ``emu_like``: started with a timeout and an instruction budget.
    """
    code, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(
        f"mov ebx, {n:#x}; l: mov eax, 5; syscall; dec ebx; jnz l; nop", CODE_BASE
    )
    blob = bytes(code)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(CODE_BASE, 0x1000, UC_PROT_READ | UC_PROT_EXEC)  # code is "rx" in emu too
    uc.mem_write(CODE_BASE, blob)
    calls = [0]
    hook = _ctypes_hook(uc, calls) if access == "ctypes" else _binding_hook(calls)
    uc.hook_add(UC_HOOK_INSN, hook, None, 1, 0, UC_X86_INS_SYSCALL)
    gc.collect()
    if emu_like:
        t0 = time.perf_counter()
        uc.emu_start(CODE_BASE, CODE_BASE + len(blob), timeout=600 * 1_000_000, count=64 * n + 100_000)
    else:
        t0 = time.perf_counter()
        uc.emu_start(CODE_BASE, CODE_BASE + len(blob))
    dt = time.perf_counter() - t0
    if calls[0] != n:
        raise SystemExit(f"bare hook: expected {n} syscalls, the hook saw {calls[0]}")
    return dt, calls[0]


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


# --- the goals' rows ---------------------------------------------------------------------------
def measure_syscall(n: int, runs: int) -> Row:
    """emu's syscall round trip / the binding's bare hook, per run (interleaved), and both floors."""
    binding, via_ctypes, emu = measuring.paired(
        runs,
        lambda: bare_hook(n),
        lambda: bare_hook(n, access="ctypes"),
        lambda: emu_run(syscall_inline_text(n), "NtClose", n, False),
    )
    ratios = [e[0] / b[0] for e, b in zip(emu, binding)]
    vs_ctypes = [e[0] / c[0] for e, c in zip(emu, via_ctypes)]
    us = [statistics.median(dt for dt, _ in series) / n * 1e6 for series in (emu, binding, via_ctypes)]
    detail = (
        f"emu {us[0]:.2f} µs, bare hook {us[1]:.2f} µs through the binding, {us[2]:.2f} µs through ctypes "
        f"(emu = {statistics.median(vs_ctypes):.2f}× the ctypes hook); N = {n:,}"
    )
    return Row(SYSCALL_VS_BARE, "x", ratios, detail=detail)


def measure_callback(n: int, runs: int) -> Row:
    """Callback round trips per second (syscall, callback, NtCallbackReturn, sysret), and the
    cost of one in bare hooks measured beside it (a figure the machine's load moves less)."""
    series, binding = measuring.paired(
        runs, lambda: emu_run(callback_text(n), "NtUserMessageCall", n, True), lambda: bare_hook(n)
    )
    rates = [ops / dt for dt, ops in series]
    us = 1e6 / statistics.median(rates)
    # The verdict's basis: a round trip's time over one bare hook's, run by run (both loops do N ops).
    hooks = [(e[0] / e[1]) / (b[0] / b[1]) for e, b in zip(series, binding)]
    hook_us = statistics.median(b[0] / b[1] for b in binding) * 1e6
    detail = (
        f"{us:.1f} µs per callback round trip, {statistics.median(hooks):.2f}× the bare hook measured beside it"
        f" ({hook_us:.2f} µs here, {REFERENCE_HOOK_US} µs where the goal was set); N = {n:,}"
    )
    return Row(CALLBACK_RATE, "/s", rates, judged=hooks, detail=detail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=20000, help="loop iterations (ops) per run (default 20000)")
    ap.add_argument("--runs", type=int, default=measuring.MIN_RUNS, help="runs per measurement; the median is kept")
    args = ap.parse_args(argv)
    n, runs = args.n, measuring.check_runs(args.runs)
    if n < 1:
        ap.error("--n must be positive")
    measuring.print_header(f"N = {n}, median of {runs} interleaved runs")
    info = [
        ("bare hook + count/timeout (as Machine.run starts Unicorn)", lambda: bare_hook(n, emu_like=True)),
        ("emu syscall round trip (call NtClose stub)", lambda: emu_run(syscall_stub_text(n), "NtClose", n, False)),
    ]
    for name, fn in info:
        (series,) = measuring.paired(runs, fn)
        print(f"{name}: {statistics.median(dt for dt, _ in series) / n * 1e6:.2f} µs/op")
    print()
    measuring.print_rows([measure_syscall(n, runs), measure_callback(n, runs)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
