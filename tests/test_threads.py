"""Several threads: waits on kernel objects, cross-thread sends, interleavings, wait chains, deadlocks."""

from __future__ import annotations

from pathlib import Path

from conftest import asm_scenario
from emu.api import run
from emu.detection.observers import node_status
from emu.exploration.explorer import explore
from emu.exploration.result import Exploration
from emu.scenario import parse_scenario
from emu.winnt import STATUS_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent


def two_threads(ui: str, worker: str, extra: str = "", services: str = "", table: str = "") -> str:
    code = ui + "\n" + worker
    text = asm_scenario(code, services=services, table=table, extra=extra)
    threads = (
        '[[thread]]\nname = "ui"\nentry = "app!ui_main"\n\n[[thread]]\nname = "worker"\nentry = "app!worker_main"\n'
    )
    return text.replace('[thread]\nentry = "app!main"\n', threads)


def test_a_single_run_is_deterministic_and_finishes(root: Path) -> None:
    r = run(root / "scenarios/threads_deadlock_sometimes.toml")
    assert r.error is None and not r.deadlock
    assert [t.name for t in r.threads.values()] == ["ui", "worker"]
    assert all(t.terminated and t.exit_status == 0 for t in r.threads.values())
    order = [r.threads[t.thread].name for t in r.trace]
    assert order == sorted(order, key=lambda n: n != "ui")  # ui keeps the CPU until it exits


def test_exploration_finds_the_deadlock_only_with_abba_order(root: Path) -> None:
    some = explore(root / "scenarios/threads_deadlock_sometimes.toml")
    none = explore(root / "scenarios/threads_no_deadlock.toml")
    assert some.complete and none.complete
    assert len(some.deadlocks) == 2 and none.deadlocks == []
    chains = some.graph.attrs(some.deadlocks[0])["deadlock"]
    assert "(a cycle: deadlock)" in str(chains)


def test_interleavings_export_the_same_graph_in_bfs_and_dfs(root: Path) -> None:
    path = root / "scenarios/threads_deadlock_sometimes.toml"
    assert explore(path, "bfs").graph.to_graphml() == explore(path, "dfs").graph.to_graphml()


def test_a_thread_is_never_parked_at_zwcallbackreturn_unless_the_scenario_asks(root: Path) -> None:
    # NtCallbackReturn never waits (WRK ke/amd64/callout.asm): without
    # [machine] preempt_at_callback_return no other thread runs between its entry and its switch back,
    # so ui is at ZwCallbackReturn only in its own states (Running), never while worker runs.
    def at_callback_return(exp: Exploration) -> tuple[set[int], set[str]]:
        """Threads whose nodes have a wait chain through ui at ZwCallbackReturn; ui's states at the seed's instant."""
        g = exp.graph
        chains = {g.state(n).thread for n in g.nodes() if "at ZwCallbackReturn" in str(g.attrs(n).get("wait_chains"))}
        return chains, {node_status(g, n).state for n in g.pending()}

    exp = explore(root / "scenarios/threads_no_deadlock.toml")
    assert at_callback_return(exp) == ({0}, {"Running"})
    text = (root / "scenarios/threads_no_deadlock.toml").read_text()
    preempt = explore(parse_scenario("[machine]\npreempt_at_callback_return = true\n" + text, "p.toml"))
    assert at_callback_return(preempt) == ({0, 1}, {"Running", "Ready"})  # worker runs while ui is Ready there
    assert preempt.states > exp.states


SEND_UI = """
ui_main:
    sub rsp, 0x48
    xor ecx, ecx
    xor edx, edx
    xor r8d, r8d
    xor r9d, r9d
    call NtUserGetMessage          ; delivers the sent message through callback api 3
    add rsp, 0x48
    ret
on_sent:                           ; api 3
    mov eax, dword ptr [rcx]
    ret
"""
SEND_WORKER = """
worker_main:
    sub rsp, 0x28
    call NtUserMessageCall         ; scripted: send to ui, api 3
    add rsp, 0x28
    ret
"""
SEND_SERVICE = """
[services.NtUserMessageCall]
steps = [{ kind = "send", to = "ui", api = 3, data = "44 33 22 11" }, { kind = "return", status = "callback" }]
"""
TABLE = '[kernel_callback_table]\n3 = "app!on_sent"\n'


def test_cross_thread_send_runs_the_callback_on_the_receiver_and_replies() -> None:
    r = run(parse_scenario(two_threads(SEND_UI, SEND_WORKER, services=SEND_SERVICE, table=TABLE), "send.toml"))
    assert r.error is None and not r.deadlock
    assert r.thread("worker").exit_status == 0x11223344  # the receiver's callback status, via the reply
    callbacks = [t for t in r.trace if t.kind == "callback"]
    assert [r.threads[t.thread].name for t in callbacks] == ["ui"]
    blocks = [t for t in r.trace if t.kind == "block"]
    assert any(t.detail == "waits for a sent message" for t in blocks)


def test_send_to_a_thread_that_waits_on_the_senders_lock_deadlocks() -> None:
    ui = """
ui_main:
    sub rsp, 0x28
    mov ecx, 0x100
    xor edx, edx
    xor r8d, r8d
    call NtWaitForSingleObject     ; the lock the worker holds while it sends
    add rsp, 0x28
    ret
on_sent:
    xor eax, eax
    ret
"""
    worker = """
worker_main:
    sub rsp, 0x28
    call NtUserMessageCall
    add rsp, 0x28
    ret
"""
    objects = '[[object]]\nkind = "mutex"\nname = "L"\nhandle = 0x100\nowner = "worker"\n'
    text = two_threads(ui, worker, services=SEND_SERVICE, table=TABLE).replace(
        "[kernel_callback_table]", objects + "\n[kernel_callback_table]"
    )
    r = run(parse_scenario(text, "d.toml"))
    assert r.deadlock == [
        "thread ui waits on mutant 'L' owned by thread worker, which waits for the reply to a message (api 3)"
        " not yet received by thread ui (a cycle: deadlock)",
        "thread worker waits for the reply to a message (api 3) not yet received by thread ui, which waits on"
        " mutant 'L' owned by thread worker (a cycle: deadlock)",
    ]
    assert r.stop == "deadlock"


def test_a_wait_with_a_timeout_expires_when_nothing_else_can_run() -> None:
    ui = """
ui_main:
    sub rsp, 0x38
    mov qword ptr [rsp + 0x28], -10000
    mov ecx, 0x100
    xor edx, edx
    lea r8, [rsp + 0x28]           ; a timeout: the wait may expire
    call NtWaitForSingleObject
    add rsp, 0x38
    ret
"""
    worker = "worker_main:\n xor eax, eax\n ret\n"
    objects = '[[object]]\nkind = "event"\nname = "E"\nhandle = 0x100\n'
    text = two_threads(ui, worker).replace("[[thread]]", objects + "\n[[thread]]", 1)
    r = run(parse_scenario(text, "t.toml"))
    assert not r.deadlock
    assert r.thread("ui").exit_status == STATUS_TIMEOUT
    exp = explore(parse_scenario(text, "t.toml"))
    assert exp.complete and exp.deadlocks == []
