"""Minidump streams beyond the basic ones: the full CONTEXT, ThreadInfoList, HandleData.

Layouts from MS ``minidumpapiset.h`` (MINIDUMP_THREAD_INFO_LIST, MINIDUMP_THREAD_INFO,
MINIDUMP_HANDLE_DATA_STREAM, MINIDUMP_HANDLE_DESCRIPTOR) and ``winnt.h`` (CONTEXT,
XMM_SAVE_AREA32), as the MS docs pages of those names give them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from emu.dump.format import (
    CONTEXT,
    CONTEXT_AMD64,
    CONTEXT_CONTROL,
    CONTEXT_INTEGER,
    CONTEXT_REGISTERS,
    CONTEXT_SEGMENTS,
    INITIAL_MXCSR,
    SEG_CS,
    SEG_DATA,
    SEG_FS,
    Layout,
)

if TYPE_CHECKING:
    from emu.scenario.model import ObjectSpec
    from emu.trace import State

ThreadInfoListStream = 17
HandleDataStream = 12
CONTEXT_FLOATING_POINT = CONTEXT_AMD64 | 0x8  # winnt.h: FltSave (XMM_SAVE_AREA32) and the XMM registers
CONTEXT_DEBUG_REGISTERS = CONTEXT_AMD64 | 0x10
# CONTEXT_ALL: what a debugger's GetThreadContext asks for and a minidump holds.
CONTEXT_ALL = CONTEXT_CONTROL | CONTEXT_INTEGER | CONTEXT_SEGMENTS | CONTEXT_FLOATING_POINT | CONTEXT_DEBUG_REGISTERS
# The x87 control word Windows x64 starts threads with (MS docs "x64 ABI conventions", FPU state:
# 0x27F, all exceptions masked, 53-bit precision) and MXCSR 0x1F80; emu runs no x87 or SSE code of its
# own, so the XMM registers are written as zero.
INITIAL_FPU_CONTROL_WORD = 0x27F
MXCSR_MASK = 0xFFFF  # XMM_SAVE_AREA32.MxCsr_Mask: the bits the CPU supports (SSE2+ with DAZ)
STILL_ACTIVE = 0x103  # MINIDUMP_THREAD_INFO.ExitStatus of a live thread (STATUS_PENDING, winbase.h)
EVENT_ALL_ACCESS = 0x1F0003  # winnt.h
MUTANT_ALL_ACCESS = 0x1F0001  # winnt.h

MINIDUMP_THREAD_INFO_LIST = Layout("MINIDUMP_THREAD_INFO_LIST", 12, (
    ("SizeOfHeader", "I"), ("SizeOfEntry", "I"), ("NumberOfEntries", "I"),
))  # fmt: skip
MINIDUMP_THREAD_INFO = Layout("MINIDUMP_THREAD_INFO", 64, (
    ("ThreadId", "I"), ("DumpFlags", "I"), ("DumpError", "I"), ("ExitStatus", "I"),
    ("CreateTime", "Q"), ("ExitTime", "Q"), ("KernelTime", "Q"), ("UserTime", "Q"),
    ("StartAddress", "Q"), ("Affinity", "Q"),
))  # fmt: skip
MINIDUMP_HANDLE_DATA_STREAM = Layout("MINIDUMP_HANDLE_DATA_STREAM", 16, (
    ("SizeOfHeader", "I"), ("SizeOfDescriptor", "I"), ("NumberOfDescriptors", "I"), ("Reserved", "I"),
))  # fmt: skip
MINIDUMP_HANDLE_DESCRIPTOR = Layout("MINIDUMP_HANDLE_DESCRIPTOR", 32, (
    ("Handle", "Q"), ("TypeNameRva", "I"), ("ObjectNameRva", "I"), ("Attributes", "I"),
    ("GrantedAccess", "I"), ("HandleCount", "I"), ("PointerCount", "I"),
))  # fmt: skip
XMM_SAVE_AREA = 0x100  # CONTEXT.FltSave
FLT_CONTROL_WORD, FLT_MXCSR_MASK = XMM_SAVE_AREA + 0x0, XMM_SAVE_AREA + 0x1C


def context_bytes(state: State) -> bytes:
    """The thread's user-mode x64 CONTEXT (0x4D0 bytes) as a user-mode dump holds it: CONTEXT_ALL."""
    values: dict[str, int | bytes] = {
        "ContextFlags": CONTEXT_ALL,
        "MxCsr": INITIAL_MXCSR, "FltSave.MxCsr": INITIAL_MXCSR,
        "SegCs": SEG_CS, "SegDs": SEG_DATA, "SegEs": SEG_DATA, "SegFs": SEG_FS, "SegGs": SEG_DATA, "SegSs": SEG_DATA,
    }  # fmt: skip
    for reg, fname in CONTEXT_REGISTERS.items():
        values[fname] = getattr(state.context, reg) & (0xFFFF_FFFF if fname == "EFlags" else 0xFFFF_FFFF_FFFF_FFFF)
    out = bytearray(CONTEXT.pack(values))
    out[FLT_CONTROL_WORD : FLT_CONTROL_WORD + 2] = INITIAL_FPU_CONTROL_WORD.to_bytes(2, "little")
    out[FLT_MXCSR_MASK : FLT_MXCSR_MASK + 4] = MXCSR_MASK.to_bytes(4, "little")
    return bytes(out)


def thread_info_list(threads: list[tuple[int, int]]) -> bytes:
    """ThreadInfoList for (thread id, start address) pairs: live threads, one CPU, no times (deterministic)."""
    head = MINIDUMP_THREAD_INFO_LIST.pack({
        "SizeOfHeader": MINIDUMP_THREAD_INFO_LIST.size, "SizeOfEntry": MINIDUMP_THREAD_INFO.size,
        "NumberOfEntries": len(threads),
    })  # fmt: skip
    return head + b"".join(
        MINIDUMP_THREAD_INFO.pack({"ThreadId": tid, "ExitStatus": STILL_ACTIVE, "StartAddress": start, "Affinity": 1})
        for tid, start in threads
    )


def handle_data(objects: tuple[ObjectSpec, ...], string: Callable[[str], int]) -> bytes:
    """HandleDataStream for the scenario's events and mutants; ``string`` stores a MINIDUMP_STRING, giving its RVA.

    Type names are the object manager's ("Event", "Mutant"); emu's objects are unnamed
    (ObjectNameRva 0), as an event created without a name is.
    """
    head = MINIDUMP_HANDLE_DATA_STREAM.pack({
        "SizeOfHeader": MINIDUMP_HANDLE_DATA_STREAM.size, "SizeOfDescriptor": MINIDUMP_HANDLE_DESCRIPTOR.size,
        "NumberOfDescriptors": len(objects),
    })  # fmt: skip
    body = b""
    for o in sorted(objects, key=lambda o: o.handle):
        event = o.kind == "event"
        body += MINIDUMP_HANDLE_DESCRIPTOR.pack({
            "Handle": o.handle, "TypeNameRva": string("Event" if event else "Mutant"),
            "GrantedAccess": EVENT_ALL_ACCESS if event else MUTANT_ALL_ACCESS, "HandleCount": 1, "PointerCount": 1,
        })  # fmt: skip
    return head + body
