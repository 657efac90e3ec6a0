"""The registers KiUserCallbackDispatcher starts with, per source.

Every kernel leaves for the dispatcher through SYSRET (Intel SDM vol. 2B: RIP <- RCX,
RFLAGS <- R11), so RCX holds the dispatcher's own address. Then:

* WRK ``base/ntos/ke/amd64/callout.asm`` KiCallUserMode (no user APC pending): ``mov r8,
  TrRsp``; ``mov r9, TrRbp``; ``xor r10, r10``; ``pxor xmm0..xmm5``; ``mov rcx,
  KeUserCallbackDispatcher``; ``mov r11, TrEFlags``; ``mov rbp, r9``; ``mov rsp, r8``;
  ``sysretq``. KeUserModeCallback set TrRsp to the callout frame (WRK ``ke/amd64/callback.c``).
* Windows 10/11 (observed behaviour, profile value ``windows10``): as WRK with RDX, R8, R9
  zero as well.
* ReactOS ``ntoskrnl/ke/amd64/usercall_asm.S`` KiUserCallbackExit: ``xor`` of RBX, RDI, RSI,
  RBP, R12-R15, RAX, RDX, R8-R10, ``pxor`` of XMM0-15, ``mov r11, EFLAGS_IF_MASK`` (0x200).

main loads a distinct value into each register (XMMn = 1 << n) and calls
NtUserMessageCall; the callback returns OR(XMM0..XMM5) | XMM6 << 8 as its status, so the
status says which vector registers survived the trip into user mode.
"""

from __future__ import annotations

import pytest

from emu.api import Run, run
from emu.errors import ScenarioError
from emu.scenario import parse_scenario

VALUES = {"rbx": 0x1111, "rbp": 0x5555, "rsi": 0x6666, "rdi": 0x7777, "r12": 0xC0C0, "r15": 0xF0F0}

SCENARIO = """
[scenario]
name = "entry_registers"
profile = "{profile}"
{override}
[[module]]
name = "app"
code = '''
main:
    push rbp
    sub rsp, 0x20
{loads}
{xmm}
    xor ecx, ecx
    mov edx, 0x000F
    call NtUserMessageCall
    add rsp, 0x20
    pop rbp
    ret

on_message:
    movq rax, xmm0
    movq rcx, xmm1
    or rax, rcx
    movq rcx, xmm2
    or rax, rcx
    movq rcx, xmm3
    or rax, rcx
    movq rcx, xmm4
    or rax, rcx
    movq rcx, xmm5
    or rax, rcx
    movq rcx, xmm6
    shl rcx, 8
    or rax, rcx
    ret
'''

[thread]
entry = "app!main"

[kernel_callback_table]
size = 4
2 = "app!on_message"

[services.NtUserMessageCall]
steps = [{{ kind = "callback", api = 2 }}, {{ kind = "return", status = "callback" }}]
"""


def _run(profile: str, registers: str | None = None) -> Run:
    loads = "\n".join(f"    mov {r}, {v:#x}" for r, v in VALUES.items())
    xmm = "\n".join(f"    mov eax, {1 << n:#x}\n    movq xmm{n}, rax" for n in range(7))
    override = f'[profile]\ndispatcher_registers = "{registers}"\n' if registers else ""
    text = SCENARIO.format(profile=profile, override=override, loads=loads, xmm=xmm)
    r = run(parse_scenario(text, "entry_registers.toml"))
    assert r.error is None, r.error
    return r


def _entry(r: Run) -> tuple[dict[str, int], dict[str, int], int]:
    """(registers at the dispatcher, registers the syscall's trap frame kept, the callback's status)."""
    (cb,) = [t for t in r.trace if t.kind == "callback"]
    (ret,) = [t for t in r.trace if t.kind == "callback_return"]
    at = r.trace.state(cb.dst).context._asdict()
    trap = r.trace.state(cb.src).context._asdict()
    assert ret.status is not None
    return at, trap, ret.status


def _dispatcher(r: Run) -> int:
    (ntdll,) = [i for i in r.images if i.name == "ntdll"]
    return ntdll.symbols["KiUserCallbackDispatcher"]


@pytest.mark.parametrize("profile", ["win10-22h2", "win11-23h2"])
def test_windows10_scrubs_the_volatile_registers(profile: str) -> None:
    r = _run(profile)
    at, trap, status = _entry(r)
    assert at["rip"] == at["rcx"] == _dispatcher(r)
    assert at["r11"] == at["rflags"] == trap["rflags"]  # R11 = the trap frame's EFLAGS
    assert (at["rdx"], at["r8"], at["r9"], at["r10"]) == (0, 0, 0, 0)
    assert at["rbp"] == VALUES["rbp"]  # RBP from the trap frame
    assert at["rsp"] % 16 == 0 and at["rsp"] < trap["rsp"]  # the callout frame
    assert status == 0x40 << 8  # XMM0-5 zero, XMM6 (non-volatile) kept


def test_wrk_leaves_rsp_and_rbp_in_r8_and_r9() -> None:
    r = _run("win7-sp1")
    at, trap, status = _entry(r)
    assert r.scenario.profile.dispatcher_registers == "wrk"
    assert at["rcx"] == _dispatcher(r) and at["r11"] == trap["rflags"]
    assert at["r10"] == 0
    assert (at["r8"], at["r9"]) == (at["rsp"], VALUES["rbp"])
    assert at["rdx"] == trap["rdx"] == 0x000F  # WRK does not touch RDX on this path
    assert status == 0x40 << 8


def test_reactos_zeroes_everything_but_rcx_r11_and_rsp() -> None:
    r = _run("win10-22h2", "reactos")
    at, trap, status = _entry(r)
    assert at["rcx"] == _dispatcher(r) and at["r11"] == 0x200
    assert at["rflags"] == 0x202  # SYSRET: RFLAGS <- R11, bit 1 always set
    zero = ("rax", "rdx", "rbx", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r12", "r13", "r14", "r15")
    assert {n: at[n] for n in zero} == dict.fromkeys(zero, 0)
    assert at["rsp"] % 16 == 0 and at["rsp"] < trap["rsp"]  # the callout frame, from the trap frame
    assert status == 0  # XMM0-15 zero, XMM6 included


def test_the_original_callers_registers_come_back_after_the_callback() -> None:
    r = _run("win10-22h2", "reactos")
    (sysret,) = [t for t in r.trace if t.kind == "sysret" and t.service == "NtUserMessageCall"]
    back = r.trace.state(sysret.dst).context
    for name, value in VALUES.items():
        assert getattr(back, name) == value  # the trap frame the service resumes with is the syscall's


def test_an_unknown_register_policy_is_one_line() -> None:
    text = SCENARIO.format(
        profile="win10-22h2", override='[profile]\ndispatcher_registers = "linux"\n', loads="", xmm=""
    )
    with pytest.raises(ScenarioError, match=r"profile\.dispatcher_registers.*expected one of wrk, windows10, reactos"):
        parse_scenario(text, "x.toml")
