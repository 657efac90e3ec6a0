"""The stack signal under a KiUserCallbackDispatcher whose unwind data has no machine frame.

Two ntdll_like variants built by mingw-w64 (tests/fixtures/pe/): a C-function dispatcher in the
"registers" convention (PUSH_NONVOL rbx; ALLOC_LARGE 0x150, the shape of Wine 8's) and a
"stack"-convention one (PUSH_NONVOL rbx; ALLOC_SMALL 0x28). The walk must reach every
UCALLOUT_FRAME the kernel model built, at every depth, from unwind data and, with the unwind
data taken away, from the dispatcher's code; and on Wine 8's real ntdll (tests/real_ntdll.py
fetches it), whose dispatcher is such a C function.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from pe_fixtures import pe_fixtures_or_fail
from real_ntdll import RealNtdllError, install_real_scenarios

from emu.cli.main import main
from emu.detection.prologue import sweep
from emu.detection.signals import combined
from emu.detection.unwind import walk
from emu.detection.view import ThreadView, callout_frame, view_of
from emu.dump import read_minidump, write_minidump
from emu.engine import Run, run
from emu.loader.image import image_from_assembly
from emu.winnt import UCALLOUT_FRAME_SIZE

ROOT = Path(__file__).resolve().parent.parent
PE_DIR = ROOT / "scenarios" / "pe"
CASES = {"c_dispatcher": "registers", "seh_stack_dispatcher": "stack"}


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    built = pe_fixtures_or_fail()
    (PE_DIR / "bin").mkdir(exist_ok=True)
    for dll in built.dlls:
        shutil.copyfile(dll, PE_DIR / "bin" / dll.name)
    return {name: run(PE_DIR / f"{name}.toml") for name in CASES}


def _without_unwind_data(view: ThreadView) -> ThreadView:
    """The same view with every module's .pdata gone (a dump from a tool that kept no headers)."""
    mods = []
    for m in view.modules:
        bare = dataclasses.replace(m, memo={})
        bare.__dict__["function_table"] = ()  # the cached property, filled in as empty
        mods.append(bare)
    return dataclasses.replace(view, modules=tuple(mods))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("unwind_data", [True, False], ids=["unwind-data", "code-only"])
def test_every_callback_frame_is_found_at_every_state(runs: dict[str, Run], name: str, unwind_data: bool) -> None:
    r, convention = runs[name], CASES[name]
    how = ("unwind data" if unwind_data else "dispatcher layout") + f" to a UCALLOUT_FRAME ({convention} convention)"
    checked = 0
    for s in r.trace.states:
        if s.mode == "exited":
            continue
        view = view_of(r, s)
        if not unwind_data:
            view = _without_unwind_data(view)
        w = walk(view)
        apis = [api for api, _ in reversed(s.callbacks)]  # the kernel's callback stack, innermost first
        assert [d.api for d in w.dispatchers] == apis, f"s{s.id}: {w.problem}"
        assert sum(f.how == how for f in w.frames) == len(apis), f"s{s.id}: {[f.how for f in w.frames]}"
        for d in w.dispatchers:  # the frame the kernel wrote: Buffer right above it
            assert d.buffer == d.frame + UCALLOUT_FRAME_SIZE
        if unwind_data:
            assert w.complete, f"s{s.id}: {w.problem}"
        v = combined(view)
        assert v.pending == s.pending, f"s{s.id}: {v}"
        checked += 1
    assert checked > 10 and r.max_depth == 3


def test_the_registers_frame_needs_a_slot_without_a_return_address(runs: dict[str, Run]) -> None:
    """A real return address right below the frame means the dispatcher was called, not entered
    by the kernel: the frame above that slot is not taken."""
    r = runs["c_dispatcher"]
    s = next(s for s in r.trace.states if s.pending)
    view = view_of(r, s)
    w = walk(view)
    inner = w.dispatchers[0]
    entry_slot = inner.frame - 8
    assert view.u64(entry_slot) == 0  # what the kernel model left there
    # Put a genuine return address (after the `call` in program!ProgramMain) into the slot.
    ret = next(f.rip for f in w.frames if r.symbolize(f.rip).startswith("program!ProgramMain"))
    start, data = view.memory[0]
    forged = bytearray(data)
    forged[entry_slot - start : entry_slot - start + 8] = ret.to_bytes(8, "little")
    w2 = walk(dataclasses.replace(view, memory=((start, bytes(forged)),)))
    assert inner.frame not in [d.frame for d in w2.dispatchers]
    assert any(f.rip == ret and f.how == "unwind data" for f in w2.frames)


def test_callout_frame_plausibility() -> None:
    base = 0x10_0000
    stack = bytearray(0x200)

    def frame_at(off: int, buffer: int, length: int, old_rsp: int) -> None:
        stack[off + 0x20 : off + 0x28] = buffer.to_bytes(8, "little")
        stack[off + 0x28 : off + 0x2C] = length.to_bytes(4, "little")
        stack[off + 0x2C : off + 0x30] = (7).to_bytes(4, "little")
        stack[off + 0x48 : off + 0x50] = old_rsp.to_bytes(8, "little")

    def view() -> ThreadView:
        ctx = run(ROOT / "scenarios" / "syscall_basic.toml").trace.states[0].context
        return ThreadView(1, ctx._replace(rsp=base), ((base, bytes(stack)),), ())

    f = base + 0x40
    frame_at(0x40, f + 0x58, 0x10, f + 0x70)
    found = callout_frame(view(), f, f - 8)
    assert found is not None and (found.api, found.buffer, found.length, found.return_slot) == (
        7,
        f + 0x58,
        0x10,
        f - 8,
    )
    frame_at(0x40, f + 0x50, 0x10, f + 0x70)  # Buffer inside the frame
    assert callout_frame(view(), f, f - 8) is None
    frame_at(0x40, f + 0x58, 0x20, f + 0x70)  # input runs past the saved RSP
    assert callout_frame(view(), f, f - 8) is None
    frame_at(0x40, f + 0x58, 0x10, base + 0x208)  # saved RSP beyond the stack range
    assert callout_frame(view(), f, f - 8) is None
    frame_at(0x40, f + 0x58, 0x10, base + 0x200)  # at its end: fine
    assert callout_frame(view(), f, f - 8) is not None
    assert callout_frame(view(), base + 0x1C0, 0) is None  # the frame itself runs past the range


def test_sweep_follows_branches_to_a_call_after_a_return() -> None:
    """Compiled code puts an early `ret` between the prologue and the call a return address
    follows (Wine 8's dispatcher tests a setjmp result first); the sweep goes around it."""
    image = image_from_assembly(
        "m", 0x7FF0_0000_0000,
        """
f:
    push rbx
    sub rsp, 0x150
    test eax, eax
    je body
    add rsp, 0x150
    pop rbx
    ret
body:
    call rax
after:
    int3
""",
    )  # fmt: skip
    found = sweep(image, image.symbols["f"], image.symbols["after"])
    assert found is not None and found.delta == 0x158 and found.saved == {3: 8}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_pending_state_dumped_gives_the_live_verdict(
    runs: dict[str, Run], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`emu detect --json` live, then `emu dump` of each pending state and `emu detect --dump --json`."""
    path = str(PE_DIR / f"{name}.toml")
    assert main(["detect", "--json", path]) == 0
    live = json.loads(capsys.readouterr().out)
    assert [d["depth"] for d in live] == [3, 2, 1]
    for d in live:
        out = tmp_path / f"s{d['state']}.dmp"
        assert main(["dump", path, "--state", f"s{d['state']}", "-o", str(out)]) == 0
        capsys.readouterr()
        assert main(["detect", "--dump", str(out), "--json"]) == 0
        [got] = json.loads(capsys.readouterr().out)
        assert {**got, "state": d["state"], "thread": d["thread"]} == d


# --- the real thing: Wine 8's PE ntdll, whose dispatcher is a C function -----------------------
REAL_SCENARIOS = sorted((ROOT / "scenarios" / "real").glob("*.toml"))


@pytest.fixture(scope="module")
def real_runs() -> dict[str, Run]:
    try:
        install_real_scenarios()
    except (RealNtdllError, RuntimeError) as e:
        pytest.fail(f"cannot fetch the real ntdll: {e}", pytrace=False)
    return {p.stem: run(p) for p in REAL_SCENARIOS}


def test_real_ntdll_every_state_live_and_from_its_dump(real_runs: dict[str, Run]) -> None:
    """On Wine's ntdll, with default settings: the combined detector equals the kernel model's
    truth at every state, each pending state's walk reaches the thread's first frame through
    the dispatcher's own unwind data, and a minidump of every state gives the live verdict."""
    depths = set()
    for name, r in real_runs.items():
        for s in r.trace.states:
            view = view_of(r, s)
            v = combined(view)
            assert v.pending == s.pending, f"{name} s{s.id}: {v}"
            [dumped, *_] = read_minidump(write_minidump(r, s), f"{name}.dmp").threads()
            got = combined(dumped)
            assert got.pending == v.pending, f"{name} s{s.id}: {got}"
            if v.detection is not None and got.detection is not None:
                live_fields = dataclasses.replace(v.detection, thread=0)
                assert dataclasses.replace(got.detection, thread=0) == live_fields, f"{name} s{s.id}"
            if s.pending:
                w = v.stack.walk
                assert w is not None and w.complete, f"{name} s{s.id}: {w and w.problem}"
                how = "unwind data to a UCALLOUT_FRAME (registers convention)"
                assert sum(f.how == how for f in w.frames) == v.stack.depth == len(s.callbacks)
                depths.add(v.stack.depth)
    assert depths == {1, 2, 3}
