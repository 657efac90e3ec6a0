"""The text a state's digest is computed from, built faster than ``repr`` and byte-identical to it.

A state's digest (:meth:`emu.exploration.explorer.Explorer._observe`) hashes the
``repr`` of the recorded registers and of the kernel model's key. Those texts are
exported (the digest is a node attribute), so they must not change; but most of their
parts recur from state to state: a register value is usually the one it had in the
previous state, and the kernel model's key of one thread at a system call is the same
over thousands of states. So each part's ``repr`` is kept in a memo and the whole is
joined from the parts, exactly as ``repr`` of the tuple would spell it.

The memos are bounded: past ``MEMO_LIMIT`` entries one is cleared and starts again
(a register that counts takes a new value at every state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emu.kernel.fork import digest_key

if TYPE_CHECKING:
    from emu.kernel.core import Kernel
    from emu.kernel.thread import KThread

MEMO_LIMIT = 1 << 16


class _Reprs(dict[int, str]):
    """Register value -> its repr, computed on a miss (the hits stay in C: ``map(d.__getitem__, ...)``)."""

    def __missing__(self, value: int) -> str:
        text = self[value] = repr(value)
        return text


class _ByteReprs(dict[int, bytes]):
    """Register value -> its repr, encoded."""

    def __missing__(self, value: int) -> bytes:
        text = self[value] = repr(value).encode()
        return text


class DigestText:
    """Memoised ``repr`` of the parts of a state's identity."""

    __slots__ = ("_bregs", "_ends", "_keys", "_lone", "_regs", "_tails")

    def __init__(self) -> None:
        self._regs = _Reprs()  # register value -> its repr
        self._tails: dict[tuple[Any, ...], str] = {}  # (depth, service, api, pending, frames) -> repr
        self._keys: dict[tuple[object, ...], bytes] = {}  # the kernel model's key -> its repr, encoded
        self._bregs = _ByteReprs()  # the same, encoded
        self._ends: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}  # state text around the registers
        self._lone: dict[tuple[object, ...], bytes] = {}  # a lone running thread's kernel key text

    def state_parts(self, raw: tuple[Any, ...]) -> list[bytes]:
        """``state(...)``'s text for a RawState ``raw``, in pieces whose concatenation is that text:
        what goes before the registers and after them is memoised per (tid, mode, tail)."""
        context = raw[3]
        if type(context) is not tuple or len(context) < 2:
            return [self.state(raw[1], raw[2], context, raw[6:11])]
        # The tail holds a bool (pending) where 0 would compare equal: its type is part of the memo key.
        memo = (raw[1], raw[2], raw[6], raw[7], raw[8], raw[9], type(raw[9]), raw[10])
        ends = self._ends
        got = ends.get(memo)
        if got is None:
            if len(ends) > MEMO_LIMIT:
                ends.clear()
            head, _, tail = self.state(raw[1], raw[2], (0, 0), raw[6:11]).partition(b"(0, 0)")
            got = ends[memo] = (head + b"(", b")" + tail)
        regs = self._bregs
        if len(regs) > MEMO_LIMIT:
            regs.clear()
        return [got[0], b", ".join(map(regs.__getitem__, context)), got[1]]

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

    def state(self, tid: int, mode: str, context: tuple[int, ...], tail: tuple[Any, ...]) -> bytes:
        """``repr((tid, mode, context, tail)).encode()``."""
        if type(context) is not tuple:  # a named tuple spells its field names: no shortcut
            return repr((tid, mode, context, tail)).encode()
        regs = self._regs
        if len(regs) > MEMO_LIMIT:
            regs.clear()
        text = ", ".join(map(regs.__getitem__, context))
        if len(context) == 1:
            text += ","  # a 1-tuple's repr
        # The tail holds a bool (pending) where 0 would compare equal: its type is part of the memo key.
        tails = self._tails
        memo = (tail, type(tail[3]))
        t = tails.get(memo)
        if t is None:
            if len(tails) > MEMO_LIMIT:
                tails.clear()
            t = tails[memo] = repr(tail)
        return f"({tid!r}, {mode!r}, ({text}), {t})".encode()

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
