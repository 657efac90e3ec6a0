"""Reading code where there is no unwind data: a function's RSP changes, syscall stubs, return addresses.

The x64 ABI requires unwind data for every function that is not a leaf (MS docs "x64 exception
handling"), but assembly authors (and emu's scenario modules) often leave it out. A debugger
then falls back on the code itself, and so does :mod:`emu.detection.unwind`:

* :func:`sweep` follows the instructions from a function's start (the nearest export) to RIP,
  along its branches, and adds up what moves RSP: ``push``/``pop``, ``sub``/``add rsp``, a frame
  pointer (``mov rbp, rsp`` ... ``mov rsp, rbp``/``leave``). It gives up on anything it cannot
  model.
* :func:`stub_containing` reads a syscall stub back with :func:`emu.loader.stubs.stub_at`: from the
  export at or below RIP, or from a ``mov r10, rcx`` found by scanning back (no symbols needed).
* :func:`is_return_address`: a value in executable code with a ``call`` ending right at it.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

from emu.context import REGISTER_NAMES
from emu.detection.view import ModuleInfo, ThreadView
from emu.loader.disasm import Insn, disasm
from emu.loader.image import Image
from emu.loader.stubs import STUB_WINDOW, Stub, stub_at
from emu.records import record

GPR = REGISTER_NAMES[:16]  # the general registers, in UserContext's (and the unwind codes') order
RSP, RBP = GPR.index("rsp"), GPR.index("rbp")
SWEEP_LIMIT = 0x1000  # bytes of code read from a function start
CS_GPR = {n: i for i, n in enumerate(GPR)}  # register name (as emu.loader.disasm gives it) -> number
_CALL_LENGTHS = (2, 3, 4, 5, 6, 7)  # call reg, call [reg], call [reg+d8], rel32, [rip+d32], [sib+d32]


@record(frozen=True)
class Sweep:
    """RSP's distance to the return address slot at a RIP, and the registers pushed so far."""

    delta: int  # bytes between RSP at RIP and the return address slot
    saved: dict[int, int]  # register number -> its push slot, bytes below the return address slot


def sweep(image: Image, start: int, rip: int) -> Sweep | None:
    """Follow the RSP changes from a function's start to ``rip``, or None.

    The code is followed along its branches (conditional jumps both ways, direct jumps inside
    [start, rip]), breadth first: compiled functions branch before the call a return address
    belongs to (Wine 8's KiUserCallbackDispatcher tests a setjmp result first). A path ends at
    ``ret``, a jump out of the range or an RSP change this sweep cannot model; the first path
    to reach ``rip`` gives the answer.
    """
    if not start <= rip < start + SWEEP_LIMIT:
        return None
    code = image.read(start, rip - start) if rip > start else b""
    if code is None:
        return None
    queue: deque[_Path] = deque([_Path(start, 0, {}, {})])
    seen: set[int] = set()
    budget = SWEEP_STEPS
    while queue and budget > 0:
        path = queue.popleft()
        while budget > 0:
            if path.pc == rip:
                return Sweep(path.delta, path.saved) if path.delta >= 0 else None
            if path.pc in seen or not start <= path.pc < rip:
                break
            seen.add(path.pc)
            budget -= 1
            found = disasm(code[path.pc - start :], path.pc, 1)
            insn = found[0] if found else None
            if insn is None or not _apply(insn, path):
                break
            target = _branch_target(insn)
            m = insn.mnemonic
            if m == "jmp":
                if target is None:
                    break  # an indirect jump: a tail call or a table this sweep does not read
                path.pc = target
                continue
            if m.startswith("j") or m.startswith("loop"):
                if target is not None:
                    queue.append(_Path(target, path.delta, dict(path.copies), dict(path.saved)))
            elif m in ("ret", "int3", "ud2", "hlt", "iretq"):
                break  # the code after it is reached from somewhere else, if at all
            path.pc = insn.address + insn.size
    return None


SWEEP_STEPS = 4096  # instructions a sweep decodes at most, over all paths


@record
class _Path:
    """One path of the sweep through a function: its PC and what RSP and the registers hold."""

    pc: int
    delta: int  # bytes pushed or allocated since the function's start
    copies: dict[int, int]  # register -> the delta RSP had when the register got RSP's value
    saved: dict[int, int]  # register -> its push slot (the delta after the push)


def _branch_target(insn: Insn) -> int | None:
    ops = insn.operands
    if len(ops) == 1 and ops[0].type == "imm":
        return int(ops[0].imm)
    return None


def _apply(insn: Insn, path: _Path) -> bool:
    """Apply one instruction's RSP change to ``path``; False when this sweep cannot follow it."""
    m, ops = insn.mnemonic, insn.operands
    copies, saved = path.copies, path.saved
    if m == "push":
        path.delta += 8
        if ops[0].type == "reg" and ops[0].reg in CS_GPR:
            saved.setdefault(CS_GPR[ops[0].reg], path.delta)
    elif m == "pop":
        path.delta -= 8
        if ops[0].type == "reg":
            copies.pop(CS_GPR.get(ops[0].reg, -1), None)
    elif m in ("pushfq", "popfq"):
        path.delta += 8 if m == "pushfq" else -8
    elif m in ("sub", "add") and is_reg(ops, 0, RSP) and ops[1].type == "imm":
        path.delta += ops[1].imm if m == "sub" else -ops[1].imm
    elif m in ("mov", "lea") and len(ops) == 2 and ops[0].type == "reg" and ops[0].reg in CS_GPR:
        dst = CS_GPR[ops[0].reg]
        # The source as (register, displacement): `mov dst, reg` or `lea dst, [reg + disp]`.
        src: tuple[int, int] | None = None
        if m == "mov" and ops[1].type == "reg" and ops[1].reg in CS_GPR:
            src = (CS_GPR[ops[1].reg], 0)
        elif m == "lea" and ops[1].mem.index == "" and ops[1].mem.base in CS_GPR:
            src = (CS_GPR[ops[1].mem.base], ops[1].mem.disp)
        if dst == RSP:
            if src is None or (src[0] != RSP and src[0] not in copies):
                return False  # RSP from somewhere this sweep cannot follow
            path.delta = (path.delta if src[0] == RSP else copies[src[0]]) - src[1]
        elif src is not None and (src[0] == RSP or src[0] in copies):
            copies[dst] = (path.delta if src[0] == RSP else copies[src[0]]) - src[1]
        else:
            copies.pop(dst, None)
    elif m == "leave":  # mov rsp, rbp; pop rbp
        if RBP not in copies:
            return False
        path.delta = copies.pop(RBP) - 8
    elif "rsp" in insn.writes and m not in ("call", "syscall", "int", "ret", "iretq"):
        return False  # RSP changed in a way this sweep does not model
    return True


def is_reg(ops: Any, i: int, reg: int) -> bool:
    if len(ops) <= i:
        return False
    op = ops[i]
    return bool(op.type == "reg" and CS_GPR.get(op.reg) == reg)


def is_return_address(view: ThreadView, value: int) -> bool:
    """True when ``value`` is in a module's executable code and a ``call`` ends right at it."""
    module = view.module_at(value)
    if module is None:
        return False
    key = ("return address", value)  # a module's code does not change: read each value once
    if key not in module.memo:
        module.memo[key] = _follows_call(module, value)
    return bool(module.memo[key])


def _follows_call(module: ModuleInfo, value: int) -> bool:
    section = module.image.section_at(value)
    if section is None or "x" not in section.perms:
        return False
    for n in _CALL_LENGTHS:
        code = module.image.read(value - n, n)
        if code is None:
            continue
        insns = disasm(code, value - n)
        if len(insns) == 1 and insns[0].size == n and insns[0].mnemonic == "call":
            return True
    return False


def function_start(module: ModuleInfo, rip: int) -> int | None:
    """The nearest export at or below ``rip`` (what a tool without symbols can call a function start)."""
    best = max((a for a in module.exports.values() if a <= rip), default=None)
    return best


# `mov r10, rcx` as Windows' ntdll writes it (4C 8B D1) and as assemblers do (49 89 CA): every
# stub shape emu.loader.stubs knows starts with it.
_STUB_OPENERS = (b"\x4c\x8b\xd1", b"\x49\x89\xca")


def stub_containing(module: ModuleInfo, rip: int) -> Stub | None:
    """The syscall stub whose ``syscall``/``int 2Eh`` ends right at ``rip``, read back from code.

    Tries the export at or below ``rip`` first, then scans back for a stub's first
    instruction (no symbols needed). Each candidate is read with :func:`emu.loader.stubs.stub_at`.
    """
    key = ("stub", rip)
    if key in module.memo:
        return module.memo[key]  # type: ignore[return-value]
    found = _stub_containing(module, rip)
    module.memo[key] = found
    return found


def _stub_containing(module: ModuleInfo, rip: int) -> Stub | None:
    image = module.image
    candidates: list[int] = []
    start = function_start(module, rip)
    if start is not None and rip - start <= STUB_WINDOW:
        candidates.append(start)
    section = image.section_at(rip - 1)
    if section is not None:
        low = max(image.base + section.rva, rip - STUB_WINDOW)
        code = image.read(low, rip - low) or b""
        for i in range(len(code) - 3, -1, -1):  # nearest first
            if code[i : i + 3] in _STUB_OPENERS and low + i not in candidates:
                candidates.append(low + i)
    names = {a: n for n, a in sorted(module.exports.items(), reverse=True)}
    for c in candidates:
        name = names.get(c, f"{module.name}+{c - module.base:#x}")
        stub = stub_at(dataclasses.replace(image, exports={name: c}), name)
        sites = (stub.syscall_offset, stub.int2e_offset)
        # A stub loads its SSN itself: one that leaves EAX as it found it is not one emu can read.
        if (
            stub.shape is not None
            and stub.ssn is not None
            and any(off is not None and c + off + 2 == rip for off in sites)
        ):
            return stub
    return None
