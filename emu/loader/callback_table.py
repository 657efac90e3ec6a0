"""A KernelCallbackTable taken from an image: an array of pointers a module exports as data.

On Windows, PEB.KernelCallbackTable points at user32's dispatch table (``apfnDispatch``
in user32's data); user32 does not export it by name, it stores the address in the PEB
while it initializes. emu runs no DllMain, so ``[kernel_callback_table] from =
"module!export"`` lets a DLL that *does* export its table be used as the table.

The entries are read as the image was loaded (relocations applied), 8 bytes each:
``size`` of them when the scenario gives one, otherwise up to (not including) the first
that is 0 or does not point into a loaded image, and never past the end of the export's
section.
"""

from __future__ import annotations

from collections.abc import Sequence

from emu.errors import ImageError
from emu.loader.image import Image
from emu.records import record

__all__ = ["ExportedTable", "exported_table", "peb_callback_table"]


@record(frozen=True)
class ExportedTable:
    """The table found: the image that exports it, its address and its entries (absolute)."""

    image: Image
    address: int
    entries: tuple[int, ...]


def exported_table(images: Sequence[Image], ref: str, size: int | None = None, limit: int = 4096) -> ExportedTable:
    """Read the table ``ref`` ("module!export") names.

    Raises:
        ImageError: one line: no such module or export, the export is not in a data section,
        ``size`` entries do not fit the section, or the table has no entry.
    """
    mod, _, name = ref.partition("!")
    image = next((i for i in images if i.name.lower() == mod.lower()), None)
    if image is None:
        raise ImageError(f"no loaded module named {mod!r} (loaded: {', '.join(i.name for i in images)})")
    at = image.exports.get(name)
    if at is None:
        raise ImageError(f"{image.name} exports no {name!r}")
    section = image.section_at(at)
    if section is None or "x" in section.perms:
        where = f"section {section.name} (executable)" if section is not None else "no section"
        raise ImageError(
            f"{ref} at {at:#x} is in {where}, not in a data section: expected an exported array of pointers"
        )
    room = min((image.base + section.rva + section.size - at) // 8, limit)
    if size is not None and size > room:
        raise ImageError(f"{ref}: {size} entries run past the end of section {section.name} (room for {room})")
    raw = image.read(at, 8 * (size if size is not None else room)) or b""
    values = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]
    if size is None:
        stop = next((i for i, v in enumerate(values) if v == 0 or not any(m.contains(v) for m in images)), len(values))
        if stop == 0:
            raise ImageError(
                f"{ref}: the first entry, {values[0]:#x}, is not an address in a loaded image; set 'size' to take it anyway"
                if values
                else f"{ref}: no room for an entry in section {section.name}"
            )
        values = values[:stop]
    return ExportedTable(image, at, tuple(values))


def peb_callback_table(
    images: Sequence[Image], source: str | None, size: int, overrides: dict[int, int]
) -> tuple[int | None, bytes]:
    """What PEB.KernelCallbackTable points at: (an image's own table, b"") or (None, a table to map).

    With ``source`` and no ``overrides`` the PEB points at the exported table itself, as
    Windows' PEB points into user32's data. Overrides (index → address) go into a copy of
    it (the image's table stays as loaded); without ``source`` the table is ``size``
    entries holding the overrides. ``size`` 0 with ``source`` means as many as the table has.
    """
    first: tuple[int, ...] = ()
    if source is not None:
        found = exported_table(images, source, size or None)
        if not overrides:
            return found.address, b""
        first = found.entries
    table = bytearray(8 * max(len(first), size, max(overrides, default=-1) + 1))
    for idx, value in [*enumerate(first), *overrides.items()]:
        table[8 * idx : 8 * idx + 8] = value.to_bytes(8, "little")
    return None, bytes(table)
