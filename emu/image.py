"""Images: the code and data a thread runs, with the names that make addresses readable.

An :class:`Image` is a module as the loader sees it: a name, a base, sections with
protections, and symbols. Images come from assembly (keystone) here; PE files (LIEF)
produce the same type. :class:`Symbolizer` turns any address into
``module!symbol+0xoff``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError

from emu.errors import ImageError

PAGE = 0x1000


def page_align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@dataclass(frozen=True)
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


@dataclass
class Image:
    """A module: name, base, sections and symbols (absolute addresses).

    ``exports`` are the names other modules may bind to; ``symbols`` adds internal
    labels. Two names at one address (``NtClose``/``ZwClose``) are both kept.
    """

    name: str
    base: int
    sections: list[Section]
    exports: dict[str, int] = field(default_factory=dict)
    symbols: dict[str, int] = field(default_factory=dict)

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
        """Bytes of the image as loaded, or None outside any section."""
        for s in self.sections:
            start = self.base + s.rva
            if start <= address and address + size <= start + s.size:
                off = address - start
                chunk = s.data[off : off + size]
                return chunk + b"\0" * (size - len(chunk))
        return None


_TOKEN = re.compile(r"[A-Za-z_.$?][\w.$?@]*")
_LABEL = re.compile(r"^\s*([A-Za-z_.$?][\w.$?@]*)\s*:", re.MULTILINE)
_COMMENT = re.compile(r"""^((?:[^;#"']|"[^"]*"|'[^']*')*)[;#].*$""")


def strip_comments(source: str) -> str:
    """Drop ``;`` and ``#`` comments (keystone reads ``;`` as a statement separator)."""
    return "\n".join(_COMMENT.sub(r"\1", line) for line in source.splitlines())


def labels_in(source: str) -> list[str]:
    """Labels defined in an assembly text, in order (numeric local labels excluded)."""
    seen: dict[str, None] = {}
    for line in strip_comments(source).splitlines():
        m = _LABEL.match(line)
        if m:
            seen.setdefault(m.group(1), None)
    return list(seen)


Resolver = Callable[[str], int | None]


class AssemblyError(ImageError):
    """Assembly failed; ``line`` is 1-based within the source when it could be found."""

    def __init__(self, message: str, line: int | None = None, text: str = "") -> None:
        self.line = line
        self.text = text
        self.detail = message
        where = f"line {line}: " if line is not None else ""
        shown = f" in {text.strip()!r}" if text.strip() else ""
        super().__init__(f"{where}{message}{shown}")


def assemble(source: str, base: int, resolve: Resolver | None = None) -> tuple[bytes, dict[str, int]]:
    """Assemble Intel-syntax x86-64 at ``base``; return the bytes and every label's address.

    Names the source does not define are looked up with ``resolve`` (e.g. exports of
    other modules). Label addresses are read back from a table of ``.quad label``
    appended after the code, which leaves the code's layout untouched.

    >>> code, labels = assemble("start: nop\\nend: ret", 0x1000)
    >>> code.hex(), labels
    ('90c3', {'start': 4096, 'end': 4097})
    """
    source = strip_comments(source)
    names = labels_in(source)
    missing: list[str] = []
    local = set(names)
    # Names from other modules become `.set NAME, address` lines: keystone's symbol
    # resolver callback mis-encodes `call NAME` (the target lands 4 bytes late).
    external: dict[str, int] = {}
    if resolve is not None:
        for token in sorted(set(_TOKEN.findall(source)) - local):
            addr = resolve(token)
            if addr is not None:
                external[token] = addr
    prefix = "".join(f".set {n}, {a:#x}\n" for n, a in external.items())

    def resolver(sym: bytes, value: object) -> bool:
        missing.append(sym.decode(errors="replace"))
        return False

    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    ks.sym_resolver = resolver
    table = "\n__emu_label_table__:\n" + "".join(f".quad {n}\n" for n in names)
    try:
        encoding, _ = ks.asm(prefix + source + table, base)
    except KsError as e:
        raise _explain(source, e, missing) from None
    blob = bytes(encoding or b"")
    n = len(names)
    code = blob[: len(blob) - 8 * n] if n else blob
    tail = blob[len(code) :]
    labels = {name: int.from_bytes(tail[8 * i : 8 * i + 8], "little") for i, name in enumerate(names)}
    return code, labels


def _explain(source: str, error: KsError, missing: list[str]) -> AssemblyError:
    """Find the first line keystone rejects, for a one-line message."""
    if missing:
        name = missing[-1]
        for i, line in enumerate(source.splitlines(), 1):
            if re.search(rf"(?<![\w.$?@]){re.escape(name)}(?![\w.$?@])", line):
                return AssemblyError(f"undefined symbol '{name}'", i, line)
        return AssemblyError(f"undefined symbol '{name}'")
    ks = Ks(KS_ARCH_X86, KS_MODE_64)

    def anything(sym: bytes, value: object) -> bool:
        value[0] = 0  # type: ignore[index]
        return True

    ks.sym_resolver = anything
    for i, line in enumerate(source.splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        try:
            ks.asm(text, 0)
        except KsError as e:
            return AssemblyError(_ks_message(e), i, line)
    return AssemblyError(_ks_message(error))


def _ks_message(e: KsError) -> str:
    return re.sub(r"\s*\(KS_ERR_\w+\)", "", str(e)).strip() or "does not assemble"


def image_from_assembly(
    name: str,
    base: int,
    code: str,
    data: str = "",
    resolve: Resolver | None = None,
    exports: Iterable[str] | None = None,
) -> Image:
    """Build an image from assembly: ``.data`` (rw) first at base+0x1000, then ``.text`` (rx).

    Every label is a symbol; all are exported unless ``exports`` narrows them.
    Errors are :class:`AssemblyError` with ``section`` set to ``"data"`` or ``"code"``.
    """
    sections: list[Section] = []
    symbols: dict[str, int] = {}
    rva = PAGE
    if data.strip():
        try:
            blob, labels = assemble(data, base + rva, resolve)
        except AssemblyError as e:
            e.section = "data"  # type: ignore[attr-defined]
            raise
        sections.append(Section(".data", rva, blob, "rw", page_align(max(len(blob), 1))))
        symbols.update(labels)
        rva += page_align(max(len(blob), 1))

    def resolve_with_data(sym: str) -> int | None:
        if sym in symbols:
            return symbols[sym]
        return resolve(sym) if resolve else None

    try:
        blob, labels = assemble(code, base + rva, resolve_with_data)
    except AssemblyError as e:
        e.section = "code"  # type: ignore[attr-defined]
        raise
    sections.append(Section(".text", rva, blob, "rx", page_align(max(len(blob), 1))))
    dup = set(labels) & set(symbols)
    if dup:
        raise AssemblyError(f"label {sorted(dup)[0]!r} is defined in both data and code")
    symbols.update(labels)
    public = {n: a for n, a in symbols.items() if "__" not in n}
    exported = public if exports is None else {n: public[n] for n in exports if n in public}
    return Image(name=name, base=base, sections=sections, exports=dict(exported), symbols=symbols)


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
                if "__" in sym:
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
