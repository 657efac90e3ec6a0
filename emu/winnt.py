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
# Returned by the kernel model's waits but not (yet) named in reports or scenario files:
# STATUS_NAMES below is what status_name and the scenario reader know.
STATUS_TIMEOUT = 0x00000102  # the wait timed out
STATUS_PENDING = 0x00000103  # also winbase.h STILL_ACTIVE: the exit status of a live thread
STATUS_MUTANT_NOT_OWNED = 0xC0000046  # release of a mutant the caller does not own

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
KGDT64_R3_DATA = 0x2B  # 0x28 | RPL 3: user DS, ES, SS and GS
KGDT64_R3_CMTEB = 0x53  # 0x50 | RPL 3: user FS (the 32-bit TEB's selector)

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
PEB_PROCESS_PARAMETERS = 0x20  # also in MS docs "PEB structure" (winternl.h): after Reserved3[2] and Ldr
PEB_PROCESS_HEAP = 0x30
PEB_KERNEL_CALLBACK_TABLE = 0x58
PEB_SIZE = 0x1000

# --- Loader data (x64): ReactOS sdk/include/ndk/ldrtypes.h for the layouts, offsets checked
# against the public Windows 7 SP1 and Windows 10 PDB dumps of _PEB_LDR_DATA and
# _LDR_DATA_TABLE_ENTRY. LIST_ENTRY is {Flink +0, Blink +8}; UNICODE_STRING is
# {Length +0 (bytes, no terminator), MaximumLength +2, Buffer +8}, 0x10 bytes.
LIST_ENTRY_SIZE = 0x10
UNICODE_STRING_SIZE = 0x10
LDR_DATA_LENGTH = 0x00  # PEB_LDR_DATA.Length: sizeof(PEB_LDR_DATA)
LDR_DATA_INITIALIZED = 0x04
LDR_DATA_IN_LOAD_ORDER = 0x10  # InLoadOrderModuleList
LDR_DATA_IN_MEMORY_ORDER = 0x20  # InMemoryOrderModuleList
LDR_DATA_IN_INIT_ORDER = 0x30  # InInitializationOrderModuleList
LDR_DATA_SIZE = 0x58  # Windows 7 and later (ShutdownInProgress, ShutdownThreadId)
LDR_ENTRY_IN_LOAD_ORDER = 0x00  # LDR_DATA_TABLE_ENTRY.InLoadOrderLinks
LDR_ENTRY_IN_MEMORY_ORDER = 0x10
LDR_ENTRY_IN_INIT_ORDER = 0x20
LDR_ENTRY_DLL_BASE = 0x30
LDR_ENTRY_ENTRY_POINT = 0x38
LDR_ENTRY_SIZE_OF_IMAGE = 0x40
LDR_ENTRY_FULL_DLL_NAME = 0x48
LDR_ENTRY_BASE_DLL_NAME = 0x58
LDR_ENTRY_FLAGS = 0x68
LDR_ENTRY_LOAD_COUNT = 0x6C  # LoadCount; ObsoleteLoadCount from Windows 8
LDR_ENTRY_TLS_INDEX = 0x6E
LDR_ENTRY_HASH_LINKS = 0x70
LDR_ENTRY_TIME_DATE_STAMP = 0x80
LDR_ENTRY_SIZE = 0x120  # Windows 10's size (0xE0 on Windows 7); the rest stays zero
LDRP_IMAGE_DLL = 0x0004  # ldrtypes.h; the ImageDll bit of Windows 8+'s Flags bit field
LDRP_ENTRY_PROCESSED = 0x4000  # the EntryProcessed bit

# --- RTL_USER_PROCESS_PARAMETERS (x64): MS docs "RTL_USER_PROCESS_PARAMETERS structure"
# (winternl.h: Reserved1[16], Reserved2[10], ImagePathName, CommandLine) for +0x60/+0x70;
# the rest from ReactOS sdk/include/ndk/rtltypes.h and the public Windows 10 PDB layout.
PARAMS_MAXIMUM_LENGTH = 0x00
PARAMS_LENGTH = 0x04
PARAMS_FLAGS = 0x08
PARAMS_CURRENT_DIRECTORY = 0x38  # CURDIR { UNICODE_STRING DosPath; HANDLE Handle } (0x18 bytes)
PARAMS_DLL_PATH = 0x50
PARAMS_IMAGE_PATH_NAME = 0x60
PARAMS_COMMAND_LINE = 0x70
PARAMS_ENVIRONMENT = 0x80
PARAMS_ENVIRONMENT_SIZE = 0x3F0  # Vista and later
PARAMS_SIZE = 0x440  # Windows 10
RTL_USER_PROC_PARAMS_NORMALIZED = 0x01  # Buffers are pointers, not offsets (rtltypes.h)

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

# --- Kernel stack (x64; WRK public/sdk/inc/ksamd64.inc) -----------------------------------
KERNEL_STACK_CONTROL_LENGTH = 0x200  # the KERNEL_STACK_CONTROL area above a stack's InitialStack
KEXCEPTION_FRAME_LENGTH = 0x180  # KiCallUserMode's GENERATE_EXCEPTION_FRAME
PAGE_SIZE = 0x1000

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

# --- x64 unwind data (MS docs "x64 exception handling": struct UNWIND_CODE, UNWIND_INFO) --
# UNWIND_CODE.UnwindOp; 6 and 7 are version-2 epilog codes.
UWOP_PUSH_NONVOL, UWOP_ALLOC_LARGE, UWOP_ALLOC_SMALL, UWOP_SET_FPREG = 0, 1, 2, 3
UWOP_SAVE_NONVOL, UWOP_SAVE_NONVOL_FAR, UWOP_EPILOG, UWOP_SPARE_CODE = 4, 5, 6, 7
UWOP_SAVE_XMM128, UWOP_SAVE_XMM128_FAR, UWOP_PUSH_MACHFRAME = 8, 9, 10
UNW_FLAG_EHANDLER, UNW_FLAG_UHANDLER, UNW_FLAG_CHAININFO = 1, 2, 4  # UNWIND_INFO.Flags
RUNTIME_FUNCTION_SIZE = 12  # {BeginAddress, EndAddress, UnwindData}: three RVAs

# --- PE32+ images (MS docs "PE Format") ----------------------------------------------------
IMAGE_DOS_E_LFANEW = 0x3C  # IMAGE_DOS_HEADER.e_lfanew: file offset of "PE\0\0" and the NT headers
IMAGE_NT_TIME_DATE_STAMP = 0x08  # IMAGE_NT_HEADERS64: Signature (4), then IMAGE_FILE_HEADER.TimeDateStamp
IMAGE_NT_CHECKSUM = 0x58  # IMAGE_NT_HEADERS64.OptionalHeader.CheckSum
IMAGE_FILE_HEADER_SIZE = 20  # the COFF file header
IMAGE_SECTION_HEADER_SIZE = 40
IMAGE_EXPORT_DIRECTORY_SIZE = 40
IMAGE_DIRECTORY_ENTRY_EXPORT, IMAGE_DIRECTORY_ENTRY_EXCEPTION, IMAGE_DIRECTORY_ENTRY_BASERELOC = 0, 3, 5
IMAGE_SCN_CNT_CODE, IMAGE_SCN_CNT_INITIALIZED_DATA = 0x20, 0x40
IMAGE_SCN_MEM_EXECUTE, IMAGE_SCN_MEM_READ, IMAGE_SCN_MEM_WRITE = 0x20000000, 0x40000000, 0x80000000

# --- RFLAGS (Intel SDM vol. 1, 3.4.3) ------------------------------------------------------
RFLAGS_IF = 0x200
RFLAGS_RESERVED = 0x2
