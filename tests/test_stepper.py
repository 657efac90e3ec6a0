"""The Jupyter stepper: one transition at a time, forwards and back, as a widget and as static pages."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SCENARIOS
from emu.api import Run
from emu.stepper import Stepper, static_steps


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_static_pages_show_every_transition_of_the_run(path: Path, shipped_runs: dict[str, Run]) -> None:
    ref = shipped_runs[path.stem]
    panels = list(static_steps(path))
    assert len(panels) == len(ref.trace) + 1
    assert panels[0].title.startswith("step 0: ")
    for k, (panel, t) in enumerate(zip(panels[1:], ref.trace), start=1):
        assert panel.title.startswith(f"step {k}: {t.kind} ")
        assert ("[callback-return pending]" in panel.title) == ref.trace.state(t.dst).pending


def test_the_pending_state_gets_its_own_step_with_its_stack_and_callbacks(root: Path) -> None:
    panels = list(static_steps(root / "scenarios" / "callback_roundtrip.toml"))
    (pending,) = [p for p in panels if "[callback-return pending]" in p.title]
    assert "syscall NtCallbackReturn" in pending.title and "ntdll!ZwCallbackReturn+0x14" in pending.title
    # In the seed's state [RSP] is the return into the dispatcher that called ZwCallbackReturn,
    # and the callback (api 2, from NtUserMessageCall) is still on the thread's callback stack.
    first_word = pending.stack.splitlines()[1]
    assert "rsp+0x000" in first_word and "ret -> ntdll!KiUserCallbackDispatcherContinue" in first_word
    assert "1. api 2 from NtUserMessageCall" in pending.callbacks
    # The kernel-mode state shows the trap frame's user context: RIP after the `syscall`, and
    # RCX holding that same RIP (Intel SDM SYSCALL: RCX <- RIP of the next instruction).
    lines = {line[2:8].strip(): line for line in pending.registers.splitlines()[1:]}
    assert lines["rip"].endswith("ntdll!ZwCallbackReturn+0x14") and lines["rcx"].endswith("ntdll!ZwCallbackReturn+0x14")
    assert "<pre>" in pending.html


def test_the_widget_steps_back_and_forth_and_leaves_the_run_as_emu_run_records_it(
    root: Path, shipped_runs: dict[str, Run]
) -> None:
    pytest.importorskip("ipywidgets")
    st = Stepper(root / "scenarios" / "nested_callbacks.toml")
    box = st.widget()
    step, instruction, back, restart, to_end = box.children[0].children
    title, picture = box.children[1], box.children[2]
    assert "step 0" in title.value and back.disabled
    step.click()
    step.click()
    assert "step 2: callback" in title.value
    assert bytes(picture.value).startswith(b"\x89PNG")
    instruction.click()
    assert "instruction step: ntdll!KiUserCallbackDispatcher+" in title.value
    back.click()
    assert "step 2: callback" in title.value
    to_end.click()
    assert "the run ended (exit)" in title.value and step.disabled
    restart.click()
    assert "step 0" in title.value
    r = st.session.finish()
    ref = shipped_runs["nested_callbacks"]
    assert r.trace.raw_transitions == ref.trace.raw_transitions and r.trace.raw_states == ref.trace.raw_states
