"""Binding imports: fill an image's IAT from other loaded images, or point it at traps.

Works on any :class:`~emu.loader.image.Image` with ``imports`` (PE images from
:func:`emu.loader.pe.load_pe`); the modules bound against may be PE or assembled images.
Forwarded exports are reported, never followed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import field
from typing import Literal

from emu.errors import ImageError
from emu.loader.image import PAGE, Image, ImageImport, Section, page_align
from emu.records import record

__all__ = ["TRAP_BASE", "TRAP_STRIDE", "ImportTrap", "ImportTraps", "bind_imports"]

TRAP_BASE = 0x7FFF_0000_0000  # default base of the trap image (user space, away from emu's other regions)
TRAP_STRIDE = 0x10


@record(frozen=True)
class ImportTrap:
    """An import bound to a trap address instead of code: calling it must raise UnimplementedImport."""

    label: str  # ``ntdll.dll!NtFoo``
    address: int
    importer: str
    reason: str


@record
class ImportTraps:
    """Trap addresses for unbound imports, shared by every image of one process.

    Trap ``k`` sits at ``base + 0x1000 + 0x10*k`` (the first page is the headers page
    every Image has); the same ``dll!name`` always gets the same trap. :meth:`image`
    gives the Image to map there: ``int3`` bytes, one symbol per trap, so an engine hook
    on that range can raise :class:`~emu.errors.UnimplementedImport` naming it.
    """

    base: int = TRAP_BASE
    traps: list[ImportTrap] = field(default_factory=list)

    def trap_for(self, label: str, importer: str, reason: str) -> ImportTrap:
        for t in self.traps:
            if t.label.lower() == label.lower():
                return t
        trap = ImportTrap(label, self.base + PAGE + TRAP_STRIDE * len(self.traps), importer, reason)
        self.traps.append(trap)
        return trap

    def trap_at(self, address: int) -> ImportTrap | None:
        """The trap ``address`` falls in (for the engine's hook on the trap page), else None."""
        k = (address - self.base - PAGE) // TRAP_STRIDE
        return self.traps[k] if address >= self.base + PAGE and k < len(self.traps) else None

    def image(self, name: str = "unbound") -> Image:
        size = max(len(self.traps), 1) * TRAP_STRIDE
        symbols = {t.label.replace("!", "."): t.address for t in self.traps}
        return Image(
            name, self.base, [Section(".traps", PAGE, b"\xcc" * size, "rx", page_align(size))], symbols=symbols
        )


def _module_key(name: str) -> str:
    n = name.lower()
    return n[:-4] if n.endswith(".dll") else n


def _resolve(imp: ImageImport, modules: dict[str, Image]) -> tuple[int | None, str]:
    target = modules.get(_module_key(imp.dll))
    if target is None:
        return None, f"{imp.dll} is not loaded"
    if imp.name is not None:
        addr = target.exports.get(imp.name)
        forwarded = next((f for f in target.forwarders if f.name == imp.name), None)
    else:
        addr = target.ordinals.get(imp.ordinal or 0)
        forwarded = next((f for f in target.forwarders if f.ordinal == imp.ordinal), None)
    if addr is not None:
        return addr, ""
    if forwarded is not None:
        return None, f"it is forwarded to {forwarded.target} (emu does not follow forwarders)"
    return None, f"{target.name} does not export it"


def bind_imports(
    image: Image,
    images: Iterable[Image],
    on_missing: Literal["error", "trap"] = "error",
    traps: ImportTraps | None = None,
) -> tuple[Image, list[ImportTrap]]:
    """Write the address of every import into its IAT slot; the input Image is not changed.

    DLL names match module names without ``.dll``, case-insensitively. By name, an
    import binds to an export; by ordinal, to ``ordinals``.

    Args:
        image: the importing image (from :func:`load_pe`).
        images: the loaded modules to bind against.
        on_missing: ``"error"`` raises for the first import that cannot be bound;
            ``"trap"`` points it at a trap from ``traps`` instead.
        traps: the process's trap table (a fresh one if None).

    Returns:
        A new Image with the IAT filled, and the traps this image's imports use.

    Raises:
        ImageError: ``callbacks: cannot bind import ntdll.dll!NtFoo: ...`` (error mode).
    """
    modules = {_module_key(m.name): m for m in images}
    table = traps if traps is not None else ImportTraps()
    patches: dict[int, int] = {}
    used: list[ImportTrap] = []
    missing: list[str] = []
    for imp in image.imports:
        addr, reason = _resolve(imp, modules)
        if addr is None:
            if on_missing == "error":
                missing.append(f"{imp.label}: {reason}")
                continue
            trap = table.trap_for(imp.label, image.name, reason)
            if trap not in used:
                used.append(trap)
            addr = trap.address
        patches[imp.slot] = addr
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ImageError(
            f"{image.name}: cannot bind import {missing[0]}{more}; "
            '[machine] unbound_imports = "trap" loads it anyway and stops the run only if it is called'
        )
    sections = []
    pending = dict(patches)
    for s in image.sections:
        start = image.base + s.rva
        mine = {slot: pending.pop(slot) for slot in list(pending) if start <= slot and slot + 8 <= start + s.size}
        if mine:
            data = bytearray(s.data)
            for slot, a in mine.items():
                off = slot - start
                if len(data) < off + 8:
                    data.extend(bytes(off + 8 - len(data)))
                data[off : off + 8] = a.to_bytes(8, "little")
            s = dataclasses.replace(s, data=bytes(data))
        sections.append(s)
    if pending:
        raise ImageError(f"{image.name}: IAT slot {min(pending):#x} is not inside a section")
    return dataclasses.replace(image, sections=sections), used
