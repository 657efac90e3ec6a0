"""Symbolic values cost nothing while none is live: the same exploration with a symbolic status and
with a listed choice.

The program asks NtClose for a status, branches on NT_SUCCESS, then runs a concrete compute
loop (no system calls, no symbolic value involved: RAX is overwritten first) and exits::

    call NtClose
    test eax, eax
    js failed
  failed:
    <loop: 8 instructions per iteration, N iterations>

``choice``
    NtClose's script chooses between STATUS_SUCCESS and STATUS_INVALID_HANDLE; the explorer
    follows both options: two paths, each running the loop.
``symbolic``
    NtClose's status is ``{ symbolic = "st" }``; the solver finds the second side of the
    ``js``: two paths, each running the loop. The symbolic executor's hook is installed from the
    status's return to the instruction that overwrites RAX, then removed, so the loop runs
    without it.
``symbolic, live`` (informational)
    The same with the status kept in RBX across the loop (N / 100 iterations): the hook follows
    every instruction, which is what a live symbolic value costs.

Two figures: ``symbolic`` time over ``choice`` time, whole explorations (the symbolic one adds a
fixed cost: z3 builds its expressions and answers one query, some tens of milliseconds); and
the *marginal* ratio, the extra time N more iterations take in each (measured at N and N/10),
which is the speed of concrete code with nothing live (1.0: today's speed). Medians of
interleaved runs in one process.

Run::

    python benchmarks/bench_symbolic.py [--n N] [--runs R]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import measuring  # noqa: F401  (puts the repository first on sys.path)

LOOP = (
    "    mov ecx, {n:#x}\n    xor eax, eax\n    mov edx, 1\n"
    "loop:\n    add rax, rcx\n    imul rdx, rax, 3\n    xor rax, rdx\n    mov qword ptr [rsp - 0x40], rax\n"
    "    add rax, qword ptr [rsp - 0x40]\n    rol rax, 7\n    dec ecx\n    jnz loop\n"
)


def scenario_text(n: int, status: str, keep_live: bool = False) -> str:
    keep = "    mov ebx, eax               ; the status stays live in RBX\n" if keep_live else ""
    return f'''
[scenario]
name = "bench_symbolic"

[budgets]
wall_time = 600

[[module]]
name = "app"
code = """
main:
    push rbx
    sub rsp, 0x20
    mov rcx, 0x44
    call NtClose
{keep}    test eax, eax
    js failed
failed:
{LOOP.format(n=n)}    add rsp, 0x20
    pop rbx
    ret
"""

[thread]
entry = "app!main"

[services.NtClose]
steps = [{status}]
'''


CHOICE = (
    '{ kind = "choice", name = "r", options = { ok = [{ kind = "return", status = "STATUS_SUCCESS" }], '
    'bad = [{ kind = "return", status = "STATUS_INVALID_HANDLE" }] } }'
)
SYMBOLIC = '{ kind = "return", status = { symbolic = "st" } }'


def measure(text: str, paths: int) -> tuple[float, int]:
    from emu.exploration.explorer import Explorer
    from emu.scenario import parse_scenario

    explorer = Explorer(parse_scenario(text, "bench"))
    gc.collect()
    t0 = time.perf_counter()
    exp = explorer.run()
    dt = time.perf_counter() - t0
    if exp.paths != paths or not exp.complete:
        raise SystemExit(f"bench_symbolic: expected {paths} complete paths, got {exp.summary()}")
    followed = explorer.symbolic.exec.instructions if explorer.symbolic is not None else 0
    return dt, followed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="loop iterations (default 1,000,000)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    if args.n < 100 or args.runs < 1:
        ap.error("--n must be at least 100 and --runs at least 1")
    choice, symbolic, live, choice10, symbolic10 = [], [], [], [], []
    followed = followed_live = 0
    for _ in range(args.runs):
        choice.append(measure(scenario_text(args.n, CHOICE), 2)[0])
        dt, followed = measure(scenario_text(args.n, SYMBOLIC), 2)
        symbolic.append(dt)
        choice10.append(measure(scenario_text(args.n // 10, CHOICE), 2)[0])
        symbolic10.append(measure(scenario_text(args.n // 10, SYMBOLIC), 2)[0])
        dt, followed_live = measure(scenario_text(args.n // 100, SYMBOLIC, keep_live=True), 2)
        live.append(dt)
    med = statistics.median
    c, s, lv = med(choice), med(symbolic), med(live)
    marginal = (s - med(symbolic10)) / max(1e-9, c - med(choice10))
    instructions = 2 * 8 * args.n
    print(f"loop: {args.n} iterations x 8 instructions, 2 paths; median of {args.runs} runs")
    print(f"choice                 {c * 1e3:10.1f} ms")
    print(
        f"symbolic               {s * 1e3:10.1f} ms   ratio {s / c:.2f}, marginal ratio {marginal:.2f} (1.00: today's speed)"
    )
    print(f"  instructions followed symbolically: {followed} of about {instructions}")
    per = lv / max(1, followed_live) * 1e6
    print(f"symbolic, live (n/100) {lv * 1e3:10.1f} ms   {followed_live} instructions followed, {per:.1f} us each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
