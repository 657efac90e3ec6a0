"""The PE loader on DLLs compiled by mingw-w64: layout, relocations, exports, binding, bad input."""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzz_support import no_hang
from pe_fixtures import PeFixtures, pe_fixtures_or_fail

from emu.errors import ImageError, UnimplementedImport
from emu.loader.image import Image, ImageImport, Symbolizer
from emu.loader.pe import TRAP_BASE, ImportTraps, bind_imports, load_pe
from emu.profile import get_profile
from emu.runtime import build_ntdll

NEW_BASE = 0x1_5000_0000


@pytest.fixture(scope="session")
def pe_files() -> PeFixtures:
    return pe_fixtures_or_fail()


def _u64(image: Image, address: int) -> int:
    data = image.read(address, 8)
    assert data is not None
    return int.from_bytes(data, "little")


def test_sections_headers_and_perms(pe_files: PeFixtures) -> None:
    nt = load_pe(pe_files.ntdll)
    assert (nt.name, nt.base, nt.preferred_base, nt.path) == (
        "ntdll",
        0x7FFB_0000_0000,
        0x7FFB_0000_0000,
        str(pe_files.ntdll),
    )
    assert [(s.name, s.rva, s.perms) for s in nt.sections] == [
        (".text", 0x1000, "rx"),
        (".data", 0x2000, "rw"),
        (".edata", 0x3000, "r"),
        (".idata", 0x4000, "rw"),
        (".reloc", 0x5000, "r"),
    ]
    assert nt.headers[:2] == b"MZ" and nt.read(nt.base, 2) == b"MZ"
    assert nt.entry == nt.symbols["DllEntry"]
    assert load_pe(pe_files.program).pdata  # mingw emits .pdata for C functions


def test_exports_ordinals_forwarders_and_symbols(pe_files: PeFixtures) -> None:
    nt = load_pe(pe_files.ntdll)
    assert "ZwCallbackReturn" not in nt.exports and "NtCallbackReturn" in nt.exports
    assert nt.exports["NtClose"] == nt.exports["ZwClose"]  # one stub, two names
    assert (
        nt.export_ordinals["KiUserCallbackDispatcher"] == 1 and nt.ordinals[1] == nt.exports["KiUserCallbackDispatcher"]
    )
    assert nt.ordinals[42] == nt.symbols["RtlFixtureOrdinal"]  # NONAME: an ordinal, no name
    assert "RtlFixtureOrdinal" not in nt.exports
    assert [(f.name, f.ordinal, f.target) for f in nt.forwarders] == [("RtlForwardedSleep", 15, "kernelbase.Sleep")]
    assert "RtlForwardedSleep" not in nt.exports
    # COFF symbols: a label the .def does not export
    assert nt.symbols["KiUserCallbackDispatcherReturn"] == nt.exports["KiUserCallbackDispatcher"] + 0x1D
    sym = Symbolizer([nt])
    assert sym(nt.exports["NtClose"] + 0x12) == "ntdll!ZwClose+0x12"
    assert sym(nt.symbols["KiUserCallbackDispatcherReturn"] + 7) == "ntdll!KiUserCallbackDispatcherReturn+0x7"


def test_relocations_at_another_base(pe_files: PeFixtures) -> None:
    at_home = load_pe(pe_files.program)
    moved = load_pe(pe_files.program, base=NEW_BASE)
    assert moved.base == NEW_BASE and moved.preferred_base == at_home.base == 0x1_4000_0000
    # ProgramMainPointer (.data) holds &ProgramMain: a DIR64 base relocation
    assert _u64(at_home, at_home.exports["ProgramMainPointer"]) == at_home.exports["ProgramMain"] == 0x1_4000_1000
    assert _u64(moved, moved.exports["ProgramMainPointer"]) == moved.exports["ProgramMain"] == NEW_BASE + 0x1000
    assert moved.sections[0].data == at_home.sections[0].data  # RIP-relative code needs no fix-up
    nt = load_pe(pe_files.ntdll, base=0x7FFC_0000_0000)
    assert _u64(nt, nt.exports["NtdllDispatcherPointer"]) == nt.exports["KiUserCallbackDispatcher"] == 0x7FFC_0000_1120


def test_imports_by_name_and_ordinal(pe_files: PeFixtures) -> None:
    cb = load_pe(pe_files.callbacks)
    assert [i.label for i in cb.imports] == [
        "ntdll.dll!NtCallbackReturn",
        "ntdll.dll!NtUserMessageCall",
        "ntdll.dll!#42",
    ]
    assert all(cb.section_at(i.slot) is not None for i in cb.imports)


def test_bind_imports_fills_the_iat(pe_files: PeFixtures) -> None:
    nt, cb = load_pe(pe_files.ntdll), load_pe(pe_files.callbacks)
    bound, traps = bind_imports(cb, [nt, cb])
    assert traps == []
    slots = {i.label: i.slot for i in cb.imports}
    assert _u64(bound, slots["ntdll.dll!NtCallbackReturn"]) == nt.exports["NtCallbackReturn"]
    assert _u64(bound, slots["ntdll.dll!NtUserMessageCall"]) == nt.exports["NtUserMessageCall"]
    assert _u64(bound, slots["ntdll.dll!#42"]) == nt.ordinals[42]
    assert _u64(cb, slots["ntdll.dll!NtCallbackReturn"]) != nt.exports["NtCallbackReturn"]  # input untouched
    # binding follows the ntdll where it is actually loaded
    moved = load_pe(pe_files.ntdll, base=0x7FFC_0000_0000)
    rebound, _ = bind_imports(cb, [moved])
    assert _u64(rebound, slots["ntdll.dll!NtCallbackReturn"]) == 0x7FFC_0000_1020


TRAP = '; [machine] unbound_imports = "trap" loads it anyway and stops the run only if it is called'


def test_missing_import_is_one_error_naming_it(pe_files: PeFixtures) -> None:
    cb = load_pe(pe_files.callbacks)
    builtin = build_ntdll(get_profile("win10-22h2"))  # NtUserMessageCall lives in win32u there
    with pytest.raises(ImageError) as e:
        bind_imports(cb, [builtin])
    assert (
        str(e.value)
        == "callbacks: cannot bind import ntdll.dll!NtUserMessageCall: ntdll does not export it (and 1 more)" + TRAP
    )
    with pytest.raises(ImageError) as e:
        bind_imports(cb, [])
    assert (
        str(e.value)
        == "callbacks: cannot bind import ntdll.dll!NtCallbackReturn: ntdll.dll is not loaded (and 2 more)" + TRAP
    )
    forwarded = dataclasses.replace(
        cb, imports=[ImageImport("NTDLL.DLL", "RtlForwardedSleep", None, cb.imports[0].slot)]
    )
    with pytest.raises(ImageError) as e:
        bind_imports(forwarded, [load_pe(pe_files.ntdll)])
    assert str(e.value) == (
        "callbacks: cannot bind import NTDLL.DLL!RtlForwardedSleep: it is forwarded to kernelbase.Sleep "
        "(emu does not follow forwarders)" + TRAP
    )


def test_trap_mode_points_missing_imports_at_traps(pe_files: PeFixtures) -> None:
    builtin = build_ntdll(get_profile("win10-22h2"))
    cb, prog = load_pe(pe_files.callbacks), load_pe(pe_files.program)
    traps = ImportTraps()
    bound, used = bind_imports(cb, [builtin], on_missing="trap", traps=traps)
    assert [(t.label, t.address, t.importer) for t in used] == [
        ("ntdll.dll!NtUserMessageCall", TRAP_BASE + 0x1000, "callbacks"),
        ("ntdll.dll!#42", TRAP_BASE + 0x1010, "callbacks"),
    ]
    slots = {i.label: i.slot for i in cb.imports}
    assert _u64(bound, slots["ntdll.dll!NtCallbackReturn"]) == builtin.exports["NtCallbackReturn"]
    assert _u64(bound, slots["ntdll.dll!NtUserMessageCall"]) == TRAP_BASE + 0x1000
    _, used2 = bind_imports(prog, [builtin], on_missing="trap", traps=traps)
    assert used2 == used[:1]  # one trap per dll!name across the process
    trap_image = traps.image()
    assert trap_image.read(TRAP_BASE + 0x1000, 1) == b"\xcc"
    assert Symbolizer([trap_image])(TRAP_BASE + 0x1010) == "unbound!ntdll.dll.#42"
    t = used[0]
    assert traps.trap_at(TRAP_BASE + 0x1000) == t and traps.trap_at(TRAP_BASE + 0x1013) == used[1]
    assert traps.trap_at(TRAP_BASE + 0x1020) is None and traps.trap_at(TRAP_BASE) is None
    assert str(UnimplementedImport(t.label, t.importer, t.reason)) == (
        "call to unbound import ntdll.dll!NtUserMessageCall (imported by callbacks): ntdll does not export it"
    )


# --- malformed input: mutate the compiled ntdll at offsets read from its own headers ---------


def _layout(raw: bytes) -> dict[str, int]:
    pe = struct.unpack_from("<I", raw, 0x3C)[0]
    fh = pe + 4
    opt = fh + 20
    sect = opt + struct.unpack_from("<H", raw, fh + 16)[0]
    reloc_rva = struct.unpack_from("<I", raw, opt + 112 + 8 * 5)[0]
    export_rva = struct.unpack_from("<I", raw, opt + 112)[0]
    out = {"pe": pe, "fh": fh, "opt": opt, "sect": sect}
    for i in range(struct.unpack_from("<H", raw, fh + 2)[0]):
        name = raw[sect + 40 * i : sect + 40 * i + 8].rstrip(b"\0").decode()
        vsize, rva, _, ptr = struct.unpack_from("<IIII", raw, sect + 40 * i + 8)
        out[name] = sect + 40 * i
        out[name + ".vsize"] = vsize
        if rva <= reloc_rva < rva + vsize:
            out["reloc_block"] = ptr + reloc_rva - rva
        if rva <= export_rva < rva + vsize:
            out["export_dir"] = ptr + export_rva - rva
            eat_rva = struct.unpack_from("<I", raw, ptr + export_rva - rva + 28)[0]
            out["eat"] = ptr + eat_rva - rva
    return out


def _put(fmt: str, where: str, delta: int, value: int) -> Callable[[bytearray, dict[str, int]], bytes]:
    def mutate(raw: bytearray, at: dict[str, int]) -> bytes:
        struct.pack_into(fmt, raw, at[where] + delta, value)
        return bytes(raw)

    return mutate


def _text_data_overlap(raw: bytearray, at: dict[str, int]) -> bytes:
    struct.pack_into("<I", raw, at[".data"] + 12, 0x1000)
    return bytes(raw)


# (case, mutation, expected message after "<file>: ", load base or None)
MALFORMED: list[tuple[str, Callable[[bytearray, dict[str, int]], bytes], str, int | None]] = [
    ("tiny", lambda raw, at: bytes(raw[:0x30]), "truncated: 48 bytes is too small for the DOS header (0x40 bytes)", None),
    ("cut in headers", lambda raw, at: bytes(raw[:0x90]), "truncated: the PE header at e_lfanew 0x80 ends past the end of the file (0x90 bytes)", None),
    ("cut in .text", lambda raw, at: bytes(raw[:0x500]), "truncated: section .text raw data [0x400, 0x600) ends past the end of the file (0x500 bytes)", None),
    ("no MZ", _put("<H", "pe", -0x80, 0x4D5A), "not a PE file (no MZ signature)", None),
    ("no PE", _put("<I", "pe", 0, 0x4C45467F), "not a PE file (no PE signature at e_lfanew 0x80)", None),
    ("x86", _put("<H", "fh", 0, 0x14C), "not an x64 image (Machine 0x14c); emu loads PE32+ x64 images only", None),
    ("PE32", _put("<H", "opt", 0, 0x10B), "not a PE32+ image (optional header magic 0x10b); emu loads PE32+ x64 images only", None),
    ("no sections", _put("<H", "fh", 2, 0), "bad section table: NumberOfSections 0 (the Windows loader accepts 1 to 96)", None),
    ("65535 sections", _put("<H", "fh", 2, 0xFFFF), "bad section table: NumberOfSections 65535 (the Windows loader accepts 1 to 96)", None),
    ("table past headers", _put("<H", "fh", 2, 40), "bad section table: 40 entries at 0x188 end past SizeOfHeaders 0x400", None),
    ("overlap", _text_data_overlap, "sections .text [0x1000, 0x11e0) and .data [0x1000, 0x1010) overlap", None),
    ("unaligned section", _put("<I", ".data", 12, 0x2100), "section .data: VirtualAddress 0x2100 is not a multiple of SectionAlignment 0x1000", None),
    ("section over headers", _put("<I", ".text", 12, 0), "section .text at RVA 0x0 overlaps the headers (SizeOfHeaders 0x400)", None),
    ("SizeOfImage", _put("<I", "opt", 56, 0xFFFFFFFF), "absurd SizeOfImage 0xffffffff (emu's limit is 0x10000000)", None),
    ("VirtualSize", _put("<I", ".text", 8, 0xFFFFF000), "section .text: absurd VirtualSize 0xfffff000 (emu's limit is 0x10000000)", None),
    ("SizeOfRawData", _put("<I", ".edata", 16, 0x7FFFFFFF), "section .edata: absurd SizeOfRawData 0x7fffffff (emu's limit is 0x10000000)", None),
    ("section past image", _put("<I", ".reloc", 8, 0x5000), "section .reloc [0x5000, 0xa000) ends past SizeOfImage 0x6000", None),
    ("raw past file", _put("<I", ".reloc", 20, 0x100000), "truncated: section .reloc raw data [0x100000, 0x100200) ends past the end of the file ({size:#x} bytes)", None),
    ("reloc out of range", _put("<I", "reloc_block", 0, 0x7FFF0000), "base relocation at RVA 0x7fff0000 (DIR64) lies outside the image (SizeOfImage 0x6000)", NEW_BASE),
    ("reloc block size", _put("<I", "reloc_block", 4, 2), "bad base relocation block at RVA 0x5000 (SizeOfBlock 0x2)", NEW_BASE),
    ("reloc type", _put("<H", "reloc_block", 8, 0x5000), "unsupported base relocation type 5 at RVA 0x2000", NEW_BASE),
    ("export RVA", _put("<I", "eat", 0, 0x7FFFFFF0), "export KiUserCallbackDispatcher (ordinal 1) has RVA 0x7ffffff0 outside the image (SizeOfImage 0x6000)", None),
    ("export count", _put("<I", "export_dir", 20, 0x7FFFFFFF), "the export functions table (2147483647 entries at RVA 0x3028) lies outside the image (SizeOfImage 0x6000)", None),
    ("export directory", _put("<I", "opt", 112, 0x7FFF0000), "the export directory [0x7fff0000, 0x7fff0265) lies outside the image (SizeOfImage 0x6000)", None),
    ("entry point", _put("<I", "opt", 16, 0x10000), "AddressOfEntryPoint 0x10000 lies outside the image (SizeOfImage 0x6000)", None),
    ("relocs stripped", _put("<H", "fh", 18, 0x2023), "cannot load at 0x150000000: relocations are stripped (ImageBase 0x7ffb00000000)", NEW_BASE),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "expected", "base"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_pe_is_one_quick_error(
    pe_files: PeFixtures,
    tmp_path: Path,
    mutate: Callable[[bytearray, dict[str, int]], bytes],
    expected: str,
    base: int | None,
) -> None:
    raw = pe_files.ntdll.read_bytes()
    bad = tmp_path / "bad.dll"
    bad.write_bytes(mutate(bytearray(raw), _layout(raw)))
    with no_hang(), pytest.raises(ImageError) as e:  # a runaway parse ends the run; speed is for benchmarks
        load_pe(bad, base=base)
    assert str(e.value) == f"{bad}: {expected.format(size=len(raw))}"
    assert "\n" not in str(e.value)


def test_unreadable_file_and_bad_base(pe_files: PeFixtures, tmp_path: Path) -> None:
    with pytest.raises(ImageError) as e:
        load_pe(tmp_path / "missing.dll")
    assert str(e.value) == f"{tmp_path / 'missing.dll'}: cannot read: No such file or directory"
    with pytest.raises(ImageError) as e:
        load_pe(pe_files.ntdll, base=0x1234)
    assert str(e.value) == (
        f"{pe_files.ntdll}: cannot load at 0x1234: the image must be page-aligned in user space (below 0x7fffffff0000)"
    )


def test_random_header_corruption_never_escapes_as_another_error(pe_files: PeFixtures) -> None:
    raw = pe_files.ntdll.read_bytes()
    rng = random.Random(4)
    for _ in range(300):
        bad = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(0, 0x400)] = rng.randrange(256)  # headers and section table
        try:
            with no_hang(case=bytes(bad)):  # a runaway parse ends the run; speed is for benchmarks
                load_pe(bytes(bad), base=rng.choice([None, NEW_BASE]), name="fuzz")
        except ImageError as e:
            assert "\n" not in str(e) and str(e).startswith("fuzz: ")
