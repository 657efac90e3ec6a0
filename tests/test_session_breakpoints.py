"""A session's breakpoints change nothing: the same trace, state for state, as ``emu.run``.

The built-in ntdll serves its ``Rtl*`` exception routines with Python traps on their own
``ret``. A breakpoint there must stop before the trap acts, so that the trap acts once when
the session goes on (by :meth:`Session.cont`, :meth:`Session.step_instruction` or
:meth:`Session.finish`), as in a run with no breakpoint at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SCENARIOS
from emu.api import Run
from emu.session import Session


def _same(s: Session, ref: Run) -> None:
    got = s.finish()
    assert got.stop == ref.stop
    assert got.trace.raw_transitions == ref.trace.raw_transitions
    assert got.trace.raw_states == ref.trace.raw_states


def _ntdll_symbols(s: Session) -> set[int]:
    return {a for img in s.process.images if img.name.lower() == "ntdll" for a in img.symbols.values()}


def _traps(s: Session) -> set[int]:
    rtl = s.process.rtl
    return set(rtl.handlers) if rtl is not None else set()


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_breakpoints_on_every_ntdll_symbol_leave_the_run_unchanged(path: Path, shipped_runs: dict[str, Run]) -> None:
    s = Session(path)
    traps = _traps(s)
    for address in _ntdll_symbols(s) | traps:
        s.add_breakpoint(address)
    hits, at_traps, stepped = 0, 0, 0
    while not s.done and hits < 100_000:
        s.cont()  # from a breakpoint: its own instruction first
        if s.hit is None:
            break
        assert s.regs.rip == s.hit and s.hit in s.breakpoints
        hits += 1
        at_traps += s.hit in traps
        if s.hit in traps and at_traps % 2:
            # Every other trap is left by one instruction: the trap's work and its `ret`. A trap
            # is a leaf routine: the `ret` takes the thread back out (Intel SDM, RET).
            s.step_instruction()
            stepped += 1
            assert s.done or s.regs.rip not in traps
    assert s.done
    assert hits  # every scenario enters the kernel through an ntdll stub at least once
    _same(s, shipped_runs[path.stem])
    if "exception" in path.stem and s.process.rtl is not None:
        assert stepped  # the built-in exception dispatch runs through its traps


def test_a_vectored_handler_added_under_a_breakpoint_is_added_once(root: Path, shipped_runs: dict[str, Run]) -> None:
    s = Session(root / "scenarios" / "exception_int3.toml")
    s.run_to("ntdll!RtlAddVectoredExceptionHandler")
    assert s.process.rtl is not None and s.process.rtl.vectored_entries(0) == []  # stopped before the trap acted
    rsp, back = s.regs.rsp, s.read_u64(s.regs.rsp)
    assert s.step_instruction() == []
    # The call returned to its caller with a handle (MS docs, AddVectoredExceptionHandler:
    # "a handle to the exception handler"), popping its return address.
    assert (s.regs.rip, s.regs.rsp) == (back, rsp + 8) and s.symbol(back).startswith("app!")
    added = s.process.rtl.vectored_entries(0)
    assert len(added) == 1 and s.regs.rax == added[0] != 0
    _same(s, shipped_runs["exception_int3"])
