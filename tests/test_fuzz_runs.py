"""Fuzzing whole runs: random small assembly programs → a Run (its error, if any, typed) within budgets.

A program is a list of statements from a small grammar, each behind its own label (``L0``,
``L1`` ...) so that jumps and calls can target any of them:

* register arithmetic and moves (``mov``/``add``/``xor``), ``push``/``pop``;
* calls of the built-in ntdll/win32u stubs (``NtClose``, ``NtYieldExecution``,
  ``ZwCallbackReturn``, ``NtCallbackReturn``, ``NtUserMessageCall``, an unscripted
  ``NtDelayExecution``) with random arguments in RCX, RDX, R8, R9;
* a raw ``syscall`` or ``int 2Eh`` with a random EAX;
* jumps, conditional jumps and calls to any label, indirect jumps and calls through a register;
* loads and stores at interesting and random addresses (NULL, KUSER_SHARED_DATA, the PEB, the
  TEB through GS, the images, a stack guard page, non-canonical addresses);
* writes through RSP, RSP adjustments, a wild RSP;
* ``int3``, ``hlt``, ``ud2``, ``int N``, a division by zero, ``ret``;

plus callbacks ``cb0``/``cb1`` in the KernelCallbackTable (one of them re-enters ``main``),
scripted services that call back into them, and a random profile, dispatcher convention and
``[machine] system_call``. Each program runs under ``instructions = 10000`` and
``wall_time = 0.5``: the result must be a Run whose error, if any, is an EmuError; any other
exception fails the case, and a run that never ends is a hang (no_hang ends the process).
"""

from __future__ import annotations

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from fuzz_support import (
    RUN_SECONDS,
    Tally,
    fast_settings,
    no_hang,
    run_bounded,
    slow_only,
    slow_settings,
    tally,
)
from hypothesis import given
from hypothesis import strategies as st

from conftest import asm_scenario
from emu.api import Run, run
from emu.engine import build
from emu.errors import BudgetExceeded, MachineFault
from emu.profile import profile_names
from emu.scenario import parse_scenario

REGS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
ARG_REGS = ["rcx", "rdx", "r8", "r9"]
STUBS = ["NtClose", "NtYieldExecution", "ZwCallbackReturn", "NtCallbackReturn", "NtUserMessageCall", "NtDelayExecution"]
ADDRESSES = [
    0, 8, 0x1000, 0xFFFF, 0x10000,  # NULL page and below the first mapping
    0x7FFE0000, 0x7FFE0308, 0x7FFE0FF8,  # KUSER_SHARED_DATA (read-only)
    0x7FF_FFFD_F000, 0x7FF_FFFD_F060, 0x7FF_FFFD_D000, 0x7FF_FFFD_D030,  # PEB, TEB
    0x1_0000_0000, 0x1_0000_2000, 0x1_0000_4000, 0x1_0000_5000,  # emu's allocations: table, loader data, stack guard, stack
    0x7FFB_0000_0000, 0x7FFB_0000_1000, 0x7FFA_C000_1000,  # ntdll and app headers / code
    0x7FFF_FFFF_FFF8, 0x8000_0000_0000, 0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_FFF8,  # top, non-canonical, kernel
]  # fmt: skip
IMMEDIATES = [0, 1, 0x7F, 0x80, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xC0000005, 0x1234]
SSNS = [0x0, 0x5, 0xC, 0xF, 0x43, 0x46, 0x53, 0x1007, 0x1FFF, 0x2000, 0xFFFF, 0x10000, 0xFFFFFFFF]

reg = st.sampled_from(REGS)
imm32 = st.sampled_from(IMMEDIATES) | st.integers(0, 2**32 - 1)
imm64 = imm32 | st.integers(0, 2**64 - 1)
address = st.sampled_from(ADDRESSES) | st.integers(0, 2**64 - 1)
ssn = st.sampled_from(SSNS) | st.integers(0, 2**32 - 1)
NOPS = ["\n    nop", "\n    nop", "\n    nop", ""]
small = st.integers(0, 0x100).map(lambda n: n * 8)


def _call_stub(args: list[tuple[str, int]], stub: str) -> str:
    return "\n".join([*(f"    mov {r}, {v:#x}" for r, v in args), f"    call {stub}"])


# Each strategy is one statement: one or more lines of assembly that keystone accepts.
# `L{k}` in a line is a label index, resolved against the program's length in `program()`.
safe = st.one_of(
    st.builds(lambda r, v: f"    mov {r}, {v:#x}", reg, imm64),
    st.builds(lambda r, v: f"    add {r}, {v:#x}", reg, st.integers(0, 0x7FFFFFFF)),
    st.builds(lambda a, b: f"    xor {a}, {b}", reg, reg),
    st.builds(lambda a, b: f"    push {a}\n    pop {b}", reg, reg),
    st.builds(lambda off, r: f"    mov qword ptr [rsp + {off:#x}], {r}", small, reg),
    st.builds(lambda off, v: f"    mov qword ptr [rsp - {off:#x}], {v:#x}", small, st.integers(0, 0x7FFFFFFF)),
    st.builds(lambda n: f"    sub rsp, {n:#x}\n    add rsp, {n:#x}", small),
    st.builds(lambda off: f"    mov rax, qword ptr gs:[{off:#x}]", st.integers(0, 0x2000)),
    st.sampled_from(
        ["    nop", "    pushfq\n    popfq", "    cpuid", "    rdtsc", "    lea rcx, [rsp + 8]\n    call NtClose"]
    ),
)
crossing = st.one_of(
    st.builds(_call_stub, st.lists(st.tuples(st.sampled_from(ARG_REGS), imm64), max_size=4), st.sampled_from(STUBS)),
    # With or without a trailing nop: a label right after a raw `syscall` once broke the
    # detector (fixed; test_detections_after_a_raw_syscall_before_a_label pins it).
    st.builds(lambda n, tail: f"    mov eax, {n:#x}\n    mov r10, rcx\n    syscall{tail}", ssn, st.sampled_from(NOPS)),
    st.builds(lambda n, tail: f"    mov eax, {n:#x}\n    int 0x2e{tail}", ssn, st.sampled_from(NOPS)),
)
control = st.one_of(
    st.builds(lambda k: f"    jmp L{{{k}}}", st.integers(0, 63)),
    st.builds(
        lambda cc, k: f"    {cc} L{{{k}}}", st.sampled_from(["jz", "jnz", "jc", "js", "jle", "ja"]), st.integers(0, 63)
    ),
    st.builds(lambda k: f"    call L{{{k}}}", st.integers(0, 63)),
)
risky = st.one_of(
    st.builds(lambda r: f"    push {r}", reg),
    st.builds(lambda r: f"    pop {r}", reg),
    st.builds(lambda a: f"    mov rax, {a:#x}\n    jmp rax", address),
    st.builds(lambda a: f"    mov rax, {a:#x}\n    call rax", address),
    st.builds(lambda a, r: f"    mov rax, {a:#x}\n    mov {r}, qword ptr [rax]", address, st.sampled_from(REGS[1:])),
    st.builds(lambda a, r: f"    mov rax, {a:#x}\n    mov qword ptr [rax], {r}", address, st.sampled_from(REGS[1:])),
    st.builds(lambda a: f"    mov rax, {a:#x}\n    mov byte ptr [rax], 0x90", address),
    st.builds(lambda n: f"    sub rsp, {n:#x}", small),
    st.builds(lambda n: f"    add rsp, {n:#x}", small),
    st.builds(lambda a: f"    mov rsp, {a:#x}", address),
    st.builds(lambda n: f"    int {n:#x}", st.integers(0, 255)),
    st.sampled_from(["    int3", "    hlt", "    ud2", "    ret", "    xor ecx, ecx\n    div rcx", "    and rsp, -16"]),
)
# Weighted so that most programs get as far as a few crossings before something faults.
statement = st.sampled_from([safe, safe, safe, crossing, crossing, crossing, control, risky]).flatmap(lambda kind: kind)


def program(lines: list[str]) -> str:
    n = len(lines)
    body = "\n".join(f"L{i}:\n{line}" for i, line in enumerate(_resolve(lines, n)))
    return f"main:\n{body}\nL{n}:\n    ret"


def _resolve(lines: list[str], n: int) -> list[str]:
    out = []
    for line in lines:
        while "L{" in line:
            start = line.index("L{") + 2
            end = line.index("}", start)
            line = f"{line[: start - 1]}{int(line[start:end]) % (n + 1)}{line[end + 1 :]}"
        out.append(line)
    return out


callback_steps = st.lists(
    st.builds(
        lambda api, text: f'{{ kind = "callback", api = {api}, text = "{text}" }}',
        st.sampled_from(["0", "1", "2", "[0, 1]", "[1, 2, 0]"]),
        st.sampled_from(["", "WM_PAINT", "x" * 40]),
    ),
    max_size=2,
)
status = st.sampled_from(['"callback"', "0", "0xC0000008", '"STATUS_INVALID_HANDLE"', "0xFFFFFFFF"])


def _service(name: str, steps: list[str], end: str) -> str:
    last = '{ kind = "return", status = ' + end + " }"
    return f"[services.{name}]\nsteps = [{', '.join([*steps, last])}]\n"


@st.composite
def scenario_texts(draw: st.DrawFn) -> str:
    main = draw(st.lists(statement, min_size=3, max_size=24))
    cb0 = draw(st.lists(statement, max_size=4))
    cb1 = draw(st.lists(statement, max_size=4))
    code = program(main) + "\ncb0:\n" + "\n".join(_resolve(cb0, 0)).replace("L0", "cb0") + "\n    ret"
    code += "\ncb1:\n" + "\n".join(_resolve(cb1, 0)).replace("L0", "cb1") + "\n    call ZwCallbackReturn\n    ret"
    services = "".join(
        _service(name, draw(callback_steps), draw(status))
        for name in ("NtClose", "NtYieldExecution", "NtUserMessageCall")
        if draw(st.integers(0, 3)) > 0
    )
    profile = draw(st.sampled_from(profile_names()))
    dispatcher = draw(st.sampled_from(["", 'dispatcher = "stack"', 'dispatcher = "registers"']))
    machine = draw(st.sampled_from(["", "[machine]\nsystem_call = 1\n"]))
    depth = draw(st.sampled_from([2, 16, 64]))
    extra = (
        f'profile = "{profile}"\n\n[profile]\n{dispatcher}\n\n{machine}'
        f"[budgets]\ninstructions = 10000\nwall_time = {RUN_SECONDS}\ncallback_depth = {depth}\n"
    )
    table = '[kernel_callback_table]\n0 = "app!cb0"\n1 = "app!cb1"\n2 = "app!main"\n'
    return asm_scenario(code, services=services, table=table, extra=extra)


def check_program(text: str, t: Tally) -> Run:
    """Parse, build and run: a Run within the budgets, its error (if any) an EmuError."""
    with no_hang(case=text):
        r = run_bounded(parse_scenario(text, "<fuzz>"))  # build, run, detections, expectations; checks the Run
        t.record(r.error)
    # No wall-clock assertion: a loaded machine makes any such bound flaky. The run's own
    # wall_time budget (RUN_SECONDS) stops runaway guest code, and no_hang() fails the test
    # loudly if building or running ever hangs.
    assert r.trace.transitions or r.error is not None
    return r


def _programs(config: pytest.Config, text: str, suite: str) -> None:
    check_program(text, tally(suite, config))


@fast_settings(150)
@given(text=scenario_texts())
def test_random_programs_run_within_budgets(pytestconfig: pytest.Config, text: str) -> None:
    _programs(pytestconfig, text, "runs: programs (fast)")


@slow_only
@slow_settings(10_000)
@given(text=scenario_texts())
def test_random_programs_run_within_budgets_slow(pytestconfig: pytest.Config, text: str) -> None:
    _programs(pytestconfig, text, "runs: programs")


def test_program_grammar_assembles() -> None:
    """Every statement kind assembles, so the fuzzer's cases reach the run instead of the assembler."""
    lines = [
        "    mov rax, 0xffffffffffffffff", "    jmp L{70}", "    call L{3}",
        _call_stub([("rcx", 1), ("r9", 2**64 - 1)], "NtUserMessageCall"), "    mov rax, qword ptr gs:[0x30]",
        "    mov qword ptr [rsp - 0x800], 0x7fffffff", "    int 0x2e", "    xor ecx, ecx\n    div rcx",
    ]  # fmt: skip
    text = asm_scenario(program(lines), extra="[budgets]\ninstructions = 10000\n")
    process = build(parse_scenario(text))
    where = ("thread", "entry")
    labels = [process.resolve(f"app!L{i}", where) for i in range(len(lines) + 1)]
    assert labels == sorted(labels) and len(set(labels)) == len(labels)  # one label per statement, in order
    cs = Cs(CS_ARCH_X86, CS_MODE_64)

    def first(label: int) -> tuple[str, str]:
        insn = next(cs.disasm(process.machine.read(label, 16), label))
        return insn.mnemonic, insn.op_str

    # Label references wrap modulo the program's length plus one: L{70} is L7 of nine labels.
    assert first(labels[1]) == ("jmp", hex(labels[70 % 9]))
    assert first(labels[2]) == ("call", hex(labels[3]))
    assert process.machine.read(labels[6], 2) == b"\xcd\x2e"  # INT imm8 is CD ib (Intel SDM Vol. 2A, INT n)
    assert first(labels[7]) == ("xor", "ecx, ecx")


# --- bugs the fuzzer found, fixed: each test pins the fix -------------------------------------------
def _run_code(code: str) -> Run:
    return run_bounded(parse_scenario(asm_scenario(code, extra="[budgets]\ninstructions = 10000\n")))


def test_jump_to_null_is_a_fault() -> None:
    r = _run_code("main:\n    xor eax, eax\n    call rax\n    ret")
    # Delivered as an access violation executing 0 (MS docs EXCEPTION_RECORD: 8 = DEP/execute);
    # no handler takes it, so the second chance ends the process with the code.
    assert r.error is None and r.exit_status == 0xC0000005, r.error
    first = next(t for t in r.trace if t.kind == "exception")
    assert first.rip == 0 and "executing 0x0" in first.detail
    stopped = run_bounded(
        parse_scenario(
            asm_scenario("main:\n    xor eax, eax\n    call rax\n    ret", extra='[machine]\nexceptions = "stop"')
        )
    )
    assert isinstance(stopped.error, MachineFault), stopped.error


def test_hlt_is_not_an_instruction_budget() -> None:
    r = _run_code("main:\n    hlt\n    ret")
    assert not (isinstance(r.error, BudgetExceeded) and r.error.budget == "instructions"), r.error


def test_detections_after_a_raw_syscall_before_a_label() -> None:
    service = '[services.NtClose]\nsteps = [{ kind = "return", status = 0 }]'
    r = run(
        parse_scenario(
            asm_scenario("main:\n    mov eax, 0xF\n    mov r10, rcx\n    syscall\nafter:\n    ret", services=service)
        )
    )
    assert r.error is None
    assert r.detections == []


WAIT_FOREVER = """
[scenario]
name = "wait_forever"
[[module]]
name = "app"
code = \"\"\"
main:
    sub rsp, 0x28
    mov rcx, 0x100
    xor edx, edx
    xor r8d, r8d
    call NtWaitForSingleObject
    add rsp, 0x28
    ret
\"\"\"
[thread]
entry = "app!main"
[[object]]
kind = "event"
name = "never"
handle = 0x100
"""


def test_a_deadlocked_run_is_an_outcome_not_a_harness_failure() -> None:
    # Found by the mutated-scenario fuzzer: a mutant of a threads scenario ended deadlocked, which
    # the harness took for a broken Run. One thread waiting on an event nobody sets is the smallest case.
    r = run_bounded(parse_scenario(WAIT_FOREVER, "wait_forever.toml"))
    assert r.stop == "deadlock" and r.error is None
    assert r.deadlock == ["thread thread0 waits on event 'never' (no owner: someone must signal it)"]
