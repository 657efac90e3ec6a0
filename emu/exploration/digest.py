"""The text a state's digest is computed from, built from remembered pieces.

A state's digest (:meth:`emu.exploration.explorer.Explorer._observe`) hashes the state's
thread, mode and callback tail, its registers, its stack bytes and the kernel model's key.
Most of those parts recur from state to state: the kernel model's key of one thread at a
system call is the same over thousands of states, and so is the text around the registers.
So those texts are kept in memos (their ``repr``, encoded); the registers themselves are
hashed as 64-bit little-endian words, one ``struct`` call (a ``repr`` of each value cost
more than the rest of the digest).

The memos are bounded: past ``MEMO_LIMIT`` entries one is cleared and starts again.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from emu.kernel.fork import digest_key

if TYPE_CHECKING:
    from emu.kernel.core import Kernel
    from emu.kernel.thread import KThread

MEMO_LIMIT = 1 << 16


def _words(count: int) -> Callable[..., bytes]:
    """A packer of ``count`` registers as 64-bit little-endian words."""
    pack = _PACKERS.get(count)
    if pack is None:
        pack = _PACKERS[count] = struct.Struct(f"<{count}Q").pack
    return pack


_PACKERS: dict[int, Callable[..., bytes]] = {}


class DigestText:
    """The remembered pieces of states' identity texts."""

    __slots__ = ("_heads", "_keys", "_lone")

    def __init__(self) -> None:
        self._heads: dict[tuple[Any, ...], bytes] = {}  # a state's text before its registers
        self._keys: dict[tuple[object, ...], bytes] = {}  # the kernel model's key -> its repr, encoded
        self._lone: dict[tuple[object, ...], bytes] = {}  # a lone running thread's kernel key text

    def state_parts(self, raw: tuple[Any, ...]) -> list[bytes]:
        """The identity text of a RawState ``raw`` (its stack and the kernel aside), in pieces:
        ``repr((tid, mode, (depth, service, api, pending, frames), count))`` remembered per
        those values, then the ``count`` registers as 64-bit words. A register value that is
        not a 64-bit word (a context made by hand) is spelled by ``repr`` instead, with a
        count of -1, so the two spellings never meet."""
        context = raw[3]
        count = len(context)
        try:
            words = (_PACKERS.get(count) or _words(count))(*context)
        except (struct.error, TypeError):
            words, count = repr(tuple(context)).encode(), -1
        # The tail holds a bool (pending) where 0 would compare equal: its type is part of the memo key.
        memo = (raw[1], raw[2], raw[6], raw[7], raw[8], raw[9], type(raw[9]), raw[10], count)
        heads = self._heads
        head = heads.get(memo)
        if head is None:
            if len(heads) > MEMO_LIMIT:
                heads.clear()
            head = heads[memo] = repr((raw[1], raw[2], raw[6:11], count)).encode()
        return [head, words]

    def kernel_of(self, kernel: Kernel, thread: KThread) -> bytes:
        """``kernel(digest_key(kernel, thread))``, without building the key in the common case of
        one started thread with no callback, no wait, no choice pending and no objects."""
        threads = kernel.threads
        o = kernel.objects
        if (
            len(threads) == 1
            and thread.started is True
            and not thread.callback_stack
            and thread.suspended is None
            and thread.resuming is None
            and type(thread.terminated) is bool
            and kernel.pending_choice is None
            and kernel.next_thread is None
            and not (o.objects or o.queues or o.waiters)
            and threads.get(thread.tid) is thread
        ):
            status = thread.exit_status
            memo = (thread.tid, thread.mode, thread.terminated, status, type(status))
            lone = self._lone
            got = lone.get(memo)
            if got is None:
                if len(lone) > MEMO_LIMIT:
                    lone.clear()
                got = lone[memo] = self.kernel(digest_key(kernel, thread))
            return got
        return self.kernel(digest_key(kernel, thread))

    def kernel(self, key: tuple[object, ...]) -> bytes:
        """``repr(key).encode()`` for the kernel model's key (:func:`emu.kernel.fork.digest_key`)."""
        keys = self._keys
        try:
            got = keys.get(key)
        except TypeError:  # something unhashable in it: no memo
            return repr(key).encode()
        if got is None:
            if len(keys) > MEMO_LIMIT:
                keys.clear()
            got = keys[key] = repr(key).encode()
        return got
