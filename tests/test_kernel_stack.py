"""How deep callbacks nest: the kernel stack, not a count.

WRK ``base/ntos/ke/amd64/callout.asm`` KiCallUserMode: ``sub rsp, KERNEL_STACK_CONTROL_LENGTH``;
``lea r15, -KERNEL_LARGE_STACK_COMMIT[rsp]``; below the thread's StackLimit it calls
MmGrowKernelStack(rsp), and on failure returns its status without entering user mode.
``mm/procsup.c`` MmGrowKernelStackEx: STATUS_STACK_OVERFLOW when the PTE of rsp - CommitSize
lies below the PTE of StackBase - KERNEL_LARGE_STACK_SIZE. ``public/sdk/inc/ntamd64.h``:
KERNEL_LARGE_STACK_SIZE 0x12000, KERNEL_LARGE_STACK_COMMIT = KERNEL_STACK_SIZE = 0x6000;
``ksamd64.inc``: KERNEL_STACK_CONTROL_LENGTH 0x200.

So with c bytes per callback level, the (d+1)-th callback is refused once
0x200 + (d+1)·c + 0x6000 > 0x12000 (everything page aligned).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from emu.api import run
from emu.kernel.callout import kernel_stack_overflow
from emu.profile import get_profile
from emu.scenario import parse_scenario

STATUS_STACK_OVERFLOW = 0xC00000FD  # ntstatus.h


def _deepest(cost: int, size: int = 0x12000) -> int:
    """How many callbacks nest: the first depth d at which one more is refused."""
    p = dataclasses.replace(get_profile("win10-22h2"), callback_stack_cost=cost, kernel_stack_size=size)
    d = 0
    while kernel_stack_overflow(p, d) is None:
        d += 1
    return d


def test_the_windows_profiles_carry_wrks_stack_sizes() -> None:
    for name in ("win7-sp1", "win10-22h2", "win11-23h2"):
        p = get_profile(name)
        assert (p.kernel_stack_size, p.kernel_stack_commit) == (0x12000, 0x6000)
        # 0x190 (KTRAP_FRAME) + 0x180 (KEXCEPTION_FRAME) + 0x200 (stack control) from WRK,
        # and a 0x2F0 estimate for the service's frames.
        assert p.callback_stack_cost == 0x190 + 0x180 + 0x200 + 0x2F0 == 0x800


def test_depth_follows_from_the_stack_numbers() -> None:
    # 0x800: 0x200 + 23 * 0x800 + 0x6000 = 0x11A00 fits, 0x200 + 24 * 0x800 + 0x6000 = 0x12200 does not.
    assert _deepest(0x800) == 23
    # 0x2000: 0x200 + 5 * 0x2000 + 0x6000 = 0x10200 fits, 6 * 0x2000 gives 0x12200.
    assert _deepest(0x2000) == 5
    # Only WRK's fixed frames (0x510): 0x200 + 37 * 0x510 + 0x6000 = 0x11D50 fits, 38 gives 0x12260.
    assert _deepest(0x510) == 37
    # A smaller reserve: 0x200 + 5 * 0x800 + 0x6000 = 0x8A00 <= 0x9000 < 0x9200 (6 levels).
    assert _deepest(0x800, size=0x9000) == 5


def test_the_refused_callback_gets_stack_overflow_from_the_kernel(root: Path) -> None:
    text = (root / "scenarios/callback_depth_overflow.toml").read_text()
    text = text.split("[[expect]]")[0].replace("[[module]]", "[profile]\nkernel_stack_size = 0x9000\n\n[[module]]", 1)
    r = run(parse_scenario(text, str(root / "scenarios" / "small_stack.toml")))
    assert r.error is None and r.max_depth == 5
    refused = [t for t in r.trace if "refused" in t.detail]
    assert len(refused) == 1 and refused[0].depth == 5 and refused[0].status == STATUS_STACK_OVERFLOW
    assert [t.kind for t in r.trace].count("callback") == 5  # the 6th never entered user mode
    assert r.exit_status == STATUS_STACK_OVERFLOW
