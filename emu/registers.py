"""Fast register access for the machine: Unicorn register ids by name, and the batched reads
and writes through Unicorn's C API that the system-call hot path uses."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from typing import Any

from unicorn import UC_ERR_OK, Uc, UcError
from unicorn import x86_const as x86

from emu.context import REGISTER_NAMES, UserContext

_REG_IDS: dict[str, int] = {
    **{n: getattr(x86, f"UC_X86_REG_{n.upper()}") for n in REGISTER_NAMES if n != "rflags"},
    "rflags": x86.UC_X86_REG_RFLAGS,
    "gs_base": x86.UC_X86_REG_GS_BASE,
}

_XMM: tuple[int, ...] = tuple(getattr(x86, f"UC_X86_REG_XMM{n}") for n in range(16))
XMM_IDS = _XMM  # Unicorn's ids of XMM0-15, by number
_XMM_SETS: dict[tuple[int, ...], tuple[int, ...]] = {}  # XMM numbers -> Unicorn register ids


class RegisterFile:
    """Batched register access through the C API: one call for many registers.

    The binding's ``reg_read`` costs about 1.3 µs per register and ``reg_read_batch``
    more; ``uc_reg_read_batch`` through ctypes with preallocated arrays reads all 18
    user registers in under 1 µs. Falls back to the binding if its internals move.
    """

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._lib = None
        try:
            from unicorn.unicorn_py3 import unicorn as binding

            self._lib = binding.uclib
            self._handle = uc._uch
            # The same two functions without the binding's argtypes: converting each argument
            # through them costs more than the call itself. Every argument passed here is a
            # ctypes object or a small int (the handle a c_void_p, arrays by address, a count).
            plain = ctypes.CDLL(binding.uclib._name)
            self._read_batch = plain.uc_reg_read_batch
            self._write_batch = plain.uc_reg_write_batch
        except (ImportError, AttributeError, OSError):  # pragma: no cover - other binding layouts
            self._lib = None
        self._batches: dict[tuple[str, ...], tuple[object, object, object, int]] = {}
        self._wide: dict[tuple[int, ...], tuple[Any, object]] = {}
        self._buffers: list[object] = []
        self._all = tuple(REGISTER_NAMES)

    def _batch(self, names: tuple[str, ...]) -> tuple[object, object, object, int]:
        b = self._batches.get(names)
        if b is None:
            n = len(names)
            ids = (ctypes.c_int * n)(*[_REG_IDS[x] for x in names])
            vals = (ctypes.c_uint64 * n)()
            base = ctypes.addressof(vals)
            ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
            b = self._batches[names] = (ids, vals, ptrs, n)
        return b

    def reader(self, names: tuple[str, ...]) -> Callable[[], list[int]]:
        """A function reading ``names`` in one C call (for hot paths: arrays bound once)."""
        if self._lib is None:
            return lambda: self.read(names)
        ids, vals, ptrs, n = self._batch(names)
        fn, handle = self._read_batch, self._handle

        def read() -> list[int]:
            fn(handle, ids, ptrs, n)
            return vals[:]  # type: ignore[index]

        return read

    def writer(self, names: tuple[str, ...]) -> Callable[[Sequence[int]], None]:
        """A function writing ``names`` in one C call (values must fit in 64 bits)."""
        if self._lib is None:
            return lambda values: self.write(names, values)
        ids, vals, ptrs, n = self._batch(names)
        fn, handle = self._write_batch, self._handle

        def write(values: Sequence[int]) -> None:
            vals[:] = values  # type: ignore[index]
            fn(handle, ids, ptrs, n)

        return write

    def bound(self, names: tuple[str, ...]) -> tuple[Callable[[], object], Callable[[], object], Any]:
        """For the hottest paths: a call taking no arguments that reads ``names`` into the
        returned ctypes array (or, after the array is filled, writes them from it) in one C
        call with no Python frame: (read, write, array)."""
        ids, vals, ptrs, n = self._batch(names)
        if self._lib is None:  # pragma: no cover - other binding layouts
            raise NotImplementedError("bound register access needs the C API")
        read = functools.partial(self._read_batch, self._handle, ids, ptrs, n)
        write = functools.partial(self._write_batch, self._handle, ids, ptrs, n)
        return read, write, vals

    def bound_zeroing(self, names: tuple[str, ...], wide: tuple[int, ...]) -> tuple[Callable[[], object], Any]:
        """Like :meth:`bound`'s write, and the same C call also zeroes the 128-bit registers
        ``wide`` (Unicorn ids): (write, array to fill first)."""
        key = (*names, *(f"#{i}" for i in wide))
        b = self._batches.get(key)
        if b is None:
            n, m = len(names), len(wide)
            out = (ctypes.c_uint64 * n)()
            zero = ctypes.create_string_buffer(16)
            at = ctypes.addressof(out)
            b = self._batches[key] = (
                (ctypes.c_int * (n + m))(*[_REG_IDS[x] for x in names], *wide),
                out,
                (ctypes.c_void_p * (n + m))(*[at + 8 * i for i in range(n)], *[ctypes.addressof(zero)] * m),
                n + m,
            )
            self._buffers.append(zero)  # the pointers name it: keep it alive
        if self._lib is None:  # pragma: no cover - other binding layouts
            raise NotImplementedError("bound register access needs the C API")
        return functools.partial(self._write_batch, self._handle, b[0], b[2], b[3]), b[1]

    def read(self, names: tuple[str, ...]) -> list[int]:
        if self._lib is None:
            return [self._uc.reg_read(_REG_IDS[n]) for n in names]
        ids, vals, ptrs, n = self._batch(names)
        if self._read_batch(self._handle, ids, ptrs, n) != UC_ERR_OK:
            raise UcError(1)
        return vals[:]  # type: ignore[index]

    def write(self, names: tuple[str, ...], values: Sequence[int]) -> None:
        if self._lib is None:
            for name, v in zip(names, values):
                self._uc.reg_write(_REG_IDS[name], v)
            return
        ids, vals, ptrs, n = self._batch(names)
        if len(values) == n:
            vals[:] = values  # type: ignore[index]  # c_uint64 keeps the low 64 bits, as the mask did
        else:
            for i, v in enumerate(values):
                vals[i] = v & 0xFFFF_FFFF_FFFF_FFFF  # type: ignore[index]
        if self._write_batch(self._handle, ids, ptrs, n) != UC_ERR_OK:
            raise UcError(1)

    def zero_wide(self, ids: tuple[int, ...]) -> None:
        """Set 128-bit registers (XMM) to zero in one C call: every pointer names one zeroed
        16-byte buffer, which uc_reg_write_batch only reads."""
        if self._lib is None:
            for i in ids:
                self._uc.reg_write(i, 0)
            return
        if self._zeroer(ids)() != UC_ERR_OK:
            raise UcError(1)

    def _zeroer(self, ids: tuple[int, ...]) -> Callable[[], int]:
        """A call with no Python frame that zeroes the registers ``ids`` (see :meth:`zero_wide`)."""
        b = self._wide.get(ids)
        if b is None:
            zero = ctypes.create_string_buffer(16)
            n = len(ids)
            call = functools.partial(
                self._write_batch, self._handle, (ctypes.c_int * n)(*ids),
                (ctypes.c_void_p * n)(*[ctypes.addressof(zero)] * n), n,
            )  # fmt: skip
            b = self._wide[ids] = (call, zero)
        return b[0]

    def context(self) -> UserContext:
        return UserContext._make(self.read(self._all))

    def set_context(self, ctx: UserContext) -> None:
        self.write(self._all, ctx)
