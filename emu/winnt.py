"""Windows x64 facts emu models: status codes, structure offsets, selectors, layout.

Data only, one source each. Where a number comes from is said next to it.
"""

from __future__ import annotations

# --- NTSTATUS values (MS-ERREF 2.3.1, ntstatus.h) ---------------------------------------
STATUS_SUCCESS = 0x00000000
STATUS_INVALID_HANDLE = 0xC0000008
STATUS_INVALID_PARAMETER = 0xC000000D
STATUS_ACCESS_VIOLATION = 0xC0000005
STATUS_INVALID_SYSTEM_SERVICE = 0xC000001C
STATUS_STACK_OVERFLOW = 0xC00000FD
STATUS_NO_CALLBACK_ACTIVE = 0xC0000258
STATUS_CALLBACK_POP_STACK = 0xC0000423
STATUS_BUFFER_TOO_SMALL = 0xC0000023

STATUS_NAMES: dict[int, str] = {
    STATUS_SUCCESS: "STATUS_SUCCESS",
    STATUS_INVALID_HANDLE: "STATUS_INVALID_HANDLE",
    STATUS_INVALID_PARAMETER: "STATUS_INVALID_PARAMETER",
    STATUS_ACCESS_VIOLATION: "STATUS_ACCESS_VIOLATION",
    STATUS_INVALID_SYSTEM_SERVICE: "STATUS_INVALID_SYSTEM_SERVICE",
    STATUS_STACK_OVERFLOW: "STATUS_STACK_OVERFLOW",
    STATUS_NO_CALLBACK_ACTIVE: "STATUS_NO_CALLBACK_ACTIVE",
    STATUS_CALLBACK_POP_STACK: "STATUS_CALLBACK_POP_STACK",
    STATUS_BUFFER_TOO_SMALL: "STATUS_BUFFER_TOO_SMALL",
}
STATUS_BY_NAME: dict[str, int] = {v: k for k, v in STATUS_NAMES.items()}


def status_name(status: int) -> str:
    """``STATUS_SUCCESS`` for a known code, ``0x...`` otherwise."""
    return STATUS_NAMES.get(status, f"{status:#010x}")


# --- Selectors (Windows x64 GDT layout; ReactOS sdk/include/ndk/amd64/ketypes.h) ---------
KGDT64_R0_CODE = 0x10
KGDT64_R0_DATA = 0x18
KGDT64_R3_CODE = 0x33  # 0x30 | RPL 3
KGDT64_R3_DATA = 0x2B  # 0x28 | RPL 3

# --- TEB / PEB (x64; ReactOS sdk/include/ndk/peb_teb.h, checked against public PDB dumps) --
TEB_EXCEPTION_LIST = 0x00  # NT_TIB.ExceptionList
TEB_STACK_BASE = 0x08  # NT_TIB.StackBase
TEB_STACK_LIMIT = 0x10  # NT_TIB.StackLimit
TEB_SELF = 0x30  # NT_TIB.Self, read as gs:[0x30]
TEB_CLIENT_ID = 0x40  # CLIENT_ID { UniqueProcess, UniqueThread }
TEB_PEB = 0x60  # ProcessEnvironmentBlock, read as gs:[0x60]
TEB_LAST_ERROR = 0x68
TEB_SIZE = 0x2000  # 0x1838 bytes on Windows 10, rounded to two pages

PEB_BEING_DEBUGGED = 0x02
PEB_IMAGE_BASE = 0x10
PEB_LDR = 0x18
PEB_KERNEL_CALLBACK_TABLE = 0x58
PEB_SIZE = 0x1000

# --- KUSER_SHARED_DATA (MS docs "KUSER_SHARED_DATA structure", ntddk.h) -------------------
KUSER_SHARED_DATA = 0x7FFE0000
KUSER_NT_MAJOR_VERSION = 0x26C
KUSER_NT_MINOR_VERSION = 0x270
KUSER_SYSTEM_CALL = 0x308  # non-zero: ntdll stubs take the `int 2Eh` path
KUSER_NT_BUILD_NUMBER = 0x260

# --- KTRAP_FRAME (x64; ReactOS sdk/include/ndk/amd64/ketypes.h) --------------------------
KTRAP_FRAME_RAX = 0x30
KTRAP_FRAME_RCX = 0x38
KTRAP_FRAME_RDX = 0x40
KTRAP_FRAME_R8 = 0x48
KTRAP_FRAME_R9 = 0x50
KTRAP_FRAME_R10 = 0x58
KTRAP_FRAME_R11 = 0x60
KTRAP_FRAME_RIP = 0x168
KTRAP_FRAME_SEGCS = 0x170
KTRAP_FRAME_EFLAGS = 0x178
KTRAP_FRAME_RSP = 0x180
KTRAP_FRAME_SEGSS = 0x188
KTRAP_FRAME_SIZE = 0x190

# --- UCALLOUT_FRAME built by KeUserModeCallback (ReactOS ntoskrnl/ke/amd64/usercall.c) ----
UCALLOUT_BUFFER = 0x20
UCALLOUT_LENGTH = 0x28
UCALLOUT_API_NUMBER = 0x2C
UCALLOUT_MACHINE_FRAME = 0x30  # MACHINE_FRAME { Rip, SegCs, EFlags, Rsp, SegSs }
UCALLOUT_MF_RIP = 0x30
UCALLOUT_MF_SEGCS = 0x38
UCALLOUT_MF_EFLAGS = 0x40
UCALLOUT_MF_RSP = 0x48
UCALLOUT_MF_SEGSS = 0x50
UCALLOUT_FRAME_SIZE = 0x58

# --- RFLAGS (Intel SDM vol. 1, 3.4.3) ------------------------------------------------------
RFLAGS_IF = 0x200
RFLAGS_RESERVED = 0x2
