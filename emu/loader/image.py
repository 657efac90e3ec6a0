"""Images: the code and data a thread runs, with the names that make addresses readable.

An :class:`Image` is a module as the loader sees it: a name, a base, sections with
protections, and symbols. Images come from assembly (keystone) here; PE files (LIEF,
:mod:`emu.loader.pe`) produce the same type and also fill the PE-only fields (headers,
ordinals, forwarders, imports). :class:`Symbolizer` turns any address into
``module!symbol+0xoff``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import field

from emu.loader.asm import AssemblyError, Resolver, assemble, assemble_parts, labels_in, strip_comments
from emu.loader.link import IMPORT_PREFIX, Linked, Lookup, link
from emu.records import record

__all__ = [
    "AssemblyError",
    "Forwarder",
    "Image",
    "ImageImport",
    "Section",
    "Symbolizer",
    "assemble",
    "image_from_assembly",
    "labels_in",
]

PAGE = 0x1000
# Labels with "__" are internal (``NtClose__int2e``, ``__imp_NtClose``), except names Windows
# DLLs export with two leading underscores (ntdll's __C_specific_handler).
EXPORTED_DUNDER = frozenset({"__C_specific_handler"})


def is_internal(name: str) -> bool:
    """Whether an assembly label is internal: neither exported nor used to name addresses."""
    return "__" in name and name not in EXPORTED_DUNDER


def page_align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@record(frozen=True)
class Section:
    """A mapped range of an image. ``perms`` is a subset of ``"rwx"``."""

    name: str
    rva: int
    data: bytes
    perms: str
    virtual_size: int = 0

    @property
    def size(self) -> int:
        return max(self.virtual_size, len(self.data))


@record(frozen=True)
class ImageImport:
    """One imported function: its DLL, a name or an ordinal, and the IAT slot (absolute) to fill."""

    dll: str
    name: str | None
    ordinal: int | None
    slot: int

    @property
    def label(self) -> str:
        """``ntdll.dll!NtClose`` or ``ntdll.dll!#42``."""
        return f"{self.dll}!{self.name if self.name is not None else f'#{self.ordinal}'}"


@record(frozen=True)
class Forwarder:
    """An export that names another DLL's export (``kernelbase.Sleep``) instead of code."""

    name: str | None
    ordinal: int
    target: str


@record
class Image:
    """A module: name, base, sections and symbols (absolute addresses).

    ``exports`` are the names other modules may bind to; ``symbols`` adds internal
    labels. Two names at one address (``NtClose``/``ZwClose``) are both kept.

    The remaining fields are filled by the PE loader and empty for assembled images:
    ``headers`` (the bytes of the first page, which the machine maps read-only),
    ``ordinals`` (ordinal → address, including exports without a name),
    ``export_ordinals`` (name → ordinal), ``forwarders`` (reported, never followed),
    ``imports`` (for :func:`emu.loader.pe.bind_imports`), ``entry`` (AddressOfEntryPoint,
    absolute), ``preferred_base`` (the file's ImageBase; differs from ``base`` when
    relocated), ``path`` and ``pdata`` (the raw exception directory: RUNTIME_FUNCTION
    entries, RVAs).
    """

    name: str
    base: int
    sections: list[Section]
    exports: dict[str, int] = field(default_factory=dict)
    symbols: dict[str, int] = field(default_factory=dict)
    headers: bytes = b""
    ordinals: dict[int, int] = field(default_factory=dict)
    export_ordinals: dict[str, int] = field(default_factory=dict)
    forwarders: list[Forwarder] = field(default_factory=list)
    imports: list[ImageImport] = field(default_factory=list)
    entry: int | None = None
    preferred_base: int | None = None
    path: str | None = None
    pdata: bytes = b""

    @property
    def size(self) -> int:
        return page_align(max((s.rva + s.size for s in self.sections), default=PAGE))

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, address: int) -> bool:
        return self.base <= address < self.end

    def export(self, *names: str) -> int | None:
        """Address of the first of ``names`` this image exports, else None."""
        for n in names:
            if n in self.exports:
                return self.exports[n]
        return None

    def read(self, address: int, size: int) -> bytes | None:
        """Bytes of the image as loaded, or None outside any section (and the headers page)."""
        ranges = [(self.base + s.rva, s.size, s.data) for s in self.sections]
        if self.headers:
            ranges.append((self.base, page_align(len(self.headers)), self.headers))
        for start, length, data in ranges:
            if start <= address and address + size <= start + length:
                off = address - start
                chunk = data[off : off + size]
                return chunk + b"\0" * (size - len(chunk))
        return None

    def section_at(self, address: int) -> Section | None:
        """The section holding ``address``, else None."""
        for s in self.sections:
            if self.base + s.rva <= address < self.base + s.rva + s.size:
                return s
        return None


def image_from_assembly(
    name: str,
    base: int,
    code: str,
    data: str = "",
    resolve: Resolver | None = None,
    exports: Iterable[str] | None = None,
    imports: Lookup | None = None,
) -> Image:
    """Build an image from assembly: ``.text`` (rx) at base+0x1000, ``.data`` (rw) after it.

    Every label is a symbol; all but internal ones (containing ``__``) are exported
    unless ``exports`` narrows them. Errors are :class:`AssemblyError` naming the
    section (``code`` or ``data``) and the line within it.

    With ``imports`` (a name → (module, address) lookup over the loaded modules), names
    other modules export are linked as a linker links a DLL's imports (see :mod:`emu.loader.link`):
    ``call NtClose`` becomes ``call qword ptr [rip + __imp_NtClose]`` and an ``.idata``
    section (read-only) after the others holds one slot per import, each module's slots
    ending with a zero one. The slots hold the targets' addresses already (the modules
    are loaded when this one is linked, as with a bound import), and ``Image.imports``
    lists them.
    """
    code, data = strip_comments(code), strip_comments(data)
    if imports is not None and resolve is None:
        resolve = _addresses(imports)
    linked_code = linked_data = None
    table: list[tuple[str, str, int]] = []  # (import name, module, address)
    if imports is not None:
        local = set(labels_in(code)) | set(labels_in(data))
        try:
            linked_code = link(code, local, imports, base + PAGE)
        except AssemblyError as e:
            e.section = "code"
            raise
        try:
            linked_data = link(data, local, imports, base + PAGE)
        except AssemblyError as e:
            e.section = "data"
            raise
        for n in dict.fromkeys(linked_code.imports + linked_data.imports):
            module, address = imports(n)  # type: ignore[misc]  # link() only lists names it found
            table.append((n, module, address))
        code, data = linked_code.source, linked_data.source
    idata = _import_table(table)
    try:
        parts, symbols = assemble_parts([("code", code), ("data", data), ("idata", idata)], base + PAGE, PAGE, resolve)
    except AssemblyError as e:
        raise _as_written(e, {"code": linked_code, "data": linked_data}) from None
    (_, text), (data_off, blob), (idata_off, slots) = parts
    sections = [Section(".text", PAGE, text, "rx", page_align(max(len(text), 1)))]
    if data.strip():
        sections.append(Section(".data", PAGE + data_off, blob, "rw", page_align(max(len(blob), 1))))
    if table:
        # Import slots are read-only once bound, as in a linked PE's .idata/.rdata (MS docs, "PE Format").
        sections.append(Section(".idata", PAGE + idata_off, slots, "r", page_align(len(slots))))
    bound = [ImageImport(_dll_name(module), n, None, symbols[IMPORT_PREFIX + n]) for n, module, _ in table]
    public = {n: a for n, a in symbols.items() if not is_internal(n)}
    exported = public if exports is None else {n: public[n] for n in exports if n in public}
    return Image(name=name, base=base, sections=sections, exports=dict(exported), symbols=symbols, imports=bound)


def _addresses(lookup: Lookup) -> Resolver:
    def resolve(sym: str) -> int | None:
        hit = lookup(sym)
        return hit[1] if hit is not None else None

    return resolve


def _import_table(table: list[tuple[str, str, int]]) -> str:
    """An import address table as assembly: each module's slots together, then a zero slot."""
    lines: list[str] = []
    for module in dict.fromkeys(m for _, m, _ in table):
        lines += [f"{IMPORT_PREFIX}{n}: .quad {a:#x}" for n, m, a in table if m == module]
        lines.append(".quad 0")
    return "\n".join(lines)


def _dll_name(module: str) -> str:
    return module if "." in module else f"{module}.dll"


def _as_written(e: AssemblyError, linked: dict[str, Linked | None]) -> AssemblyError:
    """Show the line of an error as the user wrote it, not as :func:`link` rewrote it."""
    done = linked.get(e.section)
    if done is not None and e.line is not None and e.line in done.original:
        e.text = done.original[e.line].strip()
        e.args = (f"line {e.line}: {e.detail} in {e.text!r}",)
    return e


def find_symbol(images: Iterable[Image], ref: str) -> int | None:
    """The address ``ref`` names: ``module!label`` (the module's name in any case) or a bare
    ``label`` in the first image that has it; None when no loaded image has it."""
    mod, bang, label = ref.partition("!")
    for img in images:
        if bang and img.name.lower() != mod.lower():
            continue
        address = img.symbols.get(label if bang else ref)
        if address is not None:
            return address
    return None


class Symbolizer:
    """Address → ``module!symbol+0xoff`` over a set of images (cached; addresses repeat).

    Where two names share an address, ``prefer`` decides (Zw before Nt by default,
    the spelling the seed document uses for ZwCallbackReturn).
    """

    def __init__(self, images: Iterable[Image], regions: Iterable[tuple[int, int, str]] = ()) -> None:
        self._images = sorted(images, key=lambda i: i.base)
        self._bases = [i.base for i in self._images]
        self._regions = sorted(regions)
        self._tables: list[tuple[list[int], list[str]]] = []
        for img in self._images:
            by_addr: dict[int, str] = {}
            for sym, addr in sorted(img.symbols.items()):
                if is_internal(sym):
                    continue  # internal labels (``NtClose__int2e``) never name an address
                cur = by_addr.get(addr)
                if cur is None or _preference(sym) < _preference(cur):
                    by_addr[addr] = sym
            addrs = sorted(by_addr)
            self._tables.append((addrs, [by_addr[a] for a in addrs]))
        self._cache: dict[int, str] = {}

    def image_at(self, address: int) -> Image | None:
        i = bisect.bisect_right(self._bases, address) - 1
        if i >= 0 and self._images[i].contains(address):
            return self._images[i]
        return None

    def __call__(self, address: int) -> str:
        hit = self._cache.get(address)
        if hit is None:
            hit = self._cache[address] = self._lookup(address)
        return hit

    def _lookup(self, address: int) -> str:
        i = bisect.bisect_right(self._bases, address) - 1
        if i >= 0 and self._images[i].contains(address):
            img = self._images[i]
            addrs, names = self._tables[i]
            j = bisect.bisect_right(addrs, address) - 1
            if j >= 0:
                off = address - addrs[j]
                return f"{img.name}!{names[j]}" + (f"+{off:#x}" if off else "")
            return f"{img.name}+{address - img.base:#x}"
        for start, end, label in self._regions:
            if start <= address < end:
                return f"{label}-{end - address:#x}" if address != end else label
        return f"{address:#x}"

    def address(self, symbol: str) -> int | None:
        """Inverse lookup for ``module!name`` (no offset)."""
        mod, _, name = symbol.partition("!")
        for img in self._images:
            if img.name.lower() == mod.lower():
                return img.symbols.get(name)
        return None


def _preference(name: str) -> tuple[int, str]:
    return (0 if name.startswith("Zw") else 1, name)
