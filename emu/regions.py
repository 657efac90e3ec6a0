"""Mapped regions of the user address space and their protections as Unicorn takes them."""

from __future__ import annotations

from unicorn import UC_PROT_EXEC, UC_PROT_NONE, UC_PROT_READ, UC_PROT_WRITE

from emu.records import record


def uc_prot(perms: str) -> int:
    """Unicorn's protection bits for ``perms`` (\"r\", \"w\", \"x\" in any combination)."""
    p = UC_PROT_NONE
    if "r" in perms:
        p |= UC_PROT_READ
    if "w" in perms:
        p |= UC_PROT_WRITE
    if "x" in perms:
        p |= UC_PROT_EXEC
    return p


@record(frozen=True)
class Region:
    """A mapped range of the address space: start, size, protection and what it holds."""

    start: int
    size: int
    perms: str
    label: str

    @property
    def end(self) -> int:
        return self.start + self.size
