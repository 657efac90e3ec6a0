"""No silent cap on the user stack a state keeps: deep callback nesting is seen whole.

With a fixed 64 KiB capture, the stack walk of a state at callback depth 50 found only the
innermost 43 KiUserCallbackDispatcher frames, and nothing said so. Each state now keeps its
whole live stack, from RSP to the stack base.
"""

from __future__ import annotations

import re
from pathlib import Path

from emu.api import run
from emu.detection.unwind import walk
from emu.detection.view import view_of
from emu.scenario import parse_scenario

ROOT = Path(__file__).resolve().parent.parent


def test_every_dispatcher_frame_is_found_at_depth_60() -> None:
    text = (ROOT / "scenarios" / "callback_depth_overflow.toml").read_text()
    # Callbacks nest while 0x200 + (d+1) * cost + 0x6000 <= 0x12000 (the profile's kernel stack,
    # WRK KiCallUserMode/MmGrowKernelStackEx): cost 0x320 lets exactly 60 in (60 * 800 = 48000
    # <= 0xBE00 = 48640 < 61 * 800).
    text = text.replace("[[module]]", "[profile]\ncallback_stack_cost = 0x320\n\n[[module]]", 1)
    text = re.sub(r"\[\[expect\]\][^\[]*", "", text)  # this variant checks only what the test says
    # Each callback keeps 2 KiB of locals, so depth 60 needs well over 64 KiB of user stack.
    text = text.replace(
        "on_message:                   ; (Buffer = RCX, Length = EDX); entered with RSP = 8 mod 16\n    sub rsp, 0x28",
        "on_message:\n    sub rsp, 0x828",
    )
    text = text.replace(
        "    call NtUserMessageCall\n    add rsp, 0x28\n    ret                       ; the inner",
        "    call NtUserMessageCall\n    add rsp, 0x828\n    ret                       ; the inner",
    )
    assert text.count("0x828") == 2
    r = run(parse_scenario(text, str(ROOT / "scenarios" / "deep.toml")))
    assert r.error is None and r.max_depth == 60
    pending = [s for s in r.trace.states if s.pending]
    assert max(s.depth for s in pending) == 60
    for s in pending:
        stack_bytes = s.stack_base - s.rsp
        assert len(s.stack) == stack_bytes  # the whole live stack, however deep
        found = walk(view_of(r, s)).dispatchers
        assert len(found) == s.depth, (s.id, s.depth, len(found), hex(stack_bytes))
    # The deepest states hold far more than the old 64 KiB cap.
    assert max(len(s.stack) for s in pending) > 0x10000
