"""Syscall numbers read from the code: each Nt*/Zw* export's stub, disassembled with capstone.

A stub is walked twice, once for each value of KUSER_SHARED_DATA.SystemCall (the byte at
0x7FFE0308 that Windows 10+ stubs test; MS docs "KUSER_SHARED_DATA structure"). Each
walk follows the stub's branches until it reaches ``syscall``, ``int 2Eh`` or anything
else, so the shape is named by what the code does, not by its bytes:

==================  =================================================================
``win7``            ``mov r10,rcx; mov eax,N; syscall; ret`` (ntdll 6.1.7601)
``win10``           ``test byte [7FFE0308h],1; jne int2e; syscall; ret; int 2Eh; ret``
                    (ntdll 10.0.19041; syscall when the byte is 0, the fall-through)
``win10-reversed``  the same test, ``je`` to the ``syscall`` (taken when the byte is 0),
                    ``int 2Eh`` on the fall-through
``syscall-if-zero`` the same test, ``syscall`` when the byte is 0, otherwise neither
                    ``syscall`` nor ``int 2Eh`` (Wine 8: ``call [7FFE1000h]``;
                    dlls/ntdll/signal_x86_64.c)
``int2e-if-zero``   the test's sense inverted: ``int 2Eh`` when the byte is 0
``int2e``           ``int 2Eh`` only
==================  =================================================================

>>> from emu.profile import get_profile
>>> from emu.runtime import build_ntdll
>>> stub = stub_at(build_ntdll(get_profile("win10-22h2")), "ZwCallbackReturn")
>>> stub.shape, hex(stub.ssn or 0), hex(stub.syscall_offset or 0)
('win10', '0x5', '0x12')
"""

from __future__ import annotations

from typing import Literal

from emu.errors import ImageError
from emu.loader.asm_cache import blake2b
from emu.loader.disasm import Insn, disasm
from emu.loader.image import Image
from emu.profile import Profile
from emu.records import record
from emu.winnt import KUSER_SHARED_DATA, KUSER_SYSTEM_CALL, UCALLOUT_API_NUMBER, UCALLOUT_BUFFER, UCALLOUT_LENGTH

__all__ = [
    "STUB_WINDOW",
    "DispatcherGuess",
    "SsnDisagreement",
    "Stub",
    "compare_with_profile",
    "guess_dispatcher_convention",
    "recover_stubs",
    "service_table",
    "stub_at",
]

SYSTEM_CALL_FLAG = KUSER_SHARED_DATA + KUSER_SYSTEM_CALL  # the byte Windows 10+ stubs test (0x7FFE0308)
STUB_WINDOW = 0x40  # a stub's syscall/int 2Eh lies within this many bytes of its start; every known shape fits in 0x20
MAX_STEPS = 16  # instructions per walk: bounded, so a loop in a stub cannot hang
# Dispatcher entry: UCALLOUT_FRAME fields at [RSP] (ReactOS ntoskrnl/ke/amd64/usercall.c):
# Buffer +0x20, Length +0x28, ApiNumber +0x2C.
_FRAME_FIELDS = {UCALLOUT_BUFFER, UCALLOUT_LENGTH, UCALLOUT_API_NUMBER}
# The "registers" convention's argument registers: ECX = ApiNumber, RDX = InputBuffer,
# R8D = InputLength (Wine 8, dlls/ntdll/signal_x86_64.c).
_ARG_FAMILIES = {
    **dict.fromkeys(("rcx", "ecx", "cx", "cl", "ch"), "rcx"),
    **dict.fromkeys(("rdx", "edx", "dx", "dl", "dh"), "rdx"),
    **dict.fromkeys(("r8", "r8d", "r8w", "r8b"), "r8"),
}


Terminal = Literal["syscall", "int2e", "other"]


@record(frozen=True)
class Stub:
    """One export as a syscall stub. ``shape`` is None when the code is not a stub."""

    name: str
    address: int
    ssn: int | None
    shape: str | None
    syscall_offset: int | None
    int2e_offset: int | None


@record(frozen=True)
class SsnDisagreement:
    """A service whose stub loads another number than the profile gives it."""

    service: str
    in_code: int
    in_profile: int


@record(frozen=True)
class DispatcherGuess:
    """A guess at the KiUserCallbackDispatcher entry convention, with what it is based on."""

    convention: Literal["stack", "registers", "unknown"]
    evidence: str

    def __str__(self) -> str:
        return f"{self.convention} (guess: {self.evidence})"


@record(frozen=True)
class _Walk:
    """Where the walk through one stub ended, and the number it loaded on the way."""

    end: Terminal
    ssn: int | None
    offset: int | None  # of the terminal instruction
    tested: bool
    via: str  # "jne", "je" or "" (fall-through): how the terminal was reached after the test


def _insn(image: Image, address: int) -> Insn | None:
    code = image.read(address, 16)
    if code is None:
        sec = image.section_at(address)
        if sec is None:
            return None
        code = image.read(address, image.base + sec.rva + sec.size - address)
    found = disasm(code or b"", address, 1)
    return found[0] if found else None


def _target(insn: Insn) -> int | None:
    ops = insn.operands
    return int(ops[0].imm) if len(ops) == 1 and ops[0].type == "imm" else None


def _is_systemcall_test(insn: Insn) -> bool:
    if insn.mnemonic != "test" or len(insn.operands) != 2:
        return False
    mem, imm = insn.operands
    if mem.type != "mem" or imm.type != "imm" or imm.imm != 1:
        return False
    if mem.mem.base == "rip" and mem.mem.index == "":
        return bool(insn.address + insn.size + mem.mem.disp == SYSTEM_CALL_FLAG)
    return bool(mem.mem.base == "" and mem.mem.index == "" and mem.mem.disp == SYSTEM_CALL_FLAG)


def _walk(image: Image, start: int, system_call: int) -> _Walk:
    """Follow the stub for one value of KUSER_SHARED_DATA.SystemCall."""
    pc, ssn, tested, via = start, None, False, ""
    for _ in range(MAX_STEPS):
        insn = _insn(image, pc)
        if insn is None:
            break
        nxt = pc + insn.size
        m, ops = insn.mnemonic, insn.operands
        if m == "syscall" or (m == "int" and _target(insn) == 0x2E):
            return _Walk("syscall" if m == "syscall" else "int2e", ssn, pc - start, tested, via)
        if m == "mov" and len(ops) == 2 and ops[0].type == "reg" and ops[0].reg == "eax":
            if ops[1].type != "imm":
                break
            ssn, pc = int(ops[1].imm) & 0xFFFFFFFF, nxt
        elif m == "mov" and insn.op_str == "r10, rcx":
            pc = nxt
        elif _is_systemcall_test(insn):
            tested, pc = True, nxt
        elif m in ("jne", "je") and tested and _target(insn) is not None:
            taken = (system_call & 1) == (1 if m == "jne" else 0)  # ZF is set when the byte is 0
            pc, via = (_target(insn) or 0, m) if taken else (nxt, "")
        elif m == "jmp" and _target(insn) is not None:
            pc = _target(insn) or 0
        elif m == "nop":
            pc = nxt
        else:
            break
    return _Walk("other", ssn, None, tested, via)


def _shape(zero: _Walk, one: _Walk) -> str | None:
    ends = (zero.end, one.end)
    if not zero.tested:
        return {"syscall": "win7", "int2e": "int2e"}.get(zero.end)
    if ends == ("syscall", "int2e"):
        return "win10-reversed" if zero.via == "je" else "win10"
    if zero.end == "syscall":
        return "syscall-if-zero"
    if ends == ("int2e", "syscall"):
        return "int2e-if-zero"
    return None


def stub_at(image: Image, name: str) -> Stub:
    """The export ``name`` of ``image`` read as a syscall stub."""
    address = image.exports[name]
    section = image.section_at(address)
    if section is None or "x" not in section.perms:
        return Stub(name, address, None, None, None, None)
    zero, one = _walk(image, address, 0), _walk(image, address, 1)
    shape = _shape(zero, one)
    if shape is None:
        return Stub(name, address, None, None, None, None)
    walks = (zero, one)
    sys_off = next((w.offset for w in walks if w.end == "syscall"), None)
    int_off = next((w.offset for w in walks if w.end == "int2e"), None)
    ssn = next(w.ssn for w in walks if w.end in ("syscall", "int2e"))
    return Stub(name, address, ssn, shape, sys_off, int_off)


def recover_stubs(image: Image) -> list[Stub]:
    """Every Nt*/Zw* export of ``image`` read as a stub, by address then name."""
    names = sorted((a, n) for n, a in image.exports.items() if n[:2] in ("Nt", "Zw"))
    return [stub_at(image, n) for _, n in names]


def service_table(image: Image) -> dict[str, int]:
    """{Nt name: SSN} from the stubs; NtX and ZwX are one service.

    Raises:
        ImageError: if NtX and ZwX carry different numbers (reported, never guessed).

    >>> from emu.profile import get_profile
    >>> from emu.runtime import build_ntdll
    >>> service_table(build_ntdll(get_profile("win7-sp1")))["NtCallbackReturn"]
    2
    """
    key = _content_key(image)
    hit = _TABLES.get(key)
    if hit is None:
        if len(_TABLES) > 32:
            _TABLES.clear()
        hit = _TABLES[key] = _service_table(image)
    return dict(hit)


# service_table results by image content: reading every stub of a large ntdll takes ~0.5 s,
# and a scenario builds its process more than once (thread-start probe, explorer, tests).
_TABLES: dict[bytes, dict[str, int]] = {}


def _content_key(image: Image) -> bytes:
    """A digest of what the SSNs depend on: the stub exports (as RVAs) and the executable bytes."""
    h = blake2b(digest_size=20)
    for name, addr in sorted(image.exports.items()):
        if name[:2] in ("Nt", "Zw"):
            h.update(f"{name}={addr - image.base:x};".encode())
    for sec in image.sections:
        if "x" in sec.perms:
            h.update(sec.rva.to_bytes(8, "little"))
            h.update(sec.data)
    return h.digest()


def _service_table(image: Image) -> dict[str, int]:
    table: dict[str, tuple[int, str]] = {}
    for stub in recover_stubs(image):
        if stub.ssn is None:
            continue
        service = "Nt" + stub.name[2:]
        seen = table.get(service)
        if seen is not None and seen[0] != stub.ssn:
            raise ImageError(f"{image.name}: {seen[1]} (SSN {seen[0]:#x}) and {stub.name} (SSN {stub.ssn:#x}) disagree")
        table.setdefault(service, (stub.ssn, stub.name))
    return {name: ssn for name, (ssn, _) in sorted(table.items())}


def compare_with_profile(table: dict[str, int], profile: Profile) -> list[SsnDisagreement]:
    """Services whose number in the code differs from the profile's.

    A service missing on either side is not a disagreement: ntdll has no win32k stubs,
    and the profile lists only the services emu models.
    """
    return [
        SsnDisagreement(name, ssn, profile.ssn[name])
        for name, ssn in sorted(table.items())
        if name in profile.ssn and profile.ssn[name] != ssn
    ]


def guess_dispatcher_convention(image: Image) -> DispatcherGuess:
    """Guess how KiUserCallbackDispatcher expects to be entered, from its first instructions.

    ``stack`` if it reads [rsp+0x20]/[rsp+0x28]/[rsp+0x2c] (UCALLOUT_FRAME fields) before
    any push or RSP change; ``registers`` if it reads ECX/RDX/R8 before writing them;
    otherwise ``unknown``. A heuristic, labelled as one.

    >>> from emu.profile import get_profile
    >>> from emu.runtime import build_ntdll
    >>> guess_dispatcher_convention(build_ntdll(get_profile())).convention
    'stack'
    """
    start = image.export("KiUserCallbackDispatcher")
    if start is None:
        return DispatcherGuess("unknown", "no KiUserCallbackDispatcher export")
    pc, moved, written = start, False, set()
    for _ in range(32):
        insn = _insn(image, pc)
        if insn is None:
            break
        where = f"+{pc - start:#x}"
        for op in insn.operands:
            if op.type == "mem" and op.mem.base == "rsp" and op.mem.disp in _FRAME_FIELDS and not moved:
                return DispatcherGuess("stack", f"reads [rsp+{op.mem.disp:#x}] at {where} before moving RSP")
        read, write = insn.reads, insn.writes
        ops = insn.operands
        zero_idiom = insn.mnemonic in ("xor", "sub") and len(ops) == 2 and ops[0].type == ops[1].type == "reg"
        zero_idiom = zero_idiom and ops[0].reg == ops[1].reg
        for reg in () if zero_idiom else read:
            family = _ARG_FAMILIES.get(reg)
            if family is not None and family not in written:
                return DispatcherGuess("registers", f"reads {reg} at {where} before writing it")
        written |= {f for r in write if (f := _ARG_FAMILIES.get(r)) is not None}
        if insn.mnemonic in ("push", "pop", "call", "enter") or "rsp" in write:
            moved = True
        if insn.mnemonic == "jmp" and _target(insn) is not None:
            pc = _target(insn) or 0
            continue
        if insn.mnemonic in ("ret", "jmp", "call", "int3", "ud2"):
            break
        pc += insn.size
    return DispatcherGuess("unknown", "no read of the UCALLOUT_FRAME or of ECX/RDX/R8D on entry")
