"""The explorer's compact forms and cheaper paths keep what they replace: digest texts (from
memoised pieces, against their definition), CPU contexts, shared parts, memory layers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RIP, UC_X86_REG_XMM3

from conftest import SCENARIOS
from emu.exploration.cpu import CpuContexts
from emu.exploration.digest import MEMO_LIMIT, DigestText
from emu.exploration.explorer import Explorer
from emu.exploration.shared import SharedParts
from emu.kernel.fork import digest_key
from emu.kernel.thread import KThread
from emu.machine import Machine
from emu.scenario import load_scenario
from emu.trace import State

CTX = (
    70,
    0x7FFE_0000_1234,
    0,
    2,
    0x1_0004_0058,
    0,
    1,
    0,
    0,
    0,
    0x7FFE_0000_1234,
    582,
    0,
    0,
    0,
    0,
    0x7FFE_0000_1234,
    582,
)


def _reference_text(tid: int, mode: str, context: tuple[int, ...], tail: tuple[object, ...]) -> bytes:
    """A state's identity text (its stack and the kernel aside) by its definition in emu.exploration.digest."""
    values = tuple(context)
    if all(isinstance(v, int) and 0 <= v < 1 << 64 for v in values):
        return repr((tid, mode, tail, len(values))).encode() + b"".join(v.to_bytes(8, "little") for v in values)
    return repr((tid, mode, tail, -1)).encode() + repr(values).encode()


def test_kernel_text_is_repr_and_survives_unhashable_keys_and_a_full_memo() -> None:
    text = DigestText()
    key = (0, ((0, "user", True, False, None, (), None, None, None),), None, ((), (), ()), None)
    assert text.kernel(key) == repr(key).encode()
    unhashable = (0, [1, 2], {"a": 1})
    assert text.kernel(unhashable) == repr(unhashable).encode()
    for i in range(MEMO_LIMIT + 2):
        text.kernel((i,))
    assert text.kernel(key) == repr(key).encode()


def test_state_memo_starts_again_when_full() -> None:
    text = DigestText()
    for i in range(MEMO_LIMIT + 3):
        raw = _raw(i, "user", CTX, (0, None, None, False, ()))
        assert b"".join(text.state_parts(raw)) == _reference_text(i, "user", CTX, (0, None, None, False, ()))


class _ReferenceDigests(Explorer):
    """The explorer, also computing each digest from the texts' definitions (no memo, no shortcut)."""

    def _observe(self, sid: int, thread: KThread) -> None:
        raw = self.trace.raw_states[sid]
        h = hashlib.blake2b(digest_size=12)
        h.update(_reference_text(raw[1], raw[2], raw[3], (raw[6], raw[7], raw[8], raw[9], raw[10])))
        h.update(raw[4])
        h.update(repr(digest_key(self.kernel, thread)).encode())
        for other in self.kernel.threads.values():
            if other is not thread:
                h.update(self._stack_of(other))
        h.update(self.cow.digest(self._stacks))
        self.reference.append(h.hexdigest())
        merged = self._merged_at is not None  # past a merge the explorer does not keep the digest
        super()._observe(sid, thread)
        if not merged:
            self.checked.append((self._last or "", self.reference[-1]))

    reference: list[str]
    checked: list[tuple[str, str]]


@pytest.mark.parametrize(
    "name", ["choice_nested_depth", "threads_deadlock_sometimes", "callback_sends_to_thread", "exception_handled_av"]
)
def test_digests_are_those_of_the_defined_texts(name: str) -> None:
    path = next(p for p in SCENARIOS if p.stem == name)
    ex = _ReferenceDigests(load_scenario(path), "dfs")
    ex.reference, ex.checked = [], []
    result = ex.run()
    assert result.complete
    assert len(ex.checked) > 3
    assert all(got == ref for got, ref in ex.checked)
    assert {a["digest"] for _, a in result.graph.lean.nodes(data=True)} <= set(ex.reference)


def _uc() -> Any:
    uc: Any = Machine().uc  # a real Unicorn x86-64 instance (its binding is untyped)
    return uc


def test_cpu_contexts_restore_in_any_order() -> None:
    uc = _uc()
    cpu = CpuContexts(uc)
    saved = []
    for i in range(4):
        uc.reg_write(UC_X86_REG_RAX, 0x1000 + i)
        uc.reg_write(UC_X86_REG_RIP, 0x1000 + 4 * i)
        uc.reg_write(UC_X86_REG_XMM3, (i + 1) << 70 if i % 2 else 0)  # a vector register, past the first chunk
        saved.append(cpu.save())
    for i in (2, 0, 3, 1, 1, 2):
        uc.reg_write(UC_X86_REG_RAX, 0xDEAD)
        cpu.restore(saved[i])
        assert uc.reg_read(UC_X86_REG_RAX) == 0x1000 + i
        assert uc.reg_read(UC_X86_REG_RIP) == 0x1000 + 4 * i
        assert uc.reg_read(UC_X86_REG_XMM3) == ((i + 1) << 70 if i % 2 else 0)


def test_cpu_contexts_share_what_did_not_change() -> None:
    uc = _uc()
    cpu = CpuContexts(uc)
    uc.reg_write(UC_X86_REG_RAX, 1)
    a = cpu.save()
    uc.reg_write(UC_X86_REG_RAX, 2)
    b = cpu.save()
    assert a[1] is b[1]  # only the general registers changed: the rest is one shared tuple
    assert a[0] != b[0]
    uc.reg_write(UC_X86_REG_XMM3, 1 << 100)
    c = cpu.save()
    shared = sum(1 for x, y in zip(b[1], c[1], strict=True) if x is y)
    assert shared == len(b[1]) - 1  # the chunk holding XMM3 is its own, the others are b's
    whole = len(b"".join((a[0], *a[1])))
    assert whole == len(bytes(uc.context_save()))


def test_shared_parts_keep_the_record_and_share_equal_parts() -> None:
    parts = SharedParts()
    stack = bytes(range(64))
    raw1 = (5, 0, "user", CTX, stack, 0x1000, 0, None, None, False, ())
    raw2 = (6, 0, "kernel", CTX, bytes(stack), 0x1000, 0, "NtX", None, False, ())
    s1, s2 = parts.state(raw1), parts.state(raw2)
    assert isinstance(s1, State) and tuple(s1) == (*raw1[:3], s1.context, *raw1[4:])
    assert tuple(s1.context) == CTX and s1.context.rip == CTX[16]
    assert s1.stack is s2.stack and s1.context[1] is s2.context[1]
    assert list(s2) == [6, 0, "kernel", s2.context, stack, 0x1000, 0, "NtX", None, False, ()]


def test_edge_attribute_dicts_are_shared_by_equal_transitions() -> None:
    path: Path = next(p for p in SCENARIOS if p.stem == "choice_nested_depth")
    g = Explorer(load_scenario(path), "bfs").run().graph.lean
    by_info: dict[object, set[int]] = {}
    for _, _, a in g.edges(data=True):
        by_info.setdefault((a["edge"], a.get("also")), set()).add(id(a))
    assert by_info and all(len(ids) == 1 for ids in by_info.values())
    assert len(by_info) < g.number_of_edges()


# --- the digest text from memoised pieces, the lone-thread kernel text, reused memory layers ---
def _raw(tid: int, mode: str, context: tuple[int, ...], tail: tuple[object, ...]) -> tuple[object, ...]:
    """A RawState with these fields (id, stack and stack base do not enter the text)."""
    return (7, tid, mode, context, b"stack", 0x1000, *tail)


@pytest.mark.parametrize(
    ("tid", "mode", "context", "tail"),
    [
        (0, "user", CTX, (0, None, None, False, ())),
        (3, "kernel", CTX, (2, "NtUserMessageCall", 2, True, ((2, "NtUserMessageCall"), (7, "x")))),
        (1, "exited", (0, 2**64 - 1), (0, None, None, 0, ())),  # a 0 where the flag is usually a bool
        (1, "exited", (-1, 2**64 - 1), (0, None, None, 0, ())),  # not a 64-bit word: spelled by repr
        (1, "exited", (0, 2**64), (0, None, None, 0, ())),
        (0, "user", (5,), (0, None, None, False, ())),
        (0, "user", (), (0, None, None, False, ())),
    ],
)
def test_state_pieces_join_to_the_defined_text(
    tid: int, mode: str, context: tuple[int, ...], tail: tuple[object, ...]
) -> None:
    text = DigestText()
    want = _reference_text(tid, mode, context, tail)
    raw = _raw(tid, mode, context, tail)
    assert b"".join(text.state_parts(raw)) == want
    assert b"".join(text.state_parts(raw)) == want  # from the memos this time


def test_state_pieces_keep_a_bool_flag_apart_from_an_equal_int() -> None:
    text = DigestText()
    a = b"".join(text.state_parts(_raw(0, "user", CTX, (0, None, None, False, ()))))
    b = b"".join(text.state_parts(_raw(0, "user", CTX, (0, None, None, 0, ()))))  # 0 == False
    assert a != b and b"False, ()), 18)" in a and b"0, ()), 18)" in b


def test_a_named_tuple_context_is_the_same_state_as_its_values() -> None:
    from emu.context import UserContext

    text = DigestText()
    tail = (0, None, None, False, ())
    named = b"".join(text.state_parts(_raw(0, "user", UserContext._make(CTX), tail)))
    assert named == b"".join(text.state_parts(_raw(0, "user", CTX, tail))) == _reference_text(0, "user", CTX, tail)


def test_registers_that_differ_give_other_texts_and_a_repr_spelling_never_meets_a_packed_one() -> None:
    text = DigestText()
    tail = (0, None, None, False, ())
    seen = {
        b"".join(text.state_parts(_raw(0, "user", CTX[:i] + (CTX[i] + 1,) + CTX[i + 1 :], tail))) for i in range(18)
    }
    seen.add(b"".join(text.state_parts(_raw(0, "user", CTX, tail))))
    seen.add(b"".join(text.state_parts(_raw(0, "user", (-1,) + CTX[1:], tail))))
    assert len(seen) == 20


def _explorer() -> Explorer:
    return Explorer(load_scenario(next(p for p in SCENARIOS if p.stem == "choice_status")), "bfs")


def test_a_lone_threads_kernel_text_is_the_repr_of_its_key() -> None:
    ex = _explorer()
    kernel, thread = ex.kernel, ex.process.thread
    text = DigestText()
    for started, status in [(False, None), (True, None), (True, 1), (True, 0), (True, None), (True, 1)]:
        thread.started, thread.exit_status = started, status
        assert text.kernel_of(kernel, thread) == repr(digest_key(kernel, thread)).encode()
        thread.mode = "exited" if thread.mode != "exited" else "user"
        assert text.kernel_of(kernel, thread) == repr(digest_key(kernel, thread)).encode()


def test_a_take_that_changed_no_page_returns_the_current_layer() -> None:
    ex = _explorer()
    first = ex.cow.take()
    assert ex.cow.take() is first and not ex.cow.took_new
    where = ex.process.thread.stack_base - 8
    ex.cow.on_host_write(where, 8)  # the kernel model writes the stack (a tracked page)
    ex.machine.write(where, b"\x5a" * 8)
    second = ex.cow.take()
    assert second is not first and ex.cow.took_new and second.parent is first
    assert second.page(where & ~0xFFF) == ex.machine.read(where & ~0xFFF, 0x1000)
