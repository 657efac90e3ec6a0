"""The code hooks on the built-in ntdll's Python traps, set when a process is built; the routines
behind them (:mod:`emu.kernel.rtl`, with the frame walks and the unwinder) load on the first trap
the guest reaches or the first look at ``Process.rtl``. A run that raises no exception and adds no
vectored handler never loads them.

The hooks are the ones :class:`~emu.kernel.rtl.BuiltinRtl` describes: [RtlLookupFunctionEntry,
the label after the last trap) and RtlRaiseStatus's first byte, set in that order at the same
point of the build as before, so Unicorn runs them in the same order among the other hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emu.kernel.core import Kernel
    from emu.kernel.rtl import BuiltinRtl
    from emu.loader.image import Image

__all__ = ["BUILTIN_TRAPS_END", "RtlTraps"]

# The label after the built-in ntdll's last trap: present only in emu's own ntdll.
BUILTIN_TRAPS_END = "RtlpEmuTrapsEnd__"


class RtlTraps:
    """The hooks on one process's built-in ntdll traps, and the routines behind them once needed."""

    def __init__(self, kernel: Kernel, ntdll: Image, images: list[Image]) -> None:
        self._kernel = kernel
        self._ntdll = ntdll
        self._images = list(images)  # the images of the build, as the routines would have seen them
        self._routines: BuiltinRtl | None = None
        begin = ntdll.symbols["RtlLookupFunctionEntry"]
        end = ntdll.symbols[BUILTIN_TRAPS_END]
        raise_status = ntdll.symbols["RtlRaiseStatus"]
        kernel.machine.add_code_hook(begin, end, self._hit)
        kernel.machine.add_code_hook(raise_status, raise_status + 1, self._hit)

    @property
    def routines(self) -> BuiltinRtl:
        """The routines behind the traps (emu.kernel.rtl), made on first use."""
        if self._routines is None:
            from emu.kernel.rtl import BuiltinRtl

            self._routines = BuiltinRtl(self._kernel, self._ntdll, self._images)
        return self._routines

    def _hit(self, uc: object, address: int, size: int, user_data: object) -> None:
        self.routines.on_trap(address)
