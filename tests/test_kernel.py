"""The kernel model honours the Windows and Intel facts it claims (DESIGN §4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import asm_scenario
from emu.api import Run, run
from emu.engine import build
from emu.errors import BudgetExceeded, MachineFault, UnimplementedService
from emu.scenario import Scenario, parse_scenario
from emu.winnt import (
    KTRAP_FRAME_RIP,
    KTRAP_FRAME_RSP,
    KTRAP_FRAME_SEGCS,
    STATUS_INVALID_SYSTEM_SERVICE,
    STATUS_NO_CALLBACK_ACTIVE,
)

CALLBACK_APP = """
main:
    sub rsp, 0x28
    mov rbx, 0x1111
    call NtUserMessageCall
    add rsp, 0x28
    ret
on_message:
    push rbx
    mov rbx, 0x2222          ; clobbered on purpose: the trap frame restores the caller's RBX
    movzx eax, byte ptr [rcx]
    add eax, edx
    pop rbx
    ret
"""
CALLBACK_TABLE = '[kernel_callback_table]\n2 = "app!on_message"\n'
CALLBACK_SERVICE = """
[services.NtUserMessageCall]
steps = [{ kind = "callback", api = 2, data = "41 42 43" }, { kind = "return", status = "callback" }]
"""


def scenario(code: str, **kw: str) -> Scenario:
    return parse_scenario(asm_scenario(code, **kw), "test.toml")


def callback_run(extra: str = "") -> Run:
    return run(scenario(CALLBACK_APP, table=CALLBACK_TABLE, services=CALLBACK_SERVICE, extra=extra))


def test_syscall_sets_rcx_and_r11_and_sysret_sets_rax() -> None:
    r = run(
        scenario(
            "main:\n sub rsp, 0x28\n call NtClose\n add rsp, 0x28\n ret",
            services='[services.NtClose]\nsteps = [{ kind = "return", status = 0xC0000008 }]',
        )
    )
    entry = next(t for t in r.trace if t.kind == "syscall" and t.service == "NtClose")
    k = r.trace.state(entry.dst)
    # Intel SDM SYSCALL: RCX <- next RIP, R11 <- RFLAGS; the user context shows RIP after `syscall`.
    assert k.context.rcx == k.context.rip
    assert k.context.r11 == k.context.rflags
    assert r.symbolize(k.rip) == "ntdll!ZwClose+0x14"
    ret = next(t for t in r.trace if t.kind == "sysret")
    assert r.trace.state(ret.dst).context.rax == 0xC0000008
    assert r.exit_status == 0xC0000008


def test_unknown_ssn_returns_invalid_system_service() -> None:
    r = run(scenario("main:\n mov eax, 0x0FFF\n mov r10, rcx\n syscall\n ret"))
    assert r.error is None
    ret = next(t for t in r.trace if t.kind == "sysret")
    assert ret.status == STATUS_INVALID_SYSTEM_SERVICE
    assert r.exit_status == STATUS_INVALID_SYSTEM_SERVICE


def test_unimplemented_service_is_a_named_error() -> None:
    r = run(scenario("main:\n sub rsp, 0x28\n call NtClose\n add rsp, 0x28\n ret"))
    assert isinstance(r.error, UnimplementedService)
    assert "NtClose (SSN 0xf) is not implemented" in str(r.error)
    assert r.stop == "fault"


def test_callback_enters_dispatcher_with_a_ucallout_frame() -> None:
    r = callback_run()
    cb = next(t for t in r.trace if t.kind == "callback")
    s = r.trace.state(cb.dst)
    syscall_state = r.trace.state(cb.src)
    rsp = s.context.rsp
    assert rsp % 16 == 0
    assert r.symbolize(s.rip) == "ntdll!KiUserCallbackDispatcher"
    buffer = s.stack_word(rsp + 0x20)
    assert buffer is not None
    assert int.from_bytes(s.stack[0x28:0x2C], "little") == 3  # Length
    assert int.from_bytes(s.stack[0x2C:0x30], "little") == 2  # ApiNumber
    assert s.stack_word(rsp + 0x30) == syscall_state.context.rip  # MachineFrame.Rip
    assert s.stack_word(rsp + 0x48) == syscall_state.context.rsp  # MachineFrame.Rsp
    # WRK callback.c KeUserModeCallback: frame = (old - (ROUND_UP(len, 16) + 0x58)) & ~15, the
    # input right above it (with old = 8 mod 16 and len 3, ReactOS's formula agrees).
    old = syscall_state.context.rsp
    assert rsp == (old - (0x10 + 0x58)) & ~0xF and buffer == rsp + 0x58
    assert s.stack[buffer - rsp : buffer - rsp + 3] == b"ABC"
    assert r.exit_status == 0x41 + 3  # the callback saw Buffer and Length


def test_service_return_restores_the_callers_trap_frame() -> None:
    r = callback_run()
    ret = next(t for t in r.trace if t.kind == "sysret")
    ctx = r.trace.state(ret.dst).context
    assert ctx.rbx == 0x1111
    assert r.symbolize(ctx.rip) == "win32u!NtUserMessageCall+0x14"


def test_int_2e_path_when_kuser_system_call_is_set() -> None:
    r = callback_run("[machine]\nsystem_call = 1\n")
    assert r.error is None
    pending = [s for s in r.trace.states if s.pending]
    assert [r.symbolize(s.rip) for s in pending] == ["ntdll!ZwCallbackReturn+0x17"]
    assert [d.state for d in r.detections] == [pending[0].id]
    assert r.exit_status == 0x44
    entries = [t for t in r.trace if t.kind == "syscall"]
    assert entries and all(t.detail == "entered via int 2Eh" for t in entries)


def test_windows7_profile_uses_its_stub_and_ssn() -> None:
    r10 = callback_run()
    text = asm_scenario(CALLBACK_APP, table=CALLBACK_TABLE, services=CALLBACK_SERVICE)
    r7 = run(parse_scenario(text.replace('name = "t"', 'name = "t"\nprofile = "win7-sp1"'), "w7.toml"))
    assert r7.error is None
    ssn = {r.scenario.profile.name: next(t.ssn for t in r.trace if t.service == "NtCallbackReturn") for r in (r7, r10)}
    assert ssn == {"win7-sp1": 0x02, "win10-22h2": 0x05}
    assert [d.rip for d in r7.detections] == ["ntdll!ZwCallbackReturn+0xa"]


def test_registers_dispatcher_convention() -> None:
    r = callback_run('[profile]\ndispatcher = "registers"\n')
    assert r.error is None
    cb = next(t for t in r.trace if t.kind == "callback")
    s = r.trace.state(cb.dst)
    assert s.context.rsp % 16 == 8
    assert (s.context.rcx, s.context.r8) == (2, 3)
    assert s.context.rdx == s.stack_word(s.context.rsp + 8 + 0x20)
    assert [d.depth for d in r.detections] == [1]
    assert r.exit_status == 0x44


def test_no_callback_active_outside_a_callback() -> None:
    r = run(
        scenario(
            "main:\n sub rsp, 0x28\n xor ecx, ecx\n xor edx, edx\n xor r8d, r8d\n"
            " call ZwCallbackReturn\n add rsp, 0x28\n ret"
        )
    )
    assert r.exit_status == STATUS_NO_CALLBACK_ACTIVE
    assert not any(s.pending for s in r.trace.states)
    assert r.detections == []


STOP_AT_FAULTS = '[machine]\nexceptions = "stop"\n'


def test_memory_fault_names_access_address_and_symbol() -> None:
    r = run(scenario("main:\n nop\n mov qword ptr [0x10], rax\n ret", extra=STOP_AT_FAULTS))
    assert isinstance(r.error, MachineFault)
    assert str(r.error) == "memory fault: write of 8 byte(s) at 0x10 (unmapped) at app!main+0x1"
    assert r.trace.transitions[-1].kind == "fault"


def test_stack_overflow_hits_the_guard_page() -> None:
    r = run(scenario("main:\n push rax\n jmp main", extra=STOP_AT_FAULTS))
    assert isinstance(r.error, MachineFault)
    assert "guard page of thread 0 stack (stack overflow)" in str(r.error)


def test_instruction_budget() -> None:
    r = run(scenario("main:\n jmp main", extra="[budgets]\ninstructions = 5000\n"))
    assert isinstance(r.error, BudgetExceeded)
    assert str(r.error) == "budget 'instructions' exceeded (limit 5000) at app!main"


def test_wall_time_budget() -> None:
    r = run(scenario("main:\n jmp main", extra="[budgets]\ninstructions = 1000000000000\nwall_time = 0.2\n"))
    assert isinstance(r.error, BudgetExceeded)
    assert r.error.budget == "wall_time"


def test_callback_depth_budget() -> None:
    code = "main:\n sub rsp, 0x28\n call NtUserMessageCall\n add rsp, 0x28\n ret\non_message:\n jmp main"
    r = run(scenario(code, table=CALLBACK_TABLE, services=CALLBACK_SERVICE, extra="[budgets]\ncallback_depth = 3\n"))
    assert isinstance(r.error, BudgetExceeded)
    assert r.error.budget == "callback_depth"
    assert r.max_depth == 3


def test_trap_frame_layout() -> None:
    r = callback_run()
    s = r.trace.state(r.trace.transitions[0].dst)
    frame = s.trap_frame()
    assert frame is not None
    raw = frame.to_bytes()
    assert len(raw) == 0x190
    assert int.from_bytes(raw[KTRAP_FRAME_RIP : KTRAP_FRAME_RIP + 8], "little") == s.context.rip
    assert int.from_bytes(raw[KTRAP_FRAME_RSP : KTRAP_FRAME_RSP + 8], "little") == s.context.rsp
    assert raw[KTRAP_FRAME_SEGCS] == 0x33


def test_threads_get_teb_peb_and_kernel_callback_table(tmp_path: Path) -> None:
    p = build(scenario(CALLBACK_APP, table=CALLBACK_TABLE, services=CALLBACK_SERVICE))
    m = p.machine
    teb = p.thread.teb
    assert m.read_u64(teb + 0x30) == teb
    peb = m.read_u64(teb + 0x60)
    table = m.read_u64(peb + 0x58)
    assert table == p.callback_table
    assert m.read_u64(table + 2 * 8) == p.images[-1].symbols["on_message"]
    assert m.read_u64(teb + 0x08) == p.thread.stack_base
    assert m.read(0x7FFE0308, 1) == b"\0"


def test_refused_callback_is_named_on_the_next_transition(shipped_runs: dict[str, Run]) -> None:
    r = shipped_runs["callback_depth_overflow"]
    refused = [t for t in r.trace if "refused" in t.detail]
    # 23 levels in use: 0x200 + 24 * 0x800 = 0xC200 bytes, and 0x6000 more to commit
    # passes the 0x12000 reserve (WRK KiCallUserMode -> MmGrowKernelStackEx).
    assert [(t.kind, t.detail) for t in refused] == [
        (
            "sysret",
            "callback api 2 refused: STATUS_STACK_OVERFLOW "
            "(kernel stack: 0xc200 bytes in use + 0x6000 to commit > 0x12000 (MmGrowKernelStack))",
        )
    ]
    assert refused[0].depth == r.max_depth == 23


def test_assembly_that_would_hang_keystone_is_refused() -> None:
    from emu.errors import ScenarioError

    with pytest.raises(ScenarioError) as e:
        build(scenario("main:\n nop\n [rax]\n ret"))
    assert "line 3 of the code: a statement cannot start with '['" in str(e.value)
