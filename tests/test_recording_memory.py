"""What a run keeps of its records: equal stack bytes once, and nothing left for the collector.

A callback round trip passes the same RSP several times (the service's system call, the
callback_return that resumes it, the sysret after it); the recorder keeps one copy of stack
bytes that are equal at the same RSP, and a separate copy wherever they differ. After the
run, the records sit in the collector's oldest generation, so the first collection after a
run does not walk them all, and a cycle made during the run is still collected.
"""

from __future__ import annotations

import gc

from emu.engine import RunResult, build
from emu.scenario import parse_scenario

CALLBACKS = 3
_TEMPLATE = '''
[scenario]
name = "recording_memory"
profile = "win10-22h2"

[[module]]
name = "app"
code = """
main:                         ; entered by call: RSP = 8 mod 16
    push rbx
    sub rsp, 0x20
    mov ebx, COUNT
again:
    xor ecx, ecx
    mov edx, 0xF
    call NtUserMessageCall
    dec ebx
    jnz again
    xor eax, eax
    add rsp, 0x20
    pop rbx
    ret
on_message:
    mov qword ptr [rsp+8], rbx  ; writes its home slot, above the frame
    xor eax, eax
    ret
"""

[thread]
entry = "app!main"

[kernel_callback_table]
size = 4
2 = "app!on_message"

[services.NtUserMessageCall]
steps = [{ kind = "callback", api = 2 }, { kind = "return", status = "callback" }]
'''


def _text(count: int) -> str:
    return _TEMPLATE.replace("COUNT", str(count))


def _run() -> RunResult:
    return build(parse_scenario(_text(CALLBACKS), "recording_memory.toml")).run()


def test_equal_stack_bytes_at_one_rsp_are_kept_once_and_unequal_ones_apart() -> None:
    r = _run()
    assert r.error is None and r.exit_status == 0
    states, kinds = r.trace.states, [t.kind for t in r.trace.transitions]
    assert kinds.count("callback") == CALLBACKS
    for t in r.trace.transitions:
        if t.kind != "sysret" or t.service != "NtUserMessageCall":
            continue
        back, resumed = states[t.src], states[t.dst]
        # SYSRET after NtCallbackReturn: the same RSP, no user code between, so the same bytes ...
        assert resumed.rsp == back.rsp and resumed.stack == back.stack
        # ... held once.
        assert resumed.stack is back.stack
    # Every state still holds the live stack from its RSP to the base.
    assert all(len(s.stack) == s.stack_base - s.rsp for s in states if s.mode != "exited")
    # The callback's first instruction writes above its frame: the states at that RSP before
    # and after differ in those bytes and keep their own copies.
    entries = [s for s in states if s.mode == "user" and s.depth == 1]
    pending = [s for s in states if s.pending]
    assert len(entries) == len(pending) == CALLBACKS
    for entry, at_return in zip(entries, pending):
        assert at_return.rsp == entry.rsp - 8  # the call to NtCallbackReturn pushed its return address
        assert entry.stack != at_return.stack[8:]


def test_a_run_leaves_its_records_to_the_oldest_generation() -> None:
    process = build(parse_scenario(_text(400), "recording_memory.toml"))  # a few thousand records
    gc.collect()
    collections: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    was = gc.isenabled()
    gc.enable()
    gc.callbacks.append(seen)
    try:
        r = process.run()
        assert r.error is None and len(r.trace.raw_states) > 5 * 400
        # No collection walked the records inside the run, its end included ...
        assert collections == []
        assert gc.get_count()[0] < gc.get_threshold()[0]
        assert gc.get_freeze_count() == 0  # ... and nothing is left frozen
        # What the run kept is still known to the collector (a later full collection sees it).
        assert gc.is_tracked(r.trace.raw_states)
    finally:
        gc.callbacks.remove(seen)
        if not was:
            gc.disable()
