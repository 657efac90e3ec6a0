"""The explorer's cheaper paths give the same texts and layers as the plain ones."""

from __future__ import annotations

import pytest

from conftest import SCENARIOS
from emu.exploration.digest import DigestText
from emu.exploration.explorer import Explorer
from emu.kernel.fork import digest_key
from emu.scenario import load_scenario

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


def _raw(tid: int, mode: str, context: tuple[int, ...], tail: tuple[object, ...]) -> tuple[object, ...]:
    """A RawState with these fields (id, stack and stack base do not enter the text)."""
    return (7, tid, mode, context, b"stack", 0x1000, *tail)


@pytest.mark.parametrize(
    ("tid", "mode", "context", "tail"),
    [
        (0, "user", CTX, (0, None, None, False, ())),
        (3, "kernel", CTX, (2, "NtUserMessageCall", 2, True, ((2, "NtUserMessageCall"), (7, "x")))),
        (1, "exited", (-1, 2**64 - 1), (0, None, None, 0, ())),  # a 0 where the flag is usually a bool
        (0, "user", (5,), (0, None, None, False, ())),  # a 1-tuple's repr has a trailing comma
        (0, "user", (), (0, None, None, False, ())),
    ],
)
def test_state_pieces_join_to_the_repr_of_the_tuple(
    tid: int, mode: str, context: tuple[int, ...], tail: tuple[object, ...]
) -> None:
    text = DigestText()
    want = repr((tid, mode, context, tail)).encode()
    raw = _raw(tid, mode, context, tail)
    assert b"".join(text.state_parts(raw)) == want
    assert b"".join(text.state_parts(raw)) == want  # from the memos this time


def test_state_pieces_keep_a_bool_flag_apart_from_an_equal_int() -> None:
    text = DigestText()
    a = b"".join(text.state_parts(_raw(0, "user", CTX, (0, None, None, False, ()))))
    b = b"".join(text.state_parts(_raw(0, "user", CTX, (0, None, None, 0, ()))))  # 0 == False
    assert a.endswith(b"False, ()))") and b.endswith(b"0, ()))")


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
