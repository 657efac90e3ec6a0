"""x64 unwind data as a debugger reads it from memory: .pdata and UNWIND_INFO.

The reading itself is :mod:`emu.loader.unwind_data` (shared with the built-in ntdll's
RtlVirtualUnwind); this module names it for the stack walk in :mod:`emu.detection.unwind`,
whose problems end a walk with :class:`WalkStop`.

* ``.pdata`` holds RUNTIME_FUNCTION {BeginAddress, EndAddress, UnwindData}: three RVAs, sorted
  (MS docs "x64 exception handling", struct RUNTIME_FUNCTION).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.loader import unwind_data as _data
from emu.loader.pdata import RuntimeFunction as RuntimeFunction
from emu.loader.pdata import entry_at
from emu.loader.pdata import function_table as function_table
from emu.loader.pdata import parse_function_table as parse_function_table
from emu.loader.unwind_data import OP_NAMES as OP_NAMES
from emu.loader.unwind_data import Reader as Reader
from emu.loader.unwind_data import UnwindCode as UnwindCode
from emu.loader.unwind_data import UnwindDataError
from emu.loader.unwind_data import UnwindInfo as UnwindInfo

if TYPE_CHECKING:
    from emu.detection.view import ModuleInfo


__all__ = [
    "OP_NAMES", "Reader", "RuntimeFunction", "UnwindCode", "UnwindInfo", "WalkStop", "function_table", "lookup",
    "parse_function_table", "read_unwind_info",
]  # fmt: skip


class WalkStop(UnwindDataError):
    """Ends a stack walk: unwind data or stack memory that cannot be read or makes no sense; the
    message says why, in one line (:func:`emu.detection.unwind.walk` turns it into a ``problem``)."""


def read_unwind_info(read: Reader, address: int, base: int) -> UnwindInfo:
    """Decode the UNWIND_INFO at ``address`` (``base``: the image base its RVAs are relative to)."""
    try:
        return _data.read_unwind_info(read, address, base)
    except UnwindDataError as e:
        raise WalkStop(str(e)) from None


def lookup(module: ModuleInfo, address: int) -> RuntimeFunction | None:
    """The .pdata entry covering ``address`` (binary search, like RtlLookupFunctionEntry)."""
    return entry_at(module.function_table, address)
