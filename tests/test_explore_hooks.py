"""Hooks in the explorer (every path; notes and stops in the graph), in a Session, and the
kernel model's reads of user memory seen by read hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import asm_scenario
from emu.api import run
from emu.exploration.explorer import explore
from emu.hooks import Hit, Hooks
from emu.scenario import parse_scenario
from emu.services import ULONG, Choice, Ptr, ServiceGen, ServiceRegistry
from emu.session import Session

# choice_nested_depth: NtUserMessageCall may call back api 2 (app!on_level1), whose
# NtUserCallOneParam may call back api 3 (app!on_level2), whose NtUserCallNoParam may call
# back api 4 (app!on_level3). Each level is reached on exactly one path: the one that chose
# "deeper" at every level above it.
NESTED = "scenarios/choice_nested_depth.toml"


def nested_hooks(seen: list[int]) -> Hooks:
    hooks = Hooks()

    @hooks.instruction("app!on_level1")
    def level1(hit: Hit) -> None:
        # KiUserCallbackDispatcher passes (InputBuffer, InputLength): the scenario sends none.
        hit.note(f"level1 length {hit.register('rdx') & 0xFFFF_FFFF}")

    @hooks.transition("callback")
    def callback(hit: Hit) -> None:
        assert hit.transition is not None
        seen.append(hit.transition.api or 0)
        hit.note(f"callback api {hit.transition.api}")

    @hooks.instruction("app!on_level3")
    def deepest(hit: Hit) -> None:
        hit.stop("deepest level reached")

    return hooks


def edge_notes(exp: Any) -> dict[tuple[str, str], str]:
    return {(u, v): d["notes"] for u, v, d in exp.graph.lean.edges(data=True) if "notes" in d}


def test_hooks_fire_on_every_path_and_their_notes_land_on_the_edges(root: Path) -> None:
    seen: list[int] = []
    exp = explore(root / NESTED, hooks=nested_hooks(seen))
    assert exp.complete and not exp.faults
    # One hook object for the whole exploration (as qiling's hooks across save/restore): each
    # callback is on one path, so the shared list holds each api once.
    assert sorted(seen) == [2, 3, 4]
    notes = edge_notes(exp)
    lean = exp.graph.lean
    callbacks = {uv: lean.edges[uv]["edge"].api for uv in lean.edges if lean.edges[uv]["edge"].kind == "callback"}
    # A transition hook's note sits on that transition's edge.
    for uv, api in callbacks.items():
        assert f"nested_hooks.<locals>.callback: callback api {api}" in notes[uv]
    # The instruction hook ran between the api 2 callback and the next state (its syscall).
    level1 = [uv for uv, text in notes.items() if "level1 length 0" in text]
    assert len(level1) == 1
    (u, v) = level1[0]
    assert lean.nodes[u]["state"].api == 2 and lean.edges[(u, v)]["edge"].service == "NtUserCallOneParam"


def test_a_hook_stop_ends_its_path_and_the_others_go_on(root: Path) -> None:
    plain = explore(root / NESTED)
    exp = explore(root / NESTED, hooks=nested_hooks([]))
    # The api 4 callback's path stops before on_level3 runs: its NtCallbackReturn syscall and
    # callback_return states are never recorded, so neither is the third callback-return-pending
    # state, nor the merge of the level-3 sysret with the "stop" option's.
    assert (plain.states, plain.merges, len(plain.pending)) == (18, 3, 3)
    assert (exp.states, exp.merges, len(exp.pending)) == (16, 2, 2)
    assert exp.complete and exp.paths == plain.paths
    ((node, reason),) = exp.hook_stops
    assert reason == "deepest level reached"
    state = exp.graph.state(node)
    assert (state.mode, state.depth, state.api) == ("user", 3, 4)  # in the dispatcher, at api 4
    assert exp.graph.attrs(node)["hook_stop"] == "deepest level reached"
    assert exp.summary()["hook_stops"] == [{"node": node, "reason": "deepest level reached"}]
    exits = [d["edge"] for _, _, d in exp.graph.lean.edges(data=True) if d["edge"].kind == "exit"]
    assert [e.status for e in exits] == [0]  # the other paths still end


def test_bfs_and_dfs_export_the_same_bytes_with_hooks(root: Path, tmp_path: Path) -> None:
    bfs = explore(root / NESTED, "bfs", hooks=nested_hooks([]))
    dfs = explore(root / NESTED, "dfs", hooks=nested_hooks([]))
    assert bfs.graph.to_json() == dfs.graph.to_json()
    assert bfs.graph.to_graphml() == dfs.graph.to_graphml()
    assert bfs.summary() | {"strategy": ""} == dfs.summary() | {"strategy": ""}
    assert '"notes"' in bfs.graph.to_json()


def test_hooks_that_only_note_leave_the_graph_as_it_is(root: Path) -> None:
    hooks = Hooks()

    @hooks.transition()
    def every(hit: Hit) -> None:
        hit.note("seen")

    plain, hooked = explore(root / NESTED), explore(root / NESTED, hooks=hooks)
    assert plain.summary() == hooked.summary()
    assert list(plain.graph.lean.edges) == list(hooked.graph.lean.edges)
    # Every edge is some path's transition: each has the note, once.
    assert all(d.get("notes") == "test_hooks_that_only_note_leave_the_graph_as_it_is.<locals>.every: seen"
               for _, _, d in hooked.graph.lean.edges(data=True))  # fmt: skip


def test_a_hook_that_raises_on_one_path_ends_that_path_as_a_fault(root: Path) -> None:
    hooks = Hooks()

    @hooks.instruction("app!on_level2")
    def broken(hit: Hit) -> None:
        raise RuntimeError("not finished")

    exp = explore(root / NESTED, hooks=hooks)
    assert exp.complete
    ((node, message),) = exp.faults
    assert message.startswith("hook test_a_hook_that_raises_on_one_path_ends_that_path_as_a_fault.<locals>.broken (instruction) raised RuntimeError: not finished at app!on_level2")  # fmt: skip
    assert exp.graph.state(node).api == 3
    # Lost with level 2's body: its NtUserCallNoParam syscall; the api 4 callback, its
    # NtCallbackReturn and callback_return; that service's sysret (one state for both options);
    # level 2's own NtCallbackReturn and callback_return. The next sysret is the "stop" path's too.
    assert exp.states == 18 - 7


def test_notes_made_before_a_choice_go_with_every_option_and_replays_fire_nothing() -> None:
    # The service writes *Info, then asks a choice: the write hook's note is made after the
    # syscall's state and before the kernel suspends, so each option's edge (its sysret) carries
    # it. A fork rebuilds the service by replaying its journal, writes skipped (emu.kernel.services):
    # the hook fires once, not once per option.
    code = """
main:
    sub rsp, 0x38
    mov ecx, 5
    lea rdx, [rsp+0x30]
    call NtQuerySystemInformation
    add rsp, 0x38
    ret
"""
    registry = ServiceRegistry()

    @registry.syscall("NtQuerySystemInformation")
    def query(ctx: Any, Class: ULONG, Info: Ptr) -> ServiceGen:
        ctx.write(Info, b"\x07\x00\x00\x00")
        pick = yield Choice("c", ("a", "b"), "a")
        return 1 if pick == "a" else 2

    hooks = Hooks()
    fired: list[bytes] = []

    @hooks.write((0x1000, 1 << 47))
    def kernel_write(hit: Hit) -> None:
        if hit.by_kernel:
            fired.append(hit.data)
            hit.note(f"kernel wrote {hit.data.hex()}")

    exp = explore(parse_scenario(asm_scenario(code), "t.toml"), hooks=hooks, services=registry)
    assert fired == [b"\x07\x00\x00\x00"]
    lean = exp.graph.lean
    sysrets = sorted((lean.edges[uv]["edge"].status, lean.edges[uv].get("notes")) for uv in lean.edges
                     if lean.edges[uv]["edge"].kind == "sysret")  # fmt: skip
    note = "test_notes_made_before_a_choice_go_with_every_option_and_replays_fire_nothing.<locals>.kernel_write: kernel wrote 07000000"  # fmt: skip
    assert sysrets == [(1, note), (2, note)]


# --- a Session ---------------------------------------------------------------------------
def test_a_session_with_hooks_notes_what_emu_run_notes_and_stops_where_it_stops(root: Path) -> None:
    hooks = Hooks()

    @hooks.instruction("app!on_message")
    def handler(hit: Hit) -> None:
        hit.note(f"rdx {hit.register('rdx') & 0xFFFF_FFFF}")

    path = root / "scenarios/callback_roundtrip.toml"
    s = Session(path, hooks=hooks)
    while not s.done:
        s.step()
    assert s.finish().trace.notes == run(path, hooks=hooks).trace.notes
    assert [n.text for n in s.trace.notes] == ["rdx 8"]  # the callback's input: "WM_PAINT"

    stopping = Hooks()

    @stopping.instruction("app!on_message")
    def stop(hit: Hit) -> None:
        hit.stop("in the handler")

    s = Session(path, hooks=stopping)
    snap = s.snapshot()
    s.step()
    s.step()
    assert s.done and s.stop == "hook" and s.symbol(s.regs.rip) == "app!on_message"
    assert s.finish().stop == "hook"
    s.restore(snap)  # going back undoes the stop
    assert not s.done and s.trace.notes == []
    assert [t.kind for t in s.step()] == ["syscall", "callback"]


# --- the kernel model's reads ------------------------------------------------------------
def test_read_hooks_see_the_service_copy_the_callbacks_output_once(root: Path) -> None:
    # The callback returns 64 bytes at app!reply through ZwCallbackReturn; the service copies
    # them (output = "copy"). NtCallbackReturn only stores Result and ResultLength for the
    # service (WRK ke/amd64/callout.asm): the copy is the one read the kernel makes.
    hooks = Hooks()
    reads: list[tuple[bool, int, bytes]] = []

    @hooks.read("app!reply")
    def on_reply(hit: Hit) -> None:
        reads.append((hit.by_kernel, hit.size, hit.data))

    r = run(root / "scenarios/callback_large_output.toml", hooks=hooks)
    assert r.exit_status == 0x600D
    assert reads == [(True, 64, bytes(range(0x10, 0x50)))]


def test_read_hooks_see_a_services_reads_and_its_stack_arguments() -> None:
    # Five arguments: the fifth is on the user stack above the return address and the 0x20
    # bytes of home space (x64 calling convention, MS docs); the service reads *Info too.
    code = """
main:
    sub rsp, 0x38
    mov dword ptr [rsp+0x30], 0x11223344
    mov qword ptr [rsp+0x20], 0x55
    mov ecx, 5
    lea rdx, [rsp+0x30]
    mov r8d, 4
    xor r9d, r9d
    call NtQuerySystemInformation
    add rsp, 0x38
    ret
"""
    registry = ServiceRegistry()

    @registry.syscall("NtQuerySystemInformation")
    def query(ctx: Any, Class: ULONG, Info: Ptr, Length: ULONG, ReturnLength: Ptr, Fifth: ULONG) -> ServiceGen:
        value = int.from_bytes(ctx.read(Info, 4), "little")
        return (value + Fifth) & 0xFFFF_FFFF
        yield  # a generator all the same

    hooks = Hooks()
    reads: list[tuple[int, bytes]] = []
    user: list[int] = []

    @hooks.read((0x1000, 1 << 47))
    def on_read(hit: Hit) -> None:
        if hit.by_kernel:
            reads.append((hit.size, hit.data))
        else:
            user.append(hit.size)

    r = run(parse_scenario(asm_scenario(code), "t.toml"), hooks=hooks, services=registry)
    assert r.exit_status == 0x11223344 + 0x55
    # The stack argument (8 bytes), then *Info (4 bytes), in the order the kernel reads them.
    assert reads == [(8, (0x55).to_bytes(8, "little")), (4, bytes.fromhex("44332211"))]
    assert user  # `ret` reads the return address: user reads are not marked


@pytest.mark.parametrize("where", ["exception_handled_av.toml"])
def test_read_hooks_see_nt_continue_read_its_context(root: Path, where: str) -> None:
    hooks = Hooks()
    sizes: list[int] = []

    @hooks.read((0x1000, 1 << 47))
    def on_read(hit: Hit) -> None:
        if hit.by_kernel:
            sizes.append(hit.size)

    r = run(root / "scenarios" / where, hooks=hooks)
    assert r.error is None
    # NtContinue reads a whole CONTEXT (0x4d0 bytes: MS docs, CONTEXT structure, x64).
    continues = [t for t in r.trace.transitions if t.kind == "syscall" and t.service == "NtContinue"]
    assert continues and sizes.count(0x4D0) == len(continues)
