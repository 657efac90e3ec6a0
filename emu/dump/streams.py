"""Minidump streams beyond the basic ones: the full CONTEXT, ThreadInfoList, HandleData.

Layouts from MS ``minidumpapiset.h`` (MINIDUMP_THREAD_INFO_LIST, MINIDUMP_THREAD_INFO,
MINIDUMP_HANDLE_DATA_STREAM, MINIDUMP_HANDLE_DESCRIPTOR_2, MINIDUMP_HANDLE_OBJECT_INFORMATION)
and ``winnt.h`` (CONTEXT, XMM_SAVE_AREA32), as the MS docs pages of those names give them.

HandleData: ``minidumpapiset.h`` names the kinds of per-object information
(MINIDUMP_HANDLE_OBJECT_INFORMATION_TYPE) but says it "does not control nor describe the
actual data". emu writes what the native query of each object returns, laid out as WRK
``public/sdk/inc/ntexapi.h`` declares it: MiniEventInformation1 is EVENT_BASIC_INFORMATION
(EventType: NotificationEvent 0 or SynchronizationEvent 1; EventState), MiniMutantInformation1
is MUTANT_BASIC_INFORMATION (CurrentCount, OwnedByCaller, AbandonedState) and
MiniMutantInformation2 is MUTANT_OWNER_INFORMATION (the owner's CLIENT_ID). A mutant's
CurrentCount is its dispatcher header's SignalState (WRK ``ex/mutant.c`` NtQueryMutant reads
KeReadStateMutant): 1 when free, 1 - n when its owner holds it n times (``ke/mutntobj.c``).
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
    Layout,
)
from emu.kernel.objects import Event, Mutant, ObjectTable
from emu.winnt import KGDT64_R3_CMTEB, KGDT64_R3_CODE, KGDT64_R3_DATA, STATUS_PENDING

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
STILL_ACTIVE = STATUS_PENDING  # MINIDUMP_THREAD_INFO.ExitStatus of a live thread (winbase.h)
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
MINIDUMP_HANDLE_DESCRIPTOR_2 = Layout("MINIDUMP_HANDLE_DESCRIPTOR_2", 40, (
    ("Handle", "Q"), ("TypeNameRva", "I"), ("ObjectNameRva", "I"), ("Attributes", "I"),
    ("GrantedAccess", "I"), ("HandleCount", "I"), ("PointerCount", "I"), ("ObjectInfoRva", "I"), ("Reserved0", "I"),
))  # fmt: skip
MINIDUMP_HANDLE_OBJECT_INFORMATION = Layout("MINIDUMP_HANDLE_OBJECT_INFORMATION", 12, (
    ("NextInfoRva", "I"), ("InfoType", "I"), ("SizeOfInfo", "I"),
))  # fmt: skip
# MINIDUMP_HANDLE_OBJECT_INFORMATION_TYPE (minidumpapiset.h)
MiniMutantInformation1, MiniMutantInformation2, MiniEventInformation1 = 2, 3, 6
NOTIFICATION_EVENT, SYNCHRONIZATION_EVENT = 0, 1  # EVENT_TYPE (wdm.h)
EVENT_BASIC_INFORMATION = Layout("EVENT_BASIC_INFORMATION", 8, (("EventType", "I"), ("EventState", "i")))
MUTANT_BASIC_INFORMATION = Layout("MUTANT_BASIC_INFORMATION", 8, (
    ("CurrentCount", "i"), ("OwnedByCaller", "B"), ("AbandonedState", "B"), ("_padding", "H"),
))  # fmt: skip
MUTANT_OWNER_INFORMATION = Layout("MUTANT_OWNER_INFORMATION", 16, (
    ("ClientId.UniqueProcess", "Q"), ("ClientId.UniqueThread", "Q"),
))  # fmt: skip
XMM_SAVE_AREA = 0x100  # CONTEXT.FltSave
FLT_CONTROL_WORD, FLT_MXCSR_MASK = XMM_SAVE_AREA + 0x0, XMM_SAVE_AREA + 0x1C


def context_bytes(state: State) -> bytes:
    """The thread's user-mode x64 CONTEXT (0x4D0 bytes) as a user-mode dump holds it: CONTEXT_ALL."""
    values: dict[str, int | bytes] = {
        "ContextFlags": CONTEXT_ALL,
        "MxCsr": INITIAL_MXCSR, "FltSave.MxCsr": INITIAL_MXCSR,
        "SegCs": KGDT64_R3_CODE, "SegDs": KGDT64_R3_DATA, "SegEs": KGDT64_R3_DATA, "SegFs": KGDT64_R3_CMTEB,
        "SegGs": KGDT64_R3_DATA, "SegSs": KGDT64_R3_DATA,
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


def handle_data(
    objects: tuple[ObjectSpec, ...], add: Callable[[bytes], int], state: ObjectTable | None,
    client_id: Callable[[int], tuple[int, int]],
) -> bytes:  # fmt: skip
    """HandleDataStream for the scenario's events and mutants, as MINIDUMP_HANDLE_DESCRIPTOR_2.

    ``add`` stores a blob in the file and gives its RVA. With ``state`` (the kernel model's
    objects at the dumped state) each descriptor points to its object's information (see
    the module notes); ``client_id`` gives a thread index's (UniqueProcess, UniqueThread).
    Type names are the object manager's ("Event", "Mutant"); emu's objects are unnamed
    (ObjectNameRva 0), as an event created without a name is.
    """
    head = MINIDUMP_HANDLE_DATA_STREAM.pack({
        "SizeOfHeader": MINIDUMP_HANDLE_DATA_STREAM.size, "SizeOfDescriptor": MINIDUMP_HANDLE_DESCRIPTOR_2.size,
        "NumberOfDescriptors": len(objects),
    })  # fmt: skip
    body = b""
    for o in sorted(objects, key=lambda o: o.handle):
        event = o.kind == "event"
        now = state.objects.get(o.handle) if state is not None else None
        info = 0
        if isinstance(now, Event):
            kind = NOTIFICATION_EVENT if now.manual_reset else SYNCHRONIZATION_EVENT
            info = _info(add, [(MiniEventInformation1, EVENT_BASIC_INFORMATION.pack(
                {"EventType": kind, "EventState": int(now.signaled)}))])  # fmt: skip
        elif isinstance(now, Mutant):
            owner = client_id(now.owner) if now.owner is not None else (0, 0)
            info = _info(add, [
                (MiniMutantInformation1, MUTANT_BASIC_INFORMATION.pack({"CurrentCount": 1 - now.count})),
                (MiniMutantInformation2, MUTANT_OWNER_INFORMATION.pack(
                    {"ClientId.UniqueProcess": owner[0], "ClientId.UniqueThread": owner[1]})),
            ])  # fmt: skip
        body += MINIDUMP_HANDLE_DESCRIPTOR_2.pack({
            "Handle": o.handle, "TypeNameRva": add(minidump_string("Event" if event else "Mutant")),
            "GrantedAccess": EVENT_ALL_ACCESS if event else MUTANT_ALL_ACCESS, "HandleCount": 1, "PointerCount": 1,
            "ObjectInfoRva": info,
        })  # fmt: skip
    return head + body


def _info(add: Callable[[bytes], int], infos: list[tuple[int, bytes]]) -> int:
    """A chain of MINIDUMP_HANDLE_OBJECT_INFORMATION, each followed by its raw data; the first one's RVA."""
    nxt = 0
    for kind, raw in reversed(infos):  # the last first, so each knows where the next one is
        nxt = add(
            MINIDUMP_HANDLE_OBJECT_INFORMATION.pack({"NextInfoRva": nxt, "InfoType": kind, "SizeOfInfo": len(raw)})
            + raw
        )
    return nxt


def minidump_string(text: str) -> bytes:
    """MINIDUMP_STRING: Length in bytes (without the terminator), then UTF-16LE and a null WCHAR."""
    raw = text.encode("utf-16-le")
    return len(raw).to_bytes(4, "little") + raw + b"\0\0"
