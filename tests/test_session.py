"""emu.Session: stepping a scenario by hand gives the run emu.run gives, and what it shows
on the way is what the sources say the CPU and the kernel hold there."""

from __future__ import annotations

import importlib
import pkgutil
import types
from pathlib import Path

import pytest

import emu
from conftest import SCENARIOS
from emu.api import Run
from emu.session import Session


def recorded(r: Run) -> bytes:
    """Everything a run recorded, as bytes: states (with their stack bytes), transitions, how it ended."""
    return repr((r.trace.raw_states, r.trace.raw_transitions, r.stop, str(r.error), r.exit_status)).encode()


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_a_session_stepped_to_the_end_records_what_emu_run_records(path: Path, shipped_runs: dict[str, Run]) -> None:
    s = Session(path)
    steps = 0
    while not s.done:
        got = s.step()
        assert got or s.done, "a step that records nothing must end the run"
        steps += 1
    r = s.finish()
    assert recorded(r) == recorded(shipped_runs[path.stem])
    assert r.graph.to_json() == shipped_runs[path.stem].graph.to_json()
    assert 1 <= steps <= len(r.trace)


@pytest.mark.parametrize("name", ["callback_roundtrip", "threads_no_deadlock", "exception_in_callback_handled"])
def test_instruction_by_instruction_records_the_same(name: str, root: Path, shipped_runs: dict[str, Run]) -> None:
    s = Session(root / "scenarios" / f"{name}.toml")
    count = 0
    while not s.done:
        s.step_instruction()
        count += 1
    assert recorded(s.finish()) == recorded(shipped_runs[name])
    assert count > len(shipped_runs[name].trace)


def test_run_to_zw_callback_return_stops_before_its_first_instruction(root: Path) -> None:
    s = emu.open(root / "scenarios" / "callback_roundtrip.toml")
    s.run_to("ntdll!ZwCallbackReturn")
    stub = s.address("ntdll!ZwCallbackReturn")
    assert s.regs.rip == stub
    # The dispatcher called it (ReactOS dispatch.S: `call ZwCallbackReturn`): [RSP] returns into it.
    assert s.symbol(s.read_u64(s.regs.rsp)).startswith("ntdll!KiUserCallbackDispatcher")
    # One callback in progress: api 2, called back by NtUserMessageCall, whose own syscall
    # returns right after the `syscall` in win32u's stub.
    (frame,) = s.callback_stack()
    assert (frame.api, frame.service) == (2, "NtUserMessageCall")
    assert s.symbol(frame.return_rip) == "win32u!NtUserMessageCall+0x14"
    assert s.state.mode == "user" and s.state.depth == 1


def test_stepping_across_the_syscall_shows_the_kernel_complete_the_callback(root: Path) -> None:
    s = Session(root / "scenarios" / "callback_roundtrip.toml")
    # Win10 stub: mov r10,rcx; mov eax,N; test byte [7FFE0308h],1; jne; syscall at +0x12.
    s.run_to("ntdll!ZwCallbackReturn+0x12")
    assert s.read(s.regs.rip, 2) == b"\x0f\x05"
    got = s.step_instruction()
    assert [t.kind for t in got] == ["syscall", "callback_return", "sysret"]
    assert s.trace.state(got[0].dst).pending  # the seed's state, on the way
    # NtCallbackReturn hands the callback's status (0x1234) to the service, which returns it
    # from the original syscall: RAX = status, RIP after win32u's `syscall`.
    assert s.symbol(s.regs.rip) == "win32u!NtUserMessageCall+0x14"
    assert s.regs.rax == 0x1234
    assert s.callback_stack() == []


def test_a_register_written_before_the_syscall_changes_the_service(root: Path) -> None:
    s = Session(root / "scenarios" / "syscall_basic.toml")
    s.run_to("ntdll!NtClose+0x12")
    s.regs.rax = 0xFFF  # an SSN past the end of the service table
    (entry, ret) = s.step_instruction()
    # KiSystemCall64 fails a number beyond the table's limit with STATUS_INVALID_SYSTEM_SERVICE.
    assert (entry.kind, ret.kind, ret.status) == ("syscall", "sysret", 0xC000001C)
    assert s.regs["eax"] == 0xC000001C
    r = s.finish()
    assert r.exit_status == 0xC000001C  # main keeps the first status and returns it


def test_memory_reads_and_writes_and_their_errors(root: Path) -> None:
    s = Session(root / "scenarios" / "syscall_basic.toml")
    s.run_to("app!main")
    rsp = s.regs.rsp
    s.write_u64(rsp - 0x100, 0x1122334455667788)
    assert s.read(rsp - 0x100, 8) == bytes.fromhex("8877665544332211")
    with pytest.raises(emu.EmuError, match="not mapped"):
        s.read(0x10, 8)
    with pytest.raises(KeyError, match="names no symbol"):
        s.run_to("ntdll!NoSuchExport")


def test_run_until_a_predicate_and_to_a_state(root: Path, shipped_runs: dict[str, Run]) -> None:
    s = Session(root / "scenarios" / "nested_callbacks.toml")
    s.run_until(lambda s: len(s.callback_stack()) == 3)
    assert [f.api for f in s.callback_stack()] == [t.api for t in s.trace if t.kind == "callback"][:3]
    pending = next(st.id for st in shipped_runs["nested_callbacks"].trace.states if st.pending)
    s2 = Session(root / "scenarios" / "nested_callbacks.toml")
    s2.run_to_state(pending)
    assert s2.trace.state(pending).pending
    assert s.threads[0].name == "thread0" and s.thread is s.threads[0]


def test_breakpoints_stop_cont_each_time_and_nothing_else(root: Path, shipped_runs: dict[str, Run]) -> None:
    path = root / "scenarios" / "nested_callbacks.toml"
    s = Session(path)
    stub = s.add_breakpoint("ntdll!ZwCallbackReturn")
    depths = []
    while True:
        s.cont()
        if s.hit is None:
            break
        assert s.regs.rip == stub
        depths.append(len(s.callback_stack()))
    # Callbacks nest three deep and return innermost first: each NtCallbackReturn pops one frame.
    assert depths == [3, 2, 1]
    assert s.done and recorded(s.finish()) == recorded(shipped_runs["nested_callbacks"])
    stepped = Session(path)
    stepped.add_breakpoint(stub)
    while not stepped.done:
        stepped.step()  # steps do not stop at breakpoints
    assert recorded(stepped.finish()) == recorded(shipped_runs["nested_callbacks"])
    stepped.remove_breakpoint(stub)
    assert stepped.breakpoints == []


# --- module names and function names ---------------------------------------------------------
def test_detect_score_and_explore_are_both_modules_and_functions(root: Path) -> None:
    import emu.detect as d
    import emu.explore as x
    import emu.score as sc

    assert isinstance(d, types.ModuleType) and isinstance(sc, types.ModuleType) and isinstance(x, types.ModuleType)
    r = emu.run(root / "scenarios" / "callback_roundtrip.toml")
    state = r.detections[0].state
    assert state is not None
    view = d.view_of(r, r.trace.state(state))
    assert d.detect_callback_return_pending(view) is not None
    assert emu.detect(view) == d.detect(view)
    found = emu.detect(r)
    assert isinstance(found, list) and [e.state for e in found] == [e.state for e in r.detections]
    assert vars(emu)["explore"] is x and x.explore is not None and sc.score is not None
    import emu.cli.main as cli_main

    assert isinstance(cli_main, types.ModuleType) and callable(cli_main)


def test_no_package_attribute_hides_one_of_its_modules() -> None:
    for info in pkgutil.walk_packages(emu.__path__, "emu."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        parent, _, leaf = info.name.rpartition(".")
        assert getattr(importlib.import_module(parent), leaf) is module, f"{parent}.{leaf} is not the module"


def test_the_readme_python_api_example_prints_what_its_comments_say(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (root / "README.md").read_text()
    section = text[text.index("## Python API") :]
    code = section[
        section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python"))
    ]
    monkeypatch.chdir(root)
    exec(compile(code.replace('"roundtrip.snap"', repr(str(tmp_path / "rt.snap"))), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    promised = [line.split("# ", 1)[1].split(":")[0] for line in code.splitlines() if line.startswith("print(")]
    assert printed == promised
    assert (tmp_path / "rt.snap").stat().st_size > 0


def test_every_dotted_emu_name_in_the_prose_resolves(root: Path) -> None:
    """README, docs and notebooks name modules and functions as ``emu.x.y``: each one imports."""
    import json
    import re

    texts = {p.name: p.read_text() for p in [root / "README.md", *root.glob("docs/*.md")]}
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        texts[nb.name] = "\n".join("".join(c["source"]) for c in cells)

    def resolves(name: str) -> bool:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for part in parts[i:]:
                if not hasattr(obj, part):
                    return False
                obj = getattr(obj, part)
            return True
        return False

    named = {
        (where, m.group(0)) for where, text in texts.items() for m in re.finditer(r"(?<![\w/])emu(?:\.\w+)+", text)
    }
    broken = sorted((where, name) for where, name in named if not resolves(name))
    assert not broken, broken


def test_before_the_first_step_the_registers_are_the_thread_s_entry_context(root: Path) -> None:
    s = emu.open(root / "scenarios" / "syscall_basic.toml")
    assert s.regs.context() == s.trace.state(0).context
    assert s.symbol(s.regs.rip) == "ntdll!RtlUserThreadStart"
    s.regs.rbx = 0x5151  # nonvolatile: the thread start leaves it alone for one instruction
    s.step_instruction()
    assert s.regs.rbx == 0x5151


def test_a_predicate_that_raises_stops_the_session_intact(root: Path, shipped_runs: dict[str, Run]) -> None:
    s = Session(root / "scenarios" / "nested_callbacks.toml")

    def broken(session: Session) -> bool:
        if session.callback_stack():
            raise ZeroDivisionError("the predicate's own bug")
        return False

    with pytest.raises(ZeroDivisionError, match="own bug"):
        s.run_until(broken)
    assert len(s.callback_stack()) == 1 and not s.done
    assert recorded(s.finish()) == recorded(shipped_runs["nested_callbacks"])
