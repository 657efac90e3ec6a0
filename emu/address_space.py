"""Where emu puts things in the process it builds, and the ids it hands out.

Classic x64 user layout (Windows 7): the PEB just below KUSER_SHARED_DATA's
neighbourhood at the top of the 8 TB user range, the TEBs below it. The images sit
16 MiB apart: the built-in ntdll at :data:`emu.runtime.NTDLL_BASE` with win32u and
kernel32 after it, the scenario's modules from :data:`MODULE_BASE` (they call each other
through import slots). Nothing here is a Windows fact; a minidump writes these ids as
the process's and threads'.
"""

from __future__ import annotations

from emu.runtime import NTDLL_BASE

PEB_ADDRESS = 0x7FF_FFFD_F000
TEB_ADDRESS = 0x7FF_FFFD_D000  # thread i at TEB_ADDRESS - i * TEB_SIZE
WIN32U_BASE = NTDLL_BASE + 0x0100_0000
KERNEL32_BASE = NTDLL_BASE + 0x0200_0000  # emu's kernel32, loaded with a foreign ntdll
MODULE_BASE = 0x7FFA_C000_0000  # scenario modules, MODULE_STRIDE apart
MODULE_STRIDE = 0x0100_0000
STACK_SIZE = 0x40000
PROCESS_ID = 0x1000
THREAD_ID_BASE = 0x1004  # thread i has id THREAD_ID_BASE + 4 * i


def thread_id(index: int) -> int:
    """The client id emu gives its thread number ``index`` (ids are multiples of 4, as in Windows)."""
    return THREAD_ID_BASE + 4 * index
