"""What the caller of KeUserModeCallback does with the callback's result: probe it, copy it.

NtCallbackReturn only passes the Result pointer and length on (WRK ``ke/amd64/callout.asm``
NtCallbackReturn stores them through CuOutputBuffer/CuOutputLength; ReactOS
``ntoskrnl/ke/amd64/usercall.c`` NtCallbackReturn the same) and returns the callback's
Status unchanged. Reading the buffer is the service's business: win32k probes it and
copies it inside a try/except, and a fault there becomes the *service's*
STATUS_ACCESS_VIOLATION (ReactOS ``win32ss/user/ntuser/callback.c`` co_IntCallWindowProc:
the copy of ResultPointer under SEH, Status = the exception code).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from emu.records import record
from emu.winnt import STATUS_ACCESS_VIOLATION

OutputUse = Literal["probe", "copy"]


@record(frozen=True)
class ProbeOutcome:
    """What a service's probe or copy of a callback's result came to."""

    status: int | None  # STATUS_ACCESS_VIOLATION when it faulted, else None (the service's own status stands)
    data: bytes  # the bytes copied ("copy" only)
    remark: str  # one line for the trace


def probe_range(address: int, length: int, probe_limit: int) -> bool:
    """ProbeForRead's range check (WRK ``base/ntos/inc/ex.h`` ProbeForRead): a zero length
    checks nothing; otherwise the range must end at or below MM_USER_PROBE_ADDRESS and not wrap."""
    if length == 0:
        return True
    end = address + length
    return end <= probe_limit and end <= 1 << 64


def use_output(
    use: OutputUse, result: int, length: int, probe_limit: int, read: Callable[[int, int], bytes | None]
) -> ProbeOutcome:
    """Probe (range check only) or copy (range check, then read every byte) a callback's result.

    ``read(address, length)`` returns the bytes or None where a read would fault.
    """
    if not probe_range(result, length, probe_limit):
        # ProbeForRead touches MM_USER_PROBE_ADDRESS, which faults: the service's except
        # clause turns it into STATUS_ACCESS_VIOLATION.
        why = f"{use} of the callback's result {result:#x} (+{length:#x}) fails: not in user space"
        return ProbeOutcome(STATUS_ACCESS_VIOLATION, b"", why + ": STATUS_ACCESS_VIOLATION")
    if use == "probe" or length == 0:
        return ProbeOutcome(None, b"", f"{use} of the callback's result {result:#x} (+{length:#x}) passes")
    got = read(result, length)
    if got is None:
        why = f"copy of the callback's result {result:#x} (+{length:#x}) faults"
        return ProbeOutcome(STATUS_ACCESS_VIOLATION, b"", why + ": STATUS_ACCESS_VIOLATION")
    return ProbeOutcome(None, bytes(got), f"copied {length:#x} byte(s) of the callback's result from {result:#x}")
