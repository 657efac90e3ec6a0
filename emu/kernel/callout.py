"""KeUserModeCallback's user-mode half: where the callout frame goes, what it holds, and
the registers KiUserCallbackDispatcher starts with.

Pure functions of the trap frame, the input and the profile: the kernel writes what
they return and records the crossing.
"""

from __future__ import annotations

from dataclasses import dataclass

from emu.context import UserContext
from emu.profile import Profile
from emu.winnt import (
    KGDT64_R3_CODE,
    KGDT64_R3_DATA,
    UCALLOUT_API_NUMBER,
    UCALLOUT_BUFFER,
    UCALLOUT_FRAME_SIZE,
    UCALLOUT_LENGTH,
    UCALLOUT_MF_EFLAGS,
    UCALLOUT_MF_RIP,
    UCALLOUT_MF_RSP,
    UCALLOUT_MF_SEGCS,
    UCALLOUT_MF_SEGSS,
)


@dataclass(frozen=True)
class Callout:
    """One callout frame laid out on the user stack."""

    frame: int  # the UCALLOUT_FRAME (RSP at the dispatcher under the "stack" convention)
    buffer: int  # the copied input, right above the frame
    lowest: int  # the lowest byte the kernel writes (probed before anything is written)
    block: bytes  # everything from ``lowest`` up: (a return slot,) the frame, the input
    entry: UserContext  # the registers KiUserCallbackDispatcher starts with


def lay_out(profile: Profile, trap: UserContext, api: int, data: bytes, dispatcher: int) -> Callout:
    """The frame for callback ``api`` with input ``data``, below the trap frame's RSP."""
    old = trap.rsp
    # ReactOS KeUserModeCallback (ntoskrnl/ke/amd64/usercall.c): the input goes to
    # ALIGN_DOWN(OldRsp - Length, 16) - 8 and the UCALLOUT_FRAME right below it, so
    # the frame (and RSP at the dispatcher) is 16-byte aligned.
    buffer = ((old - len(data)) & ~0xF) - 8
    frame = buffer - UCALLOUT_FRAME_SIZE
    block = bytearray(UCALLOUT_FRAME_SIZE)
    for off, val, size in (
        (UCALLOUT_BUFFER, buffer, 8), (UCALLOUT_LENGTH, len(data), 4), (UCALLOUT_API_NUMBER, api, 4),
        (UCALLOUT_MF_RIP, trap.rip, 8), (UCALLOUT_MF_SEGCS, KGDT64_R3_CODE, 8),
        (UCALLOUT_MF_EFLAGS, trap.rflags, 8), (UCALLOUT_MF_RSP, old, 8), (UCALLOUT_MF_SEGSS, KGDT64_R3_DATA, 8),
    ):  # fmt: skip
        block[off : off + size] = (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    if profile.dispatcher == "stack":
        return Callout(frame, buffer, frame, bytes(block) + data, trap._replace(rsp=frame, rip=dispatcher))
    # "registers" convention: entered like a call, ECX = api, RDX = buffer, R8D = length,
    # a (zero) return address at [RSP].
    entry = trap._replace(rsp=frame - 8, rip=dispatcher, rcx=api, rdx=buffer, r8=len(data))
    return Callout(frame, buffer, frame - 8, bytes(8) + bytes(block) + data, entry)
