"""The exception model's state lives where Windows keeps it, so forks and dumps carry it.

The vectored handler lists are LIST_ENTRY lists in ntdll's data (ReactOS sdk/lib/rtl/vectoreh.c:
RtlpVectoredExceptionList / RtlpVectoredContinueList, entries {ListEntry, VectoredHandler, Refs});
MS docs AddVectoredExceptionHandler: First != 0 puts the handler first, 0 last; the return value is
a handle, RemoveVectoredExceptionHandler returns non-zero when it was registered. A stack's guard
page is committed PAGE_READWRITE | PAGE_GUARD (WRK mm/acceschk.c MiCheckForUserStackOverflow),
which MINIDUMP_MEMORY_INFO.Protect reports (MS docs MEMORY_BASIC_INFORMATION).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import asm_scenario
from emu.api import run
from emu.dump import read_minidump, write_minidump
from emu.dump.live import capture, provisional_run
from emu.engine import build
from emu.errors import ScenarioError
from emu.exploration.explorer import explore
from emu.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
PAGE_GUARD = 0x100  # winnt.h

CODE = """
main:
    sub rsp, 0x28
    lea rdx, [rip + veh_a]
    xor ecx, ecx
    call RtlAddVectoredExceptionHandler       ; [a]
    mov qword ptr [rip + handle_a], rax
    lea rdx, [rip + veh_b]
    mov ecx, 1
    call RtlAddVectoredExceptionHandler       ; [b, a]
    lea rdx, [rip + veh_c]
    xor ecx, ecx
    call RtlAddVectoredExceptionHandler       ; [b, a, c]
    mov qword ptr [rip + handle_c], rax
    lea rdx, [rip + veh_a]
    xor ecx, ecx
    call RtlAddVectoredContinueHandler        ; the other list: [a]
    mov rcx, qword ptr [rip + handle_a]
    call RtlRemoveVectoredExceptionHandler    ; [b, c]
    mov qword ptr [rip + removed_once], rax
    mov rcx, qword ptr [rip + handle_a]
    call RtlRemoveVectoredExceptionHandler    ; no longer registered
    mov qword ptr [rip + removed_twice], rax
    add rsp, 0x28
    ret
veh_a:
    xor eax, eax
    ret
veh_b:
    xor eax, eax
    ret
veh_c:
    xor eax, eax
    ret
"""
DATA = """
handle_a:
    .quad 0
handle_c:
    .quad 0
removed_once:
    .quad 0
removed_twice:
    .quad 0
"""


def _walk(read: Callable[[int], int], head: int) -> list[int]:
    """The VectoredHandler of each entry, following Flink from ``head``; checks Blink on the way."""
    out, prev, entry = [], head, read(head)
    while entry != head:
        assert read(entry + 8) == prev
        out.append(read(entry + 0x10))
        prev, entry = entry, read(entry)
        assert len(out) < 16
    assert read(head + 8) == prev
    return out


def test_vectored_handler_lists_are_lists_in_ntdll_memory() -> None:
    process = build(parse_scenario(asm_scenario(CODE, data=DATA), "t.toml"))
    result = process.run()
    assert result.error is None, result.error
    app = next(i for i in process.images if i.name == "app")
    ntdll = process.ntdll
    m = process.machine
    a, b, c = (app.symbols[n] for n in ("veh_a", "veh_b", "veh_c"))
    exception_list = ntdll.symbols["RtlpVectoredExceptionList"]
    continue_list = ntdll.symbols["RtlpVectoredContinueList"]
    assert _walk(m.read_u64, exception_list) == [b, c]
    assert _walk(m.read_u64, continue_list) == [a]
    assert m.read_u64(app.symbols["removed_once"]) & 0xFFFF_FFFF != 0
    assert m.read_u64(app.symbols["removed_twice"]) & 0xFFFF_FFFF == 0
    # The handle is the entry: c's handle is the list's last entry.
    assert m.read_u64(exception_list + 8) == m.read_u64(app.symbols["handle_c"])


def test_a_dump_carries_the_vectored_handlers_and_the_guard_page(tmp_path: Path) -> None:
    """Dumps of exception_stack_overflow: before anything ran (s0) the stack's guard page is there;
    at the overflow (s1, the fault recorded in the kernel) the handler's entry is in ntdll's list
    and the guard page is stack now; runs from both end as the original did."""
    path = ROOT / "scenarios" / "exception_stack_overflow.toml"
    sc = load_scenario(path)
    original = run(sc)
    assert [t.kind for t in original.trace.transitions][:2] == ["exception", "exception"]

    def sink(process: object, live: object) -> None:
        pr = provisional_run(process)  # type: ignore[arg-type]
        f = tmp_path / f"s{live.state}.dmp"  # type: ignore[attr-defined]
        write_minidump(pr, pr.trace.state(live.state), f, live=live)  # type: ignore[attr-defined, arg-type]

    capture(sc, lambda sid: sid in (0, 1), sink)
    before, at = read_minidump(tmp_path / "s0.dmp"), read_minidump(tmp_path / "s1.dmp")
    guards = [r for r in before.regions if r.protect & PAGE_GUARD]
    assert len(guards) == 1 and guards[0].size == 0x1000 and guards[0].protect & 0xFF == 0x04  # PAGE_READWRITE
    assert not [r for r in at.regions if r.protect & PAGE_GUARD]
    assert any(r.base == guards[0].base and r.protect == 0x04 for r in at.regions)  # committed read/write
    ntdll = next(m.image for m in at.modules if m.image.name == "ntdll")
    app = next(m.image for m in at.modules if m.image.name == "app")

    def read_u64(address: int) -> int:
        for start, data in at.memory:
            if start <= address <= start + len(data) - 8:
                return int.from_bytes(data[address - start : address - start + 8], "little")
        raise AssertionError(f"{address:#x} is not in the dump")

    assert _walk(read_u64, ntdll.symbols["RtlpVectoredExceptionList"]) == [app.symbols["veh"]]
    for state in (0, 1):
        again = run(dataclasses.replace(sc, start_dump=str(tmp_path / f"s{state}.dmp"), expectations=()))
        assert again.exit_status == original.exit_status == 0xC00000FD, state  # STATUS_STACK_OVERFLOW


# Recursion that overflows twice: the vectored handler counts its calls, keeps the address of the
# overflow (ExceptionInformation[1]) and resumes app!main, which recurses again.
OVERFLOW_TWICE = """
main:
    sub rsp, 0x28
    lea rdx, [rip + veh]
    mov ecx, 1
    call RtlAddVectoredExceptionHandler
    mov qword ptr [rip + saved_rsp], rsp
    call recurse
again:
    mov rsp, qword ptr [rip + saved_rsp]
    call recurse
    add rsp, 0x28
    ret
recurse:
    sub rsp, 0x38
    call recurse
veh:
    inc qword ptr [rip + calls]
    mov rax, qword ptr [rcx]
    mov edx, dword ptr [rax]
    mov qword ptr [rip + code], rdx
    mov rdx, qword ptr [rax + 0x28]
    mov qword ptr [rip + address], rdx
    mov rax, qword ptr [rcx + 8]
    mov rdx, qword ptr [rip + saved_rsp]
    mov qword ptr [rax + 0x98], rdx
    lea rdx, [rip + again]
    mov qword ptr [rax + 0xf8], rdx
    mov eax, -1
    ret
"""
OVERFLOW_DATA = """
saved_rsp:
    .quad 0
calls:
    .quad 0
code:
    .quad 0
address:
    .quad 0
"""


def test_the_guard_page_moves_down_then_two_overflows_behave_as_on_windows() -> None:
    """WRK MiCheckForUserStackOverflow with three reserved pages below the guard page G (D is
    TEB.DeallocationStack, D = G - 3 pages): touching G commits it and makes G - 1 page the guard
    page, silently; touching that one leaves no room for another (NextPage - PAGE <= D), so D + 1
    page is committed, StackLimit = D + 1 page, and the fault is STATUS_STACK_OVERFLOW at the second
    guard page. The second overflow reaches D, reserved: an access violation with no room for the
    exception frame, so the process ends with STATUS_ACCESS_VIOLATION (KiDispatchException's second
    chance) and the handler is not called again."""
    text = asm_scenario(OVERFLOW_TWICE, data=OVERFLOW_DATA, extra="[machine]\nstack_reserve = 0x3000\n")
    process = build(parse_scenario(text, "t.toml"))
    thread = process.kernel.threads[0]
    page = 0x1000
    guard = thread.stack_limit - page
    bottom = guard - 3 * page
    assert process.machine.read_u64(thread.teb + 0x1478) == bottom  # TEB.DeallocationStack
    result = process.run()
    app = next(i for i in process.images if i.name == "app")
    seen = {n: process.machine.read_u64(app.symbols[n]) for n in ("calls", "code", "address")}
    assert seen["calls"] == 1
    assert seen["code"] == 0xC00000FD  # STATUS_STACK_OVERFLOW
    assert guard - page <= seen["address"] < guard  # the guard page it had moved to
    assert thread.stack_limit == bottom + page
    assert process.machine.read_u64(thread.teb + 0x10) == bottom + page  # NT_TIB.StackLimit
    assert result.threads[0].exit_status == 0xC0000005  # STATUS_ACCESS_VIOLATION
    kinds = [t.kind for t in result.trace.transitions]
    assert kinds.count("exception") == 3 and kinds[-1] == "exit"  # two for the overflow, one for the AV


def test_stack_reserve_must_be_whole_pages() -> None:
    text = asm_scenario("main:\n ret\n", extra="[machine]\nstack_reserve = 0x1800\n")
    with pytest.raises(ScenarioError, match=r"stack_reserve.*multiple of 0x1000"):
        parse_scenario(text, "t.toml")


EXPLORE_OVERFLOW = """
main:
    sub rsp, 0x28
    lea rdx, [rip + veh]
    mov ecx, 1
    call RtlAddVectoredExceptionHandler
    mov qword ptr [rip + saved_rsp], rsp
    mov rcx, 0x44
    call NtClose                  ; a choice: both options go on the same way
    call recurse
done:
    mov eax, dword ptr [rip + code]
    add rsp, 0x28
    ret
recurse:
    sub rsp, 0x38
    call recurse
veh:
    mov rax, qword ptr [rcx]
    mov edx, dword ptr [rax]
    mov dword ptr [rip + code], edx
    mov rax, qword ptr [rcx + 8]
    mov rdx, qword ptr [rip + saved_rsp]
    mov qword ptr [rax + 0x98], rdx
    lea rdx, [rip + done]
    mov qword ptr [rax + 0xf8], rdx
    mov eax, -1
    ret
"""
CHOICE = """
[services.NtClose]
steps = [
    { kind = "choice", name = "result", default = "success", options = { success = [{ kind = "return", status = "STATUS_SUCCESS" }], failure = [{ kind = "return", status = "STATUS_INVALID_HANDLE" }] } },
]
"""


def test_exploration_restores_the_guard_page_for_each_branch() -> None:
    """Both branches of the choice overflow the stack; the second one runs from a copy restored
    from before the first overflowed, so its guard page (and the pages the stack grew into, with
    [machine] stack_reserve) must be as they were then: it overflows the same way,
    STATUS_STACK_OVERFLOW at the same address, not an access violation below a guard page the
    first branch had used up."""
    text = asm_scenario(
        EXPLORE_OVERFLOW, data="saved_rsp:\n .quad 0\ncode:\n .quad 0\n", services=CHOICE,
        extra="[machine]\nstack_reserve = 0x3000\n",
    )  # fmt: skip
    exp = explore(parse_scenario(text, "t.toml"))
    assert exp.paths == 2 and not exp.faults
    edges = [d for _, _, d in exp.graph.nx.edges(data=True)]
    exits = sorted(str(d.get("status")) for d in edges if d.get("kind") == "exit")
    assert exits == ["STATUS_STACK_OVERFLOW", "STATUS_STACK_OVERFLOW"]
    faults = {
        str(d.get("detail")) for d in edges if d.get("kind") == "exception" and "first chance" in str(d.get("detail"))
    }
    assert len(faults) == 1 and "stack overflow" in next(iter(faults))


# A handler that saves what it saw (ExceptionCode, ExceptionAddress, Context.Rax/Rcx/Rdi) and
# resumes past the faulting instruction (its length in app!skip).
IO_BODY = """
main:
    sub rsp, 0x28
    lea rdx, [rip + veh]
    mov ecx, 1
    call RtlAddVectoredExceptionHandler
    mov rax, 0x1122334455667788
    mov edx, 0x80
    mov ecx, 3
    lea rdi, [rip + buffer]
    lea rsi, [rip + buffer]
fault:
    {insn}
    mov qword ptr [rip + buffer], 0        ; skipped by the handler: never stored
after:
    mov eax, dword ptr [rip + code]
    add rsp, 0x28
    ret
veh:
    mov rax, qword ptr [rcx]
    mov edx, dword ptr [rax]
    mov dword ptr [rip + code], edx
    mov rdx, qword ptr [rax + 0x10]
    mov qword ptr [rip + address], rdx
    mov rax, qword ptr [rcx + 8]
    mov rdx, qword ptr [rax + 0x78]
    mov qword ptr [rip + ctx_rax], rdx
    mov rdx, qword ptr [rax + 0x80]
    mov qword ptr [rip + ctx_rcx], rdx
    mov rdx, qword ptr [rax + 0xb0]
    mov qword ptr [rip + ctx_rdi], rdx
    lea rdx, [rip + after]
    mov qword ptr [rax + 0xf8], rdx
    mov eax, -1
    ret
"""
IO_DATA = """
code:
    .quad 0
address:
    .quad 0
ctx_rax:
    .quad 0
ctx_rcx:
    .quad 0
ctx_rdi:
    .quad 0
buffer:
    .quad 0x5A5A5A5A5A5A5A5A
"""


@pytest.mark.parametrize(
    "insn", ["in al, dx", "in eax, dx", "in al, 0x80", "out dx, al", "out 0x80, eax", "insb", "rep insd", "outsb",
             "rep outsw"],
)  # fmt: skip
def test_port_io_at_cpl3_is_a_privileged_instruction(insn: str) -> None:
    """User code has IOPL 0 and no I/O permission bitmap on Windows x64: every in/out/ins/outs is
    a #GP (Intel SDM vol. 1 19.5), STATUS_PRIVILEGED_INSTRUCTION at the instruction (WRK decode.c
    KiOp_Priv), with the registers and memory as before it (except the element `ins` would have
    stored: Unicorn zeroes it first, see emu.kernel.port_io); the store after it is never made."""
    process = build(parse_scenario(asm_scenario(IO_BODY.format(insn=insn), data=IO_DATA), "t.toml"))
    result = process.run()
    app = next(i for i in process.images if i.name == "app")
    seen = {n: process.machine.read_u64(app.symbols[n]) for n in ("code", "address", "ctx_rax", "ctx_rcx", "ctx_rdi")}
    assert result.threads[0].exit_status == 0xC0000096, insn
    assert seen["code"] == 0xC0000096 and seen["address"] == app.symbols["fault"]
    assert (seen["ctx_rax"], seen["ctx_rcx"], seen["ctx_rdi"]) == (0x1122334455667788, 3, app.symbols["buffer"])
    kept = 0x5A5A5A5A5A5A5A5A
    if "ins" in insn:
        kept &= ~((1 << (8 * (4 if insn.endswith("d") else 1))) - 1)
    assert process.machine.read_u64(app.symbols["buffer"]) == kept


FP_BODY = """
main:
    sub rsp, 0x28
    lea rdx, [rip + veh]
    mov ecx, 1
    call RtlAddVectoredExceptionHandler
    fninit
    fldcw word ptr [rip + fcw_set]
    ldmxcsr dword ptr [rip + mxcsr_set]
    fld1                                   ; ST(0) = 1.0
fault:
    ud2
    fnstcw word ptr [rip + fcw_after]      ; after NtContinue: the CONTEXT's state
    stmxcsr dword ptr [rip + mxcsr_after]
    add rsp, 0x28
    ret
veh:
    fnstcw word ptr [rip + fcw_entry]      ; the live state at the handler's entry
    stmxcsr dword ptr [rip + mxcsr_entry]
    fst qword ptr [rip + st0_entry]
    mov rax, qword ptr [rcx + 8]           ; the CONTEXT
    movzx edx, word ptr [rax + 0x100]      ; FltSave.ControlWord
    mov dword ptr [rip + ctx_fcw], edx
    movzx edx, byte ptr [rax + 0x104]      ; FltSave.TagWord (abridged)
    mov dword ptr [rip + ctx_tag], edx
    mov edx, dword ptr [rax + 0x118]       ; FltSave.MxCsr
    mov dword ptr [rip + ctx_mxcsr], edx
    mov rdx, qword ptr [rax + 0x120]       ; FltSave.FloatRegisters[0]: ST(0)'s mantissa
    mov qword ptr [rip + ctx_st0], rdx
    mov word ptr [rax + 0x100], 0x27f      ; resume with the default control word and MXCSR
    mov dword ptr [rax + 0x118], 0x1f80
    mov dword ptr [rax + 0x34], 0x1f80
    add qword ptr [rax + 0xf8], 2          ; past the ud2
    mov eax, -1
    ret
"""
FP_DATA = """
fcw_set:
    .word 0x37f
mxcsr_set:
    .long 0x9fc0
fcw_entry:
    .quad 0
mxcsr_entry:
    .quad 0
st0_entry:
    .quad 0
ctx_fcw:
    .quad 0
ctx_tag:
    .quad 0
ctx_mxcsr:
    .quad 0
ctx_st0:
    .quad 0
fcw_after:
    .quad 0
mxcsr_after:
    .quad 0
"""


def test_floating_point_state_at_the_handler_and_after_ntcontinue() -> None:
    """KiDispatchException changes only RSP, RIP, CS and TF in the trap frame (WRK
    ke/amd64/exceptn.c): the handler starts with the faulting code's x87 control word, MXCSR and
    registers, and the CONTEXT's FltSave (FXSAVE layout, Intel SDM vol. 1 10.5.1) holds them.
    NtContinue puts the CONTEXT's floating-point state back (KeContextToKframes)."""
    process = build(parse_scenario(asm_scenario(FP_BODY, data=FP_DATA), "t.toml"))
    result = process.run()
    assert result.error is None, result.error
    app = next(i for i in process.images if i.name == "app")

    def word(name: str, size: int = 4) -> int:
        return int.from_bytes(process.machine.read(app.symbols[name], size), "little")

    assert (word("fcw_entry", 2), word("mxcsr_entry")) == (0x37F, 0x9FC0)
    assert word("st0_entry", 8) == 0x3FF0_0000_0000_0000  # 1.0 as a double
    assert (word("ctx_fcw"), word("ctx_mxcsr")) == (0x37F, 0x9FC0)
    assert word("ctx_tag") == 0x80  # one register in use: R7 (fld1 pushed onto TOP = 7)
    assert word("ctx_st0", 8) == 0x8000_0000_0000_0000  # 1.0's 64-bit mantissa (explicit integer bit)
    assert (word("fcw_after", 2), word("mxcsr_after")) == (0x27F, 0x1F80)


def test_threads_start_with_windows_initial_floating_point_state() -> None:
    """WRK ke/amd64/thredini.c: INITIAL_FPCSR 0x27F and INITIAL_MXCSR 0x1F80."""
    code = "main:\n fnstcw word ptr [rip + fcw]\n stmxcsr dword ptr [rip + mx]\n ret\n"
    process = build(parse_scenario(asm_scenario(code, data="fcw:\n .quad 0\nmx:\n .quad 0\n"), "t.toml"))
    process.run()
    app = next(i for i in process.images if i.name == "app")
    assert process.machine.read_u64(app.symbols["fcw"]) == 0x27F
    assert process.machine.read_u64(app.symbols["mx"]) == 0x1F80
