"""The kernel model's reads of user memory: as its probes see it (None where a read would
fault), reported to the read watches the way Windows' kernel reads would be."""

from __future__ import annotations

from unicorn import UcError

from emu.machine import Machine


def read_or_none(machine: Machine, address: int, size: int) -> bytes | None:
    """User memory as the kernel's probe sees it: None where a read would fault."""
    if machine.kernel_read_watch is not None:
        machine.kernel_read_watch(address, size)
    try:
        return machine.read(address, size)
    except UcError:
        return None


def kernel_read(machine: Machine, address: int, size: int) -> bytes | None:
    """User memory the kernel model reads as Windows' kernel does (probe, then copy: WRK
    ProbeForRead and the services' copies under try/except): None where it would fault.
    Read hooks (:mod:`emu.hooks`) see it, marked as the kernel's."""
    got = read_or_none(machine, address, size)
    if got is not None and machine.read_watch is not None:
        machine.read_watch(address, got)
    return got


def record_output(machine: Machine, result: int, length: int, limit: int) -> tuple[bytes, str]:
    """What a callback's Result held when NtCallbackReturn ran (at most ``limit`` bytes, a
    recording cap), and a line for the trace. Nothing here changes what the service gets."""
    if not length:
        return b"", "0 byte(s) of output"
    n = min(length, limit)
    # The trace's own copy, not a read the modelled kernel makes (NtCallbackReturn only stores
    # the pointer and length: WRK ke/amd64/callout.asm); read hooks do not see it.
    got = read_or_none(machine, result, n)
    where = f"Result {result:#x}, ResultLength {length:#x}"
    if got is None:
        return b"", f"{where}: not readable now (a copy by the service would fault)"
    cut = f" (the trace keeps the first {n:#x})" if n < length else ""
    return got, f"{where}: {n} byte(s) of output{cut}"
