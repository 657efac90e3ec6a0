"""PEB.Ldr, its three module lists and PEB.ProcessParameters, read back from emulated memory.

Expected values come from the layouts (ReactOS ldrtypes.h / rtltypes.h, MS docs, public
PDB dumps), written here as literal offsets, and from the images emu loaded: not from
the builder's own tables.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pe_fixtures import PeFixtures, pe_fixtures_or_fail

from emu.address_space import PEB_ADDRESS
from emu.engine import Process, build
from emu.loader.image import image_from_assembly
from emu.loader.loader_data import build_loader_data, main_image
from emu.machine import Machine
from emu.scenario import parse_scenario

ROOT = Path(__file__).resolve().parent.parent
PE_DIR = ROOT / "scenarios" / "pe"


def u16(m: Machine, a: int) -> int:
    return int.from_bytes(m.read(a, 2), "little")


def u32(m: Machine, a: int) -> int:
    return int.from_bytes(m.read(a, 4), "little")


def unicode_string(m: Machine, a: int) -> tuple[str, int, int]:
    """(text, Length, MaximumLength) of the UNICODE_STRING at ``a``; checks the terminator."""
    length, maximum, buffer = u16(m, a), u16(m, a + 2), m.read_u64(a + 8)
    if buffer == 0:
        return "", length, maximum
    raw = m.read(buffer, maximum)
    assert raw[length : length + 2] == b"\0\0", "the buffer is NUL-terminated right after Length bytes"
    return raw[:length].decode("utf-16-le"), length, maximum


def walk(m: Machine, head: int, link: int) -> list[int]:
    """Entries (addresses of LDR_DATA_TABLE_ENTRY) on the list at ``head``, whose links sit at +``link``.

    Walks Flink to the end, then Blink back, and checks both ways give the same entries
    and that every node's Blink is the node before it.
    """
    forward, prev, node = [], head, m.read_u64(head)
    while node != head:
        assert m.read_u64(node + 8) == prev, f"Blink of {node:#x} is not the previous node"
        forward.append(node)
        prev, node = node, m.read_u64(node)
        assert len(forward) < 64, "the list does not come back to its head"
    assert m.read_u64(head + 8) == prev, "the head's Blink is the last node"
    backward, node = [], m.read_u64(head + 8)
    while node != head:
        backward.append(node)
        node = m.read_u64(node + 8)
    assert backward[::-1] == forward
    return [n - link for n in forward]


def lists(p: Process) -> tuple[list[int], list[int], list[int]]:
    m = p.machine
    ldr = m.read_u64(PEB_ADDRESS + 0x18)  # PEB.Ldr
    assert u32(m, ldr) == 0x58 and m.read(ldr + 4, 1) == b"\1"  # Length = sizeof(PEB_LDR_DATA), Initialized
    return walk(m, ldr + 0x10, 0x00), walk(m, ldr + 0x20, 0x10), walk(m, ldr + 0x30, 0x20)


def test_builtin_process_lists_every_module_in_windows_order() -> None:
    p = build(ROOT / "scenarios" / "callback_roundtrip.toml")
    m = p.machine
    load, memory, init = lists(p)
    assert memory == load
    app = next(i for i in p.images if i.name == "app")
    expected = [app, *(i for i in p.images if i is not app)]
    assert [i.name for i in expected] == ["app", "ntdll", "win32u"]
    assert len(load) == len(expected)
    names = {
        "app": r"C:\emu\app.exe",
        "ntdll": r"C:\Windows\System32\ntdll.dll",
        "win32u": r"C:\Windows\System32\win32u.dll",
    }
    for entry, img in zip(load, expected, strict=True):
        assert m.read_u64(entry + 0x30) == img.base  # DllBase
        assert u32(m, entry + 0x40) == img.size  # SizeOfImage
        full, flen, fmax = unicode_string(m, entry + 0x48)
        base, blen, bmax = unicode_string(m, entry + 0x58)
        assert full == names[img.name] and base == names[img.name].rsplit("\\", 1)[1]
        assert (flen, fmax) == (2 * len(full), 2 * len(full) + 2)
        assert (blen, bmax) == (2 * len(base), 2 * len(base) + 2)
        assert u16(m, entry + 0x6C) == 0xFFFF  # LoadCount: pinned
        assert m.read_u64(entry + 0x70) == m.read_u64(entry + 0x78) == entry + 0x70  # HashLinks: empty
        dll = u32(m, entry + 0x68) & 0x4  # LDRP_IMAGE_DLL
        assert dll == (0 if img is app else 4)
    assert m.read_u64(PEB_ADDRESS + 0x10) == app.base  # PEB.ImageBaseAddress
    # ntdll first, the main image not on the initialization-order list at all.
    assert init == [load[1], load[2]]
    assert m.read_u64(load[0] + 0x20) == m.read_u64(load[0] + 0x28) == load[0] + 0x20
    assert m.read_u64(PEB_ADDRESS + 0x30) == 0  # PEB.ProcessHeap: emu has no heap


def test_process_parameters() -> None:
    p = build(ROOT / "scenarios" / "callback_roundtrip.toml")
    m = p.machine
    params = m.read_u64(PEB_ADDRESS + 0x20)  # PEB.ProcessParameters
    maximum, length, flags = u32(m, params), u32(m, params + 4), u32(m, params + 8)
    assert flags & 1  # RTL_USER_PROC_PARAMS_NORMALIZED: Buffers are pointers
    assert maximum == length >= 0x440
    assert unicode_string(m, params + 0x60)[0] == r"C:\emu\app.exe"  # ImagePathName
    assert unicode_string(m, params + 0x70)[0] == r'"C:\emu\app.exe"'  # CommandLine
    assert unicode_string(m, params + 0x38)[0] == "C:\\emu\\"  # CurrentDirectory.DosPath
    assert m.read_u64(params + 0x48) == 0  # CurrentDirectory.Handle
    for off in (0x60, 0x70, 0x38):
        buffer = m.read_u64(params + off + 8)
        assert params <= buffer < params + length, "normalized strings live in the block"
    env = m.read_u64(params + 0x80)  # Environment
    assert m.read(env, 4) == b"\0\0\0\0"
    assert m.read_u64(params + 0x3F0) == 4  # EnvironmentSize


@pytest.fixture(scope="module")
def pe_bin() -> Path:
    built: PeFixtures = pe_fixtures_or_fail()
    out = PE_DIR / "bin"
    out.mkdir(exist_ok=True)
    for dll in (built.ntdll, built.callbacks, built.program):
        shutil.copyfile(dll, out / Path(dll).name)
    return out


def test_pe_images_keep_their_file_names_and_entry_points(pe_bin: Path) -> None:
    p = build(PE_DIR / "third_party_ntdll.toml")
    m = p.machine
    load, _, init = lists(p)
    got = [(unicode_string(m, e + 0x58)[0], m.read_u64(e + 0x30), m.read_u64(e + 0x38)) for e in load]
    by_name = {i.name: i for i in p.images}
    program, ntdll, callbacks = by_name["program"], by_name["ntdll"], by_name["callbacks"]
    assert got == [
        ("program.dll", program.base, program.entry),  # the image holding the thread's entry
        ("ntdll.dll", ntdll.base, ntdll.entry),
        # emu's kernel32 (BaseThreadInitThunk only) comes with a foreign ntdll, after it as on Windows.
        ("kernel32.dll", by_name["kernel32"].base, 0),
        ("callbacks.dll", callbacks.base, callbacks.entry),
    ]
    assert all(e is not None and e != 0 for e in (program.entry, callbacks.entry))
    assert unicode_string(m, load[0] + 0x48)[0] == r"C:\emu\program.dll"
    assert unicode_string(m, load[1] + 0x48)[0] == r"C:\Windows\System32\ntdll.dll"
    assert unicode_string(m, load[2] + 0x48)[0] == r"C:\Windows\System32\kernel32.dll"
    assert init == load[1:]
    assert m.read_u64(PEB_ADDRESS + 0x10) == program.base


def test_the_import_trap_page_is_not_a_module(pe_bin: Path) -> None:
    p = build(PE_DIR / "unbound_import_trap.toml")
    load, _, _ = lists(p)
    trap = p.traps.base
    assert any(i.base == trap for i in p.images)
    bases = [p.machine.read_u64(e + 0x30) for e in load]
    assert trap not in bases
    assert len(bases) == len(p.images) - 1


def test_an_extra_system_image_is_listed_after_ntdll() -> None:
    # As a built-in kernel32 would be: one more image in load order, a System32 path.
    ntdll = image_from_assembly("ntdll", 0x7FFB_0000_0000, "RtlUserThreadStart: ret")
    k32 = image_from_assembly("kernel32", 0x7FFB_0200_0000, "BaseThreadInitThunk: ret")
    app = image_from_assembly("app", 0x7FFA_C000_0000, "main: ret")
    images = [ntdll, k32, app]
    main = main_image(images, "app!main")
    assert main is app
    ld = build_loader_data(images, 0x1_0000_0000, main)
    assert [e.base_name for e in ld.entries] == ["app.exe", "ntdll.dll", "kernel32.dll"]
    assert [e.base_name for e in ld.init_order] == ["ntdll.dll", "kernel32.dll"]
    assert ld.entries[2].full_name == r"C:\Windows\System32\kernel32.dll"
    assert ld.data == build_loader_data(images, 0x1_0000_0000, main).data  # deterministic


def test_main_image_when_the_entry_is_in_ntdll() -> None:
    text = (ROOT / "scenarios" / "callback_roundtrip.toml").read_text()
    text = text.replace('entry = "app!main"', 'entry = "ntdll!RtlUserThreadStart"')
    p = build(parse_scenario(text, str(ROOT / "scenarios" / "entry_in_ntdll.toml")))
    load, _, _ = lists(p)
    # ntdll plays no .exe: the first scenario image does.
    assert unicode_string(p.machine, load[0] + 0x58)[0] == "app.exe"
