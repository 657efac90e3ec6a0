"""Assembled bytes kept on disk by content (emu.loader.asm_cache): same answers, damaged entries ignored.

Expected encodings are from the Intel SDM, Vol. 2: ``MOV r32, imm32`` is ``B8+rd id`` (EDX is
register 2: ``BA``, then the immediate little-endian) and ``RET`` (near) is ``C3``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from emu.loader import asm_cache
from emu.loader.asm import AssemblyError, assemble

TEXT = "start: mov edx, 64\nend: ret"
BYTES = bytes.fromhex("ba40000000c3")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMU_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_a_second_assembly_reads_the_same_bytes_from_one_entry(cache: Path) -> None:
    first = assemble(TEXT, 0x1000)
    entries = list(cache.iterdir())
    assert first == (BYTES, {"start": 0x1000, "end": 0x1005})
    assert len(entries) == 1
    assert assemble(TEXT, 0x1000) == first
    assert list(cache.iterdir()) == entries


def test_the_address_is_part_of_the_key(cache: Path) -> None:
    code, labels = assemble("top: jmp top", 0x2000)
    assert code == bytes.fromhex("ebfe")  # JMP rel8 (EB cb) to itself: displacement -2
    assert labels == {"top": 0x2000}
    assert assemble("top: jmp top", 0x3000) == (code, {"top": 0x3000})
    assert len(list(cache.iterdir())) == 2


def test_a_damaged_entry_is_assembled_again(cache: Path) -> None:
    assemble(TEXT, 0x1000)
    (entry,) = cache.iterdir()
    stored = entry.read_bytes()
    entry.write_bytes(stored[:-1] + bytes([stored[-1] ^ 0xFF]))  # the ret byte flipped: the check digest fails
    assert assemble(TEXT, 0x1000)[0] == BYTES
    assert entry.read_bytes() == stored  # written again, whole
    entry.write_bytes(b"not an entry")
    assert assemble(TEXT, 0x1000)[0] == BYTES


def test_an_error_is_not_stored_and_is_found_again(cache: Path) -> None:
    for _ in range(2):
        with pytest.raises(AssemblyError, match="line 2"):
            assemble("main: nop\n  frobnicate rax", 0x1000)
    assert list(cache.iterdir()) == []


def test_an_empty_cache_dir_setting_turns_the_cache_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMU_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert asm_cache.cache_dir() is None
    assert assemble(TEXT, 0x1000)[0] == BYTES
    assert list(tmp_path.iterdir()) == []


def test_the_oldest_entries_go_past_the_limit(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asm_cache, "KEEP", 2)
    for age, base in enumerate((0x1000, 0x2000)):
        assemble(TEXT, base)
        os.utime(cache / asm_cache.key(_text_of(TEXT), base), ns=(age, age))  # stored long ago, in this order
    assemble(TEXT, 0x3000)
    assert len(list(cache.iterdir())) == 2
    assert asm_cache.load(_text_of(TEXT), 0x1000) is None  # the oldest is the one removed
    assert asm_cache.load(_text_of(TEXT), 0x2000) is not None
    assert asm_cache.load(_text_of(TEXT), 0x3000) is not None


def _text_of(source: str) -> str:
    """The full text assemble() hands keystone for a source with no outside names (its prelude and label table)."""
    from emu.loader.asm import ORIGIN, labels_in

    names = labels_in(source)
    return f"{ORIGIN}:\n" + source + "\n__emu_label_table__:\n" + "".join(f".quad {n}\n" for n in names)
