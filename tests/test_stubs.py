"""SSNs and stub shapes recovered from code: compiled fixture ntdll, emu's built-in ntdll/win32u."""

from __future__ import annotations

import pytest
from pe_fixtures import PeFixtures, pe_fixtures_or_fail

from emu.errors import ImageError
from emu.loader.image import image_from_assembly
from emu.loader.pe import load_pe
from emu.loader.stubs import (
    DispatcherGuess,
    SsnDisagreement,
    compare_with_profile,
    guess_dispatcher_convention,
    recover_stubs,
    service_table,
    stub_at,
)
from emu.profile import get_profile, profile_names
from emu.runtime import NTDLL_BASE, SYSCALL_OFFSET, build_ntdll, build_win32u


@pytest.fixture(scope="session")
def pe_files() -> PeFixtures:
    return pe_fixtures_or_fail()


# name: (ssn, shape, syscall offset, int 2Eh offset), as written in tests/fixtures/pe/ntdll_like.S
FIXTURE_STUBS = {
    "NtWaitForSingleObject": (0x04, "win10", 0x12, 0x15),
    "NtCallbackReturn": (0x05, "win10-reversed", 0x15, 0x12),
    "NtClose": (0x0F, "win10", 0x12, 0x15),
    "ZwClose": (0x0F, "win10", 0x12, 0x15),
    "NtQueryInformationProcess": (0x19, "win7", 0x8, None),
    "NtTerminateProcess": (0x2C, "syscall-if-zero", 0x12, None),
    "NtDelayExecution": (0x34, "win7", 0x8, None),
    "NtYieldExecution": (0x46, "win10", 0x12, 0x15),
    "NtTerminateThread": (0x53, "win10", 0x12, 0x15),
    "NtUserMessageCall": (0x1007, "win10", 0x12, 0x15),
    "NtdllDispatcherPointer": (None, None, None, None),  # data in .data, not code
}


def test_every_stub_shape_in_the_compiled_ntdll(pe_files: PeFixtures) -> None:
    nt = load_pe(pe_files.ntdll)
    found = {s.name: (s.ssn, s.shape, s.syscall_offset, s.int2e_offset) for s in recover_stubs(nt)}
    assert found == FIXTURE_STUBS


def test_service_table_merges_nt_and_zw_and_matches_the_profile(pe_files: PeFixtures) -> None:
    table = service_table(load_pe(pe_files.ntdll))
    assert "ZwClose" not in table and table["NtClose"] == 0x0F
    assert "NtdllDispatcherPointer" not in table
    win10 = get_profile("win10-22h2")
    assert table == {name: win10.ssn[name] for name in table}
    assert compare_with_profile(table, win10) == []
    wrong = compare_with_profile(table, get_profile("win7-sp1"))
    assert SsnDisagreement("NtCallbackReturn", 0x05, 0x02) in wrong
    assert len(wrong) == 8  # every ntoskrnl service differs; NtUserMessageCall is 0x1007 in both


@pytest.mark.parametrize("name", profile_names())
def test_builtin_ntdll_and_win32u_agree_with_their_profile(name: str) -> None:
    profile = get_profile(name)
    ntdll = build_ntdll(profile)
    win32u = build_win32u(profile, NTDLL_BASE + 0x10_0000)
    nt_table, u_table = service_table(ntdll), service_table(win32u)
    assert {**nt_table, **u_table} == profile.ssn
    assert compare_with_profile(nt_table, profile) == compare_with_profile(u_table, profile) == []
    stubs = recover_stubs(ntdll)
    assert {s.shape for s in stubs} == {profile.stub}
    assert {s.syscall_offset for s in stubs} == {SYSCALL_OFFSET[profile.stub]}
    callback_return = stub_at(ntdll, "ZwCallbackReturn")
    assert callback_return.address == ntdll.exports["NtCallbackReturn"]
    assert callback_return.ssn == profile.ssn["NtCallbackReturn"]


def test_other_shapes_and_non_stubs() -> None:
    image = image_from_assembly(
        "odd",
        0x10000000,
        """
NtInverted:
    mov r10, rcx
    mov eax, 0x21
    test byte ptr [0x7ffe0308], 1
    jne NtInverted__sys
    int 0x2e
    ret
NtInverted__sys:
    syscall
    ret
NtLegacy:
    mov eax, 0x22
    int 0x2e
    ret
NtCurrentTeb:
    mov rax, qword ptr gs:[0x30]
    ret
NtLoops:
    jmp NtLoops
""",
    )
    got = {s.name: (s.ssn, s.shape, s.syscall_offset, s.int2e_offset) for s in recover_stubs(image)}
    assert got["NtInverted"][:2] == (0x21, "int2e-if-zero")
    assert got["NtLegacy"] == (0x22, "int2e", None, 5)
    assert got["NtCurrentTeb"] == got["NtLoops"] == (None, None, None, None)


def test_nt_and_zw_that_disagree_are_reported() -> None:
    image = image_from_assembly(
        "bad",
        0x10000000,
        "NtFoo:\n mov r10, rcx\n mov eax, 1\n syscall\n ret\nZwFoo:\n mov r10, rcx\n mov eax, 2\n syscall\n ret\n",
    )
    with pytest.raises(ImageError) as e:
        service_table(image)
    assert str(e.value) == "bad: NtFoo (SSN 0x1) and ZwFoo (SSN 0x2) disagree"


def test_dispatcher_convention_guess(pe_files: PeFixtures) -> None:
    assert guess_dispatcher_convention(load_pe(pe_files.ntdll)) == DispatcherGuess(
        "registers", "reads ecx at +0x4 before writing it"
    )
    stack = guess_dispatcher_convention(build_ntdll(get_profile("win10-22h2")))
    assert str(stack) == "stack (guess: reads [rsp+0x20] at +0x0 before moving RSP)"
    registers = build_ntdll(get_profile("win10-22h2").with_overrides(dispatcher="registers"))
    assert guess_dispatcher_convention(registers).convention == "registers"
    assert guess_dispatcher_convention(load_pe(pe_files.callbacks)).convention == "unknown"
    pushed = image_from_assembly(
        "pushed", 0x10000000, "KiUserCallbackDispatcher:\n push rbx\n mov rbx, qword ptr [rsp + 0x28]\n ret\n"
    )
    assert guess_dispatcher_convention(pushed).convention == "unknown"
