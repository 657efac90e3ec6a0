"""[kernel_callback_table] from = "module!export": a table a DLL exports as data.

tables.dll (tests/fixtures/pe/tables.c, built by mingw-w64) exports CallbackTable, three
static callbacks and a NULL, plus NotATable (small integers) and TableFunction (code).
It is loaded away from its preferred base, so the table's entries are only right if the
PE loader's relocations were applied.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pe_fixtures import PeFixtures, pe_fixtures_or_fail

from emu.address_space import PEB_ADDRESS
from emu.api import run
from emu.engine import Process, build
from emu.errors import ScenarioError
from emu.scenario import load_scenario

LOAD_AT = 0x7FF0_0000_0000  # not tables.dll's ImageBase: the loader relocates it

SCENARIO = """
[scenario]
name = "table_from_image"

[[pe]]
path = "tables.dll"
base = 0x7FF000000000

[[module]]
name = "app"
code = '''
main:
    sub rsp, 0x28
    xor ecx, ecx
    mov edx, 0x000F
    call NtUserMessageCall
    add rsp, 0x28
    ret
on_message:
    mov eax, 0x1234
    ret
'''
data = '''
own_table:
    .quad on_message, on_message, 0
'''

[thread]
entry = "app!main"

[kernel_callback_table]
from = "tables!CallbackTable"

[services.NtUserMessageCall]
steps = [
    { kind = "callback", api = 1, data = "2a" },
    { kind = "return", status = "callback" },
]
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built: PeFixtures = pe_fixtures_or_fail()
    out = tmp_path_factory.mktemp("tables")
    shutil.copyfile(built.tables, out / "tables.dll")
    return out


def scenario(folder: Path, text: str, name: str = "s.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def peb_table(p: Process) -> int:
    return p.machine.read_u64(PEB_ADDRESS + 0x58)  # PEB.KernelCallbackTable


def line(text: str, needle: str) -> int:
    hits = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    assert len(hits) == 1, needle
    return hits[0]


def test_the_peb_points_at_the_images_own_table_and_callbacks_run_through_it(folder: Path) -> None:
    path = scenario(folder, SCENARIO)
    p = build(path)
    tables = next(i for i in p.images if i.name == "tables")
    assert tables.base == LOAD_AT and tables.preferred_base != LOAD_AT
    export = tables.exports["CallbackTable"]
    assert peb_table(p) == export
    entries = [p.machine.read_u64(export + 8 * i) for i in range(4)]
    assert all(tables.contains(e) and tables.section_at(e).name == ".text" for e in entries[:3])  # type: ignore[union-attr]
    assert entries[3] == 0 and len(set(entries[:3])) == 3
    r = run(path)
    assert r.error is None
    assert r.exit_status == 0x712A  # TableCallback1 saw the one input byte 0x2a


def test_single_entries_override_in_a_copy(folder: Path) -> None:
    text = SCENARIO.replace('from = "tables!CallbackTable"', 'from = "tables!CallbackTable"\n2 = "app!on_message"')
    p = build(scenario(folder, text))
    tables = next(i for i in p.images if i.name == "tables")
    export = tables.exports["CallbackTable"]
    table = peb_table(p)
    region = p.machine.region_at(table)
    assert region is not None and region.label == "KernelCallbackTable"
    copy = [p.machine.read_u64(table + 8 * i) for i in range(3)]
    original = [p.machine.read_u64(export + 8 * i) for i in range(3)]
    assert copy[:2] == original[:2]
    assert copy[2] == p.resolve("app!on_message", ()) != original[2]
    assert p.machine.read_u64(export + 16) == original[2]  # the image's own table is untouched
    assert run(scenario(folder, text.replace("api = 1,", "api = 2,"))).exit_status == 0x1234
    assert run(scenario(folder, text.replace("api = 1,", "api = 0,"))).exit_status == 0x7001  # length 1


def test_an_index_past_the_exported_table_grows_the_copy(folder: Path) -> None:
    text = SCENARIO.replace('from = "tables!CallbackTable"', 'from = "tables!CallbackTable"\n5 = "app!on_message"')
    p = build(scenario(folder, text))
    table = peb_table(p)
    assert p.machine.read_u64(table + 8 * 3) == 0 and p.machine.read_u64(table + 8 * 5) != 0


def test_size_takes_entries_that_are_not_addresses(folder: Path) -> None:
    text = SCENARIO.replace('from = "tables!CallbackTable"', 'from = "tables!NotATable"\nsize = 3\n0 = "app!main"')
    p = build(scenario(folder, text))
    table = peb_table(p)
    assert [p.machine.read_u64(table + 8 * i) for i in range(1, 3)] == [2, 3]


def test_a_table_in_an_assembled_modules_data(folder: Path) -> None:
    text = SCENARIO.replace('from = "tables!CallbackTable"', 'from = "app!own_table"')
    p = build(scenario(folder, text))
    assert peb_table(p) == p.resolve("app!own_table", ())
    assert run(scenario(folder, text)).exit_status == 0x1234


def fails(folder: Path, text: str) -> str:
    path = scenario(folder, text, "bad.toml")
    with pytest.raises(ScenarioError) as e:
        build(load_scenario(path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors_name_the_file_line_and_key(folder: Path) -> None:
    path = folder / "bad.toml"

    def with_from(value: str, extra: str = "") -> str:
        return SCENARIO.replace('from = "tables!CallbackTable"', f"from = {value}{extra}")

    where = f"{path}:{line(SCENARIO, 'from = ')} [kernel_callback_table.from]"
    assert fails(folder, with_from('"nosuch!CallbackTable"')) == (
        f"{where}: no module named 'nosuch' (declared: app, tables)"
    )
    assert fails(folder, with_from('"CallbackTable"')) == (
        f"{where}: expected \"module!export\" (a table exported as data), got 'CallbackTable'"
    )
    assert fails(folder, with_from("3")) == f"{where}: expected a string, got integer 3"
    assert fails(folder, with_from('"tables!NoSuchTable"')) == f"{where}: tables exports no 'NoSuchTable'"
    p = build(scenario(folder, SCENARIO))
    tables_image = next(i for i in p.images if i.name == "tables")
    fn = tables_image.exports["TableFunction"]
    assert fails(folder, with_from('"tables!TableFunction"')) == (
        f"{where}: tables!TableFunction at {fn:#x} is in section .text (executable), not in a data section: "
        "expected an exported array of pointers"
    )
    main = p.resolve("app!main", ())
    assert fails(folder, with_from('"app!main"')) == (
        f"{where}: app!main at {main:#x} is in section .text (executable), not in a data section: "
        "expected an exported array of pointers"
    )
    assert fails(folder, with_from('"tables!NotATable"')) == (
        f"{where}: tables!NotATable: the first entry, 0x1, is not an address in a loaded image; "
        "set 'size' to take it anyway"
    )
    data = next(s for s in tables_image.sections if s.name == ".data")
    room = (tables_image.base + data.rva + data.size - tables_image.exports["CallbackTable"]) // 8
    assert fails(folder, with_from('"tables!CallbackTable"', "\nsize = 4096")) == (
        f"{where}: tables!CallbackTable: 4096 entries run past the end of section .data (room for {room})"
    )


def test_an_api_beyond_a_given_size_is_refused_when_parsing(folder: Path) -> None:
    text = SCENARIO.replace('from = "tables!CallbackTable"', 'from = "tables!CallbackTable"\nsize = 1')
    msg = fails(folder, text)
    assert msg.endswith("callback index 1 is out of range (kernel_callback_table size 1)"), msg
