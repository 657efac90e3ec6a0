"""``emu debug`` on scenarios that start from a dump (``[start] dump``), with a real GDB client,
and a Session and the debug target starting such a run as ``emu run`` does.

The dumps are written by emu itself (``emu.dump``) from callback_roundtrip and
exception_unhandled_av; the expected places come from the sources, as in test_gdb_remote:
NtCallbackReturn hands the callback's status to the service that called back, whose own
``syscall`` returns with RAX = that status (WRK ke/amd64/callout.asm); a fault the kernel has
recorded is delivered to ntdll!KiUserExceptionDispatcher (WRK ke/amd64/exceptn.c
KiDispatchException), not raised again by running the faulting instruction.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_gdb_remote import emu_debug, gdb, needs_gdb, register, syscall_in

import emu
from emu.api import Run, build
from emu.debug.target import DebugTarget
from emu.dump import write_minidump
from emu.dump.live import capture_state
from emu.scenario import load_scenario
from emu.session import Session

ROOT = Path(__file__).resolve().parent.parent


def dump_scenario(tmp_path: Path, name: str, pick: str) -> Path:
    """A scenario file whose ``[start] dump`` is ``name`` dumped at its first state of kind ``pick``
    (a transition kind into it, or "pending"), with the original's services."""
    path = ROOT / "scenarios" / f"{name}.toml"
    original = emu.run(path)
    if pick == "pending":
        sid = next(s.id for s in original.trace.states if s.pending)
    else:
        sid = next(t.dst for t in original.trace.transitions if t.kind == pick)
    again, live = capture_state(original.scenario, sid)
    write_minidump(again, again.trace.state(sid), tmp_path / "start.dmp", live=live)
    text = path.read_text(encoding="utf-8").split("[[expect]]")[0]
    # The dump holds the modules, threads and memory: keep the profile and the services.
    keep = [block for block in text.split("\n[") if block.startswith(("services", "profile", "machine"))]
    header = f'[scenario]\nname = "from_{name}"\nprofile = "win10-22h2"\n\n[start]\ndump = "start.dmp"\n'
    out = tmp_path / "from_dump.toml"
    out.write_text(header + "".join("\n[" + b for b in keep), encoding="utf-8")
    return out


def transitions(r: Run) -> list[tuple[object, ...]]:
    return [(t.kind, t.service, t.rip_symbol, t.status, t.detail) for t in r.trace.transitions]


@pytest.mark.parametrize(
    ("name", "pick"), [("callback_roundtrip", "callback"), ("callback_roundtrip", "pending"),
                       ("exception_unhandled_av", "exception"), ("exception_handled_av", "exception")],
)  # fmt: skip
def test_a_session_and_the_debug_target_start_a_dump_as_emu_run_does(tmp_path: Path, name: str, pick: str) -> None:
    scenario = load_scenario(dump_scenario(tmp_path, name, pick))
    ref = emu.run(scenario)
    assert Session(scenario).finish().stop == ref.stop
    s = Session(scenario)
    while not s.done:
        s.step_instruction(50)
    assert transitions(s.finish()) == transitions(ref)
    target = DebugTarget(build(scenario))
    while target.ended is None:
        target.resume()
    assert transitions(Run.of(target.result())) == transitions(ref)


def test_a_dump_of_a_finished_run_is_over_for_the_debugger_too(tmp_path: Path) -> None:
    scenario = load_scenario(dump_scenario(tmp_path, "callback_roundtrip", "exit"))
    target = DebugTarget(build(scenario))
    assert target.ended is not None and target.ended.kind == "exited" and target.ended.code == 0x1234
    assert Session(scenario).finish().exit_status == 0x1234


@needs_gdb
def test_gdb_on_a_dump_in_a_callback_breaks_steps_across_the_syscall_and_reads_registers(tmp_path: Path) -> None:
    scenario = dump_scenario(tmp_path, "callback_roundtrip", "callback")
    p = build(scenario)
    on_message, dispatcher = p.resolve("app!on_message", ()), p.resolve("ntdll!KiUserCallbackDispatcher", ())
    leave = syscall_in(p.resolve("ntdll!ZwCallbackReturn", ()), scenario)
    enter = syscall_in(p.resolve("win32u!NtUserMessageCall", ()), scenario)
    with emu_debug(scenario) as server:
        out = gdb(
            server.port, "info registers rip", "monitor callbacks", f"break *{on_message:#x}", "continue",
            "info registers rip", "delete", f"break *{leave:#x}", "continue", "stepi", "info registers rip rax",
            "monitor callbacks", "continue",
        )  # fmt: skip
        code, stdout, stderr = server.finish()
    rips = register(out, "rip")
    # The dump's thread is in KiUserCallbackDispatcher, one callback deep (api 2).
    assert rips[0] == dispatcher and "depth 1: api 2 for NtUserMessageCall" in out, out
    assert rips[1] == on_message
    # Across ZwCallbackReturn's syscall: back after NtUserMessageCall's own, RAX = 0x1234.
    assert rips[2] == enter + 2 and register(out, "rax")[-1] == 0x1234, out
    assert "no callback in progress" in out
    assert "exited with code 064" in out and code == 0, stderr
    assert "callback_return" in stdout and "ZwCallbackReturn+0x14" in stdout


@needs_gdb
def test_gdb_on_a_dump_of_a_recorded_fault_starts_in_the_exception_dispatcher(tmp_path: Path) -> None:
    scenario = dump_scenario(tmp_path, "exception_unhandled_av", "exception")
    dispatcher = build(scenario).resolve("ntdll!KiUserExceptionDispatcher", ())
    with emu_debug(scenario) as server:
        out = gdb(server.port, "info registers rip", "continue")
        code, stdout, stderr = server.finish()
    assert register(out, "rip")[0] == dispatcher, out
    assert stdout.count("access violation writing 0x10") == 0  # the fault is not taken a second time
    assert "second chance" in stdout and code == 0, stderr
