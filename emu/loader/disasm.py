"""x86-64 code decoded by capstone, kept on disk by content, so a later run needs no capstone.

What capstone makes of some bytes depends only on the bytes, the address they are decoded at
and the number of instructions asked for (and on capstone itself). The detector reads the same
stubs and function starts at every ``emu run``; the answers are stored under a hash of those
inputs, in the ``disasm`` folder beside :mod:`emu.loader.asm_cache`'s entries (under
``$EMU_CACHE_DIR``; an empty value turns both caches off), and capstone is not even imported
when every question was asked before. They are spread over :data:`SHARDS` files by their hash,
so a run reads only the files holding its questions, and a run that learns thousands of answers
(a real ntdll's stubs) writes each file once, at exit. A file holds at most :data:`PER_SHARD`
answers, the oldest dropped first; one that cannot be read, or whose check digest does not
match, counts as empty. The cache only ever saves time, never changes an answer.

An instruction is an :class:`Insn` with the parts of capstone's ``CsInsn`` the readers of code
use, registers by name (``"rax"``, ``""`` for none) and operand types as ``"reg"``, ``"imm"``,
``"mem"``.
"""

from __future__ import annotations

import atexit
import marshal
from pathlib import Path
from typing import Any

from emu.loader import asm_cache
from emu.loader.asm_cache import blake2b

__all__ = ["Insn", "Mem", "Operand", "disasm"]

FORMAT = b"emu-disasm-1\n"  # bump when what is stored (or how the key is made) changes
SHARDS = 256  # files, by the first two hex digits of an answer's key: a run reads only the ones it needs
PER_SHARD = 128  # answers kept per file (a hundred bytes or so each); past that the oldest go
MAX_INSN = 15  # bytes: the longest x86 instruction (Intel SDM vol. 2, 2.3.11)
_TYPES = {1: "reg", 2: "imm", 3: "mem"}  # capstone's X86_OP_REG, X86_OP_IMM, X86_OP_MEM


class Mem:
    """A memory operand: ``[base + index*scale + disp]``."""

    __slots__ = ("base", "disp", "index", "scale")

    def __init__(self, base: str, index: str, scale: int, disp: int) -> None:
        self.base, self.index, self.scale, self.disp = base, index, scale, disp


_NO_MEM = Mem("", "", 1, 0)


class Operand:
    """One operand; ``reg``, ``imm`` and ``mem`` mean something only for their ``type``."""

    __slots__ = ("imm", "mem", "reg", "type")

    def __init__(self, type: str, reg: str = "", imm: int = 0, mem: Mem = _NO_MEM) -> None:
        self.type, self.reg, self.imm, self.mem = type, reg, imm, mem


class Insn:
    """One decoded instruction; ``reads``/``writes``: the registers it reads and writes, implicit
    ones included, in capstone's order (``CsInsn.regs_access``)."""

    __slots__ = ("address", "mnemonic", "op_str", "operands", "reads", "size", "writes")

    def __init__(
        self, address: int, size: int, mnemonic: str, op_str: str, operands: tuple[Operand, ...],
        reads: tuple[str, ...], writes: tuple[str, ...],
    ) -> None:  # fmt: skip
        self.address, self.size, self.mnemonic, self.op_str = address, size, mnemonic, op_str
        self.operands, self.reads, self.writes = operands, reads, writes


def disasm(code: bytes, address: int, count: int = 0) -> tuple[Insn, ...]:
    """The instructions capstone decodes from ``code`` at ``address`` (``count`` at most; 0: all,
    up to the first byte sequence that is no instruction)."""
    if count:
        code = code[: count * MAX_INSN]  # the bytes that can matter: the answer is the same
    h = blake2b(FORMAT, digest_size=16)
    h.update((address & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))
    h.update(count.to_bytes(4, "little"))
    h.update(code)
    h.update(asm_cache.library_identity("capstone"))
    key = h.hexdigest()
    hit = _decoded.get(key)
    if hit is None:
        stored = _load(key)
        if stored is None:
            stored = _decode(code, address, count)
            _store(key, stored)
        hit = _decoded[key] = tuple(_insn(*raw) for raw in stored)
    return hit


Raw = tuple[int, int, str, str, tuple[tuple[str, str, int, str, str, int, int], ...], tuple[str, ...], tuple[str, ...]]

_decoded: dict[str, tuple[Insn, ...]] = {}  # this process's answers, as objects
_capstone: list[Any] = []  # the decoder, made on first use
_shards: dict[str, dict[str, tuple[Raw, ...]]] = {}  # the stored answers, by shard, as read
_new: dict[str, dict[str, tuple[Raw, ...]]] = {}  # answers learnt here, by shard, not yet written
_saving: list[bool] = []  # [True] once :func:`save` is to run at exit


def _insn(
    address: int, size: int, mnemonic: str, op_str: str, ops: Any, reads: tuple[str, ...], writes: tuple[str, ...]
) -> Insn:
    operands = tuple(
        Operand(t, reg, imm, Mem(base, index, scale, disp) if t == "mem" else _NO_MEM)
        for t, reg, imm, base, index, scale, disp in ops
    )
    return Insn(address, size, mnemonic, op_str, operands, reads, writes)


def _decode(code: bytes, address: int, count: int) -> tuple[Raw, ...]:
    if not _capstone:
        import capstone

        cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        cs.detail = True
        _capstone.append(cs)
    out = []
    for insn in _capstone[0].disasm(code, address, count):
        name = insn.reg_name
        ops = []
        for op in insn.operands:
            t = _TYPES.get(op.type, "other")
            reg = (name(op.reg) or "") if t == "reg" else ""
            imm = int(op.imm) if t == "imm" else 0
            if t == "mem":
                m = op.mem
                base, index, scale, disp = name(m.base) or "", name(m.index) or "", int(m.scale), int(m.disp)
            else:
                base, index, scale, disp = "", "", 1, 0
            ops.append((t, reg, imm, base, index, scale, disp))
        try:
            read, write = insn.regs_access()
        except Exception:  # capstone cannot say for this instruction: nothing known read or written
            read = write = []
        reads, writes = tuple(name(r) or "" for r in read), tuple(name(r) or "" for r in write)
        out.append((int(insn.address), int(insn.size), insn.mnemonic, insn.op_str, tuple(ops), reads, writes))
    return tuple(out)


def cache_dir() -> Path | None:
    """Where answers live: ``disasm`` in :func:`emu.loader.asm_cache.cache_dir`; None when caching is off."""
    folder = asm_cache.cache_dir()
    return None if folder is None else folder / "disasm"


def _shard(key: str) -> dict[str, tuple[Raw, ...]]:
    """The answers stored under ``key``'s first two hex digits (read once per process)."""
    name = key[:2]
    shard = _shards.get(name)
    if shard is None:
        folder = cache_dir()
        shard = _shards[name] = _read(folder / name) if folder is not None else {}
    return shard


def _read(path: Path) -> dict[str, tuple[Raw, ...]]:
    blob = asm_cache.read_checked(path, FORMAT)
    if blob is None:
        return {}
    try:
        answers = marshal.loads(blob)
    except (ValueError, EOFError, TypeError):
        return {}
    return answers if isinstance(answers, dict) else {}


def _load(key: str) -> tuple[Raw, ...] | None:
    return _shard(key).get(key)


def _store(key: str, raw: tuple[Raw, ...]) -> None:
    if cache_dir() is None:
        return
    _shard(key)[key] = raw
    _new.setdefault(key[:2], {})[key] = raw
    if not _saving:
        _saving.append(True)
        atexit.register(save)


def save() -> None:
    """Write the answers this process learnt (at exit; callable at any time). Each shard is read
    again and merged, so answers another process stored meanwhile stay; past :data:`PER_SHARD`
    answers, the oldest go."""
    folder = cache_dir()
    if folder is None:
        _new.clear()
        return
    for name, learnt in sorted(_new.items()):
        merged = {**_read(folder / name), **learnt}
        kept = dict(list(merged.items())[-PER_SHARD:])
        if not asm_cache.write_checked(folder / name, FORMAT, marshal.dumps(kept)):
            break
    _new.clear()
