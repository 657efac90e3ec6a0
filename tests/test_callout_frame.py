"""Where KeUserModeCallback puts the UCALLOUT_FRAME, per source (profile ``callout_frame``).

WRK ``base/ntos/ke/amd64/callback.c`` KeUserModeCallback::

    Length = ((InputLength + STACK_ROUND) & ~STACK_ROUND) + UCALLOUT_FRAME_LENGTH;
    CalloutFrame = (PUCALLOUT_FRAME)((OldStack - Length) & ~STACK_ROUND);

with STACK_ROUND 15 and UCALLOUT_FRAME_LENGTH 0x58 (ksamd64.inc CalloutFrameLength), the input
at CalloutFrame + 1. ReactOS ``ntoskrnl/ke/amd64/usercall.c`` KeUserModeCallback::

    UserArguments = ALIGN_DOWN_POINTER_BY(OldStack - ArgumentLength, 16) - 8;
    CalloutFrame = ((PUCALLOUT_FRAME)UserArguments) - 1;

Worked by hand for OldStack = 0x7F08 (8 mod 16, as after a `call`):

* InputLength 0:  WRK (0x7F08 - 0x58) & ~15 = 0x7EB0; ReactOS 0x7F00 - 8 - 0x58 = 0x7EA0.
* InputLength 8:  WRK (0x7F08 - 0x68) & ~15 = 0x7EA0; ReactOS 0x7F00 - 8 - 0x58 = 0x7EA0.
* InputLength 16: WRK (0x7F08 - 0x68) & ~15 = 0x7EA0; ReactOS 0x7EF0 - 8 - 0x58 = 0x7E90.

For OldStack = 0x7F00 (0 mod 16) and InputLength 16: WRK (0x7F00 - 0x68) & ~15 = 0x7E90,
ReactOS 0x7EF0 - 8 - 0x58 = 0x7E90: the same.
"""

from __future__ import annotations

import dataclasses

import pytest

from conftest import asm_scenario
from emu.api import Run, run
from emu.errors import ScenarioError
from emu.kernel.callout import place_frame
from emu.profile import get_profile
from emu.scenario import parse_scenario


@pytest.mark.parametrize(
    ("old", "length", "wrk", "reactos"),
    [
        (0x7F08, 0, 0x7EB0, 0x7EA0),
        (0x7F08, 8, 0x7EA0, 0x7EA0),
        (0x7F08, 16, 0x7EA0, 0x7E90),
        (0x7F00, 16, 0x7E90, 0x7E90),
    ],
)
def test_frame_placement_worked_from_both_formulas(old: int, length: int, wrk: int, reactos: int) -> None:
    win10 = get_profile("win10-22h2")
    assert place_frame(win10, old, length) == wrk
    assert place_frame(dataclasses.replace(win10, callout_frame="reactos"), old, length) == reactos


def test_windows_profiles_use_wrk() -> None:
    assert {get_profile(n).callout_frame for n in ("win7-sp1", "win10-22h2", "win11-23h2")} == {"wrk"}


SCENARIO = """
[scenario]
name = "frame"
profile = "win10-22h2"
{override}
[[module]]
name = "app"
code = '''
main:
    sub rsp, 0x28
    call NtUserMessageCall
    add rsp, 0x28
    ret
on_message:
    xor eax, eax
    ret
'''

[thread]
entry = "app!main"

[kernel_callback_table]
size = 4
2 = "app!on_message"

[services.NtUserMessageCall]
steps = [{{ kind = "callback", api = 2, data = "{data}" }}, {{ kind = "return", status = "callback" }}]
"""


def _frame(placement: str | None, data: bytes) -> tuple[int, int, bytes]:
    """(the trap frame's RSP, RSP at the dispatcher, the 0x58-byte frame and the input as written)."""
    override = f'[profile]\ncallout_frame = "{placement}"\n' if placement else ""
    text = SCENARIO.format(override=override, data=data.hex(" ") if data else "")
    r: Run = run(parse_scenario(text, "frame.toml"))
    assert r.error is None
    (cb,) = [t for t in r.trace if t.kind == "callback"]
    old = r.trace.state(cb.src).rsp
    state = r.trace.state(cb.dst)
    return old, state.rsp, state.stack[: 0x58 + len(data)]


@pytest.mark.parametrize("length", [0, 8, 16, 24])
def test_the_run_puts_the_frame_where_each_source_does(length: int) -> None:
    data = bytes(range(1, length + 1))
    old, wrk, frame = _frame(None, data)
    assert old % 16 == 8  # after main's call into the stub: the usual case
    assert wrk == (old - (((length + 15) & ~15) + 0x58)) & ~15
    old_r, reactos, _ = _frame("reactos", data)
    assert old_r == old and reactos == ((old - length) & ~15) - 8 - 0x58
    assert reactos == wrk - (0 if 1 <= length % 16 <= 8 else 0x10)  # old = 8 (mod 16)
    # The frame's fields (ReactOS sdk/include/ndk/amd64/ketypes.h UCALLOUT_FRAME): Buffer +0x20
    # = the input right above the frame, Length +0x28, ApiNumber +0x2C, MachineFrame.Rsp +0x48.

    def word(off: int) -> int:
        return int.from_bytes(frame[off : off + 8], "little")

    assert word(0x20) == wrk + 0x58 and frame[0x58:] == data
    assert int.from_bytes(frame[0x28:0x2C], "little") == length and frame[0x2C:0x30] == b"\x02\0\0\0"
    assert word(0x48) == old


def test_an_unknown_placement_is_one_line() -> None:
    text = SCENARIO.format(override='[profile]\ncallout_frame = "wine"\n', data="")
    with pytest.raises(ScenarioError, match=r"profile\.callout_frame.*expected one of wrk, reactos, got 'wine'"):
        parse_scenario(text, "x.toml")


LOOP_CODE = """
main:
    push rbx
    push rbp
    sub rsp, 0x28
    mov ebx, 3
again:
    lea rbp, [rbx + 0x100]       ; RBP changes each time; WRK passes it to the dispatcher in R9
    test ebx, 1
    jz even
    sub rsp, 0x10                ; odd counts call from 0x10 lower: another frame place
    call NtUserMessageCall
    add rsp, 0x10
    jmp next
even:
    call NtUserMessageCall
next:
    dec ebx
    jnz again
    add rsp, 0x28
    pop rbp
    pop rbx
    xor eax, eax
    ret
on_message:
    xor eax, eax
    ret
"""
LOOP_TABLE = '[kernel_callback_table]\nsize = 4\n2 = "app!on_message"\n'
LOOP_SERVICE = (
    '[services.NtUserMessageCall]\nsteps = [{ kind = "callback", api = 2, data = "01 02 03" },'
    ' { kind = "return", status = "callback" }]\n'
)


@pytest.mark.parametrize("registers", ["wrk", "windows10", "reactos"])
def test_repeated_callbacks_from_one_place_enter_with_each_calls_registers(registers: str) -> None:
    # Every callback's frame is laid out below that call's own trap frame (WRK callback.c
    # KeUserModeCallback), and the dispatcher starts from that call's registers (callout.asm
    # KiCallUserMode: R9 = TrRbp under WRK; ReactOS usercall_asm.S zeroes RBX and RBP): nothing
    # carries over from an earlier callback made from the same place.
    extra = f'profile = "win10-22h2"\n[profile]\ndispatcher_registers = "{registers}"\n'
    text = asm_scenario(LOOP_CODE, extra=extra, table=LOOP_TABLE, services=LOOP_SERVICE)
    r: Run = run(parse_scenario(text, "l.toml"))
    assert r.error is None and r.exit_status == 0
    calls = [t for t in r.trace if t.kind == "callback"]
    assert len(calls) == 3
    for count, cb in zip((3, 2, 1), calls, strict=True):
        trap, entry = r.trace.state(cb.src), r.trace.state(cb.dst)
        assert trap.context.rbx == count and trap.context.rbp == count + 0x100
        assert entry.rsp == (trap.rsp - (0x10 + 0x58)) & ~15  # 3 input bytes round up to 0x10
        assert int.from_bytes(entry.stack[0x48:0x50], "little") == trap.rsp  # MachineFrame.Rsp
        assert entry.stack[0x58:0x5B] == b"\x01\x02\x03"
        if registers == "reactos":
            assert (entry.context.rbx, entry.context.rbp, entry.context.r9) == (0, 0, 0)
        else:
            assert entry.context.rbx == count and entry.context.rbp == count + 0x100
            assert entry.context.r9 == (count + 0x100 if registers == "wrk" else 0)
    assert calls[0].rsp != calls[1].rsp and calls[0].rsp == calls[2].rsp  # odd counts call 0x10 lower
