"""The built-in ntdll, win32u and kernel32 are PE images: parsers read their exports and unwind table."""

from __future__ import annotations

import struct

import lief
import pefile
import pytest

from emu.address_space import KERNEL32_BASE, WIN32U_BASE
from emu.dump.modules import pe_exports
from emu.loader.image import Image
from emu.machine import Machine
from emu.profile import get_profile
from emu.runtime import NTDLL_BASE, build_kernel32, build_ntdll, build_win32u
from emu.runtime.pe_image import file_bytes


def images() -> list[Image]:
    p = get_profile()
    return [build_ntdll(p), build_win32u(p, WIN32U_BASE), build_kernel32(KERNEL32_BASE, NTDLL_BASE + 0x1234)]


@pytest.mark.parametrize("image", images(), ids=lambda i: i.name)
def test_lief_and_pefile_read_the_exports_of_the_file_the_headers_describe(image: Image) -> None:
    data = file_bytes(image)
    want = {n: a - image.base for n, a in image.exports.items()}
    pe = lief.PE.parse(list(data))
    assert pe is not None and pe.header.machine == lief.PE.Header.MACHINE_TYPES.AMD64
    assert pe.optional_header.imagebase == image.base
    assert pe.optional_header.sizeof_image == image.size
    export = pe.get_export()
    assert export is not None
    assert {e.name: e.address for e in export.entries} == want
    assert export.name == f"{image.name}.dll"
    p = pefile.PE(data=data)
    assert {s.name.decode(): s.address for s in p.DIRECTORY_ENTRY_EXPORT.symbols} == want


def test_the_exception_directory_is_the_runtime_function_table() -> None:
    ntdll = images()[0]
    p = pefile.PE(data=file_bytes(ntdll))
    got = [(e.struct.BeginAddress, e.struct.EndAddress, e.struct.UnwindData) for e in p.DIRECTORY_ENTRY_EXCEPTION]
    assert got == [struct.unpack_from("<III", ntdll.pdata, o) for o in range(0, len(ntdll.pdata), 12)]
    assert got[0][0] == ntdll.exports["KiUserCallbackDispatcher"] - ntdll.base


def test_code_stays_at_base_plus_0x1000_and_the_headers_fill_the_first_page() -> None:
    ntdll = images()[0]
    assert ntdll.sections[0].name == ".text" and ntdll.sections[0].rva == 0x1000
    assert ntdll.headers[:2] == b"MZ" and len(ntdll.headers) <= 0x1000
    # ZwCallbackReturn's `syscall` at +0x12 of its stub (Win10 shape), as the golden outputs say.
    stub = ntdll.exports["ZwCallbackReturn"]
    assert ntdll.read(stub + 0x12, 2) == b"\x0f\x05"


@pytest.mark.parametrize("image", images(), ids=lambda i: i.name)
def test_exports_read_from_memory_match_the_image(image: Image) -> None:
    m = Machine()
    m.map_image(image)

    def read(address: int, size: int) -> bytes | None:
        return m.read(address, size) if m.readable(address, size) else None

    assert pe_exports(read, image.base, image.size) == image.exports
