"""One field of a loaded image's NT headers, read without the PE loader (and so without LIEF):
``emu run`` needs it for every image it lists in PEB.Ldr, PE or assembled."""

from __future__ import annotations

from emu.winnt import IMAGE_DOS_E_LFANEW

__all__ = ["nt_header_u32"]


def nt_header_u32(headers: bytes, offset: int) -> int:
    """The 32-bit field at ``offset`` of IMAGE_NT_HEADERS64 (from its "PE\\0\\0" signature) in an
    image's first bytes, or 0 when they hold no PE headers (an image assembled without them)."""
    # IMAGE_DOS_HEADER.e_lfanew locates the NT headers (MS docs "PE Format", MS-DOS stub).
    if len(headers) < IMAGE_DOS_E_LFANEW + 4:
        return 0
    nt = int.from_bytes(headers[IMAGE_DOS_E_LFANEW : IMAGE_DOS_E_LFANEW + 4], "little")
    if headers[nt : nt + 4] != b"PE\0\0" or len(headers) < nt + offset + 4:
        return 0
    return int.from_bytes(headers[nt + offset : nt + offset + 4], "little")
