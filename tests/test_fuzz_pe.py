"""Fuzzing the PE loader: mutated mingw-built DLLs → an Image or an ImageError (a hang ends the run: no_hang).

The bases are the three DLLs of ``tests/fixtures/pe/`` (built once by mingw-w64, see
``pe_fixtures.py``). For each one the header fields are located the way the PE format lays
them out (DOS header, COFF file header, optional header, the 16 data directories, every
section header, the export directory and its first array entries, the import descriptors
and their first thunks, the base relocation blocks). A case applies one to four mutations:
a field overwritten with an interesting value (0, all ones, a sign boundary, off by one or a
page, the file size, a random number), bit flips in the headers or anywhere, a byte set,
truncation, a zeroed range or a range copied over another.

Each mutant is loaded at its preferred base or elsewhere (so the relocation walk runs), the
stub analysis that a PE ntdll goes through is run on what loads, and one suite runs the
whole ``scenarios/pe/third_party_ntdll.toml`` with one of its DLLs replaced by a mutant.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import FAST, Tally, fast_settings, no_hang, run_bounded, slow_only, slow_settings, tally
from hypothesis import given
from hypothesis import strategies as st
from pe_fixtures import pe_fixtures_or_fail

from emu.loader.image import Image
from emu.loader.pe import load_pe
from emu.loader.stubs import guess_dispatcher_convention, service_table
from emu.scenario import PeSpec, load_scenario

ROOT = Path(__file__).resolve().parent.parent
THIRD_PARTY = ROOT / "scenarios" / "pe" / "third_party_ntdll.toml"


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    width: int  # bytes: 1, 2, 4 or 8


@dataclass(frozen=True)
class Base:
    name: str
    data: bytes
    fields: tuple[Field, ...]
    headers_end: int


def _u(data: bytes, off: int, width: int) -> int:
    return int.from_bytes(data[off : off + width], "little")


def _fields(data: bytes) -> tuple[tuple[Field, ...], int]:
    """The offsets of the header and table fields of a well-formed PE32+ file (PE Format spec)."""
    out = [Field("e_magic", 0, 2), Field("e_lfanew", 0x3C, 4)]
    pe = _u(data, 0x3C, 4)
    fh = pe + 4
    out.append(Field("Signature", pe, 4))
    for name, off, w in [("Machine", 0, 2), ("NumberOfSections", 2, 2), ("PointerToSymbolTable", 8, 4),
                         ("NumberOfSymbols", 12, 4), ("SizeOfOptionalHeader", 16, 2), ("Characteristics", 18, 2)]:  # fmt: skip
        out.append(Field(name, fh + off, w))
    opt = fh + 20
    opt_size = _u(data, fh + 16, 2)
    for name, off, w in [("Magic", 0, 2), ("SizeOfCode", 4, 4), ("AddressOfEntryPoint", 16, 4), ("BaseOfCode", 20, 4),
                         ("ImageBase", 24, 8), ("SectionAlignment", 32, 4), ("FileAlignment", 36, 4),
                         ("SizeOfImage", 56, 4), ("SizeOfHeaders", 60, 4), ("DllCharacteristics", 70, 2),
                         ("NumberOfRvaAndSizes", 108, 4)]:  # fmt: skip
        out.append(Field(name, opt + off, w))
    dirs = [(_u(data, opt + 112 + 8 * i, 4), _u(data, opt + 116 + 8 * i, 4)) for i in range(16)]
    for i in range(16):
        out += [
            Field(f"DataDirectory[{i}].rva", opt + 112 + 8 * i, 4),
            Field(f"DataDirectory[{i}].size", opt + 116 + 8 * i, 4),
        ]
    table = opt + opt_size
    sections = []
    for i in range(_u(data, fh + 2, 2)):
        s = table + 40 * i
        for name, off, w in [("Name", 0, 8), ("VirtualSize", 8, 4), ("VirtualAddress", 12, 4), ("SizeOfRawData", 16, 4),
                             ("PointerToRawData", 20, 4), ("Characteristics", 36, 4)]:  # fmt: skip
            out.append(Field(f"section[{i}].{name}", s + off, w))
        vsize, rva, raw_size, raw_ptr = (_u(data, s + off, 4) for off in (8, 12, 16, 20))
        sections.append((rva, max(vsize, raw_size), raw_ptr))

    def file_offset(rva: int) -> int | None:
        for start, size, raw in sections:
            if start <= rva < start + size:
                return raw + rva - start
        return None

    exp = file_offset(dirs[0][0]) if dirs[0][1] else None
    if exp is not None:
        for name, off in [("Name", 12), ("Base", 16), ("NumberOfFunctions", 20), ("NumberOfNames", 24),
                          ("AddressOfFunctions", 28), ("AddressOfNames", 32), ("AddressOfNameOrdinals", 36)]:  # fmt: skip
            out.append(Field(f"export.{name}", exp + off, 4))
        for what, rel, width in [("functions", 28, 4), ("names", 32, 4), ("ordinals", 36, 2)]:
            arr = file_offset(_u(data, exp + rel, 4))
            if arr is not None:
                out += [Field(f"export.{what}[{j}]", arr + width * j, width) for j in range(3)]
    imp = file_offset(dirs[1][0]) if dirs[1][1] else None
    j = 0
    while imp is not None and j < 4 and imp + 20 * (j + 1) <= len(data) and any(data[imp + 20 * j : imp + 20 * j + 20]):
        d = imp + 20 * j
        for name, off in [("OriginalFirstThunk", 0), ("Name", 12), ("FirstThunk", 16)]:
            out.append(Field(f"import[{j}].{name}", d + off, 4))
        thunk = file_offset(_u(data, d, 4))
        if thunk is not None:
            out += [Field(f"import[{j}].thunk[{k}]", thunk + 8 * k, 8) for k in range(2)]
        j += 1
    reloc = file_offset(dirs[5][0]) if dirs[5][1] else None
    rel = reloc if reloc is not None else len(data)
    end = rel + dirs[5][1]
    while rel + 8 <= min(end, len(data)):
        size = _u(data, rel + 4, 4)
        out += [Field("reloc.VirtualAddress", rel, 4), Field("reloc.SizeOfBlock", rel + 4, 4)]
        out += [Field("reloc.entry", rel + 8 + 2 * k, 2) for k in range(min(3, max(0, (size - 8) // 2)))]
        if size < 8:
            break
        rel += size
    symtab, nsyms = _u(data, fh + 8, 4), _u(data, fh + 12, 4)
    if symtab and symtab + 18 * nsyms + 4 <= len(data):
        out += [Field("symbol[0].Value", symtab + 8, 4), Field("symbol[0].SectionNumber", symtab + 12, 2)]
        out.append(Field("string_table.size", symtab + 18 * nsyms, 4))
    return tuple(f for f in out if f.offset + f.width <= len(data)), _u(data, opt + 60, 4)


@pytest.fixture(scope="session")
def bases() -> list[Base]:
    fx = pe_fixtures_or_fail()
    out = []
    for path in (fx.ntdll, fx.callbacks, fx.program):
        data = path.read_bytes()
        fields, headers_end = _fields(data)
        out.append(Base(path.name, data, fields, headers_end))
    return out


# --- mutations -----------------------------------------------------------------------------------
position = st.integers(0, 1 << 20)
mutation = st.one_of(
    st.tuples(st.just("field"), position, st.integers(0, 11), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("flip_header"), position, st.integers(0, 7), st.just(0)),
    st.tuples(st.just("flip"), position, st.integers(0, 7), st.just(0)),
    st.tuples(st.just("byte"), position, st.integers(0, 255), st.just(0)),
    st.tuples(st.just("truncate"), position, st.just(0), st.just(0)),
    st.tuples(st.just("zero"), position, st.integers(1, 64), st.just(0)),
    st.tuples(st.just("copy"), position, st.integers(1, 64), position),
)
mutations = st.lists(mutation, min_size=1, max_size=4)
load_at = st.sampled_from([None, None, 0x7FF0_0000_0000, 0x1_0000_0000, 0x10000])


def _interesting(field: Field, current: int, choice: int, rnd: int, size: int) -> int:
    top = (1 << (8 * field.width)) - 1
    values = [0, 1, top, top >> 1, (top >> 1) + 1, current + 1, current - 1, current + 0x1000,
              current * 2, size, size + 1, rnd]  # fmt: skip
    return values[choice % len(values)] & top


def apply(base: Base, ops: list[tuple[str, int, int, int]]) -> bytes:
    data = bytearray(base.data)
    for op, pos, a, b in ops:
        n = len(data)
        if n == 0:
            break
        if op == "field" and base.fields:
            f = base.fields[pos % len(base.fields)]
            if f.offset + f.width <= n:
                cur = int.from_bytes(data[f.offset : f.offset + f.width], "little")
                value = _interesting(f, cur, a, b, n)
                data[f.offset : f.offset + f.width] = value.to_bytes(f.width, "little")
        elif op == "flip_header":
            i = pos % min(n, max(base.headers_end, 1))
            data[i] ^= 1 << a
        elif op == "flip":
            data[pos % n] ^= 1 << a
        elif op == "byte":
            data[pos % n] = a
        elif op == "truncate":
            del data[pos % n :]
        elif op == "zero":
            i = pos % n
            data[i : i + a] = bytes(len(data[i : i + a]))
        elif op == "copy":
            src, dst = pos % n, b % n
            chunk = data[src : src + a]
            data[dst : dst + len(chunk)] = chunk
    return bytes(data)


# --- the properties ------------------------------------------------------------------------------
def check_load(data: bytes, at: int | None, t: Tally) -> Image | None:
    """load_pe gives an Image or an ImageError (a hang ends the run); an Image also survives stub analysis."""
    with no_hang(case=data):
        try:
            image = load_pe(data, at, "fuzz")
        except Exception as e:
            t.record(e)  # re-raises anything that is not an EmuError
            return None
        assert isinstance(image, Image)
        try:
            service_table(image)
            guess_dispatcher_convention(image)
        except Exception as e:
            t.record(e)
            return image
        t.record(None)
    return image


def _load(config: pytest.Config, bases: list[Base], which: int, ops: list[Any], at: int | None, suite: str) -> None:
    check_load(apply(bases[which % len(bases)], ops), at, tally(suite, config))


@pytest.fixture(scope="session")
def scenario_dir() -> Iterator[Path]:
    """A folder for the mutants (one file per base, rewritten by each case)."""
    with tempfile.TemporaryDirectory(prefix="emu-fuzz-pe-") as d:
        yield Path(d)


def _scenario_run(
    config: pytest.Config, bases: list[Base], folder: Path, which: int, ops: list[Any], suite: str
) -> None:
    """Run third_party_ntdll.toml with one of its three DLLs mutated: a Run, or only EmuError."""
    t = tally(suite, config)
    base = bases[which % len(bases)]
    s = load_scenario(THIRD_PARTY)
    target = folder / f"mutant-{base.name}"
    target.write_bytes(apply(base, ops))
    if base.name == "ntdll.dll":
        s = dataclasses.replace(s, ntdll=PeSpec(str(target), "ntdll"))
    else:
        stem = base.name.removesuffix(".dll")
        pe = tuple(PeSpec(str(target), p.name, p.base) if p.name == stem else p for p in s.pe)
        s = dataclasses.replace(s, pe=pe)
    with no_hang():
        try:
            r = run_bounded(s)
        except AssertionError:
            raise
        except Exception as e:
            t.record(e)
        else:
            t.record(r.error)


def test_bases_load_and_have_fields(bases: list[Base]) -> None:
    for b in bases:
        assert isinstance(load_pe(b.data, None, "fuzz"), Image)
        names = {f.name for f in b.fields}
        assert {"e_lfanew", "SizeOfImage", "section[0].VirtualSize", "DataDirectory[5].rva"} <= names, b.name
    assert any(f.name.startswith("export.") for f in bases[0].fields)
    assert any(f.name.startswith("import[") for f in bases[1].fields)


which_base = st.integers(0, 2)


@fast_settings(200)
@given(which=which_base, ops=mutations, at=load_at)
def test_mutated_dlls_load_or_raise_image_error(
    pytestconfig: pytest.Config, bases: list[Base], which: int, ops: list[Any], at: int | None
) -> None:
    _load(pytestconfig, bases, which, ops, at, "pe: load_pe (fast)")


@FAST
@given(which=which_base, ops=mutations)
def test_scenario_with_a_mutated_dll(
    pytestconfig: pytest.Config, bases: list[Base], scenario_dir: Path, which: int, ops: list[Any]
) -> None:
    _scenario_run(pytestconfig, bases, scenario_dir, which, ops, "pe: third_party run (fast)")


@slow_only
@slow_settings(30_000)
@given(which=which_base, ops=mutations, at=load_at)
def test_mutated_dlls_load_or_raise_image_error_slow(
    pytestconfig: pytest.Config, bases: list[Base], which: int, ops: list[Any], at: int | None
) -> None:
    _load(pytestconfig, bases, which, ops, at, "pe: load_pe")


@slow_only
@slow_settings(5_000)
@given(which=which_base, ops=mutations)
def test_scenario_with_a_mutated_dll_slow(
    pytestconfig: pytest.Config, bases: list[Base], scenario_dir: Path, which: int, ops: list[Any]
) -> None:
    _scenario_run(pytestconfig, bases, scenario_dir, which, ops, "pe: third_party run")
