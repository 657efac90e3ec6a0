"""Bytes the kernel writes into user memory (write steps, symbolic or not), and the kernel
model reading symbolic memory: fixed to the run's values and reported, never a silent guess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import asm_scenario
from emu.api import Run, build
from emu.errors import ScenarioError
from emu.exploration.explorer import Explorer
from emu.exploration.result import Exploration
from emu.kernel import ServiceRegistry
from emu.kernel.services import ULONG, Ptr
from emu.scenario import parse_scenario
from emu.symbolic.witness import witness_hooks

ROOT = Path(__file__).resolve().parents[1]
STATUS_ACCESS_VIOLATION = 0xC0000005  # ntstatus.h

# A caller passing a buffer on its stack as argument 3 of NtQueryInformationProcess, then
# exiting with the buffer's first dword.
QUERY = """
main:
    sub rsp, 0x48
    mov qword ptr [rsp + 0x30], 0
    xor ecx, ecx
    xor edx, edx
    lea r8, [rsp + 0x30]
    mov r9d, 8
    call NtQueryInformationProcess
    cmp eax, 0
    jne failed
    mov eax, [rsp + 0x30]
failed:
    add rsp, 0x48
    ret
"""


def _parse(text: str) -> Any:
    return parse_scenario(text, "t.toml")


def _run(text: str, witness: dict[str, str] | None = None) -> Run:
    hooks, answer = witness_hooks(witness or {})
    r = Run.of(build(_parse(text), hooks).run())
    assert not answer.errors, answer.errors
    return r


def _explore(text: str) -> tuple[Exploration, dict[str, Any]]:
    exp = Explorer(_parse(text), "bfs").run()
    assert exp.symbolic is not None
    return exp, exp.symbolic


def _query(steps: str, code: str = QUERY) -> str:
    return asm_scenario(code, services=f"[services.NtQueryInformationProcess]\nsteps = [{steps}]")


def test_a_write_step_puts_bytes_at_an_argument_plus_offset() -> None:
    text = _query('{ kind = "write", at = "arg3", offset = 1, data = "11 22 33" }, { kind = "return", status = 0 }')
    r = _run(text)
    # Little-endian dword at the buffer: byte 0 untouched (0), bytes 1..3 written.
    assert r.exit_status == 0x3322_1100


def test_a_write_that_does_not_probe_fails_the_service_with_access_violation() -> None:
    """ProbeForWrite of a range that is not writable user memory raises; the service's
    handler returns the exception code and writes nothing (ReactOS ps/query.c)."""
    code = QUERY.replace("lea r8, [rsp + 0x30]", "lea r8, [rip + main]")  # read-only code
    text = _query('{ kind = "write", at = "arg3", data = "11 22" }, { kind = "return", status = 0 }', code)
    r = _run(text)
    assert r.exit_status == STATUS_ACCESS_VIOLATION
    text = _query(
        '{ kind = "write", at = "arg3", data = { symbolic = 2, name = "Info" } }, { kind = "return", status = 0 }', code
    )
    _, sym = _explore(text)
    assert sym["variables"] == []  # nothing was asked: the probe failed first


def test_symbolic_written_bytes_fork_and_their_witness_reaches_the_state() -> None:
    code = QUERY.replace(
        "mov eax, [rsp + 0x30]",
        "cmp dword ptr [rsp + 0x30], 0x1234\n    mov eax, 0\n    jne failed\n    int3",
    )
    text = _query(
        '{ kind = "write", at = "arg3", data = { symbolic = 4, name = "Info" } }, { kind = "return", status = 0 }', code
    )
    exp, sym = _explore(text)
    assert sym["incomplete"] == 0 and sym["variables"] == ["Info"]
    conditions = {a.get("path_condition") for _, a in exp.graph.lean.nodes(data=True)} - {None}
    assert "Info[0:4] == 0x00001234" in conditions and "Info[0:4] != 0x00001234" in conditions
    witnesses = {a.get("witness") for _, a in exp.graph.lean.nodes(data=True)} - {None, ""}
    assert "Info=34120000" in witnesses
    assert not any(t.kind == "exception" for t in _run(text).trace.transitions)  # the default: 0
    r = _run(text, {"Info": "34120000"})
    assert any(t.kind == "exception" for t in r.trace.transitions)  # the witness reaches the int3


@pytest.mark.parametrize(
    ("step", "place", "message"),
    [
        ('{ kind = "write", at = "arg3", data = { symbolic = 0 } }', "[0].data.symbolic", "byte count 1..256"),
        ('{ kind = "write", at = "arg3", data = { symbolic = 2, default = "00 00 00" } }', "[0].data.default",
         "expected 2 bytes, got 3"),
        ('{ kind = "write", at = "rax", data = "00" }', "[0].at", '"arg1".."arg16"'),
        ('{ kind = "write", at = "arg17", data = "00" }', "[0].at", '"arg1".."arg16"'),
        ('{ kind = "write", at = "arg3", data = "" }', "[0].data", "at least one byte"),
        ('{ kind = "write", at = "arg3", offset = -1, data = "00" }', "[0].offset", ""),
        ('{ kind = "write", at = "arg3", data = { symbolic = 4, name = "st" } }', "[0].data",
         "symbolic name 'st' is already a status"),
    ],
)  # fmt: skip
def test_bad_write_declarations_name_file_and_place(step: str, place: str, message: str) -> None:
    text = asm_scenario(
        QUERY,
        services=f'[services.NtClose]\nsteps = [{{ kind = "return", status = {{ symbolic = "st" }} }}]\n'
        f'[services.NtQueryInformationProcess]\nsteps = [{step}, {{ kind = "return", status = 0 }}]',
    )
    with pytest.raises(ScenarioError) as e:
        _parse(text)
    line = str(e.value)
    assert "\n" not in line and "t.toml" in line
    assert f"services.NtQueryInformationProcess.steps{place}" in line and message in line


# --- the kernel model reading symbolic memory ---------------------------------------------------
ECHO = """
main:
    sub rsp, 0x28
    call NtUserMessageCall
    add rsp, 0x28
    ret

echo:                         ; api 2: (Buffer, Length): copy the input to the output, return it
    sub rsp, 0x28
    mov eax, dword ptr [rcx]
    cmp eax, 7
    je seven
    mov dword ptr [rip + reply], eax
    lea rcx, [rip + reply]
    mov edx, 4
    xor r8d, r8d
    call ZwCallbackReturn
    int3
seven:
    xor ecx, ecx
    xor edx, edx
    mov r8d, 7
    call ZwCallbackReturn
    int3
"""


def test_a_callback_output_holding_its_symbolic_input_is_fixed_and_reported() -> None:
    """NtCallbackReturn records the Result bytes and the service copies them: the kernel
    model reads the symbolic input there, so the path is fixed to the run's value and said so."""
    text = asm_scenario(
        ECHO,
        data="reply:\n    .byte 0, 0, 0, 0",
        table='[kernel_callback_table]\n2 = "app!echo"',
        services='[services.NtUserMessageCall]\nsteps = [{ kind = "callback", api = 2, data = { symbolic = 4, '
        'name = "Buffer", default = "01 00 00 00" } }, { kind = "return", status = 0, output = "copy" }]',
    )
    exp, sym = _explore(text)
    assert exp.paths == 2  # the branch on the input is still explored: 7, and not 7
    (report,) = sym["reports"]
    assert "the kernel model reads symbolic bytes" in report["message"]
    assert "the callback's Result at NtCallbackReturn" in report["message"]
    assert sym["incomplete"] == 1
    conditions = {a.get("path_condition") for _, a in exp.graph.lean.nodes(data=True)} - {None}
    # The echo path: the input is not 7, and it is fixed to the run's value (once, not per read).
    assert "Buffer[0:4] != 0x00000007 and Buffer[0:4] == 0x00000001" in conditions
    pending = {e["reached_when"] for e in sym["pending"]}
    assert pending == {"Buffer[0:4] == 0x00000007", "Buffer[0:4] != 0x00000007 and Buffer[0:4] == 0x00000001"}


def test_symbolic_stack_arguments_read_by_the_kernel_are_fixed_and_reported() -> None:
    """A fifth argument holding written symbolic bytes: the kernel copies it from the stack."""
    code = """
main:
    sub rsp, 0x48
    xor ecx, ecx
    xor edx, edx
    lea r8, [rsp + 0x30]
    mov r9d, 8
    call NtQueryInformationProcess
    mov rax, [rsp + 0x30]
    mov [rsp + 0x20], rax         ; the symbolic bytes as the next call's fifth argument
    call NtQueryInformationThread
    add rsp, 0x48
    ret
"""
    text = asm_scenario(
        code,
        services='[services.NtQueryInformationProcess]\nsteps = [{ kind = "write", at = "arg3", '
        'data = { symbolic = 8, name = "Info" } }, { kind = "return", status = 0 }]\n'
        '[services.NtQueryInformationThread]\nssn = 0x25\nsteps = [{ kind = "write", at = "arg5", data = "00" }, '
        '{ kind = "return", status = 0 }]',
    )
    exp, sym = _explore(text)
    (report,) = sym["reports"]
    assert "arguments 5-5 of NtQueryInformationThread" in report["message"]
    conditions = {a.get("path_condition") for _, a in exp.graph.lean.nodes(data=True)} - {None}
    assert "Info[0:8] == 0x0000000000000000" in conditions


def test_a_python_service_reading_symbolic_bytes_gets_them_fixed_and_reported() -> None:
    """A service's ctx.read of an argument structure holding symbolic bytes: the run's values,
    fixed in the path condition and reported with the service's call site."""
    registry = ServiceRegistry()

    @registry.syscall("NtQuerySystemInformation")
    def query(ctx: Any, Class: ULONG, Info: Ptr) -> int:
        return int.from_bytes(ctx.read(Info, 4), "little") & 0xFF

    code = """
main:
    sub rsp, 0x48
    xor ecx, ecx
    xor edx, edx
    lea r8, [rsp + 0x30]
    mov r9d, 4
    call NtQueryInformationProcess
    xor ecx, ecx
    lea rdx, [rsp + 0x30]         ; the structure the kernel wrote, handed to the next service
    call NtQuerySystemInformation
    xor eax, eax
    add rsp, 0x48
    ret
"""
    text = _query(
        '{ kind = "write", at = "arg3", data = { symbolic = 4, name = "Info", default = "05 00 00 00" } }, '
        '{ kind = "return", status = 0 }',
        code,
    )
    exp = Explorer(_parse(text), "bfs", services=registry).run()
    sym: dict[str, Any] = exp.symbolic or {}
    (report,) = sym["reports"]
    assert "the kernel model reads symbolic bytes" in report["message"]
    assert "ZwQuerySystemInformation" in report["message"]  # where the thread is: the service's stub
    conditions = {a.get("path_condition") for _, a in exp.graph.lean.nodes(data=True)} - {None}
    assert "Info[0:4] == 0x00000005" in conditions


def test_a_snapshot_inside_the_callback_keeps_the_arguments_a_later_write_uses(tmp_path: Path) -> None:
    """A script that calls back and then writes: restored from a snapshot file taken inside
    the callback, the write still lands at the caller's argument."""
    from emu.session import Session
    from emu.session_snapshot import Snapshot

    code = """
main:
    sub rsp, 0x48
    mov dword ptr [rsp + 0x30], 0
    xor ecx, ecx
    xor edx, edx
    lea r8, [rsp + 0x30]
    call NtQueryInformationProcess
    mov eax, [rsp + 0x30]
    add rsp, 0x48
    ret

cb:
    xor ecx, ecx
    xor edx, edx
    xor r8d, r8d
    call ZwCallbackReturn
    int3
"""
    path = tmp_path / "t.toml"
    path.write_text(
        asm_scenario(
            code,
            table='[kernel_callback_table]\n2 = "app!cb"',
            services='[services.NtQueryInformationProcess]\nsteps = [{ kind = "callback", api = 2 }, '
            '{ kind = "write", at = "arg3", data = "44 33 22 11" }, { kind = "return", status = 0 }]',
        )
    )
    s = Session(path)
    s.run_until(lambda session: bool(session.callback_stack()))
    s.snapshot().save(tmp_path / "snap.zip")
    fresh = Session(path)
    fresh.restore(Snapshot.load(tmp_path / "snap.zip"))
    assert fresh.finish().exit_status == 0x1122_3344
