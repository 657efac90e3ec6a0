"""The CPU part of a fork: Unicorn's saved context, kept as bytes shared between forks.

A Unicorn x86-64 context is about 5.6 KiB (general registers, segments, FPU and vector
registers, MSRs), one allocation per ``context_save``. Between two forks of an
exploration only a few words of it differ (the general registers, RIP, flags), so a
fork keeps its context as its first chunk (those words) and a tuple of the other
fixed-size chunks, shared with the previous save's when they are equal: a few hundred
bytes a fork instead of 5.6 KiB. Saving and restoring go through one reusable context
(``context_update`` into it, its bytes copied back before ``context_restore``): the
same bytes Unicorn copies for a context of its own.
"""

from __future__ import annotations

import ctypes
from typing import Any

CHUNK = 256  # bytes per shared piece of a saved context

# (the first chunk: general registers, RIP, flags; the other chunks, usually one shared tuple)
SavedCpu = tuple[bytes, tuple[bytes, ...]]


class CpuContexts:
    """Saves and restores one Unicorn instance's CPU context as shared chunks."""

    __slots__ = ("_address", "_held", "_reference", "_scratch", "_size", "_tail", "_uc")

    def __init__(self, uc: Any) -> None:  # a unicorn.Uc (its context methods are untyped)
        self._uc = uc
        self._scratch = uc.context_save()  # the one context Unicorn saves into and restores from
        self._address: int = self._scratch.context.value  # where its bytes are
        raw = bytes(self._scratch)
        self._size = len(raw)
        self._tail = raw[CHUNK:]
        # Equal chunks of later saves are these objects (the latest save whose later chunks
        # changed); usually only the first chunk differs.
        self._reference = tuple([raw[i : i + CHUNK] for i in range(CHUNK, self._size, CHUNK)])
        self._held: SavedCpu = (raw[:CHUNK], self._reference)  # what the scratch context holds now

    def save(self) -> SavedCpu:
        """The CPU's context now."""
        self._uc.context_update(self._scratch)
        raw = ctypes.string_at(self._address, self._size)
        if raw[CHUNK:] == self._tail:
            rest = self._reference
        else:  # something past the first chunk changed: the saves from now on are compared with this one
            pieces = [raw[i : i + CHUNK] for i in range(CHUNK, self._size, CHUNK)]
            rest = self._reference = tuple([r if p == r else p for p, r in zip(pieces, self._reference, strict=True)])
            self._tail = raw[CHUNK:]
        out = self._held = (raw[:CHUNK], rest)
        return out

    def restore(self, saved: SavedCpu) -> None:
        """Put a saved context back on the CPU (copying only what the scratch context lacks)."""
        first, rest = saved
        held_first, held_rest = self._held
        if first is not held_first:
            ctypes.memmove(self._address, first, CHUNK)
        if rest is not held_rest:
            ctypes.memmove(self._address + CHUNK, b"".join(rest), self._size - CHUNK)
        self._held = saved
        self._uc.context_restore(self._scratch)
