"""capstone's answers kept on disk by content (emu.loader.disasm): the same instructions, read back
without decoding, and a damaged or missing file only costs a decode."""

from __future__ import annotations

from pathlib import Path

import capstone
import pytest

from emu.loader import disasm as d

# mov r10, rcx; mov eax, 2; test byte ptr [0x7ffe0308], 1; syscall; ret; mov rcx, [rip+0x10]; call [rip-0x10]
CODE = bytes.fromhex("4c8bd1 b802000000 f604250803fe7f01 0f05 c3 488b0d10000000 ff15f0ffffff".replace(" ", ""))
BASE = 0x180001000


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder, and this process's answers forgotten (as in a new process)."""
    monkeypatch.setenv("EMU_CACHE_DIR", str(tmp_path))
    _forget(monkeypatch)
    return tmp_path


def _forget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(d, "_decoded", {})
    monkeypatch.setattr(d, "_shards", {})
    monkeypatch.setattr(d, "_new", {})


def _no_capstone(*_: object) -> None:
    raise AssertionError("decoded again")


def test_instructions_are_capstones(fresh: Path) -> None:
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = True
    want = list(cs.disasm(CODE, BASE))
    got = d.disasm(CODE, BASE)
    assert [(i.address, i.size, i.mnemonic, i.op_str) for i in got] == [
        (w.address, w.size, w.mnemonic, w.op_str) for w in want
    ]
    assert [i.mnemonic for i in got] == ["mov", "mov", "test", "syscall", "ret", "mov", "call"]
    mov_eax, test, load, call = got[1], got[2], got[5], got[6]
    assert [(o.type, o.reg, o.imm) for o in mov_eax.operands] == [("reg", "eax", 0), ("imm", "", 2)]
    assert (test.operands[0].type, test.operands[0].mem.base, test.operands[0].mem.disp) == ("mem", "", 0x7FFE0308)
    assert (load.operands[1].mem.base, load.operands[1].mem.index, load.operands[1].mem.disp) == ("rip", "", 0x10)
    assert "rsp" in call.writes and "rsp" in got[4].writes  # call and ret move RSP (implicitly)
    assert mov_eax.writes == ("eax",) and got[0].reads == ("rcx",)
    assert d.disasm(CODE, BASE, 1) == d.disasm(CODE[:15], BASE, 1)  # one instruction: only its bytes count


def test_a_later_process_reads_the_answers_back(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = [(i.address, i.mnemonic, i.op_str) for i in d.disasm(CODE, BASE)]
    assert list(fresh.iterdir()) == []  # written once, at exit
    d.save()
    assert [p.name for p in fresh.iterdir()] == ["disasm"] and len(list((fresh / "disasm").iterdir())) == 1
    _forget(monkeypatch)
    monkeypatch.setattr(d, "_decode", _no_capstone)
    assert [(i.address, i.mnemonic, i.op_str) for i in d.disasm(CODE, BASE)] == first
    with pytest.raises(AssertionError, match="decoded again"):
        d.disasm(CODE, BASE + 1)  # another address: another question


def test_a_damaged_file_counts_as_empty(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = [(i.address, i.mnemonic) for i in d.disasm(CODE, BASE)]
    d.save()
    (stored,) = (fresh / "disasm").iterdir()
    data = bytearray(stored.read_bytes())
    data[-3] ^= 0xFF
    stored.write_bytes(bytes(data))
    _forget(monkeypatch)
    assert [(i.address, i.mnemonic) for i in d.disasm(CODE, BASE)] == first  # decoded again, same answer
    stored.write_bytes(b"not a cache")
    _forget(monkeypatch)
    assert [(i.address, i.mnemonic) for i in d.disasm(CODE, BASE)] == first


def test_an_empty_cache_dir_setting_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMU_CACHE_DIR", "")
    _forget(monkeypatch)
    assert len(d.disasm(CODE, BASE)) == 7
    d.save()
    assert d.cache_dir() is None
    assert list(tmp_path.iterdir()) == []


def test_the_oldest_answers_go_past_the_limit(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(d, "PER_SHARD", 1)
    bases = [0x1000 * n for n in range(1, 41)]
    for base in bases:
        d.disasm(CODE, base)
    d.save()
    files = list((fresh / "disasm").iterdir())
    assert 1 < len(files) <= 40  # answers spread over files by their hash
    assert all(len(d._read(f)) == 1 for f in files)  # one kept in each: the newest
    _forget(monkeypatch)
    monkeypatch.setattr(d, "_decode", _no_capstone)
    assert d.disasm(CODE, bases[-1])[0].address == bases[-1]  # the last one asked is kept
    kept = 0
    for base in bases:
        try:
            d.disasm(CODE, base)
            kept += 1
        except AssertionError:
            pass
    assert kept == len(files)


def test_another_process_answers_are_kept_when_saving(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bases = [0x1000 * n for n in range(1, 41)]
    for base in bases[:20]:
        d.disasm(CODE, base)
    other = dict(d._new)
    _forget(monkeypatch)
    for base in bases[20:]:
        d.disasm(CODE, base)
    d.save()  # this process first
    monkeypatch.setattr(d, "_new", other)
    d.save()  # then the other one, which read its files before this one wrote
    _forget(monkeypatch)
    monkeypatch.setattr(d, "_decode", _no_capstone)
    assert all(d.disasm(CODE, base)[0].address == base for base in bases)
