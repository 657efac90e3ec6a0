"""How a thread starts in a loaded ntdll: read from RtlUserThreadStart's own code.

Every user thread begins at ``ntdll!RtlUserThreadStart(StartAddress, Parameter)``. On
Windows that function calls ``kernel32!BaseThreadInitThunk(0, StartAddress, Parameter)``
through a pointer the loader stored while the process initialised
(``Kernel32ThreadInitThunkFunction``, set by LdrpInitializeProcess once kernel32 is
loaded; Wine keeps the same pointer as ``pBaseThreadInitThunk``, set in
dlls/ntdll/loader.c ``process_init``). emu does not run the process loader, so that
pointer is still NULL in a foreign ntdll and the thread would call address 0.

:func:`find_init_thunk` finds the pointer the way a reader of the disassembly would: it
sweeps RtlUserThreadStart (bounded by its ``.pdata`` entry, or its first ``ret``),
tracks which registers hold values loaded from the image (``mov reg, [rip+X]``, one
dereference further, ``lea reg, [rip+X]``) and takes the first indirect call whose
pointer slot lies in a writable section of the image and holds 0 at load time. A call
through a control-flow-guard dispatcher (a non-zero slot called with the target in RAX)
is followed to RAX's slot. The engine then stores its built-in
``kernel32!BaseThreadInitThunk`` there, as the Windows loader would.

>>> from emu.profile import get_profile
>>> from emu.runtime import build_ntdll
>>> find_init_thunk(build_ntdll(get_profile())) is None   # the built-in ntdll calls the entry itself
True
"""

from __future__ import annotations

from emu.loader.disasm import Insn, disasm
from emu.loader.image import Image
from emu.loader.pdata import entry_at, function_table
from emu.records import record

__all__ = ["InitThunk", "find_init_thunk", "function_range"]

MAX_INSNS = 400  # RtlUserThreadStart is a few dozen instructions in every build seen


@record(frozen=True)
class InitThunk:
    """The pointer RtlUserThreadStart calls BaseThreadInitThunk through."""

    slot: int  # address of the pointer (in the image's writable data)
    call_site: int  # the indirect call that uses it
    how: str  # one line for notes: how the code reaches the slot


def function_range(image: Image, address: int) -> tuple[int, int | None]:
    """``(begin, end)`` of the function at ``address`` from the image's .pdata (end None when not listed)."""
    entry = entry_at(function_table(image), address)
    return (entry.begin, entry.end) if entry is not None else (address, None)


def _u64(image: Image, address: int) -> int | None:
    raw = image.read(address, 8)
    return None if raw is None else int.from_bytes(raw, "little")


def _writable(image: Image, address: int) -> bool:
    sec = image.section_at(address)
    return sec is not None and "w" in sec.perms


def _mem_address(insn: Insn, op_index: int) -> int | None:
    """The absolute address of a ``[rip+disp]`` or ``[disp32]`` operand."""
    mem = insn.operands[op_index].mem
    if mem.index != "":
        return None
    if mem.base == "rip":
        return int(insn.address + insn.size + mem.disp)
    if mem.base == "":
        return int(mem.disp) & 0xFFFF_FFFF_FFFF_FFFF
    return None


def find_init_thunk(ntdll: Image) -> InitThunk | None:
    """The BaseThreadInitThunk pointer in ``ntdll``'s RtlUserThreadStart, or None.

    None means the code makes no indirect call through a zero pointer of the image's
    own data (the built-in ntdll calls the entry directly, for example).
    """
    start = ntdll.export("RtlUserThreadStart")
    if start is None:
        return None
    _, end = function_range(ntdll, start)
    code = ntdll.read(start, (end - start) if end else 0x400)
    if code is None:
        sec = ntdll.section_at(start)
        if sec is None:
            return None
        code = ntdll.read(start, min(0x400, ntdll.base + sec.rva + sec.size - start))
    # What each register holds: ("addr", A) = the address A itself, ("load", A) = the value at A.
    regs: dict[str, tuple[str, int]] = {}
    for count, insn in enumerate(disasm(code or b"", start)):
        if count >= MAX_INSNS or (end is None and insn.mnemonic in ("ret", "int3")):
            break
        ops = insn.operands
        if insn.mnemonic == "call" and len(ops) == 1:
            slot = _call_slot(ntdll, insn, regs)
            if slot is not None:
                value = _u64(ntdll, slot[0])
                if value == 0 and _writable(ntdll, slot[0]):
                    return InitThunk(slot[0], insn.address, slot[1])
            regs = {}  # a call clobbers the volatile registers; be conservative
            continue
        if len(ops) == 2 and ops[0].type == "reg" and insn.mnemonic in ("mov", "lea"):
            dst = ops[0].reg
            src = ops[1]
            if src.type == "mem":
                addr = _mem_address(insn, 1)
                if addr is not None:
                    regs[dst] = ("addr", addr) if insn.mnemonic == "lea" else ("load", addr)
                    continue
                held = regs.get(src.mem.base)
                if insn.mnemonic == "mov" and held is not None and src.mem.index == "":
                    if held[0] == "addr":
                        regs[dst] = ("load", held[1] + int(src.mem.disp))
                        continue
                    inner = _u64(ntdll, held[1])
                    if inner:
                        regs[dst] = ("load", inner + int(src.mem.disp))
                        continue
            elif src.type == "reg" and insn.mnemonic == "mov" and src.reg in regs:
                regs[dst] = regs[src.reg]
                continue
        # Anything else that writes a register forgets what it held.
        for op in ops[:1]:
            if op.type == "reg":
                regs.pop(op.reg, None)
    return None


def _call_slot(image: Image, insn: Insn, regs: dict[str, tuple[str, int]]) -> tuple[int, str] | None:
    """The pointer slot an indirect call goes through, with a note on how it was found."""
    op = insn.operands[0]
    where = f"{insn.mnemonic} {insn.op_str} at {insn.address:#x}"
    if op.type == "reg":
        held = regs.get(op.reg)
        return (held[1], where) if held and held[0] == "load" else None
    if op.type != "mem":
        return None
    addr = _mem_address(insn, 0)
    if addr is None:
        held = regs.get(op.mem.base)
        if held is None or op.mem.index != "":
            return None
        if held[0] == "addr":
            addr = held[1] + int(op.mem.disp)
        else:
            inner = _u64(image, held[1])
            if not inner:
                return None
            addr = inner + int(op.mem.disp)
    value = _u64(image, addr)
    if value:
        # A filled slot called with the real target in RAX: a control-flow-guard dispatch
        # (__guard_dispatch_icall_fptr; MS docs "Control Flow Guard").
        held = regs.get("rax")
        if held is not None and held[0] == "load":
            return held[1], f"{where} (guard dispatch, target in rax)"
        return None
    return addr, where
