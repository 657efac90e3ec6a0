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

from typing import Any

MEMO_LIMIT = 1 << 16


class _Reprs(dict[int, str]):
    """Register value -> its repr, computed on a miss (the hits stay in C: ``map(d.__getitem__, ...)``)."""

    def __missing__(self, value: int) -> str:
        text = self[value] = repr(value)
        return text


class DigestText:
    """Memoised ``repr`` of the parts of a state's identity."""

    __slots__ = ("_keys", "_regs", "_tails")

    def __init__(self) -> None:
        self._regs = _Reprs()  # register value -> its repr
        self._tails: dict[tuple[Any, ...], str] = {}  # (depth, service, api, pending, frames) -> repr
        self._keys: dict[tuple[object, ...], bytes] = {}  # the kernel model's key -> its repr, encoded

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
