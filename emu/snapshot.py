"""Page-level copy-on-write snapshots of user memory, restorable in any order.

Unicorn's own memory snapshots restore only in LIFO order (restoring out of order
crashed the process here), and an explorer forks in arbitrary order. So emu keeps
its own: while tracking is on, every writable page is mapped read-only; the first
guest write to a page faults, the machine saves the page's original bytes, makes it
writable again and re-executes the instruction (Unicorn's faults are precise: the
instruction has no effect yet). A snapshot stores only the pages written since its
parent, so memory per fork is proportional to dirty pages, not to the address space.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from unicorn import UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE

from emu.loader.image import PAGE

if TYPE_CHECKING:
    from emu.machine import Machine


class PageSnapshot:
    """An immutable layer of page contents over its parent; ``touched`` is every page in the chain."""

    __slots__ = ("delta", "depth", "parent", "touched")

    def __init__(self, parent: PageSnapshot | None, delta: dict[int, bytes]) -> None:
        self.parent = parent
        self.delta = delta
        self.touched: frozenset[int] = (parent.touched if parent else frozenset()) | frozenset(delta)
        self.depth: int = parent.depth + 1 if parent else 0

    def page(self, address: int) -> bytes | None:
        node: PageSnapshot | None = self
        while node is not None:
            hit = node.delta.get(address)
            if hit is not None:
                return hit
            node = node.parent
        return None

    @property
    def own_bytes(self) -> int:
        """Bytes this layer holds (its dirty pages)."""
        return len(self.delta) * PAGE


class CowMemory:
    """Dirty-page tracking and any-order restore for one machine's writable regions."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.uc = machine.uc
        self.dirty: set[int] = set()
        self.base: dict[int, bytes] = {}  # original bytes of every page ever written
        self.current = PageSnapshot(None, {})
        self.faults = 0
        self._ranges: list[tuple[int, int, int]] = []  # (start, end, writable prot)
        for r in machine.regions:
            if "w" in r.perms:
                prot = UC_PROT_READ | UC_PROT_WRITE | (UC_PROT_EXEC if "x" in r.perms else 0)
                self._ranges.append((r.start, r.end, prot))
                self.uc.mem_protect(r.start, r.size, prot & ~UC_PROT_WRITE)

    def _prot(self, page: int) -> int | None:
        for start, end, prot in self._ranges:
            if start <= page < end:
                return prot
        return None

    def _touch(self, page: int) -> None:
        if page not in self.base:
            self.base[page] = bytes(self.uc.mem_read(page, PAGE))
        self.dirty.add(page)

    @staticmethod
    def _pages(address: int, size: int) -> range:
        return range(address & ~(PAGE - 1), ((address + max(size, 1) - 1) & ~(PAGE - 1)) + PAGE, PAGE)

    def on_write_fault(self, address: int, size: int) -> bool:
        """A guest write hit a tracked read-only page: note it and make the page writable."""
        pages = self._pages(address, size)
        prots = [self._prot(p) for p in pages]
        if any(p is None for p in prots):
            return False  # a page that is really read-only: a genuine fault
        for page, prot in zip(pages, prots, strict=True):
            self._touch(page)
            self.uc.mem_protect(page, PAGE, prot)
        self.faults += 1
        return True

    def prefault(self, address: int, size: int) -> None:
        """Make tracked pages writable ahead of the guest's first write (no fault, no restart)."""
        if not self.on_write_fault(address, size):
            return
        self.faults -= 1  # not a fault taken

    def on_host_write(self, address: int, size: int) -> None:
        """The kernel model writes user memory directly (protections do not apply to it)."""
        for page in self._pages(address, size):
            if page not in self.dirty and self._prot(page) is not None:
                self._touch(page)

    def reprotect(self, start: int, size: int, perms: str) -> None:
        """A whole region's protection changed (the kernel made a guard page ``rw``): track its
        pages from now on if it is writable, forget them if not (the bytes stay as they are)."""
        end = start + size
        self._ranges = [r for r in self._ranges if not (r[0] == start and r[1] == end)]
        if "w" in perms:
            prot = UC_PROT_READ | UC_PROT_WRITE | (UC_PROT_EXEC if "x" in perms else 0)
            self._ranges.append((start, end, prot))
            for page in range(start, end, PAGE):
                self.uc.mem_protect(page, PAGE, prot if page in self.dirty else prot & ~UC_PROT_WRITE)

    def adopt(self, pages: Iterable[int]) -> None:
        """Keep the original bytes of ``pages`` before a snapshot from elsewhere overwrites them."""
        for page in pages:
            if page not in self.base:
                self.base[page] = bytes(self.uc.mem_read(page, PAGE))

    def _protect(self, pages: Iterable[int]) -> None:
        for page in pages:
            prot = self._prot(page)
            if prot is not None:
                self.uc.mem_protect(page, PAGE, prot & ~UC_PROT_WRITE)

    def take(self) -> PageSnapshot:
        """Freeze the pages written since the last take/restore into a new layer."""
        delta = {p: bytes(self.uc.mem_read(p, PAGE)) for p in sorted(self.dirty)}
        self._protect(self.dirty)
        self.dirty.clear()
        self.current = PageSnapshot(self.current, delta)
        return self.current

    def restore(self, snap: PageSnapshot) -> int:
        """Make memory equal to ``snap``; returns how many pages were rewritten."""
        cur = self.current
        written = 0
        for page in sorted(cur.touched | self.dirty | snap.touched):
            want = snap.page(page) or self.base[page]
            if page not in self.dirty and (cur.page(page) or self.base[page]) is want:
                continue
            self.uc.mem_write(page, want)
            written += 1
        self._protect(self.dirty)
        self.dirty.clear()
        self.current = snap
        return written

    def digest(self, skip: Iterable[tuple[int, int]] = ()) -> bytes:
        """A digest of every page that differs from the initial memory, except the ``skip`` ranges."""
        ranges = list(skip)
        h = hashlib.blake2b(digest_size=16)
        for page in sorted(self.current.touched | self.dirty):
            if any(start <= page < end for start, end in ranges):
                continue
            data = bytes(self.uc.mem_read(page, PAGE)) if page in self.dirty else self.current.page(page)
            if data is None or data == self.base.get(page):
                continue  # written, but back to the original bytes
            h.update(page.to_bytes(8, "little"))
            h.update(data)
        return h.digest()
