"""The kernel model reading user memory that holds symbolic bytes.

The kernel model is Python working on concrete bytes: a service's probe or copy of a buffer, a
Python service's reads of its argument structures, the arguments above the fourth on the
caller's stack, NtCallbackReturn's record of the callback's Result. When what it reads holds
symbolic bytes, the run's values are what it gets, so the path is only what those values give:
the bytes are fixed to the run's values in the path condition and the path is reported
incomplete there, as for registers the kernel model reads (:meth:`Driver._enter_kernel`).
"""

from __future__ import annotations

from collections.abc import Callable

import z3

from emu.symbolic.store import Expr

__all__ = ["stack_arguments", "symbolic_runs"]

# Arguments 5+ of a system call sit above the return address and the 0x20 shadow space (MS
# docs "x64 calling convention"); the kernel copies them from the caller's stack (WRK
# ke/amd64/trap.asm KiSystemServiceCopyStart).
STACK_ARGS_AT = 0x28


def symbolic_runs(
    mem: dict[int, tuple[Expr, int | None]], address: int, size: int, read: Callable[[int, int], bytes]
) -> list[tuple[int, Expr, int]]:
    """The symbolic bytes in ``[address, address + size)``, as runs of consecutive bytes: (first
    address, little-endian expression, the run's concrete value). ``read`` reads concrete bytes."""
    if not mem or size <= 0:
        return []
    if size > len(mem):
        hits = sorted(a for a in mem if address <= a < address + size)
    else:
        hits = [a for a in range(address, address + size) if a in mem]
    # A byte whose concrete value changed was overwritten by what emu does not follow: stale.
    hits = [a for a in hits if mem[a][1] is None or mem[a][1] == read(a, 1)[0]]
    runs: list[list[int]] = []
    for a in hits:
        if runs and runs[-1][-1] == a - 1:
            runs[-1].append(a)
        else:
            runs.append([a])
    out: list[tuple[int, Expr, int]] = []
    for run in runs:
        parts: list[Expr] = []
        value = 0
        for i, a in enumerate(run):
            e, c = mem[a]
            parts.append(e)
            c = read(a, 1)[0] if c is None else c
            value |= c << (8 * i)
        expr = parts[0] if len(parts) == 1 else z3.Concat(*reversed(parts))
        out.append((run[0], expr, value))
    return out


def stack_arguments(rsp: int, count: int) -> tuple[int, int]:
    """The stack range the kernel reads ``count`` arguments (of all) from: (address, size)."""
    extra = max(0, count - 4)
    return rsp + STACK_ARGS_AT, 8 * extra
