"""Minidumps of multi-thread runs hold every live thread as it is at the dumped state.

The expectation is taken live: while a run goes on, an observer on the kernel notes, at
every recorded state, each thread's context from the kernel model itself (the trap frame it
will resume from, or its entry context if it has not started) and its stack from the
machine's memory. The dump must hold exactly those threads (the state's own first; ended
threads left out), with those contexts and stacks — which are also the contexts of each
thread's latest recorded state — and the detector on each dumped thread must agree with the
ground truth of that latest state. Runs: the single run of each multi-thread scenario and
runs with seeded random schedules (some of them deadlock, some have one thread preempted at
ZwCallbackReturn while another moves: [machine] preempt_at_callback_return is set for them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emu.api import Run, run
from emu.cli import dump as cli_dump
from emu.context import UserContext
from emu.detection.view import detect_callback_return_pending, view_of
from emu.dump import read_minidump, thread_id, write_minidump
from emu.dump.write import threads_at
from emu.engine import build
from emu.errors import DumpError
from emu.kernel import KernelHooks, KThread
from emu.kernel.hooks import take_default
from emu.kernel.services import Choice
from emu.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("threads_deadlock_sometimes.toml", "threads_no_deadlock.toml")
SEEDS = (None, *range(12))  # None: the plain single run


@dataclass(frozen=True)
class Live:
    """One thread as the kernel model and the machine had it when a state was recorded."""

    index: int
    teb: int
    latest: int  # the id of its latest recorded state (KThread.state_id)
    context: UserContext
    stack: bytes


def _stack(read: Callable[[int, int], bytes], t: KThread, ctx: UserContext) -> bytes:
    """The thread's stack from RSP up, as the kernel captures it for a state."""
    if not t.stack_limit <= ctx.rsp < t.stack_base:
        return b""
    return read(ctx.rsp, t.stack_base - ctx.rsp)


def _observed_run(path: Path, seed: int | None) -> tuple[Run, dict[int, list[Live]]]:
    """Run a scenario (with a seeded random schedule unless ``seed`` is None), noting every thread at every state."""
    rng = random.Random(seed)

    def choose(thread: KThread, choice: Choice) -> str | None:
        return take_default(thread, choice) if seed is None else rng.choice(choice.options)

    def observe(sid: int, moving: KThread) -> None:
        out = []
        for t in kernel.threads.values():
            if t is moving:
                ctx = UserContext._make(kernel.trace.raw_state(sid).context)
            elif t.terminated:
                continue  # ended: not in a dump
            elif not t.started:
                ctx = t.entry_context
            else:
                assert t.suspended is not None, f"s{sid}: thread {t.name} is off the CPU but not suspended"
                ctx = t.suspended.trap.ctx  # what the kernel will put back on the CPU
            out.append(Live(t.tid, t.teb, t.state_id, ctx, _stack(machine.read, t, ctx)))
        seen[sid] = sorted(out, key=lambda x: (x.index != moving.tid, x.index))

    # Preemption at NtCallbackReturn's entry, so a thread can be Ready at ZwCallbackReturn while another moves.
    scenario = dataclasses.replace(load_scenario(path), preempt_at_callback_return=True)
    p = build(scenario, KernelHooks(choose=choose, observe=observe))
    kernel, machine = p.kernel, p.machine
    seen: dict[int, list[Live]] = {}
    # The threads' initial states were recorded as they were created: all of them, unstarted, are the process then.
    created = [Live(t.tid, t.teb, t.state_id, t.entry_context, _stack(machine.read, t, t.entry_context))
               for t in kernel.threads.values()]  # fmt: skip
    for live in created:
        seen[live.latest] = sorted(created, key=lambda x: (x.index != live.index, x.index))
    r = Run.of(p.run())
    assert sorted(seen) == [s.id for s in r.trace.states]
    return r, seen


# (scenario, seed) -> the run, and every thread at each of its states
Observed = dict[tuple[str, int | None], tuple[Run, dict[int, list[Live]]]]


@pytest.fixture(scope="module")
def observed() -> Observed:
    return {(name, seed): _observed_run(ROOT / "scenarios" / name, seed) for name in SCENARIOS for seed in SEEDS}


def test_the_runs_cover_what_matters(observed: Observed) -> None:
    """The schedules reach deadlocks, and states where one thread is at ZwCallbackReturn (preempted) while another moves."""
    stops = {r.stop for r, _ in observed.values()}
    assert stops == {"exit", "deadlock"}
    cross = 0
    for r, seen in observed.values():
        states = r.trace.states
        cross += sum(1 for s in states if not s.pending and any(states[x.latest].pending for x in seen[s.id][1:]))
    assert cross >= 5


def test_every_state_dumps_every_live_thread_as_it_is(observed: Observed) -> None:
    checked = pending = 0
    for (name, seed), (r, seen) in observed.items():
        states = r.trace.states
        for s in states:
            where = f"{name} seed {seed} s{s.id}"
            live = seen[s.id]
            dv = read_minidump(write_minidump(r, s), where)
            records, views = dv.thread_records, dv.threads()
            assert [t.thread_id for t in records] == [thread_id(x.index) for x in live], where
            assert records[0].thread_id == thread_id(s.thread) and views[0].context == s.context, where
            assert [(t.tid, shown.id) for t, shown in threads_at(r, s)] == [(x.index, x.latest) for x in live], where
            for rec, view, x in zip(records, views, live):
                shown = states[x.latest]  # the thread's latest state: id up to s.id, or its first one
                assert shown.thread == x.index and (shown.id <= s.id or shown.id == min(
                    o.id for o in states if o.thread == x.index)), where  # fmt: skip
                assert rec.teb == x.teb == r.threads[x.index].teb, where
                assert rec.context == view.context == x.context == shown.context, f"{where}: thread {x.index}"
                assert shown.stack == x.stack, f"{where}: thread {x.index}'s stack changed off the CPU"
                if x.stack:
                    # The Stack range starts at RSP's page (page-aligned regions; zeros below RSP).
                    low = x.context.rsp & ~0xFFF
                    assert rec.stack[0] == low and rec.stack[1][x.context.rsp - low :].startswith(x.stack), where
                    assert view.read(x.context.rsp, len(x.stack)) == x.stack, where
                assert view.kernel_mode is None, where
                got = detect_callback_return_pending(view)
                assert (got is not None) == shown.pending, f"{where}: thread {x.index}"
                if got is not None:
                    assert got.thread == rec.thread_id, where
                    expected = detect_callback_return_pending(view_of(r, shown))
                    assert expected is not None, where
                    assert (got.rip, got.return_address, got.depth, got.api_number) == (
                        expected.rip, expected.return_address, expected.depth, expected.api_number,
                    ), where  # fmt: skip
                    pending += 1
                checked += 1
    assert checked > 500 and pending > 20


def _independent_readers(data: bytes, path: Path) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], Any]:
    """(thread id, RIP, TEB) per thread from PyPI ``minidump``; (thread id, RIP) and the parser from ``udmp-parser``."""
    import udmp_parser
    from minidump.minidumpfile import MinidumpFile

    logging.disable(logging.CRITICAL)  # it logs a traceback for the PEB, which emu does not dump
    try:
        mf = MinidumpFile.parse_bytes(data)
    finally:
        logging.disable(logging.NOTSET)
    skelsec = [(t.ThreadId, t.ContextObject.Rip, t.Teb) for t in mf.threads.threads]
    path.write_bytes(data)
    p = udmp_parser.UserDumpParser()
    assert p.Parse(path)
    udmp = sorted((tid, t.Context.Rip) for tid, t in p.Threads().items())
    return skelsec, udmp, p


def test_independent_readers_see_every_thread(observed: Observed, tmp_path: Path) -> None:
    two = 0
    for (name, seed), (r, seen) in observed.items():
        if seed not in (None, 1, 2):
            continue
        for s in r.trace.states:
            where = f"{name} seed {seed} s{s.id}"
            live = seen[s.id]
            data = write_minidump(r, s)
            skelsec, udmp, p = _independent_readers(data, tmp_path / "t.dmp")
            assert skelsec == [(thread_id(x.index), x.context.rip, x.teb) for x in live], where
            assert udmp == sorted((thread_id(x.index), x.context.rip) for x in live), where
            for x in live:
                if x.stack:
                    assert bytes(p.ReadMemory(x.context.rsp, 16) or b"") == x.stack[:16], where
            two += len(live) == 2
    assert two > 20


def test_state_of_another_run_is_one_dump_error_line() -> None:
    a = run(ROOT / "scenarios" / "threads_no_deadlock.toml")
    b = run(ROOT / "scenarios" / "threads_deadlock_sometimes.toml")
    s = b.trace.states[17]  # worker's first wait: B here, A in the other scenario
    assert s != a.trace.states[17]
    with pytest.raises(DumpError) as e:
        write_minidump(a, s)
    assert str(e.value) == "state s17: not a state of this run of threads_no_deadlock"
    with pytest.raises(DumpError) as e:
        write_minidump(a, s._replace(id=len(a.trace.states)))
    assert str(e.value) == f"state s{len(a.trace.states)}: not a state of this run of threads_no_deadlock"


# --- the commands ---------------------------------------------------------------------------

TWO_CALLBACKS = '''
[scenario]
name = "two_callbacks"
description = "two threads, each in a callback: both at ZwCallbackReturn at once (one preempted there, Ready)"

[machine]
preempt_at_callback_return = true

[[module]]
name = "app"
code = """
main:
    sub rsp, 0x28
    call NtUserMessageCall
    xor eax, eax
    add rsp, 0x28
    ret

on_paint:
    mov eax, 0x2222
    ret
"""

[[thread]]
name = "a"
entry = "app!main"

[[thread]]
name = "b"
entry = "app!main"

[kernel_callback_table]
2 = "app!on_paint"

[services.NtUserMessageCall]
steps = [{ kind = "callback", api = 2 }, { kind = "return", status = "callback" }]
'''


def _other_first(thread: KThread, choice: Choice) -> str:
    """A schedule that lets another thread go whenever it can."""
    return next((o for o in choice.options if o != thread.name), choice.default)


def test_emu_detect_dump_reports_each_thread_at_zwcallbackreturn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "two.toml").write_text(TWO_CALLBACKS)
    p = build(tmp_path / "two.toml", KernelHooks(choose=_other_first))
    r = p.run()
    assert r.stop == "exit" and r.exit_status == 0
    states = r.trace.states
    # b at ZwCallbackReturn (preempted there) while a still is
    both = next(s for s in states if s.pending and s.thread == 1)
    assert [shown.pending for _, shown in threads_at(r, both)] == [True, True]
    out = tmp_path / "both.dmp"
    write_minidump(r, both, out)
    args = argparse.Namespace(dump=str(out), json=False)
    assert cli_dump.cmd_detect_dump(args) == 0
    assert capsys.readouterr().out == (
        "thread 0x1008: ntdll!ZwCallbackReturn+0x14  [rsp] -> ntdll!KiUserCallbackDispatcherContinue+0xc  depth 1  api 2\n"
        "thread 0x1004: ntdll!ZwCallbackReturn+0x14  [rsp] -> ntdll!KiUserCallbackDispatcherContinue+0xc  depth 1  api 2\n"
    )
    args.json = True
    assert cli_dump.cmd_detect_dump(args) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(d["thread"], d["state"], d["depth"], d["api_number"]) for d in got] == [
        (0x1008, None, 1, 2), (0x1004, None, 1, 2),
    ]  # fmt: skip
    # One thread at ZwCallbackReturn, the other not started: one line, for the first.
    first = next(s for s in states if s.pending)
    write_minidump(r, first, tmp_path / "one.dmp")
    assert [d.thread for d in cli_dump.detect_dump(tmp_path / "one.dmp")] == [0x1004]


def test_emu_dump_says_how_many_threads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scen = ROOT / "scenarios" / "threads_deadlock_sometimes.toml"
    for state, threads in (("s10", "2 threads"), ("s20", "1 thread")):  # s20: ui has exited
        out = tmp_path / f"{state}.dmp"
        args = argparse.Namespace(scenario=str(scen), state=state, output=str(out), force=False, allow_path=[])
        assert cli_dump.cmd_dump(args) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"wrote {out} (") and f", {threads}, " in text, text
