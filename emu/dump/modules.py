"""Module names in a minidump: emu's own stream, and the PE export directory.

A debugger finds a module's exports in its PE export directory, in memory. Images emu
assembles have no PE headers, so emu writes what the directory would say into a stream of
its own (``EmuModulesStream``, type 0x454D5501, above LastReservedStream as MS reserves for
applications): UTF-8 JSON, keys sorted, addresses as RVAs::

    {"format": "emu-modules", "version": 1,
     "source": {"scenario": ..., "profile": ..., "state": ...},
     "modules": [{"name": "ntdll", "base": ..., "size": ..., "headers": false,
                  "exports": {"ZwCallbackReturn": 4224, ...},
                  "sections": [{"name": ".text", "rva": 4096, "size": 4096, "perms": "rx"}],
                  "pdata": "<hex of the RUNTIME_FUNCTION table, when the image has one>",
                  "symbols": {"internal_label": 4352}}]}

``symbols`` (optional) names what the image knows besides its exports (a PE file's COFF
symbols, say), so that a run started from the dump names addresses as the original did;
internal labels (``NtClose__int2e``) come along too: they name no address, but they are how
the kernel model finds the built-in ntdll's traps (:mod:`emu.kernel.rtl`) in the dumped ntdll.

Dumps from elsewhere lack the stream; then :func:`pe_exports` reads the export directory
from the dump's memory, when the dump holds the module's headers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NoReturn, TypeGuard

from emu.loader.image import Image, page_align
from emu.winnt import IMAGE_DOS_E_LFANEW

EMU_STREAM_FORMAT = "emu-modules"
EMU_STREAM_VERSION = 1


@dataclass(frozen=True)
class EmuSection:
    name: str
    rva: int
    size: int
    perms: str


@dataclass(frozen=True)
class EmuModule:
    """One module as emu's stream describes it (addresses relative to ``base``)."""

    name: str
    base: int
    size: int
    exports: dict[str, int]
    sections: tuple[EmuSection, ...]
    headers: bool
    pdata: bytes
    symbols: dict[str, int] = field(default_factory=dict)  # names besides the exports (RVAs)


def emu_stream(images: Iterable[Image], source: dict[str, object]) -> bytes:
    """The stream's bytes for ``images``; ``source`` says what the dump was made from."""
    modules = []
    for img in sorted(images, key=lambda i: i.base):
        record: dict[str, object] = {
            "name": img.name,
            "base": img.base,
            "size": img.size,
            "headers": bool(img.headers),
            "exports": {n: a - img.base for n, a in sorted(img.exports.items())},
            "sections": [
                {"name": s.name, "rva": s.rva, "size": page_align(max(s.size, 1)), "perms": s.perms}
                for s in img.sections
            ],
        }
        if img.pdata:
            record["pdata"] = img.pdata.hex()
        extra = {n: a - img.base for n, a in sorted(img.symbols.items()) if n not in img.exports}
        if extra:
            record["symbols"] = extra
        modules.append(record)
    doc = {"format": EMU_STREAM_FORMAT, "version": EMU_STREAM_VERSION, "source": source, "modules": modules}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


Fail = Callable[[str], NoReturn]


def parse_emu_stream(data: bytes, fail: Fail) -> tuple[dict[str, object], list[EmuModule]]:
    """The stream's source and modules; anything unexpected goes to ``fail`` (one line)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        fail(f"not emu's JSON ({type(e).__name__})")
    if not isinstance(doc, dict) or doc.get("format") != EMU_STREAM_FORMAT:
        fail(f"not an {EMU_STREAM_FORMAT!r} stream")
    if doc.get("version") != EMU_STREAM_VERSION:
        fail(f"version {doc.get('version')!r} is not {EMU_STREAM_VERSION}")
    source = doc.get("source", {})
    modules = doc.get("modules")
    if not isinstance(source, dict) or not isinstance(modules, list):
        fail("'source' must be an object and 'modules' a list")
    return source, [_module(m, i, fail) for i, m in enumerate(modules)]


def _int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


def _module(m: object, i: int, fail: Fail) -> EmuModule:
    where = f"modules[{i}]"
    if not isinstance(m, dict):
        fail(f"{where} is not an object")
    name, base, size, exports = m.get("name"), m.get("base"), m.get("size"), m.get("exports")
    headers, sections, pdata = m.get("headers", False), m.get("sections", []), m.get("pdata", "")
    if not (isinstance(name, str) and _int(base) and _int(size) and isinstance(headers, bool)):
        fail(f"{where} needs a string 'name', integers 'base' and 'size', a boolean 'headers'")
    symbols = m.get("symbols", {})
    if not (isinstance(exports, dict) and all(isinstance(k, str) and _int(v) for k, v in exports.items())):
        fail(f"{where}.exports must map names to RVAs")
    if not (isinstance(symbols, dict) and all(isinstance(k, str) and _int(v) for k, v in symbols.items())):
        fail(f"{where}.symbols must map names to RVAs")
    if not isinstance(sections, list) or not isinstance(pdata, str):
        fail(f"{where}: 'sections' must be a list and 'pdata' a hex string")
    try:
        blob = bytes.fromhex(pdata)
    except ValueError:
        fail(f"{where}.pdata is not hex")
    secs = []
    for j, s in enumerate(sections):
        ok = isinstance(s, dict) and isinstance(s.get("name"), str) and _int(s.get("rva")) and _int(s.get("size"))
        if not ok or not isinstance(s.get("perms"), str) or not set(s["perms"]) <= set("rwx"):
            fail(f"{where}.sections[{j}] needs 'name', 'rva', 'size' and 'perms' (a subset of 'rwx')")
        secs.append(EmuSection(s["name"], s["rva"], s["size"], s["perms"]))
    return EmuModule(name, base, size, dict(exports), tuple(secs), headers, blob, dict(symbols))


# --- PE export directory (MS PE format: IMAGE_EXPORT_DIRECTORY) ------------------------------
MAX_EXPORT_NAMES = 0x10000
MAX_NAME = 512


def pe_exports(read: Callable[[int, int], bytes | None], base: int, size: int) -> dict[str, int]:
    """Named exports (name → address) from a PE image mapped at ``base``; {} when they cannot be read."""

    def u32(address: int) -> int | None:
        b = read(address, 4)
        return None if b is None else int.from_bytes(b, "little")

    if read(base, 2) != b"MZ":
        return {}
    nt = u32(base + IMAGE_DOS_E_LFANEW)
    if nt is None or nt > size or read(base + nt, 4) != b"PE\0\0":
        return {}
    # IMAGE_OPTIONAL_HEADER64 starts 0x18 into the NT headers; DataDirectory[0] (exports) at +0x70.
    d_rva, d_size = u32(base + nt + 0x18 + 0x70), u32(base + nt + 0x18 + 0x74)
    if not d_rva or d_size is None or d_rva + 0x28 > size:
        return {}
    d = base + d_rva
    fields = [u32(d + off) for off in (0x18, 0x1C, 0x20, 0x24)]
    if None in fields:
        return {}
    count, functions, names, ordinals = (f or 0 for f in fields)
    out: dict[str, int] = {}
    for i in range(min(count, MAX_EXPORT_NAMES)):
        name_rva = u32(base + names + 4 * i)
        ordinal = read(base + ordinals + 2 * i, 2)
        if name_rva is None or ordinal is None:
            break
        func = u32(base + functions + 4 * int.from_bytes(ordinal, "little"))
        name = _c_string(read, base + name_rva)
        if func is None or name is None:
            continue
        if not d_rva <= func < d_rva + d_size:  # an RVA inside the directory is a forwarder string
            out[name] = base + func
    return out


def _c_string(read: Callable[[int, int], bytes | None], address: int) -> str | None:
    chunk = b""
    while len(chunk) < MAX_NAME:
        piece = read(address + len(chunk), 32) or read(address + len(chunk), 1)
        if piece is None:
            return None
        nul = piece.find(b"\0")
        if nul >= 0:
            return (chunk + piece[:nul]).decode("ascii", "replace")
        chunk += piece
    return None
