"""A scripted service writing bytes into the caller's memory through one of its arguments.

A query service (NtQueryInformationProcess, NtQuerySystemInformation, ...) probes the
caller's output buffer with ProbeForWrite and copies its answer into it, both inside a
try/except that returns the exception code (ReactOS ``ntoskrnl/ps/query.c``
NtQueryInformationProcess: ``ProbeForWrite`` in ``_SEH2_TRY``, ``_SEH2_GetExceptionCode()``
in the handler). ProbeForWrite fails a range that ends above MM_USER_PROBE_ADDRESS or wraps,
and touches every page for writing (WRK ``base/ntos/ex/probe.c`` ProbeForWrite), so a range
that is not mapped writable faults too: the service returns STATUS_ACCESS_VIOLATION and
writes nothing. The alignment check ProbeForWrite also makes is not modelled.

The written bytes may be declared symbolic (``data = { symbolic = N }``): the service asks
for their value (:class:`~emu.kernel.symbolic.Symbolic`, ``where = "write"``) once the probe
passed, then writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from emu.kernel.result import probe_range
from emu.winnt import STATUS_ACCESS_VIOLATION

__all__ = ["MAX_SCRIPT_ARGS", "STATUS_ACCESS_VIOLATION", "ScriptWrite", "arg_address", "probe_write"]

MAX_SCRIPT_ARGS = 16
# Arguments 1-4 arrive in R10 (the syscall stub's copy of RCX), RDX, R8, R9; 5+ on the
# caller's stack above the return address and the 0x20 shadow space (MS docs "x64 calling
# convention"; ntdll's stubs `mov r10, rcx` before `syscall`).
STACK_ARGS_AT = 0x28


@dataclass(frozen=True)
class ScriptWrite:
    """Write ``data`` at argument ``arg`` (1-based) + ``offset``; ``symbolic``: the bytes' name
    when they are declared symbolic (``data`` then holds their default)."""

    arg: int
    data: bytes
    offset: int = 0
    symbolic: str = ""

    def where(self) -> str:
        return f"arg{self.arg}" + (f"+{self.offset:#x}" if self.offset else "")


def arg_address(args: list[int], st: ScriptWrite) -> int:
    """The address the write goes to (``args``: the service's raw arguments, 1-based ``arg``)."""
    base = args[st.arg - 1] if st.arg <= len(args) else 0
    return (base + st.offset) & 0xFFFF_FFFF_FFFF_FFFF


def probe_write(address: int, size: int, probe_limit: int, writable: bool, where: str) -> str | None:
    """ProbeForWrite: None when it passes, else the line for the trace (the service then
    returns STATUS_ACCESS_VIOLATION). ``writable``: the whole range is mapped writable."""
    if probe_range(address, size, probe_limit) and writable:
        return None
    return f"write of {size} byte(s) to {where} = {address:#x} faults: STATUS_ACCESS_VIOLATION"
