"""Suspended (generator) Python services in snapshots and dumps: rebuilt from their journal when
the file is loaded, or refused in one line naming the service when that cannot be done."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
from pathlib import Path

import pytest

from emu.api import run
from emu.cli.main import main
from emu.errors import ExtensionError
from emu.scenario import parse_scenario
from emu.session import Session
from emu.session_snapshot import Snapshot

MODULE = """
from emu.services import HANDLE, ULONG, ServiceRegistry, UserCallback

registry = ServiceRegistry()


@registry.syscall("NtUserMessageCall")
def message_call(ctx, hwnd: HANDLE, msg: ULONG):
    build = ctx.read(0x7FFE0260, 4)  # KUSER_SHARED_DATA.NtBuildNumber: journaled, not read again
    first = yield UserCallback(2, b"first" + build)
    second = yield UserCallback(2, b"second")
    return (first.status + second.status) & 0xFFFFFFFF


calls = [0]
forgetful = ServiceRegistry()


@forgetful.syscall("NtUserMessageCall")
def counting_call(ctx, hwnd: HANDLE, msg: ULONG):
    calls[0] += 1  # Python state outside the journal: a replay sees another count
    first = yield UserCallback(2, b"call %d" % calls[0])
    return first.status
"""

SCENARIO = """
[scenario]
name = "generator"
profile = "win10-22h2"

[python]
services = "{ref}"

[[module]]
name = "app"
code = '''
main:
    sub rsp, 0x28
    xor ecx, ecx
    mov edx, 0x000F
    call NtUserMessageCall
    add rsp, 0x28
    ret

on_message:                   ; returns the input's length (EDX)
    mov eax, edx
    ret
'''

[thread]
entry = "app!main"

[kernel_callback_table]
size = 4
2 = "app!on_message"
"""

_names = itertools.count()


def scenario_file(tmp_path: Path, attr: str) -> tuple[Path, str]:
    module = f"gen_services_{next(_names)}"
    (tmp_path / f"{module}.py").write_text(MODULE, encoding="utf-8")
    path = tmp_path / "generator.toml"
    path.write_text(SCENARIO.replace("{ref}", f"{module}:{attr}"), encoding="utf-8")
    return path, module


def test_a_snapshot_file_inside_a_callback_resumes_the_generator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path, _ = scenario_file(tmp_path, "registry")
    snap, py = str(tmp_path / "mid.snap"), "--allow-python"
    # The callbacks return their input's length: "first" + 4 bytes, then "second": 9 + 6.
    assert main(["snapshot", str(path), "--to", "app!on_message", "-o", snap, py]) == 0
    capsys.readouterr()
    assert main(["run", "--json", str(path), py]) == 0
    whole = capsys.readouterr().out
    assert main(["run", "--json", str(path), py, "--from-snapshot", snap]) == 0
    assert capsys.readouterr().out == whole
    assert run(parse_scenario(path.read_text(encoding="utf-8"), str(path), allow_python=True)).exit_status == 9 + 6


def test_a_dump_inside_the_service_resumes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = scenario_file(tmp_path, "registry")
    dump = str(tmp_path / "p.dmp")
    assert main(["dump", str(path), "--state", "pending", "-o", dump, "--allow-python"]) == 0
    scenario = parse_scenario(path.read_text(encoding="utf-8"), str(path), allow_python=True)
    whole = run(scenario)
    resumed = run(dataclasses.replace(scenario, start_dump=dump))
    assert resumed.error is None and resumed.exit_status == whole.exit_status == 9 + 6
    later = [(t.kind, t.status, t.data) for t in whole.trace.transitions][3:]
    assert [(t.kind, t.status, t.data) for t in resumed.trace.transitions] == later


def test_a_generator_that_keeps_python_state_is_refused_in_one_line(tmp_path: Path) -> None:
    path, _ = scenario_file(tmp_path, "forgetful")
    scenario = parse_scenario(path.read_text(encoding="utf-8"), str(path), allow_python=True)
    s = Session(scenario)
    s.run_to("app!on_message")
    with pytest.raises(ExtensionError) as e:
        s.snapshot()  # a snapshot keeps a rebuilt copy of the suspended service
    message = str(e.value)
    assert "\n" not in message and message.startswith("service NtUserMessageCall cannot be resumed: ")
    assert "call 2" in message and "call 1" in message and "its own Python state cannot be saved" in message


def test_a_file_whose_service_now_goes_another_way_is_refused_in_one_line(tmp_path: Path) -> None:
    path, module = scenario_file(tmp_path, "registry")
    scenario = parse_scenario(path.read_text(encoding="utf-8"), str(path), allow_python=True)
    s = Session(scenario)
    s.run_to("app!on_message")
    s.snapshot().save(tmp_path / "mid.snap")
    # The same service, changed since the file was written: it now yields another first callback.
    importlib.import_module(module).registry.get("NtUserMessageCall").func.__code__ = compile(
        "def f(ctx, hwnd, msg):\n    first = yield __import__('emu.services').services.UserCallback(3, b'x')\n",
        "",
        "exec",
    ).co_consts[0]
    fresh = Session(scenario)
    with pytest.raises(ExtensionError, match=r"^service NtUserMessageCall cannot be resumed: replayed from its journal it yielded UserCallback\(api=3"):  # fmt: skip
        fresh.restore(Snapshot.load(tmp_path / "mid.snap"))


def test_debug_and_dump_load_the_scenarios_python_only_when_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path, _ = scenario_file(tmp_path, "registry")
    for command in (["debug", str(path), "--gdb", "127.0.0.1:0"], ["dump", str(path), "--state", "1", "-o", str(tmp_path / "d.dmp")]):  # fmt: skip
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--allow-python" in err, err
    s = __import__("emu").open(path, allow_python=True)
    assert s.finish().exit_status == 9 + 6
