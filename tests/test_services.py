"""Python kernel services: typed arguments, forking in the explorer, loading and binding, failures."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from conftest import asm_scenario
from emu.api import run
from emu.cli.main import main
from emu.dump import write_minidump
from emu.dump.live import capture_state
from emu.errors import ExtensionError, ScenarioError
from emu.exploration.explorer import explore
from emu.kernel.services import Activation, ServiceGen, _JournalContext
from emu.scenario import parse_scenario
from emu.services import HANDLE, ULONG, ULONG_PTR, CallbackResult, Choice, Ptr, ServiceRegistry, UserCallback

# Two NtQuerySystemInformation calls on one 4-byte cell on the stack; main returns the
# second call's status. The ntdll stubs take the arguments in RCX (moved to R10), RDX, R8, R9.
COUNTER = """
main:
    sub rsp, 0x38
    mov dword ptr [rsp+0x30], 0
    mov ecx, 5
    lea rdx, [rsp+0x30]
    mov r8d, 4
    xor r9d, r9d
    call NtQuerySystemInformation
    mov ecx, 5
    lea rdx, [rsp+0x30]
    mov r8d, 4
    xor r9d, r9d
    call NtQuerySystemInformation
    add rsp, 0x38
    ret
"""

COUNTER_MODULE = """
from emu.services import ULONG, Choice, Ptr, ServiceRegistry

registry = ServiceRegistry()


@registry.syscall("NtQuerySystemInformation")
def query(ctx, Class: ULONG, Info: Ptr, Length: ULONG, ReturnLength: Ptr):
    n = int.from_bytes(ctx.read(Info, 4), "little")
    step = yield Choice("step", ("one", "two"), "one")
    n += 1 if step == "one" else 2
    ctx.write(Info, n.to_bytes(4, "little"))
    return n
"""

_names = itertools.count()


def counter_registry() -> ServiceRegistry:
    """The service of COUNTER_MODULE: it keeps its count in guest memory, read before a choice."""
    registry = ServiceRegistry()

    @registry.syscall("NtQuerySystemInformation")
    def query(ctx: Any, Class: ULONG, Info: Ptr, Length: ULONG, ReturnLength: Ptr) -> ServiceGen:
        n = int.from_bytes(ctx.read(Info, 4), "little")
        step = yield Choice("step", ("one", "two"), "one")
        n += 1 if step == "one" else 2
        ctx.write(Info, n.to_bytes(4, "little"))
        return n

    return registry


def write_module(folder: Path, text: str = COUNTER_MODULE) -> str:
    """A services module in ``folder`` under a fresh name (imported modules stay cached)."""
    name = f"svc_fixture_{next(_names)}"
    (folder / f"{name}.py").write_text(text, encoding="utf-8")
    return name


def exit_statuses(graph: Any) -> list[int]:
    return sorted(d["edge"].status for _, _, d in graph.lean.edges(data=True) if d["edge"].kind == "exit")


def test_arguments_are_decoded_from_registers_and_the_stack() -> None:
    # NtAllocateVirtualMemory(ProcessHandle, *BaseAddress, ZeroBits, *RegionSize, AllocationType,
    # Protect) (MS docs): six parameters, so AllocationType and Protect are the x64 convention's
    # stack arguments 5 and 6, at [rsp+0x20] and [rsp+0x28] before the call. Both are ULONG:
    # the upper halves of their 8-byte slots are not part of the value.
    code = """
main:
    sub rsp, 0x38
    mov rcx, -1
    mov rdx, 0x1122334455667788
    mov r8, 0x8877665544332211
    mov r9, 0x3000
    mov rax, 0xdead000000003000
    mov qword ptr [rsp+0x20], rax
    mov rax, 0xbeef000000000004
    mov qword ptr [rsp+0x28], rax
    call NtAllocateVirtualMemory
    add rsp, 0x38
    ret
"""
    seen: list[tuple[int, ...]] = []
    registry = ServiceRegistry()

    @registry.syscall("NtAllocateVirtualMemory")
    def allocate(
        ctx: Any, ProcessHandle: HANDLE, BaseAddress: Ptr, ZeroBits: ULONG_PTR, RegionSize: Ptr,
        AllocationType: ULONG, Protect: ULONG,
    ) -> int:  # fmt: skip
        seen.append((ProcessHandle, BaseAddress, ZeroBits, RegionSize, AllocationType, Protect))
        return 0x40

    r = run(parse_scenario(asm_scenario(code), "t.toml"), services=registry)
    assert r.error is None
    assert seen == [(2**64 - 1, 0x1122334455667788, 0x8877665544332211, 0x3000, 0x3000, 4)]
    assert r.exit_status == 0x40


def test_a_service_with_state_forks_correctly_in_the_explorer() -> None:
    # Each call reads the count, asks a choice (+1 or +2), then writes it back. Exploring
    # follows four paths: the first call's sysret carries 1 or 2, the exits 2, 3 (twice: 1+2
    # and 2+1, one state) or 4. A fork that re-read memory instead of replaying the journal, or
    # wrote twice, would give other numbers.
    scenario = parse_scenario(asm_scenario(COUNTER), "t.toml")
    assert run(scenario, services=counter_registry()).exit_status == 2  # the defaults: one, one
    exp = explore(scenario, services=counter_registry())
    assert exp.complete and exp.paths == 4
    assert exit_statuses(exp.graph) == [2, 3, 4]
    first = sorted(
        d["edge"].status for _, _, d in exp.graph.lean.edges(data=True) if d["edge"].kind == "sysret"
    )  # the first call's two answers, then the second call's from 1 and from 2
    assert first == [1, 2, 2, 3, 3, 4]


def test_a_service_that_raises_on_one_branch_ends_that_path_as_a_fault() -> None:
    registry = ServiceRegistry()

    @registry.syscall("NtQuerySystemInformation")
    def query(ctx: Any, Class: ULONG, Info: Ptr) -> ServiceGen:
        step = yield Choice("step", ("ok", "broken"), "ok")
        if step == "broken":
            raise RuntimeError("this branch is unfinished")
        return 0

    exp = explore(parse_scenario(asm_scenario(COUNTER), "t.toml"), services=registry)
    assert exp.complete
    messages = sorted({m for _, m in exp.faults})
    assert messages == ["service NtQuerySystemInformation raised RuntimeError: this branch is unfinished"]
    assert exit_statuses(exp.graph) == [0]  # ok, ok: the one path that finishes


def test_activation_fork_replays_what_the_service_was_sent_and_read() -> None:
    memory = {0x1000: b"\x07\x00\x00\x00"}
    writes: list[tuple[int, bytes]] = []

    class Memory:  # a ServiceContext over a dict: what the kernel's thread context provides
        thread_id = 0
        probe_limit = 0x7FFF_FFFF_0000

        def read(self, address: int, size: int) -> bytes:
            return memory[address][:size]

        def probe_read(self, address: int, size: int) -> bytes | None:
            return memory.get(address)

        def write(self, address: int, data: bytes) -> None:
            writes.append((address, data))
            memory[address] = data

    registry = ServiceRegistry()

    @registry.syscall("NtQuerySystemInformation")
    def query(ctx: Any, Class: ULONG, Info: Ptr) -> Generator[Any, Any, int]:
        n = int.from_bytes(ctx.read(Info, 4), "little")
        ctx.write(Info, b"\xff\xff\xff\xff")
        step = yield Choice("step", ("one", "two"), "one")
        result: CallbackResult = yield UserCallback(2, n.to_bytes(4, "little"))
        return n + (1 if step == "one" else 2) + result.status

    spec = registry.get("NtQuerySystemInformation")
    assert spec is not None
    act = spec.activate(Memory(), [5, 0x1000])
    assert isinstance(act, Activation)
    assert act.step(None) == Choice("step", ("one", "two"), "one")
    assert writes == [(0x1000, b"\xff\xff\xff\xff")]
    twin = act.fork()  # replayed: the read answered from the journal (7, not the 0xffffffff now there)
    assert writes == [(0x1000, b"\xff\xff\xff\xff")]  # and the write not made again
    assert isinstance(twin.ctx, _JournalContext) and twin.ctx.reads == [b"\x07\x00\x00\x00"]
    assert act.step("one") == UserCallback(2, b"\x07\x00\x00\x00")
    assert twin.step("two") == UserCallback(2, b"\x07\x00\x00\x00")
    assert act.step(CallbackResult(100)) == 7 + 1 + 100
    assert twin.step(CallbackResult(200)) == 7 + 2 + 200


def test_a_name_without_a_service_number_is_refused_at_build() -> None:
    registry = ServiceRegistry()

    @registry.syscall("NtEmuInvented")
    def invented(ctx: Any) -> int:
        return 0

    scenario = parse_scenario(asm_scenario("main:\n    ret"), "t.toml")
    with pytest.raises(ExtensionError) as e:
        run(scenario, services=registry)
    message = str(e.value)
    assert "\n" not in message
    assert "NtEmuInvented" in message and "profile win10-22h2" in message and "[profile] ssn" in message
    # Numbered by the scenario, the built-in ntdll gets a stub and the service runs.
    code = "main:\n    sub rsp, 0x28\n    call NtEmuInvented\n    add rsp, 0x28\n    ret"
    numbered = parse_scenario(asm_scenario(code, extra="[profile]\nssn = { NtEmuInvented = 0x7000 }"), "t.toml")
    assert run(numbered, services=registry).error is None


def test_a_python_service_replaces_the_scenarios_script_and_says_so() -> None:
    services = '[services.NtQuerySystemInformation]\nsteps = [{ kind = "return", status = 7 }]'
    scenario = parse_scenario(asm_scenario(COUNTER, services=services), "t.toml")
    assert run(scenario).exit_status == 7
    r = run(scenario, services=counter_registry())
    assert r.exit_status == 2
    assert r.notes == [
        "the Python service NtQuerySystemInformation replaces the scenario's [services.NtQuerySystemInformation] script"
    ]


def test_a_service_that_raises_stops_the_run_and_keeps_the_trace() -> None:
    registry = ServiceRegistry()

    @registry.syscall("NtQuerySystemInformation")
    def query(ctx: Any, Class: ULONG, Info: Ptr) -> int:
        raise ValueError("no such class\nsecond line")

    r = run(parse_scenario(asm_scenario(COUNTER), "t.toml"), services=registry)
    assert r.stop == "service"
    assert str(r.error) == "service NtQuerySystemInformation raised ValueError: no such class"
    assert [t.kind for t in r.trace.transitions] == ["syscall"]  # the entry was recorded before it ran
    assert r.trace.transitions[0].service == "NtQuerySystemInformation"


def test_a_scenario_loads_python_only_when_allowed(tmp_path: Path) -> None:
    module = write_module(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(asm_scenario(COUNTER, extra=f'[python]\nservices = "{module}:registry"'), encoding="utf-8")
    with pytest.raises(ScenarioError) as e:
        run(path)
    assert "[python.services]" in str(e.value) and "--allow-python" in str(e.value)
    assert run(path, allow_python=True).exit_status == 2
    exp = explore(path, allow_python=True)
    assert exit_statuses(exp.graph) == [2, 3, 4]


def test_a_missing_module_or_a_wrong_name_is_one_line(tmp_path: Path) -> None:
    scenario = parse_scenario(asm_scenario(COUNTER), str(tmp_path / "t.toml"))
    with pytest.raises(ExtensionError, match=r"cannot import no_such_module_here"):
        run(scenario, services="no_such_module_here:registry")
    module = write_module(tmp_path, "registry = 42\n")
    scenario = dataclasses.replace(scenario, python_services=(f"{module}:registry",), allow_python=True)
    with pytest.raises(ScenarioError, match=rf"{module}.registry is int, expected a ServiceRegistry"):
        run(scenario)


def test_scenario_reader_checks_the_reference_shape() -> None:
    with pytest.raises(ScenarioError, match=r"\[python.services\]: expected \"package.module:name\""):
        parse_scenario(asm_scenario("main:\n    ret", extra='[python]\nservices = "a b"'), "t.toml")
    with pytest.raises(ScenarioError, match=r"\[python.code\]: unknown key 'code' \(allowed: services\)"):
        parse_scenario(asm_scenario("main:\n    ret", extra='[python]\ncode = "x"'), "t.toml")


def test_cli_services_need_allow_python(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    module = write_module(tmp_path)
    (tmp_path / "s.toml").write_text(asm_scenario(COUNTER), encoding="utf-8")
    assert main(["run", "s.toml", "--services", f"{module}:registry"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-python" in err
    assert main(["run", "s.toml", "--services", f"{module}:registry", "--allow-python"]) == 0
    assert "thread exit status: 0x00000002" in capsys.readouterr().out
    assert main(["explore", "s.toml", "--services", f"{module}:registry", "--allow-python", "--json"]) == 0
    assert '"paths": 4' in capsys.readouterr().out


def test_a_run_from_a_dump_takes_the_scenarios_python_services(tmp_path: Path) -> None:
    # Dumped after the first call's sysret: the count (1) is in the dumped stack, so the
    # second call, served by the Python service again, makes it 2.
    module = write_module(tmp_path)
    text = asm_scenario(COUNTER, extra=f'[python]\nservices = "{module}:registry"')
    scenario = parse_scenario(text, str(tmp_path / "t.toml"), allow_python=True)
    first = run(scenario)
    after_first = first.trace.transitions[1]
    assert (after_first.kind, after_first.status) == ("sysret", 1)
    again, live = capture_state(scenario, after_first.dst)
    write_minidump(again, again.trace.state(after_first.dst), tmp_path / "p.dmp", live=live)
    r = run(dataclasses.replace(scenario, start_dump=str(tmp_path / "p.dmp")))
    assert r.error is None and r.exit_status == 2
    assert [(t.kind, t.status) for t in r.trace.transitions if t.kind == "sysret"] == [("sysret", 2)]
