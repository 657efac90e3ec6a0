"""The memory a dump of a state holds: page-aligned regions with, where the dump carries them, their bytes.

A minidump describes memory twice: MemoryInfoList (what VirtualQuery would say about each
region) and Memory64List (the bytes of some of them). Tools expect the regions to be whole
pages, as VirtualQuery reports them (MS docs, MEMORY_BASIC_INFORMATION: "RegionSize ... in
bytes, of the region ... all pages have identical attributes"; dumpulator asserts it), and a
memory range to start where a region starts (udmp-parser looks ranges up by region base).

What is written, per kind of region:
- images: the header page and each section, as loaded (writes to data sections during the
  run are not recorded per state);
- each dumped thread's stack: the pages from RSP's page up to what the state recorded (the
  bytes below RSP in that page are zeros: emu does not record them); ``full`` writes the
  whole committed stack, zeros outside what the state recorded;
- the TEBs, the PEB, KUSER_SHARED_DATA, the loader data (PEB.Ldr, ProcessParameters), the
  KernelCallbackTable and the import-trap page: as the process was built (the model does not
  change them while it runs);
- the scenario's own ``[[memory]]`` regions: described always, their bytes (as mapped,
  before the run) only with ``full``.

A dump written from a :class:`~emu.dump.live.LiveState` (``emu dump``, ``emu corpus``)
holds instead every region's bytes as they were at the state (:func:`live_regions`), so a
run can start from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from emu.dump.format import MEM_IMAGE, MEM_PRIVATE
from emu.engine import Process, RunResult
from emu.loader.image import PAGE, Image, page_align

if TYPE_CHECKING:
    from emu.dump.live import LiveState


@dataclass(frozen=True)
class Region:
    """One MINIDUMP_MEMORY_INFO entry, and its bytes when the dump holds them."""

    start: int
    size: int
    perms: str
    allocation_base: int
    kind: int  # MEM_IMAGE or MEM_PRIVATE
    data: bytes | None = None
    guard: bool = False  # a stack's guard page: PAGE_GUARD, no bytes (a debugger cannot read it)


def image_regions(image: Image) -> list[Region]:
    """The header page and the sections as mapped (page-aligned, zero-filled, never overlapping)."""
    head = max(PAGE, len(image.headers))  # the machine maps a header page for every image
    spans = [(image.base, head, "r", image.headers)]
    spans += [(image.base + s.rva, s.size, s.perms, s.data) for s in image.sections]
    spans.sort(key=lambda t: t[0])
    out: list[Region] = []
    for i, (start, size, perms, data) in enumerate(spans):
        end = start + page_align(max(size, 1))
        if i + 1 < len(spans):
            end = min(end, spans[i + 1][0])
        if out and start < out[-1].start + out[-1].size:
            continue  # a section inside the one before it (never in images emu builds)
        if end > start:
            body = data[: end - start]
            out.append(Region(start, end - start, perms, image.base, MEM_IMAGE, body + bytes(end - start - len(body))))
    return out


def stack_regions(rsp: int, stack: bytes, limit: int, base: int, full: bool = False) -> list[Region]:
    """A thread's committed stack [limit, base): the pages holding the recorded bytes from RSP up carry data."""

    def private(start: int, end: int, data: bytes | None = None) -> Region:
        return Region(start, end - start, "rw", limit, MEM_PRIVATE, data)

    if base <= limit:
        return []
    if not (stack and limit <= rsp < base):
        return [private(limit, base, bytes(base - limit) if full else None)]
    low = rsp & ~(PAGE - 1)
    high = min(base, page_align(rsp + len(stack)))
    known = (bytes(rsp - low) + stack)[: high - low]
    known += bytes(high - low - len(known))
    if full:
        return [private(limit, base, bytes(low - limit) + known + bytes(base - high))]
    out = [private(limit, low)] if low > limit else []
    out.append(private(low, high, known))
    if high < base:
        out.append(private(high, base))
    return out


def _guard(start: int, size: int, label: str) -> list[Region]:
    """A stack's guard page as Windows commits it: PAGE_READWRITE | PAGE_GUARD (WRK
    mm/acceschk.c MiCheckForUserStackOverflow); other no-access ranges are left out."""
    return [Region(start, size, "rw", start, MEM_PRIVATE, None, guard=True)] if label.endswith(" guard") else []


def process_regions(run: RunResult, full: bool = False) -> list[Region]:
    """TEBs, PEB, KUSER_SHARED_DATA, loader data, KernelCallbackTable, scenario memory: from the process as built.

    Builds the scenario's process again (deterministic: same addresses, same bytes) and
    takes every region that is neither an image nor a stack.
    """
    process = Process(run.scenario)
    machine = process.machine
    images = [(img.base, img.end) for img in run.images]
    out = []
    for r in machine.regions:
        if any(lo <= r.start < hi for lo, hi in images):
            continue  # images come from the run's images
        if not r.perms:
            out += _guard(r.start, r.size, r.label)
            continue
        if r.label.startswith("thread ") and r.label.endswith(" stack"):
            continue
        keep = full or not r.label.startswith("memory ")
        data = machine.read(r.start, r.size) if keep else None
        out.append(Region(r.start, r.size, r.perms, r.start, MEM_PRIVATE, data))
    return out


def live_regions(
    run: RunResult, live: LiveState, stacks: dict[tuple[int, int], int], full: bool = False
) -> list[Region]:
    """Every committed region of the process as it was at the state (see :mod:`emu.dump.live`).

    ``stacks`` maps the stack (limit, base) of each dumped thread to the RSP it is shown with:
    its stack carries bytes from RSP's page up (all of it with ``full``); the limit is the
    thread's now, below the stack as allocated once an overflow committed its guard page. Stacks of threads the
    dump leaves out (ended ones) and guard pages are not written; images, TEBs, the PEB,
    KUSER_SHARED_DATA, loader data and the scenario's memory carry their bytes as they were.
    """
    images = [(img.base, img.end) for img in run.images]
    out: list[Region] = []
    for r in live.memory:
        if not r.perms:
            out += _guard(r.start, r.size, r.label)
            continue
        base = next((lo for lo, hi in images if lo <= r.start < hi), None)
        if base is not None:
            out.append(Region(r.start, r.size, r.perms, base, MEM_IMAGE, r.data))
        elif r.label.startswith("thread ") and " stack" in r.label:
            rsp = next((v for (lo, hi), v in stacks.items() if lo <= r.start < hi), None)
            if rsp is None:
                continue
            low = r.start if full or not r.start <= rsp < r.start + r.size else rsp & ~(PAGE - 1)
            if low > r.start:
                out.append(Region(r.start, low - r.start, r.perms, r.start, MEM_PRIVATE))
            out.append(Region(low, r.start + r.size - low, r.perms, r.start, MEM_PRIVATE, r.data[low - r.start :]))
        else:
            out.append(Region(r.start, r.size, r.perms, r.start, MEM_PRIVATE, r.data))
    return out
