"""Faults delivered as Windows exceptions: codes, addresses, the frame on the user stack, the
built-in ntdll's dispatcher, callbacks, and Wine's own dispatcher.

Expected values come from the sources: WRK ke/amd64/trap.asm (each trap's code, parameters and
address), ke/amd64/decode.c (privileged instructions, divide errors), ke/amd64/exceptn.c
(KiDispatchException's frame), winnt.h via MS docs (CONTEXT and EXCEPTION_RECORD layouts) and
ntstatus.h (the codes).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from real_ntdll import RealNtdllError, build_exceptions_dll, wine_dlls

from conftest import asm_scenario
from emu.api import Run, run
from emu.detection.score import score
from emu.engine import build
from emu.errors import MachineFault
from emu.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
STOP = '[machine]\nexceptions = "stop"\n'
# A vectored handler that puts the ExceptionCode in Context.Rax, the record's address, first two
# parameters and NumberParameters in app's data, and resumes at app!resume (after the body).
VEH = """
veh:
    mov rax, qword ptr [rcx]
    mov edx, dword ptr [rax]
    mov r8, qword ptr [rax + 0x10]
    mov qword ptr [rip + seen_address], r8
    mov r8d, dword ptr [rax + 0x18]
    mov qword ptr [rip + seen_count], r8
    mov r8, qword ptr [rax + 0x20]
    mov qword ptr [rip + seen_info0], r8
    mov r8, qword ptr [rax + 0x28]
    mov qword ptr [rip + seen_info1], r8
    mov rax, qword ptr [rcx + 8]
    mov r8, qword ptr [rax + 0xf8]
    mov qword ptr [rip + seen_rip], r8
    mov r8d, dword ptr [rax + 0x44]
    mov qword ptr [rip + seen_eflags], r8
    mov qword ptr [rax + 0x78], rdx
    lea rdx, [rip + resume]
    mov qword ptr [rax + 0xf8], rdx
    mov eax, -1
    ret
"""
DATA = """
seen_address:
    .quad 0
seen_count:
    .quad 0
seen_info0:
    .quad 0
seen_info1:
    .quad 0
seen_rip:
    .quad 0
seen_eflags:
    .quad 0
"""
REGISTER = "main:\n sub rsp, 0x28\n lea rdx, [rip + veh]\n mov ecx, 1\n call RtlAddVectoredExceptionHandler\n"


def handled_run(body: str, extra: str = "") -> tuple[Run, dict[str, int]]:
    """Run ``body`` after app!veh is registered; what the handler saw, read from app's data."""
    code = REGISTER + body + "\nresume:\n add rsp, 0x28\n ret\n" + VEH
    process = build(parse_scenario(asm_scenario(code, data=DATA, extra=extra), "t.toml"))
    r = Run.of(process.run())
    assert r.error is None, r.error
    app = next(i for i in r.images if i.name == "app")
    names = ("seen_address", "seen_count", "seen_info0", "seen_info1", "seen_rip", "seen_eflags")
    m = {n: process.machine.read_u64(app.symbols[n]) for n in names}
    m["fault"] = app.symbols["fault"]
    return r, m


def test_read_write_and_execute_access_violations() -> None:
    # KiPageFault: STATUS_ACCESS_VIOLATION, ExceptionAddress = the instruction, two parameters:
    # the load/store indicator (0 read, 1 write, 8 execute: MS docs EXCEPTION_RECORD) and the address.
    r, m = handled_run("fault:\n mov rax, qword ptr [0x40]")
    assert r.exit_status == 0xC0000005
    assert (m["seen_address"], m["seen_count"], m["seen_info0"], m["seen_info1"]) == (m["fault"], 2, 0, 0x40)
    r, m = handled_run("fault:\n mov qword ptr [0x48], 1")
    assert (m["seen_info0"], m["seen_info1"], r.exit_status) == (1, 0x48, 0xC0000005)


def test_execute_fault_reports_the_target() -> None:
    # A call to an unmapped address faults on the fetch: RIP and ExceptionAddress are the target.
    code = (
        REGISTER + "fault:\n mov rax, 0x50000\n call rax\n add rsp, 0x28\n ret\n"
        "veh:\n mov rax, qword ptr [rcx]\n mov edx, dword ptr [rax]\n mov r8, qword ptr [rax + 0x20]\n"
        " mov r9, qword ptr [rax + 0x28]\n mov rax, qword ptr [rcx + 8]\n"
        " cmp r8, 8\n jne bad\n cmp r9, 0x50000\n jne bad\n cmp qword ptr [rax + 0xf8], 0x50000\n jne bad\n"
        " mov r8, qword ptr [rax + 0x98]\n mov r8, qword ptr [r8]\n mov qword ptr [rax + 0xf8], r8\n"
        " add qword ptr [rax + 0x98], 8\n mov qword ptr [rax + 0x78], rdx\n mov eax, -1\n ret\n"
        "bad:\n mov qword ptr [rax + 0x78], 0xbad\n mov eax, -1\n ret\n"
    )
    r = run(parse_scenario(asm_scenario(code), "t.toml"))
    assert r.error is None and r.exit_status == 0xC0000005


def test_divide_error_is_reported_at_the_div_and_named() -> None:
    # #DE is a fault: the div itself (Intel SDM vol. 3A 6.15); KiOp_Div: a zero divisor is
    # STATUS_INTEGER_DIVIDE_BY_ZERO, a quotient that does not fit STATUS_INTEGER_OVERFLOW.
    r, m = handled_run(" xor ecx, ecx\n mov eax, 1\n xor edx, edx\nfault:\n div ecx")
    assert r.exit_status == 0xC0000094 and m["seen_address"] == m["fault"] == m["seen_rip"]
    first = next(t for t in r.trace if t.kind == "exception")
    assert r.symbolize(first.rip) == r.symbolize(m["fault"]) and "divide error (#DE)" in first.detail
    r, m = handled_run(" mov rax, 0x8000000000000000\n cqo\n mov rcx, -1\nfault:\n idiv rcx")
    assert r.exit_status == 0xC0000095


def test_int3_address_and_context_rip_are_the_int3() -> None:
    # KiBreakpointTrap: ExceptionAddress = RIP - 1, one parameter (BREAKPOINT_BREAK = 0);
    # KiDispatchException: Context.Rip -= 1 (WRK trap.asm, exceptn.c).
    r, m = handled_run("fault:\n int3")
    assert r.exit_status == 0x80000003
    assert (m["seen_address"], m["seen_rip"], m["seen_count"], m["seen_info0"]) == (m["fault"], m["fault"], 1, 0)


def test_illegal_instruction_and_into() -> None:
    r, m = handled_run("fault:\n ud2")
    assert r.exit_status == 0xC000001D and m["seen_address"] == m["fault"] and m["seen_count"] == 0
    # `into` is invalid in 64-bit mode (Intel SDM vol. 2A INTO): #UD, not #OF.
    r, m = handled_run("fault:\n .byte 0xce")
    assert r.exit_status == 0xC000001D


def test_int_4_raises_integer_overflow() -> None:
    # KiOverflowTrap (vector 4, a user-callable gate): STATUS_INTEGER_OVERFLOW, address RIP - 1.
    r, m = handled_run("fault:\n int 4")
    assert r.exit_status == 0xC0000095 and m["seen_address"] == m["fault"] + 1


@pytest.mark.parametrize(
    "insn", ["cli", "hlt", "wrmsr", "mov rax, cr0", "mov cr3, rax", "rdmsr", "invd", "lgdt [rax]", "sti", "clts"],
)  # fmt: skip
def test_privileged_instructions_fault_at_cpl3(insn: str) -> None:
    # WRK decode.c KiOpOneByteTable/KiOpTwoByteTable list these as KiOp_Priv: the #GP becomes
    # STATUS_PRIVILEGED_INSTRUCTION at the instruction.
    r, m = handled_run(f" xor eax, eax\n xor edx, edx\nfault:\n {insn}")
    assert r.exit_status == 0xC0000096, insn
    assert m["seen_address"] == m["fault"]
    # The CONTEXT's selectors are the user ones: the CPU runs at CPL 3 (CS 0x33, SS 0x2B).
    exc = [t for t in r.trace if t.kind == "exception"][1]
    ctx = r.trace.state(exc.dst).stack
    assert struct.unpack_from("<HH", ctx, 0x38)[0] == 0x33 and struct.unpack_from("<H", ctx, 0x42)[0] == 0x2B


def test_general_protection_without_a_decode_entry_is_an_access_violation() -> None:
    # `int 0x80` has no user-mode gate: #GP; KiPreprocessFault: STATUS_ACCESS_VIOLATION, {0, -1}.
    r, m = handled_run("fault:\n int 0x80")
    assert r.exit_status == 0xC0000005 and (m["seen_info0"], m["seen_info1"]) == (0, 2**64 - 1)


def test_single_step_traps_after_the_instruction_and_clears_tf() -> None:
    # KiDebugTrapOrFault: STATUS_SINGLE_STEP at the next instruction; TF cleared (WRK trap.asm).
    body = " pushfq\n or qword ptr [rsp], 0x100\n popfq\n nop\nfault:\n nop"
    r, m = handled_run(body)
    assert r.exit_status == 0x80000004
    assert m["seen_address"] == m["fault"] and m["seen_eflags"] & 0x100 == 0


def test_exception_frame_layout_on_the_user_stack() -> None:
    # WRK KiDispatchException: machine frame at (Rsp - 0x28) & ~15, the record (0xA0 bytes)
    # below it, CONTEXT_EX (0x20, Windows 7 SP1+) and CONTEXT (0x4D0) below that; RSP = CONTEXT.
    r, m = handled_run("fault:\n mov rax, qword ptr [0x40]")
    trap, delivered = [t for t in r.trace if t.kind == "exception"]
    faulting = r.trace.state(trap.dst).context
    entry = r.trace.state(delivered.dst)
    rsp = entry.context.rsp
    assert rsp % 16 == 0 and r.symbolize(entry.context.rip) == "ntdll!KiUserExceptionDispatcher"
    assert rsp == ((faulting.rsp - 0x28) & ~15) - 0xA0 - 0x20 - 0x4D0
    s = entry.stack
    (flags,) = struct.unpack_from("<I", s, 0x30)
    assert flags == 0x10001F  # CONTEXT_FULL | CONTEXT_SEGMENTS | CONTEXT_DEBUG_REGISTERS
    assert struct.unpack_from("<Q", s, 0xF8)[0] == m["fault"] and struct.unpack_from("<Q", s, 0x98)[0] == faulting.rsp
    code, _, _, address, n = struct.unpack_from("<IIQQI", s, 0x4F0)
    assert (code, address, n) == (0xC0000005, m["fault"], 2)
    assert struct.unpack_from("<QQQQQ", s, 0x590) == (m["fault"], 0x33, faulting.rflags, faulting.rsp, 0x2B)


def test_unhandled_exception_ends_the_process_with_its_code() -> None:
    r = run(parse_scenario(asm_scenario("main:\n sub rsp, 0x28\n mov qword ptr [0x10], 1\n ret"), "t.toml"))
    assert r.error is None and r.exit_status == 0xC0000005
    kinds = [t.kind for t in r.trace]
    assert kinds == ["exception", "exception", "syscall", "exit"]
    assert r.trace.transitions[2].service == "NtRaiseException" and "second chance" in r.trace.transitions[3].detail


def test_stop_mode_keeps_the_old_stop_at_the_first_fault() -> None:
    r = run(parse_scenario(asm_scenario("main:\n xor ecx, ecx\n div ecx\n ret", extra=STOP), "t.toml"))
    assert isinstance(r.error, MachineFault) and r.stop == "fault"
    assert str(r.error) == "divide error (#DE): integer divide by zero at app!main+0x2"


def test_bad_exceptions_value_is_one_line() -> None:
    from emu.errors import ScenarioError

    with pytest.raises(ScenarioError, match=r'\[machine.exceptions\]: expected "deliver" or "stop", got \'x\''):
        parse_scenario(asm_scenario("main:\n ret", extra='[machine]\nexceptions = "x"\n'), "t.toml")


def test_a_handler_that_never_fixes_the_fault_is_stopped_by_a_budget() -> None:
    code = REGISTER + "fault:\n mov rax, qword ptr [0x40]\n ret\nveh:\n mov eax, -1\n ret\n"
    text = asm_scenario(code, extra="[budgets]\nwall_time = 2\nstates = 400\n")
    r = run(parse_scenario(text, "t.toml"))
    assert r.stop == "budget" and "budget 'states' exceeded" in str(r.error)


def test_a_handler_that_corrupts_the_stack_ends_the_process() -> None:
    # The handler points RSP at unmapped memory: the next fault's frame cannot be written, so
    # KiDispatchException's probe fails and the second chance ends the process.
    code = (
        REGISTER + "fault:\n mov rax, qword ptr [0x40]\n ret\n"
        "veh:\n mov rax, qword ptr [rcx + 8]\n mov qword ptr [rax + 0x98], 0x40\n mov eax, -1\n ret\n"
    )
    r = run(parse_scenario(asm_scenario(code, extra="[budgets]\nwall_time = 5\n"), "t.toml"))
    assert r.error is None and r.exit_status == 0xC0000005
    assert "does not fit on the user stack" in r.trace.transitions[-1].detail


def test_nt_raise_exception_first_chance_reaches_the_handlers() -> None:
    # RtlRaiseException (user mode): ExceptionAddress = its caller's RIP, dispatched in place.
    code = (
        REGISTER + " lea rcx, [rip + record]\nfault:\n call RtlRaiseException\n add rsp, 0x28\n ret\n"
        "veh:\n mov rax, qword ptr [rcx]\n mov edx, dword ptr [rax]\n mov rax, qword ptr [rcx + 8]\n"
        " mov qword ptr [rax + 0x78], rdx\n mov eax, -1\n ret\n"
    )
    data = "record:\n .long 0xE0000001\n .long 0\n .quad 0\n .quad 0\n .long 0\n .long 0\n .space 120\n"
    r = run(parse_scenario(asm_scenario(code, data=data), "t.toml"))
    assert r.error is None and r.exit_status == 0xE0000001
    assert [t.kind for t in r.trace][:1] == ["syscall"] and r.trace.transitions[0].service == "NtContinue"


CALLBACK = """
[kernel_callback_table]
size = 5
2 = "app!on_message"
[services.NtUserMessageCall]
steps = [{ kind = "callback", api = 2 }, { kind = "return", status = "callback" }]
"""


@pytest.mark.parametrize(
    "profile, status, kinds",
    [
        # Windows 7 SP1 swallows (MS KB976038): the callback's result is the exception code.
        ("win7-sp1", 0xC000001D, ["syscall", "callback", "exception", "exception", "unwind", "syscall",
                                  "callback_return", "sysret", "syscall", "exit"]),
        # Windows 10/11: STATUS_FATAL_USER_CALLBACK_EXCEPTION ends the process.
        ("win11-23h2", 0xC000041D, ["syscall", "callback", "exception", "exception", "syscall", "exit"]),
    ],
)  # fmt: skip
def test_exception_escaping_a_callback_per_profile(profile: str, status: int, kinds: list[str]) -> None:
    code = "main:\n sub rsp, 0x28\n call NtUserMessageCall\n add rsp, 0x28\n ret\non_message:\n ud2\n ret"
    text = asm_scenario(code, table=CALLBACK).replace('name = "t"', f'name = "t"\nprofile = "{profile}"')
    r = run(parse_scenario(text, "t.toml"))
    assert r.error is None and r.exit_status == status
    assert [t.kind for t in r.trace] == kinds


def test_profile_override_of_the_callback_policy() -> None:
    code = "main:\n sub rsp, 0x28\n call NtUserMessageCall\n add rsp, 0x28\n ret\non_message:\n ud2\n ret"
    text = asm_scenario(code, table=CALLBACK, extra='[profile]\ncallback_exception = "swallow"\n')
    assert run(parse_scenario(text, "t.toml")).exit_status == 0xC000001D


def test_hard_case_scored_by_the_shipped_detector() -> None:
    # Two states at ZwCallbackReturn (depth 2 inside the exception dispatch, then depth 1): the
    # built-in detector walks through KiUserExceptionDispatcher's machine frame and finds both.
    from emu.detection.view import detect_callback_return_pending

    report = score(detect_callback_return_pending, ROOT / "scenarios" / "hard_exception_in_callback.toml")
    total = report.total
    assert (total.tp, total.fp, total.fn) == (2, 0, 0)


# --- compiled C: the built-in ntdll and Wine's ------------------------------------------------------
@pytest.fixture(scope="module")
def exceptions_dll(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("exc")
    (folder / "exceptions.dll").write_bytes(build_exceptions_dll().read_bytes())
    return folder


def _compiled(folder: Path, entry: str, ntdll: bool) -> Run:
    head = '[ntdll]\npath = "ntdll.dll"\n' if ntdll else ""
    text = f'[scenario]\nname = "c"\n{head}[[pe]]\npath = "exceptions.dll"\n[thread]\nentry = "exceptions!{entry}"\n'
    path = folder / f"{entry}_{int(ntdll)}.toml"
    path.write_text(text)
    return run(load_scenario(path))


@pytest.mark.parametrize("entry, status", [("ProgramVectored", 0x600D), ("ProgramFrameBased", 0x5E4)])
def test_compiled_handlers_on_the_builtin_ntdll(exceptions_dll: Path, entry: str, status: int) -> None:
    r = _compiled(exceptions_dll, entry, ntdll=False)
    assert r.error is None and r.exit_status == status
    if entry == "ProgramFrameBased":  # __C_specific_handler ran the filter and RtlUnwindEx ended the scope
        assert any(t.kind == "unwind" for t in r.trace)


def test_wine_ntdll_runs_its_own_dispatcher(exceptions_dll: Path) -> None:
    try:
        src = wine_dlls()
    except (RealNtdllError, RuntimeError) as e:
        pytest.fail(f"cannot fetch the real ntdll: {e}", pytrace=False)
    (exceptions_dll / "ntdll.dll").write_bytes((src / "ntdll.dll").read_bytes())
    r = _compiled(exceptions_dll, "ProgramFrameBased", ntdll=True)
    assert r.error is None and r.exit_status == 0x5E4
    # Wine's KiUserExceptionDispatcher, its dispatch_exception and RtlUnwindEx run; its unwind
    # ends with NtContinue (dlls/ntdll/signal_x86_64.c).
    assert [t.kind for t in r.trace] == ["exception", "exception", "syscall", "continue", "syscall", "exit"]
    assert r.symbolize(r.trace.state(r.trace.transitions[1].dst).rip) == "ntdll!KiUserExceptionDispatcher"
