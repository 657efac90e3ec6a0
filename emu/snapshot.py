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

A snapshot also holds the machine's region list when it differs from its parent's: a
stack's guard page turns into ordinary stack and the guard moves down a page when a thread
overflows or grows its stack (emu.kernel.stack_guard), so restoring a state from before
that protects (and, if the mapped ranges differ, maps and unmaps) pages back as they were,
guard pages included.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable
from typing import TYPE_CHECKING

from unicorn import UC_PROT_WRITE

from emu.loader.asm_cache import blake2b  # (hashlib's blake2b without OpenSSL's start-up)
from emu.loader.image import PAGE
from emu.regions import Region, uc_prot

if TYPE_CHECKING:
    from emu.machine import Machine


def _coverage(regions: Iterable[Region]) -> list[tuple[int, int]]:
    """The address ranges mapped, adjacent regions joined."""
    out: list[tuple[int, int]] = []
    for r in sorted(regions, key=lambda r: r.start):
        if out and out[-1][1] == r.start:
            out[-1] = (out[-1][0], r.end)
        else:
            out.append((r.start, r.end))
    return out


class PageSnapshot:
    """An immutable layer of page contents over its parent; ``touched`` is every page in the chain."""

    __slots__ = ("delta", "depth", "layout", "memo", "parent", "touched")

    def __init__(
        self, parent: PageSnapshot | None, delta: dict[int, bytes], layout: tuple[Region, ...] | None = None
    ) -> None:
        self.parent = parent
        self.delta = delta
        self.layout = layout  # the machine's regions (None: as the machine had them when tracking began)
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
        self.took_new = True  # whether the last take() made a new layer (not the current one again)
        self.faults = 0
        self._host: list[mmap.mmap] = []  # host memory behind large regions (kept alive here)
        self._ranges: list[tuple[int, int, int]] = []  # (start, end, writable prot)
        self._layout: tuple[Region, ...] | None = None  # None: the regions tracking began with
        self._initial = tuple(machine.regions)
        self._skip_ranges: tuple[tuple[int, int], ...] = ()  # digest(): the ranges last skipped,
        self._skipped: set[int] = set()  # the pages seen inside them,
        self._kept: set[int] = set()  # and those seen outside
        for r in machine.regions:
            if "w" in r.perms:
                prot = uc_prot(r.perms)
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

    def on_layout(self, start: int, size: int, perms: str) -> None:
        """The machine mapped or re-protected [start, start+size) while tracking: its pages are
        tracked from now on if writable (read-only until their first write), else not at all."""
        end = start + size
        kept: list[tuple[int, int, int]] = []
        for lo, hi, prot in self._ranges:
            if hi <= start or lo >= end:
                kept.append((lo, hi, prot))
                continue
            if lo < start:
                kept.append((lo, start, prot))
            if hi > end:
                kept.append((end, hi, prot))
        if "w" in perms:
            prot = uc_prot(perms)
            kept.append((start, end, prot))
            for page in range(start, end, PAGE):
                self.uc.mem_protect(page, PAGE, prot if page in self.dirty else prot & ~UC_PROT_WRITE)
        self._ranges = sorted(kept)
        self._layout = tuple(self.machine.regions)

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
        read = self.machine.read  # (bytes, through one reused buffer)
        delta = {p: read(p, PAGE) for p in sorted(self.dirty)}
        cur = self.current
        for p in sorted(self.hot):
            data = read(p, PAGE)
            if data != (cur.page(p) or self.base[p]):
                delta[p] = data
        self._protect(self.dirty)
        self.dirty.clear()
        if not delta and self._layout is cur.layout:
            # Nothing differs from the current layer: it is this snapshot too. An empty layer would
            # only lengthen the chain every page lookup walks (forks in a loop that leaves memory
            # as it was would stack one per fork).
            self.took_new = False
            return cur
        self.took_new = True
        self.current = PageSnapshot(
            cur, dict(sorted(delta.items())) if len(delta) > 1 and self.hot else delta, self._layout
        )
        return self.current

    def _apply_layout(self, layout: tuple[Region, ...] | None) -> set[int]:
        """Protect (and, if the mapped ranges differ, map and unmap) regions back to ``layout``;
        returns the pages mapped afresh (zeros now)."""
        target = layout if layout is not None else self._initial
        machine = self.machine
        fresh: set[int] = set()
        if _coverage(machine.regions) != _coverage(target):
            # Ranges mapped or unmapped since: Unicorn's own memory, never a host-backed region
            # (those are mapped once, when tracking begins, and keep their extent).
            now = {r.start: r for r in machine.regions}
            want = {r.start: r for r in target}
            for start, r in now.items():
                if start not in want or want[start].size != r.size:
                    self.uc.mem_unmap(r.start, r.size)
            for start, r in want.items():
                old = now.get(start)
                if old is None or old.size != r.size:
                    self.uc.mem_map(r.start, r.size, uc_prot(r.perms))
                    fresh.update(range(r.start, r.end, PAGE))
        machine.regions = list(target)
        self._ranges = sorted((r.start, r.end, uc_prot(r.perms)) for r in target if "w" in r.perms)
        for r in target:  # tracked pages read-only again (hot ones reopen at their next write)
            prot = uc_prot(r.perms)
            self.uc.mem_protect(r.start, r.size, prot & ~UC_PROT_WRITE if "w" in r.perms else prot)
        self._layout = layout
        return fresh

    def restore(self, snap: PageSnapshot) -> int:
        """Make memory equal to ``snap``; returns how many pages were rewritten."""
        cur = self.current
        fresh: set[int] = set()
        relaid = snap.layout is not self._layout
        if relaid:
            fresh = self._apply_layout(snap.layout)
        written = 0
        live = self._live()
        for page in sorted(cur.touched | live | snap.touched | fresh):
            if relaid and self.machine.region_at(page) is None:
                self.dirty.discard(page)
                self.hot.discard(page)
                continue  # not mapped in the restored layout
            want = snap.page(page) or self.base.get(page) or bytes(PAGE)
            if page not in live and page not in fresh and (cur.page(page) or self.base[page]) is want:
                continue
            self.uc.mem_write(page, want)
            written += 1
        self._protect(self.dirty)
        self.dirty.clear()
        self.current = snap
        return written

    def _classify(self, pages: set[int] | frozenset[int]) -> None:
        """Sort pages not seen before into those inside the skipped ranges and the others."""
        kept, skipped = self._kept, self._skipped
        for p in pages - skipped - kept if kept or skipped else pages:
            (skipped if any(start <= p < end for start, end in self._skip_ranges) else kept).add(p)

    def digest(self, skip: Iterable[tuple[int, int]] = ()) -> bytes:
        """A digest of every page that differs from the initial memory, except the ``skip`` ranges."""
        ranges = skip if type(skip) is tuple else tuple(skip)
        # Which pages lie in a skipped range, remembered per page for these ranges (the same
        # few stack pages are live at nearly every state).
        if ranges != self._skip_ranges:
            self._skip_ranges, self._skipped, self._kept = ranges, set(), set()
        skipped = self._skipped
        dirty, hot = self.dirty, self.hot
        if (not dirty or dirty <= skipped) and (not hot or hot <= skipped):
            live: set[int] = set()  # every page written since this layer is in a skipped range
        else:
            live = dirty | hot
            self._classify(live)
            live -= skipped
        memo = self.current.memo
        if not live and memo is not None and memo[0] == ranges:
            return memo[1]  # nothing written outside the skipped ranges since this layer
        h = blake2b(digest_size=16)
        pages = self.current.touched.union(live)
        self._classify(pages)
        for page in sorted(pages - skipped):
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
