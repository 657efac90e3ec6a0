"""Page-level copy-on-write snapshots of user memory, restorable in any order.

Unicorn's own memory snapshots restore only in LIFO order (restoring out of order
crashed the process here), and an explorer forks in arbitrary order. So emu keeps
its own: while tracking is on, every writable page is mapped read-only; the first
guest write to a page faults, the machine saves the page's original bytes, makes it
writable again and re-executes the instruction (Unicorn's faults are precise: the
instruction has no effect yet). A snapshot stores only the pages written since its
parent, so memory per fork is proportional to dirty pages, not to the address space.

Two refinements keep that cheap. A page written after most forks (the top of a stack)
becomes *hot*: it stays writable and is compared with its saved bytes at each snapshot
instead of being protected and faulted again every time. And a large writable region is
moved onto host memory emu owns (``mem_map_ptr``): the first protection change inside a
region makes Unicorn split it, and for a region of its own memory the split copies the
whole region (tens of milliseconds for 64 MiB) where a host-backed one only re-points.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
from collections.abc import Iterable
from typing import TYPE_CHECKING

from unicorn import UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE

from emu.loader.image import PAGE

if TYPE_CHECKING:
    from emu.machine import Machine


class PageSnapshot:
    """An immutable layer of page contents over its parent; ``touched`` is every page in the chain."""

    __slots__ = ("delta", "depth", "memo", "parent", "touched")

    def __init__(self, parent: PageSnapshot | None, delta: dict[int, bytes]) -> None:
        self.parent = parent
        self.delta = delta
        inherited = parent.touched if parent else frozenset()
        self.touched: frozenset[int] = inherited | delta.keys() if delta.keys() - inherited else inherited
        self.depth: int = parent.depth + 1 if parent else 0
        self.memo: tuple[object, bytes] | None = None  # (skip ranges, digest) of exactly this memory

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


# A writable region at least this large is moved onto host memory (see the module docstring).
HOST_BACKED = 1 << 20
# A page that faults this many times becomes hot (stays writable, compared at each snapshot);
# at most HOT_PAGES of them, since each costs a page compare per snapshot.
HOT_AFTER = 2
HOT_PAGES = 32


class CowMemory:
    """Dirty-page tracking and any-order restore for one machine's writable regions."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.uc = machine.uc
        self.dirty: set[int] = set()
        self.hot: set[int] = set()  # writable all the time; compared, not faulted (module docstring)
        self._faulted: dict[int, int] = {}  # page -> write faults taken, until it is hot
        self.base: dict[int, bytes] = {}  # original bytes of every page ever written
        self.current = PageSnapshot(None, {})
        self.faults = 0
        self._host: list[mmap.mmap] = []  # host memory behind large regions (kept alive here)
        self._ranges: list[tuple[int, int, int]] = []  # (start, end, writable prot)
        for r in machine.regions:
            if "w" in r.perms:
                prot = UC_PROT_READ | UC_PROT_WRITE | (UC_PROT_EXEC if "x" in r.perms else 0)
                self._ranges.append((r.start, r.end, prot))
                if r.size >= HOST_BACKED:
                    self._host_back(r.start, r.size, prot)
                self.uc.mem_protect(r.start, r.size, prot & ~UC_PROT_WRITE)

    def _host_back(self, start: int, size: int, prot: int) -> None:
        """Remap a region onto an anonymous host mapping, carrying its bytes over (zero pages are
        left untouched, so they take no host memory until written)."""
        data = bytes(self.uc.mem_read(start, size))
        host = mmap.mmap(-1, size)
        self.uc.mem_unmap(start, size)
        self.uc.mem_map_ptr(start, size, prot, ctypes.addressof(ctypes.c_char.from_buffer(host)))
        self._host.append(host)
        zero = bytes(PAGE)
        for off in range(0, size, PAGE):
            chunk = data[off : off + PAGE]
            if chunk != zero:
                self.uc.mem_write(start + off, chunk)

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
            if page in self.hot:  # written again after something made it read-only: open it, as before
                self.uc.mem_protect(page, PAGE, prot)
                continue
            self._touch(page)
            self.uc.mem_protect(page, PAGE, prot)
            n = self._faulted.get(page, 0) + 1
            self._faulted[page] = n
            if n >= HOT_AFTER and len(self.hot) < HOT_PAGES:
                self.hot.add(page)
                self.dirty.discard(page)
        self.faults += 1
        return True

    def prefault(self, address: int, size: int) -> None:
        """Make tracked pages writable ahead of the guest's first write (no fault, no restart)."""
        hot = self.hot
        if (address & ~(PAGE - 1)) in hot and ((address + max(size, 1) - 1) & ~(PAGE - 1)) in hot:
            return  # both ends are hot (a prefault covers a page or two): already writable
        if not self.on_write_fault(address, size):
            return
        self.faults -= 1  # not a fault taken

    def on_host_write(self, address: int, size: int) -> None:
        """The kernel model writes user memory directly (protections do not apply to it)."""
        for page in self._pages(address, size):
            if page not in self.dirty and page not in self.hot and self._prot(page) is not None:
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

    def _live(self) -> set[int]:
        """Pages whose bytes may differ from ``current`` (written since, or hot)."""
        return self.dirty | self.hot if self.hot else self.dirty

    def take(self) -> PageSnapshot:
        """Freeze the pages written since the last take/restore into a new layer."""
        read = self.uc.mem_read
        delta = {p: bytes(read(p, PAGE)) for p in sorted(self.dirty)}
        cur = self.current
        for p in sorted(self.hot):
            data = bytes(read(p, PAGE))
            if data != (cur.page(p) or self.base[p]):
                delta[p] = data
        self._protect(self.dirty)
        self.dirty.clear()
        self.current = PageSnapshot(cur, dict(sorted(delta.items())) if self.hot else delta)
        return self.current

    def restore(self, snap: PageSnapshot) -> int:
        """Make memory equal to ``snap``; returns how many pages were rewritten."""
        cur = self.current
        written = 0
        live = self._live()
        for page in sorted(cur.touched | live | snap.touched):
            want = snap.page(page) or self.base[page]
            if page not in live and (cur.page(page) or self.base[page]) is want:
                continue
            self.uc.mem_write(page, want)
            written += 1
        self._protect(self.dirty)
        self.dirty.clear()
        self.current = snap
        return written

    def digest(self, skip: Iterable[tuple[int, int]] = ()) -> bytes:
        """A digest of every page that differs from the initial memory, except the ``skip`` ranges."""
        ranges = tuple(skip)
        live = [p for p in self._live() if not any(start <= p < end for start, end in ranges)]
        memo = self.current.memo
        if not live and memo is not None and memo[0] == ranges:
            return memo[1]  # nothing written outside the skipped ranges since this layer
        h = hashlib.blake2b(digest_size=16)
        for page in sorted(self.current.touched.union(live)):
            if any(start <= page < end for start, end in ranges):
                continue
            data = (
                bytes(self.uc.mem_read(page, PAGE))
                if page in self.dirty or page in self.hot
                else self.current.page(page)
            )
            if data is None or data == self.base.get(page):
                continue  # written, but back to the original bytes
            h.update(page.to_bytes(8, "little"))
            h.update(data)
        out = h.digest()
        if not live:
            self.current.memo = (ranges, out)
        return out
