"""Calls into other modules go through import slots, as a linker emits them: `call [rip + __imp_NtX]`."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import capstone
import pytest
from capstone import x86
from pe_fixtures import PeFixtures, pe_fixtures_or_fail

from conftest import asm_scenario
from emu.address_space import MODULE_BASE
from emu.api import run
from emu.engine import build
from emu.errors import ScenarioError
from emu.loader.image import AssemblyError, Image, image_from_assembly
from emu.scenario import parse_scenario

BASE = 0x7FFA_C000_0000
FAR = {  # far: more than 2 GiB below the module, as Wine's ntdll at its preferred base 0x170000000
    "NtYieldExecution": ("ntdll", 0x1_7000_1230),
    "NtClose": ("ntdll", 0x1_7000_1250),
    "NtUserMessageCall": ("win32u", 0x1_8000_2000),
    "NearData": ("other", BASE + 0x0200_0000),
}
_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.detail = True


def lookup(name: str) -> tuple[str, int] | None:
    return FAR.get(name)


def link(code: str, data: str = "") -> Image:
    return image_from_assembly("app", BASE, code, data, imports=lookup)


def at(image: Image, label: str, size: int) -> bytes:
    got = image.read(image.symbols[label], size)
    assert got is not None
    return got


def slot_of(image: Image, call_at: int) -> int:
    """The slot a `FF 15/25 rel32` at ``call_at`` reads: the end of the 6 bytes plus rel32."""
    code = at_address(image, call_at, 6)
    assert code[0] == 0xFF and code[1] in (0x15, 0x25), code.hex()
    rel: int = struct.unpack("<i", code[2:])[0]
    return call_at + 6 + rel


def at_address(image: Image, address: int, size: int) -> bytes:
    got = image.read(address, size)
    assert got is not None
    return got


def quad(image: Image, address: int) -> int:
    return int.from_bytes(at_address(image, address, 8), "little")


def test_a_cross_module_call_is_an_indirect_call_through_a_slot_holding_the_target() -> None:
    image = link("main:\n    sub rsp, 0x28\nsite:\n    call NtYieldExecution\nafter:\n    add rsp, 0x28\n    ret")
    site = image.symbols["site"]
    assert at(image, "site", 2) == b"\xff\x15"  # call qword ptr [rip + rel32]
    assert image.symbols["after"] - site == 6
    slot = slot_of(image, site)
    assert slot == image.symbols["__imp_NtYieldExecution"]
    assert quad(image, slot) == 0x1_7000_1230
    # The slot is in a read-only data section of the module, as a linker's .idata.
    section = image.section_at(slot)
    assert section is not None and section.name == ".idata" and section.perms == "r"
    assert [(i.dll, i.name, i.slot) for i in image.imports] == [("ntdll.dll", "NtYieldExecution", slot)]
    # Internal names never name an address nor become exports.
    assert "__imp_NtYieldExecution" not in image.exports


def test_jmp_goes_through_the_slot_and_local_calls_stay_direct() -> None:
    image = link("main:\n    call helper\ntail:\n    jmp NtClose\nhelper:\n    ret")
    assert at(image, "main", 1) == b"\xe8"  # call rel32 to a label of the module itself
    assert at(image, "main", 5)[1:] == (image.symbols["helper"] - image.symbols["main"] - 5).to_bytes(4, "little")
    assert at(image, "tail", 2) == b"\xff\x25"  # jmp qword ptr [rip + rel32]
    assert quad(image, slot_of(image, image.symbols["tail"])) == 0x1_7000_1250


@pytest.mark.parametrize(
    "spelling",
    [
        "call NtClose",
        "call [rip + __imp_NtClose]",
        "call qword ptr [__imp_NtClose]",
        "call qword ptr [rip+__imp_NtClose]",
    ],
)
def test_every_spelling_of_the_call_gives_the_same_bytes(spelling: str) -> None:
    image = link(f"main:\n    {spelling}\n    ret")
    assert at(image, "main", 7)[:6] == link("main:\n    call NtClose\n    ret").read(BASE + 0x1000, 6)
    assert quad(image, slot_of(image, image.symbols["main"])) == 0x1_7000_1250
    assert [i.name for i in image.imports] == ["NtClose"]


def test_a_label_of_the_module_shadows_another_module_s_export() -> None:
    image = link("main:\n    call NtClose\n    ret\nNtClose:\n    ret")
    assert at(image, "main", 1) == b"\xe8" and image.imports == []


def test_a_slot_named_only_in_data_is_still_made() -> None:
    image = link("main:\n    ret", "pointer: .quad __imp_NtClose")
    assert quad(image, image.symbols["pointer"]) == image.symbols["__imp_NtClose"]
    assert quad(image, image.symbols["__imp_NtClose"]) == 0x1_7000_1250


def test_one_slot_per_name_grouped_by_module_each_group_ending_with_zero() -> None:
    image = link("main:\n    call NtClose\n    call NtUserMessageCall\n    call NtClose\n    jmp NtYieldExecution")
    slots = {i.name: i.slot for i in image.imports}
    assert len(image.imports) == 3
    assert {i.dll for i in image.imports} == {"ntdll.dll", "win32u.dll"}
    assert slots["NtYieldExecution"] == slots["NtClose"] + 8  # ntdll's slots together
    assert quad(image, slots["NtYieldExecution"] + 8) == 0  # then the terminating zero slot
    assert slots["NtUserMessageCall"] == slots["NtYieldExecution"] + 16
    assert image.sections[-1].name == ".idata" and image.sections[-1].rva % 0x1000 == 0


def test_slots_come_after_the_module_data_which_stays_where_it_was() -> None:
    data = "value: .quad 7"
    image = link("main:\n    mov rax, [rip + value]\n    call NtClose\n    ret", data)
    plain = image_from_assembly("app", BASE, "main:\n    mov rax, [rip + value]\n    ret", data)
    assert image.symbols["value"] == plain.symbols["value"]
    assert [s.name for s in image.sections] == [".text", ".data", ".idata"]


def test_other_uses_of_a_far_name_keep_the_absolute_address() -> None:
    image = link("main:\n    mov rax, NtClose\n    mov rcx, [rip + __imp_NtClose]\n    ret", "table: .quad NtClose")
    insns = list(_cs.disasm(at(image, "main", 17), image.symbols["main"]))
    assert insns[0].op_str == "rax, 0x170001250"
    slot = image.symbols["__imp_NtClose"]
    assert insns[1].op_str == f"rcx, qword ptr [rip + {slot - insns[1].address - insns[1].size:#x}]"
    assert quad(image, image.symbols["table"]) == 0x1_7000_1250


def test_a_near_name_in_a_memory_operand_is_exactly_rip_relative() -> None:
    image = link("main:\n    lea rcx, [NearData + 8]\n    mov rdx, [rip + NearData]\n    cmp byte ptr [NearData], 0x4c")
    target = FAR["NearData"][1]
    insns = list(_cs.disasm(at(image, "main", 21), image.symbols["main"]))
    assert [i.mnemonic for i in insns] == ["lea", "mov", "cmp"]
    for insn, want in zip(insns, (target + 8, target, target), strict=True):
        mem = next(op.mem for op in insn.operands if op.type == x86.X86_OP_MEM)
        assert mem.base == x86.X86_REG_RIP
        assert insn.address + insn.size + mem.disp == want, insn


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("lea rax, [NtClose]", "take its address from its import slot ('mov rax, [rip + __imp_NtClose]')"),
        (
            "mov rax, [rbx + NtClose]",
            "cannot be a 32-bit displacement here: load its address first ('mov rax, NtClose')",
        ),
        ("jne NtClose", "jump through its import slot, 'jmp qword ptr [rip + __imp_NtClose]'"),
    ],
)
def test_a_far_name_that_cannot_be_encoded_is_one_clear_error(line: str, needle: str) -> None:
    with pytest.raises(AssemblyError) as e:
        link(f"main:\n    nop\n    {line}")
    assert e.value.line == 3 and e.value.section == "code"
    assert "'NtClose' (ntdll, at 0x170001250)" in str(e.value) and needle in str(e.value)


def test_an_error_on_a_linked_line_shows_the_line_as_written() -> None:
    with pytest.raises(AssemblyError) as e:
        link("main:\n    call NtClose\n    xorr ecx, ecx")
    assert str(e.value) == "line 3: Invalid mnemonic in 'xorr ecx, ecx'"


# --- a scenario whose ntdll is loaded more than 2 GiB away from its modules ----------------------
FAR_NTDLL = 0x1_7000_0000


@pytest.fixture(scope="module")
def far_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built: PeFixtures = pe_fixtures_or_fail()
    out = tmp_path_factory.mktemp("far")
    shutil.copyfile(built.ntdll, out / "ntdll.dll")
    return out


def far_scenario(folder: Path, code: str) -> Path:
    text = asm_scenario(
        code,
        extra=f'[profile]\ndispatcher = "registers"\n[ntdll]\npath = "ntdll.dll"\nbase = {FAR_NTDLL:#x}',
        table='[kernel_callback_table]\nsize = 4\n2 = "app!on_message"',
        services='[services.NtYieldExecution]\nsteps = [{ kind = "callback", api = 2 }, { kind = "return", status = "callback" }]',
    )
    path = folder / "far.toml"
    path.write_text(text)
    return path


MAIN = """
main:
    sub rsp, 0x28
    call NtYieldExecution
main_after:
    add rsp, 0x28
    ret
on_message:                             ; returns early through NtCallbackReturn itself
    sub rsp, 0x28
    xor ecx, ecx
    xor edx, edx
    mov r8d, 0x1234
    call NtCallbackReturn
on_message_after:
    int3
"""


def test_a_module_calls_a_far_ntdll_and_the_stack_shows_the_indirect_call(far_dir: Path) -> None:
    r = run(far_scenario(far_dir, MAIN))
    assert r.error is None, r.error
    ntdll = next(i for i in r.images if i.name == "ntdll")
    app = next(i for i in r.images if i.name == "app")
    assert ntdll.base == FAR_NTDLL and app.base - ntdll.base > 1 << 31
    assert r.exit_status == 0x1234
    first = r.trace.transitions[0]
    assert (first.kind, first.service) == ("syscall", "NtYieldExecution")
    # In the kernel, the user stack's top word is the return address: right after the 6-byte call.
    state = r.trace.state(first.dst)
    ret = int.from_bytes(state.stack[:8], "little")
    assert ret == app.symbols["main_after"] == app.symbols["main"] + 4 + 6
    assert app.read(ret - 6, 2) == b"\xff\x15"
    # The detector's pending state: [RSP] is right after the callback's own indirect call.
    (d,) = r.detections
    assert d.rip == "ntdll!NtCallbackReturn+0x17"
    assert d.return_address == "app!on_message_after"
    assert app.symbols["on_message_after"] - app.symbols["on_message"] == 4 + 2 + 2 + 6 + 6


def test_a_far_lea_in_a_scenario_is_one_line_naming_the_fix(far_dir: Path) -> None:
    path = far_scenario(far_dir, MAIN.replace("    call NtYieldExecution", "    lea rax, [NtYieldExecution]"))
    with pytest.raises(ScenarioError) as e:
        build(parse_scenario(path.read_text(), str(path)))
    message = str(e.value)
    assert message.count("\n") == 0
    assert "out of rel32 reach of this module" in message
    assert "'mov rax, [rip + __imp_NtYieldExecution]'" in message
    assert f"at {MODULE_BASE + 0x1000:#x}" in message
