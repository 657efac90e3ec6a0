"""The built-in ntdll's unwind table, checked against its own disassembly: every prologue
instruction has its code, the dispatcher's MachineFrame sits where the kernel pushed it, and the
dispatcher registers its exception handler."""

from __future__ import annotations

import struct

import capstone
import pytest

from emu.detection.unwind_data import function_table, read_unwind_info
from emu.profile import get_profile
from emu.runtime import build_ntdll
from emu.runtime.unwind import SLOT, TABLES, UWOP_ALLOC_SMALL, UWOP_PUSH_MACHFRAME
from emu.winnt import UCALLOUT_MF_RIP, UWOP_ALLOC_LARGE, UWOP_PUSH_NONVOL

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


@pytest.mark.parametrize("convention", sorted(TABLES))
def test_builtin_ntdll_unwind_table_matches_its_code(convention: str) -> None:
    image = build_ntdll(get_profile().with_overrides(dispatcher=convention))
    table = function_table(image)
    assert [(f.begin, f.end) for f in table] == [
        (image.symbols[u.name], image.symbols[u.end]) for u in TABLES[convention]
    ]
    for spec, entry in zip(TABLES[convention], table):
        info = read_unwind_info(image.read, entry.unwind, image.base)
        codes = [c for c in spec.codes if c[1] != SLOT]  # an ALLOC_LARGE's size slot is part of its code
        assert [(c.offset, c.op, c.info) for c in info.codes] == codes
        code = image.read(entry.begin, entry.end - entry.begin) or b""
        insns = list(_md.disasm(code, entry.begin))
        assert insns[-1].address + insns[-1].size == entry.end, "the entry covers the whole function"
        # Each prologue instruction that moves RSP has its code at the offset where it ends.
        seen: list[tuple[int, int, int | None]] = []
        for i, insn in enumerate(insns):
            off = insn.address + insn.size - entry.begin
            epilog = insn.mnemonic == "add" and i + 1 < len(insns) and insns[i + 1].mnemonic == "ret"
            if off > info.prolog_size and not epilog:  # an epilog (add rsp, N; ret) undoes the prolog
                assert not (insn.mnemonic in ("sub", "add", "push", "pop") and "rsp" in insn.op_str.split(",")[0]), insn
                continue
            if off > info.prolog_size:
                continue
            if insn.mnemonic == "sub" and insn.op_str.startswith("rsp, "):
                size = int(insn.op_str.split(", ")[1], 0)
                # MS docs "struct UNWIND_CODE": up to 128 bytes ALLOC_SMALL (OpInfo = size/8 - 1),
                # else ALLOC_LARGE with OpInfo 0 (size/8 in the next slot).
                seen.append((off, UWOP_ALLOC_SMALL, size // 8 - 1) if size <= 128 else (off, UWOP_ALLOC_LARGE, 0))
            elif insn.mnemonic == "push":
                seen.append((off, UWOP_PUSH_NONVOL, None))
        in_prologue = [c for c in codes if c[0] > 0]
        assert seen[::-1] == in_prologue
    disp = next(f for f in TABLES[convention] if f.name == "KiUserCallbackDispatcher")
    entry_codes = [c for c in disp.codes if c[0] == 0]
    assert entry_codes[-1] == (0, UWOP_PUSH_MACHFRAME, 0)
    # What the kernel pushed below the MachineFrame: the UCALLOUT_FRAME's first 0x30 bytes, and in
    # the registers convention the zero return slot below the frame.
    pushed = sum((info + 1) * 8 for _, op, info in entry_codes if op == UWOP_ALLOC_SMALL)
    assert pushed == UCALLOUT_MF_RIP + (8 if convention == "registers" else 0)


@pytest.mark.parametrize("convention", sorted(TABLES))
def test_builtin_dispatcher_registers_its_exception_handler(convention: str) -> None:
    # MS docs "struct UNWIND_INFO": with UNW_FLAG_EHANDLER (1) in Flags, the ULONG after the
    # (even-count) unwind codes is the handler's RVA. Windows' ntdll names the dispatcher's
    # handler KiUserCallbackDispatcherHandler.
    image = build_ntdll(get_profile().with_overrides(dispatcher=convention))
    entry = next(f for f in function_table(image) if f.begin == image.exports["KiUserCallbackDispatcher"])
    head = image.read(entry.unwind, 4) or b""
    # Version 1, Flags = UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER (2): the handler also runs while an
    # unwind passes through the dispatcher (emu.runtime dispatcher_handler.asm).
    assert head[0] & 7 == 1 and head[0] >> 3 == 3
    codes = head[2] + head[2] % 2
    rva = struct.unpack("<I", image.read(entry.unwind + 4 + 2 * codes, 4) or b"")[0]
    handler = image.base + rva
    assert image.symbols["KiUserCallbackDispatcherHandler"] == handler
    # It looks at ExceptionRecord->ExceptionFlags first (EXCEPTION_UNWIND = 0x66, winnt.h).
    insns = [(i.mnemonic, i.op_str) for i in _md.disasm(image.read(handler, 16) or b"", handler)]
    assert insns[:2] == [("sub", "rsp, 0x38"), ("test", "dword ptr [rcx + 4], 0x66")]
    # The unwinder still reads the codes in front of the handler RVA.
    info = read_unwind_info(image.read, entry.unwind, image.base)
    assert info.codes[-1].op == UWOP_PUSH_MACHFRAME
