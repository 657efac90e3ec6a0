"""The built-in reference ntdll (syscall stubs, KiUserCallbackDispatcher, RtlUserThreadStart),
win32u (win32k stubs) and a kernel32 holding only BaseThreadInitThunk.

Each is a PE image in memory (:mod:`emu.runtime.pe_image`): headers at its base, an export
directory, and for ntdll the exception directory over its ``.pdata``. The code sits at
base+0x1000 as before.

Assembled with keystone from the source in ``ntdll.asm`` plus one stub per
service in the profile's table, so it runs without any Windows file. NtX and ZwX
are two names for one address, as in the real ntdll.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources

from emu.loader.asm import own_text
from emu.loader.image import Image, image_from_assembly
from emu.ntcontext import VEH_ENTRIES, VEH_ENTRY_SIZE
from emu.profile import Profile
from emu.runtime.pe_image import with_pe_headers
from emu.runtime.unwind import with_unwind_data

NTDLL_BASE = 0x7FFB_0000_0000

# Win10+ stub, byte for byte as in ntdll 10.0.19041 (and j00ru's / MS docs' disassemblies):
#   4C 8B D1                 mov r10, rcx
#   B8 nn nn nn nn           mov eax, SSN
#   F6 04 25 08 03 FE 7F 01  test byte ptr [7FFE0308h], 1   ; KUSER_SHARED_DATA.SystemCall
#   75 03                    jne +3                         ; -> int 2Eh
#   0F 05                    syscall                        ; at +0x12
#   C3                       ret                            ; at +0x14
#   CD 2E                    int 2Eh
#   C3                       ret
# padded to 0x20 with an 8-byte NOP. keystone would encode `mov r10, rcx` and the absolute
# `test` differently (49 89 CA; RIP-relative), so the fixed bytes are spelled out.
_WIN10_STUB = """\
{nt}:
{zw}:
    .byte 0x4c, 0x8b, 0xd1
    mov eax, {ssn:#x}
    .byte 0xf6, 0x04, 0x25, 0x08, 0x03, 0xfe, 0x7f, 0x01
    jne {nt}__int2e
    syscall
    ret
{nt}__int2e:
    int 0x2e
    ret
    .byte 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00
"""

# Win7 stub (ntdll 6.1.7601): mov r10,rcx; mov eax,N; syscall; ret, padded to 0x10.
_WIN7_STUB = """\
{nt}:
{zw}:
    .byte 0x4c, 0x8b, 0xd1
    mov eax, {ssn:#x}
    syscall
    ret
    .byte 0x0f, 0x1f, 0x40, 0x00, 0x90
"""

SYSCALL_OFFSET = {"win10": 0x12, "win7": 0x8}
STUB_SIZE = {"win10": 0x20, "win7": 0x10}


def zw_name(nt_name: str) -> str:
    return "Zw" + nt_name[2:] if nt_name.startswith("Nt") else nt_name


def ntdll_source(profile: Profile) -> str:
    """The runtime's assembly text for this profile (dispatcher, thread start, stubs)."""
    pkg = resources.files("emu.runtime")
    common = pkg.joinpath("ntdll.asm").read_text()
    dispatcher = pkg.joinpath(f"dispatcher_{profile.dispatcher}.asm").read_text()
    template = _WIN10_STUB if profile.stub == "win10" else _WIN7_STUB
    stubs = []
    for name, ssn in sorted(profile.ssn.items(), key=lambda kv: (kv[1], kv[0])):
        if name.startswith("NtUser") or name.startswith("NtGdi"):
            continue  # win32k services live in win32u.dll, not ntdll
        stubs.append(template.format(nt=name, zw=zw_name(name), ssn=ssn))
    handler = pkg.joinpath("dispatcher_handler.asm").read_text()
    tail = pkg.joinpath("ntdll_tail.asm").read_text()  # after the stubs: no address before it moves
    exceptions = pkg.joinpath("ntdll_exceptions.asm").read_text()
    return "\n".join([dispatcher, common, *stubs, handler, tail, exceptions])


def ntdll_data(profile: Profile) -> str:
    """The built-in ntdll's .data: what an exception escaping a callback does on this build
    (see dispatcher_handler.asm): 0 ends the process, 1 swallows the exception."""
    swallow = 1 if profile.callback_exception == "swallow" else 0
    return f"RtlpCallbackExceptionPolicy:\n    .byte {swallow}\n" + _VECTORED_DATA


# The vectored handler lists, in ntdll's .data as Windows keeps them (ReactOS rtl/vectoreh.c:
# RtlpVectoredExceptionList and RtlpVectoredContinueList, LIST_ENTRY heads that start empty,
# pointing at themselves). Windows takes each entry from the process heap; emu has no heap, so
# the entries come from a pool here, zero (free) until RtlAdd*Handler takes one (emu/kernel/rtl.py).
_VECTORED_DATA = f"""    .balign 16, 0
RtlpVectoredExceptionList:
    .quad RtlpVectoredExceptionList, RtlpVectoredExceptionList
RtlpVectoredContinueList:
    .quad RtlpVectoredContinueList, RtlpVectoredContinueList
RtlpVectoredHandlerEntries:
    .space {VEH_ENTRIES * VEH_ENTRY_SIZE:#x}, 0
"""


def win32u_source(profile: Profile) -> str:
    """Stubs for win32k services (numbers >= 0x1000), exported by win32u.dll on Windows 10+."""
    template = _WIN10_STUB if profile.stub == "win10" else _WIN7_STUB
    stubs = [
        template.format(nt=name, zw=name, ssn=ssn).replace(f"{name}:\n{name}:\n", f"{name}:\n")
        for name, ssn in sorted(profile.ssn.items(), key=lambda kv: (kv[1], kv[0]))
        if name.startswith("NtUser") or name.startswith("NtGdi")
    ]
    return "\n".join(stubs) or "    ret\n"


def build_ntdll(profile: Profile, base: int = NTDLL_BASE) -> Image:
    """Assemble the reference ntdll for ``profile`` at ``base``, with its x64 unwind data
    (.pdata/.xdata, see :mod:`emu.runtime.unwind`) so stack walks work as on Windows."""
    return dataclasses.replace(_ntdll(ntdll_source(profile), ntdll_data(profile), profile.dispatcher, base))


def build_win32u(profile: Profile, base: int) -> Image:
    """Assemble win32u (the win32k syscall stubs) for ``profile`` at ``base``."""
    return dataclasses.replace(_win32u(win32u_source(profile), base))


def build_kernel32(base: int, terminate_thread: int) -> Image:
    """Assemble emu's kernel32 at ``base``: only BaseThreadInitThunk (see ``kernel32.asm``),
    which ends threads through ``terminate_thread`` (the loaded ntdll's NtTerminateThread)."""
    return dataclasses.replace(_kernel32(base, terminate_thread))


@functools.lru_cache(maxsize=32)
def _kernel32(base: int, terminate_thread: int) -> Image:
    source = resources.files("emu.runtime").joinpath("kernel32.asm").read_text()
    with own_text():
        image = image_from_assembly(
            "kernel32", base, source, resolve=lambda name: terminate_thread if name == "NtTerminateThread" else None
        )
    return with_pe_headers(image, "kernel32.dll")


# The runtime is the same for every run of a profile: assemble it once per process.
@functools.lru_cache(maxsize=32)
def _ntdll(source: str, data: str, dispatcher: str, base: int) -> Image:
    with own_text():
        image = image_from_assembly("ntdll", base, source, data)
    return with_pe_headers(with_unwind_data(image, dispatcher), "ntdll.dll")


@functools.lru_cache(maxsize=32)
def _win32u(source: str, base: int) -> Image:
    with own_text():
        image = image_from_assembly("win32u", base, source)
    return with_pe_headers(image, "win32u.dll")
