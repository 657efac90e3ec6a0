"""Session snapshots across a stack that grew: the regions mapped since (or unmapped) come back
as the snapshot had them, in memory and from a file."""

from __future__ import annotations

from pathlib import Path

from conftest import asm_scenario
from emu.api import run
from emu.scenario import Scenario, parse_scenario
from emu.session import Session
from emu.session_snapshot import Snapshot

# Touch 0x44 pages below RSP, one at a time (as __chkstk probes): each touch of the guard page
# commits it and puts a new guard page below (MiCheckForUserStackOverflow, WRK mm/mmfault.c:
# the reserve left below the guard page is the room the stack grows into).
PROBE = """
main:
    mov rax, rsp
    mov rcx, 0x44
probe:
    sub rax, 0x1000
    mov byte ptr [rax], 1
    dec rcx
    jnz probe
    xor eax, eax
    ret
"""


def scenario() -> Scenario:
    return parse_scenario(asm_scenario(PROBE, extra="[machine]\nstack_reserve = 0x10000\n"), "t.toml")


def test_going_back_before_the_stack_grew_unmaps_what_it_mapped() -> None:
    sc = scenario()
    ref = run(sc)
    assert ref.error is None and [t.kind for t in ref.trace.transitions] == ["syscall", "exit"]
    s = Session(sc)
    first, before = s.snapshot(), list(s.process.machine.regions)
    s.finish()
    assert len(s.process.machine.regions) > len(before)  # the stack grew: guard pages moved down
    s.restore(first)
    assert s.process.machine.regions == before
    assert s.finish().trace.raw_transitions == ref.trace.raw_transitions


def test_a_file_taken_after_the_stack_grew_maps_it_in_a_fresh_session(tmp_path: Path) -> None:
    sc = scenario()
    ref = run(sc)
    s = Session(sc)
    start = len(s.process.machine.regions)
    while len(s.process.machine.regions) < start + 3:
        s.step_instruction()
    s.snapshot().save(tmp_path / "grown.snap")
    grown = list(s.process.machine.regions)
    fresh = Session(sc)
    fresh.restore(Snapshot.load(tmp_path / "grown.snap"))
    assert fresh.process.machine.regions == grown
    assert fresh.finish().trace.raw_transitions == ref.trace.raw_transitions
