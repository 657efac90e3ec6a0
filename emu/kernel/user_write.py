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

from collections.abc import Sequence
from typing import Any

from emu.kernel.result import probe_range
from emu.kernel.symbolic import Symbolic
from emu.records import record
from emu.winnt import STATUS_ACCESS_VIOLATION

__all__ = [
    "MAX_SCRIPT_ARGS",
    "STATUS_ACCESS_VIOLATION",
    "ScriptWrite",
    "arg_address",
    "join_remark",
    "probe_write",
    "script_args",
    "write_step",
]

# Arguments 1-4 arrive in R10 (the syscall stub's copy of RCX), RDX, R8, R9; 5+ on the
# caller's stack above the return address and the 0x20 shadow space (MS docs "x64 calling
# convention"; ntdll's stubs `mov r10, rcx` before `syscall`): the kernel reads them there
# (emu.kernel.core _dispatch). A scenario names 1-16 (emu.scenario.symbolic ARG_PATTERN).
MAX_SCRIPT_ARGS = 16


@record(frozen=True)
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


def join_remark(old: str, line: str) -> str:
    return f"{old}; {line}" if old else line


def write_step(act: Any, st: ScriptWrite, value: int | None = None) -> Symbolic | int | None:
    """A write step of a running script (``act``: its ScriptActivation): the request to hand
    the kernel (a :class:`Symbolic` for declared bytes, STATUS_ACCESS_VIOLATION when the probe
    fails: the service returns it), or None to go on. ``value``: the symbolic bytes' value,
    once the kernel's hooks gave it (the probe passed before they were asked)."""
    ctx = act.ctx
    if ctx is None:
        return None
    address = arg_address(act.args, st)
    n = len(st.data)
    if value is None:
        # A context that cannot tell writable pages (no probe_write) leaves the range check alone.
        writable = getattr(ctx, "probe_write", None)
        line = probe_write(address, n, ctx.probe_limit, True if writable is None else writable(address, n), st.where())
        if line is not None:
            act.remark = join_remark(act.remark, line)
            return STATUS_ACCESS_VIOLATION
        if st.symbolic:
            act.pending_symbolic = st
            return Symbolic(st.symbolic, 8 * n, "write", (), int.from_bytes(st.data, "little"), address=address)
    data = st.data if value is None else value.to_bytes(n, "little")
    ctx.write(address, data)
    act.remark = join_remark(act.remark, f"wrote {n} byte(s) to {st.where()} = {address:#x}")
    return None


def script_args(steps: Sequence[object]) -> int:
    """How many arguments a script's writes use (the kernel reads arguments 5+ from the
    stack); a choice's options (``options``: (name, steps) pairs) count too."""
    n = 0
    for st in steps:
        if isinstance(st, ScriptWrite):
            n = max(n, st.arg)
        for _, option in getattr(st, "options", ()):
            n = max(n, script_args(option))
    return n
