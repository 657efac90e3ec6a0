"""Loader data a guest can walk: ``PEB.Ldr`` with its three module lists, and ``PEB.ProcessParameters``.

On Windows, ntdll's loader builds a PEB_LDR_DATA and one LDR_DATA_TABLE_ENTRY per
mapped module while the process starts, and the process's creator hands over an
RTL_USER_PROCESS_PARAMETERS block. emu runs no loader code, so it builds both itself,
in one block, from the images it loaded; code that walks the module list (a DLL's
startup, GetModuleHandle-style lookups, shellcode looking for ntdll) then finds every
loaded image. The offsets are in :mod:`emu.winnt`.

What emu decides, since it has no .exe and calls no DllMain:

- **The main image** (Windows' .exe): the image holding thread 0's entry, unless that
  is a system module; then the first scenario image ([[pe]] before [[module]], as emu
  loads them). ``PEB.ImageBaseAddress`` is its base.
- **Load order and memory order**: the main image, then every other image in the order
  emu loaded it (ntdll first). Windows' loader inserts the .exe, then ntdll, then each
  DLL at the tail of both lists as it maps it, so the two lists agree (ReactOS
  dll/ntdll/ldr/ldrinit.c, LdrpInitializeProcess; ldrutils.c, LdrpInsertMemoryTableEntry).
- **Initialization order**: ntdll first, then the other DLLs in load order; the main
  image is never on this list (LdrpInitializeProcess puts ntdll at its head and does not
  insert the .exe's entry). Windows orders the other DLLs by when their DllMain ran;
  emu runs none, so load order stands in for it.
- **Names**: system modules (:data:`SYSTEM_MODULES`) as ``C:\\Windows\\System32\\<name>.dll``;
  every other image under ``C:\\emu\\``: a PE file by its file name, an assembled module
  as ``<name>.dll``, or ``<name>.exe`` when it is the main image.
- **Entries**: DllBase, EntryPoint (a PE's AddressOfEntryPoint; 0 for an assembled image,
  which has none), SizeOfImage (the mapped size, as emu's minidumps give it), the PE's
  TimeDateStamp, LoadCount 0xFFFF (the loader pins every module it loads at startup:
  LdrpInitializeProcess), Flags LDRP_IMAGE_DLL | LDRP_ENTRY_PROCESSED for a DLL and
  LDRP_ENTRY_PROCESSED for the main image. HashLinks is an empty list (linked to itself):
  the hash table it would join lives inside ntdll.
- **Process parameters**: normalized (Buffers are pointers), ImagePathName = the main
  image's full name, CommandLine = that path in quotes, CurrentDirectory ``C:\\emu\\``,
  DllPath ``C:\\emu;C:\\Windows\\System32``, Environment an empty block (two NUL
  WCHARs). ``PEB.ProcessHeap`` stays 0: emu has no heap.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import PurePath

from emu.loader.image import Image
from emu.loader.pe_headers import nt_header_u32
from emu.records import record
from emu.winnt import (
    IMAGE_NT_TIME_DATE_STAMP,
    LDR_DATA_IN_INIT_ORDER,
    LDR_DATA_IN_LOAD_ORDER,
    LDR_DATA_IN_MEMORY_ORDER,
    LDR_DATA_INITIALIZED,
    LDR_DATA_LENGTH,
    LDR_DATA_SIZE,
    LDR_ENTRY_BASE_DLL_NAME,
    LDR_ENTRY_DLL_BASE,
    LDR_ENTRY_ENTRY_POINT,
    LDR_ENTRY_FLAGS,
    LDR_ENTRY_FULL_DLL_NAME,
    LDR_ENTRY_HASH_LINKS,
    LDR_ENTRY_IN_INIT_ORDER,
    LDR_ENTRY_IN_LOAD_ORDER,
    LDR_ENTRY_IN_MEMORY_ORDER,
    LDR_ENTRY_LOAD_COUNT,
    LDR_ENTRY_SIZE,
    LDR_ENTRY_SIZE_OF_IMAGE,
    LDR_ENTRY_TIME_DATE_STAMP,
    LDRP_ENTRY_PROCESSED,
    LDRP_IMAGE_DLL,
    PARAMS_COMMAND_LINE,
    PARAMS_CURRENT_DIRECTORY,
    PARAMS_DLL_PATH,
    PARAMS_ENVIRONMENT,
    PARAMS_ENVIRONMENT_SIZE,
    PARAMS_FLAGS,
    PARAMS_IMAGE_PATH_NAME,
    PARAMS_LENGTH,
    PARAMS_MAXIMUM_LENGTH,
    PARAMS_SIZE,
    RTL_USER_PROC_PARAMS_NORMALIZED,
)

__all__ = ["MODULE_DIR", "SYSTEM_DIR", "SYSTEM_MODULES", "LoaderData", "LoaderEntry", "build_loader_data", "main_image"]

SYSTEM_DIR = "C:\\Windows\\System32"
MODULE_DIR = "C:\\emu"
SYSTEM_MODULES = frozenset({"ntdll", "win32u", "kernel32", "kernelbase", "user32"})
EMPTY_ENVIRONMENT = b"\0\0\0\0"  # an environment block with no variables: two NUL WCHARs


@record(frozen=True)
class LoaderEntry:
    """One LDR_DATA_TABLE_ENTRY as built: where it is, which image, the names it carries."""

    address: int
    image: Image
    full_name: str
    base_name: str


@record(frozen=True)
class LoaderData:
    """The built block (``data``, to map at ``address``) and the addresses of what is in it."""

    address: int
    data: bytes
    ldr: int  # PEB_LDR_DATA, for PEB.Ldr
    entries: tuple[LoaderEntry, ...]  # load order (also memory order)
    init_order: tuple[LoaderEntry, ...]  # InInitializationOrderModuleList order
    process_parameters: int  # RTL_USER_PROCESS_PARAMETERS, for PEB.ProcessParameters
    environment: int
    image_base: int  # the main image's base, for PEB.ImageBaseAddress (0 without one)


def main_image(images: Sequence[Image], entry: str) -> Image | None:
    """The image that plays the .exe: the one holding ``entry`` ("module!label" or "label").

    Falls back to the first image that is not a system module when the entry is in one
    (or names nothing).
    """
    mod, bang, label = entry.partition("!")
    for img in images:
        if (img.name.lower() == mod.lower() and label in img.symbols) if bang else (entry in img.symbols):
            if img.name.lower() not in SYSTEM_MODULES:
                return img
            break
    return next((img for img in images if img.name.lower() not in SYSTEM_MODULES), None)


def dll_names(image: Image, is_main: bool = False) -> tuple[str, str]:
    """(FullDllName, BaseDllName) emu gives an image (see the module's docstring)."""
    if image.name.lower() in SYSTEM_MODULES:
        base = f"{image.name.lower()}.dll"
        return f"{SYSTEM_DIR}\\{base}", base
    if image.path:
        base = PurePath(image.path).name
    else:
        base = f"{image.name}.exe" if is_main else f"{image.name}.dll"
    return f"{MODULE_DIR}\\{base}", base


def build_loader_data(images: Sequence[Image], address: int, main: Image | None = None) -> LoaderData:
    """Build PEB_LDR_DATA, its entries and the process parameters as one block at ``address``.

    ``images`` are the modules in the order emu loaded them; ``main`` (one of them, or
    None) goes first in load order and stays off the initialization-order list.

    >>> from emu.loader.image import image_from_assembly
    >>> app = image_from_assembly("app", 0x10000000, "main: ret")
    >>> ld = build_loader_data([app], 0x20000000, app)
    >>> ld.entries[0].full_name, ld.image_base == app.base
    ('C:\\\\emu\\\\app.exe', True)
    """
    ordered = ([main] if main is not None else []) + [i for i in images if i is not main]
    b = _Block(address)
    ldr = b.reserve(LDR_DATA_SIZE)
    b.u32(ldr + LDR_DATA_LENGTH, LDR_DATA_SIZE)
    b.u8(ldr + LDR_DATA_INITIALIZED, 1)
    slots = [b.reserve(LDR_ENTRY_SIZE) for _ in ordered]
    entries: list[LoaderEntry] = []
    for at, img in zip(slots, ordered, strict=True):
        full, base = dll_names(img, img is main)
        is_dll = img is not main
        b.u64(at + LDR_ENTRY_DLL_BASE, img.base)
        b.u64(at + LDR_ENTRY_ENTRY_POINT, img.entry or 0)
        b.u32(at + LDR_ENTRY_SIZE_OF_IMAGE, img.size)
        b.unicode_string(at + LDR_ENTRY_FULL_DLL_NAME, full)
        b.unicode_string(at + LDR_ENTRY_BASE_DLL_NAME, base)
        b.u32(at + LDR_ENTRY_FLAGS, (LDRP_IMAGE_DLL if is_dll else 0) | LDRP_ENTRY_PROCESSED)
        b.u16(at + LDR_ENTRY_LOAD_COUNT, 0xFFFF)
        b.link(at + LDR_ENTRY_HASH_LINKS, [])
        b.u32(at + LDR_ENTRY_TIME_DATE_STAMP, _time_date_stamp(img.headers))
        entries.append(LoaderEntry(at, img, full, base))
    ntdll = [e for e in entries if e.image.name.lower() == "ntdll"]
    init = ntdll + [e for e in entries if e.image is not main and e.image.name.lower() != "ntdll"]
    on_init = {e.address for e in init}
    b.link(ldr + LDR_DATA_IN_LOAD_ORDER, [e.address + LDR_ENTRY_IN_LOAD_ORDER for e in entries])
    b.link(ldr + LDR_DATA_IN_MEMORY_ORDER, [e.address + LDR_ENTRY_IN_MEMORY_ORDER for e in entries])
    b.link(ldr + LDR_DATA_IN_INIT_ORDER, [e.address + LDR_ENTRY_IN_INIT_ORDER for e in init])
    # Entries not on the initialization-order list get empty links, as an unlinked LIST_ENTRY.
    for e in entries:
        if e.address not in on_init:
            b.link(e.address + LDR_ENTRY_IN_INIT_ORDER, [])

    params = b.reserve(PARAMS_SIZE)
    image_path = entries[0].full_name if main is not None else ""
    b.u32(params + PARAMS_FLAGS, RTL_USER_PROC_PARAMS_NORMALIZED)
    b.unicode_string(params + PARAMS_CURRENT_DIRECTORY, MODULE_DIR + "\\")
    b.unicode_string(params + PARAMS_DLL_PATH, f"{MODULE_DIR};{SYSTEM_DIR}")
    b.unicode_string(params + PARAMS_IMAGE_PATH_NAME, image_path)
    b.unicode_string(params + PARAMS_COMMAND_LINE, f'"{image_path}"' if image_path else "")
    # A normalized block holds the structure and its strings; both lengths cover all of it.
    size = b.end - params
    b.u32(params + PARAMS_MAXIMUM_LENGTH, size)
    b.u32(params + PARAMS_LENGTH, size)
    env = b.reserve(len(EMPTY_ENVIRONMENT))
    b.u64(params + PARAMS_ENVIRONMENT, env)
    b.u64(params + PARAMS_ENVIRONMENT_SIZE, len(EMPTY_ENVIRONMENT))
    return LoaderData(
        address=address, data=bytes(b.buf), ldr=ldr, entries=tuple(entries), init_order=tuple(init),
        process_parameters=params, environment=env, image_base=main.base if main is not None else 0,
    )  # fmt: skip


class _Block:
    """A growing byte block addressed as it will be mapped."""

    def __init__(self, address: int) -> None:
        self.address = address
        self.buf = bytearray()

    @property
    def end(self) -> int:
        return self.address + len(self.buf)

    def reserve(self, size: int) -> int:
        """``size`` zero bytes, 16-byte aligned (as heap blocks are on x64); returns their address."""
        self.buf.extend(b"\0" * (-len(self.buf) % 16))
        at = self.end
        self.buf.extend(b"\0" * size)
        return at

    def _put(self, at: int, raw: bytes) -> None:
        off = at - self.address
        self.buf[off : off + len(raw)] = raw

    def u8(self, at: int, value: int) -> None:
        self._put(at, bytes((value,)))

    def u16(self, at: int, value: int) -> None:
        self._put(at, struct.pack("<H", value))

    def u32(self, at: int, value: int) -> None:
        self._put(at, struct.pack("<I", value))

    def u64(self, at: int, value: int) -> None:
        self._put(at, struct.pack("<Q", value))

    def unicode_string(self, at: int, text: str) -> None:
        """A UNICODE_STRING at ``at`` whose buffer (UTF-16LE, NUL-terminated) goes at the block's end."""
        raw = text.encode("utf-16-le")
        buffer = self.reserve(len(raw) + 2)
        self._put(buffer, raw)
        # Length excludes the terminator, MaximumLength includes it (MS docs, UNICODE_STRING).
        self._put(at, struct.pack("<HH4xQ", len(raw), len(raw) + 2, buffer))

    def link(self, head: int, nodes: list[int]) -> None:
        """Make ``head`` and ``nodes`` one circular doubly linked list (LIST_ENTRY Flink +0, Blink +8)."""
        ring = [head, *nodes]
        for i, at in enumerate(ring):
            self.u64(at, ring[(i + 1) % len(ring)])
            self.u64(at + 8, ring[i - 1])


def _time_date_stamp(headers: bytes) -> int:
    """IMAGE_FILE_HEADER.TimeDateStamp, or 0 for an image without PE headers."""
    return nt_header_u32(headers, IMAGE_NT_TIME_DATE_STAMP)
