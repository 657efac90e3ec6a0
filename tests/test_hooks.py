"""emu-level hooks: instructions, memory (the kernel model's writes too), transitions, thread
switches; notes and clean stops in the trace; a hook that raises."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from conftest import asm_scenario
from emu.api import build, run
from emu.errors import ExtensionError
from emu.hooks import Hit, Hooks
from emu.kernel.services import UserCallback
from emu.scenario import parse_scenario
from emu.services import HANDLE, ULONG, ServiceRegistry


def test_instruction_hook_by_symbol_sees_the_callback_arguments(root: Path) -> None:
    # KiUserCallbackDispatcher calls KernelCallbackTable[api](InputBuffer, InputLength)
    # (ReactOS dll/ntdll/dispatch/amd64/dispatch.S): the scenario's input is "WM_PAINT".
    hooks = Hooks()
    hits: list[tuple[int, bytes, int]] = []

    @hooks.instruction("app!on_message")
    def at_handler(hit: Hit) -> None:
        rcx, rdx = hit.register("rcx"), hit.register("rdx")
        hits.append((hit.address, hit.read(rcx, rdx & 0xFFFF_FFFF), hit.size))
        hit.note(f"handler called with {rdx & 0xFFFF_FFFF} byte(s)")

    r = run(root / "scenarios/callback_roundtrip.toml", hooks=hooks)
    assert r.error is None and r.exit_status == 0x1234
    address = next(img for img in r.images if img.name == "app").symbols["on_message"]
    assert hits == [(address, b"WM_PAINT", 5)]  # mov eax, imm32 is five bytes
    note = r.trace.notes[0]
    assert (note.by, note.text, note.rip) == ("test_instruction_hook_by_symbol_sees_the_callback_arguments.<locals>.at_handler", "handler called with 8 byte(s)", address)  # fmt: skip
    # After the callback transition (syscall, callback) and before its return.
    assert note.after == 2 and note.thread == 0


def test_a_hook_stops_the_run_before_the_instruction(root: Path) -> None:
    hooks = Hooks()

    @hooks.instruction("app!on_message")
    def stop_here(hit: Hit) -> None:
        hit.stop("reached the handler")

    process = build(root / "scenarios/callback_roundtrip.toml", hooks=hooks)
    r = process.run()
    assert r.stop == "hook" and r.error is None
    assert [t.kind for t in r.trace.transitions] == ["syscall", "callback"]
    assert r.trace.notes[-1].text == "stopped: reached the handler"
    assert process.trace.symbolize(process.machine.register("rip") or 0) == "app!on_message"
    assert process.machine.register("rax") != 0x1234  # `mov eax, 0x1234` has not run


def test_write_hook_sees_user_writes_and_the_kernel_models_writes(root: Path) -> None:
    # KeUserModeCallback copies the input buffer onto the user stack below the syscall's RSP
    # (WRK ke/amd64/callout.asm, ReactOS ke/amd64/usercall.c KiUserModeCallout): a write by
    # the kernel, not by an instruction, so Unicorn's own hooks never see it.
    hooks = Hooks()
    writes: list[Hit] = []

    @hooks.write((0x1000, 1 << 47))
    def on_write(hit: Hit) -> None:
        writes.append(hit)

    r = run(root / "scenarios/callback_roundtrip.toml", hooks=hooks)
    assert r.error is None
    entry_rsp = r.trace.transitions[0].rsp
    by_kernel = [w for w in writes if w.by_kernel]
    assert len(by_kernel) == 1
    frame = by_kernel[0]
    assert frame.address + frame.size <= entry_rsp and b"WM_PAINT" in frame.data
    by_code = [w for w in writes if not w.by_kernel]
    # `call NtUserMessageCall` pushes its return address: an 8-byte user write.
    main = next(img for img in r.images if img.name == "app").symbols["main"]
    assert any(w.size == 8 and main < int.from_bytes(w.data, "little") < main + 0x20 for w in by_code)


def test_read_and_fetch_hooks() -> None:
    code = """
main:
    sub rsp, 0x28
    mov dword ptr [rsp+0x20], 0x1234abcd
    mov eax, dword ptr [rsp+0x20]
    add rsp, 0x28
    ret
"""
    hooks = Hooks()
    reads: list[tuple[int, bytes]] = []
    fetched: list[int] = []

    @hooks.read((0x1000, 1 << 47))
    def on_read(hit: Hit) -> None:
        reads.append((hit.size, hit.data))

    @hooks.fetch("app")  # a module's name: its whole image
    def on_fetch(hit: Hit) -> None:
        fetched.append(hit.size)

    r = run(parse_scenario(asm_scenario(code), "t.toml"), hooks=hooks)
    assert r.exit_status == 0x1234ABCD
    assert (4, bytes.fromhex("cdab3412")) in reads
    # sub rsp, imm8 (4), mov dword [rsp+disp8], imm32 (8), mov eax, [rsp+disp8] (4), add (4), ret (1)
    assert fetched == [4, 8, 4, 4, 1]


def test_transition_hooks_see_each_record_as_it_is_appended(root: Path) -> None:
    hooks = Hooks()
    seen: list[tuple[int, str]] = []
    callbacks: list[int | None] = []

    @hooks.transition()
    def every(hit: Hit) -> None:
        assert hit.transition is not None
        seen.append((hit.transition.step, hit.transition.kind))

    @hooks.transition("callback", "callback_return")
    def only_callbacks(hit: Hit) -> None:
        assert hit.transition is not None
        callbacks.append(hit.transition.api)

    r = run(root / "scenarios/nested_callbacks.toml", hooks=hooks)
    assert seen == [(t.step, t.kind) for t in r.trace.transitions]
    assert callbacks == [t.api for t in r.trace.transitions if t.kind in ("callback", "callback_return")]
    assert callbacks  # the scenario calls back


def test_exception_transitions_reach_a_hook(root: Path) -> None:
    hooks = Hooks()
    codes: list[int | None] = []

    @hooks.transition("exception")
    def on_exception(hit: Hit) -> None:
        assert hit.transition is not None
        codes.append(hit.transition.status)

    r = run(root / "scenarios/exception_handled_av.toml", hooks=hooks)
    assert r.error is None
    assert codes and set(codes) == {0xC0000005}  # STATUS_ACCESS_VIOLATION (ntstatus.h)
    assert codes == [t.status for t in r.trace.transitions if t.kind == "exception"]


def test_thread_switch_hook(root: Path) -> None:
    hooks = Hooks()
    switches: list[tuple[int | None, int | None]] = []

    @hooks.thread_switch()
    def switched(hit: Hit) -> None:
        switches.append((hit.previous, hit.thread))

    r = run(root / "scenarios/callback_sends_to_thread.toml", hooks=hooks)
    assert r.error is None
    # Each switch puts another thread on the CPU; the transitions change thread only across one.
    assert switches and all(a != b for a, b in switches)
    order = [t.thread for t in r.trace.transitions]
    changes = [(a, b) for a, b in itertools.pairwise(order) if a != b]
    assert changes == switches


def test_a_hook_that_raises_stops_the_run_with_one_line(root: Path) -> None:
    hooks = Hooks()

    @hooks.transition("callback")
    def broken(hit: Hit) -> None:
        raise KeyError("api")

    r = run(root / "scenarios/callback_roundtrip.toml", hooks=hooks)
    assert r.stop == "hook"
    assert isinstance(r.error, ExtensionError)
    assert str(r.error) == (
        "hook test_a_hook_that_raises_stops_the_run_with_one_line.<locals>.broken (transition) raised "
        "KeyError: 'api' at ntdll!KiUserCallbackDispatcher"
    )
    assert [t.kind for t in r.trace.transitions] == ["syscall", "callback"]  # kept up to the hook


def test_hooks_and_services_together() -> None:
    # A Python service calls back; a transition hook stops at the callback's return.
    registry = ServiceRegistry()

    @registry.syscall("NtUserMessageCall")
    def message_call(ctx: object, Hwnd: HANDLE, Msg: ULONG):  # type: ignore[no-untyped-def]
        result = yield UserCallback(2, b"hi")
        return result.status + 1

    code = """
main:
    sub rsp, 0x28
    call NtUserMessageCall
    add rsp, 0x28
    ret
handler:
    mov eax, 0x10
    ret
"""
    text = asm_scenario(code, table='[kernel_callback_table]\n2 = "app!handler"')
    assert run(parse_scenario(text, "t.toml"), services=registry).exit_status == 0x11
    hooks = Hooks()

    @hooks.transition("callback_return")
    def back(hit: Hit) -> None:
        assert hit.transition is not None
        hit.stop(f"callback returned {hit.transition.status:#x}")

    r = run(parse_scenario(text, "t.toml"), services=registry, hooks=hooks)
    assert r.stop == "hook" and r.trace.notes[-1].text == "stopped: callback returned 0x10"


def test_bad_hook_arguments_are_one_line() -> None:
    with pytest.raises(ExtensionError, match=r"unknown kind 'syscal'"):
        Hooks().transition("syscal")
    hooks = Hooks()
    hooks.instruction("app!nowhere")(lambda hit: None)
    with pytest.raises(ExtensionError, match=r"hook address 'app!nowhere' names no symbol"):
        run(parse_scenario(asm_scenario("main:\n    ret"), "t.toml"), hooks=hooks)
