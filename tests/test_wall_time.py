"""The wall-time budget stops guest code that never returns to the kernel, and code that does.

The clock is one watchdog thread per run (not Unicorn's ``timeout=``, which starts a thread
polling the clock at every ``emu_start``); these tests check what a user sees: the run stops,
names the budget and keeps what it recorded. No assertion here depends on how long anything took.
"""

from __future__ import annotations

import threading

from conftest import asm_scenario
from emu.api import run
from emu.errors import BudgetExceeded
from emu.scenario import parse_scenario

# No instruction budget: only the clock can stop these.
BUDGET = "[budgets]\nwall_time = 0.3\n"
YIELD = '[services.NtYieldExecution]\nsteps = [{ kind = "return", status = 0 }]'


def _watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "emu-watchdog"]


def test_a_tight_loop_stops_at_the_wall_budget() -> None:
    # `jmp $` never leaves the CPU: no hook fires, so no Python runs until something stops Unicorn.
    r = run(parse_scenario(asm_scenario("main:\n    jmp main", extra=BUDGET), "tight.toml"))
    assert r.stop == "budget"
    assert isinstance(r.error, BudgetExceeded) and r.error.budget == "wall_time"
    assert "app!main" in str(r.error)  # where the thread was: the loop itself
    assert [t.kind for t in r.trace] == []  # it never crossed into the kernel
    assert _watchdogs() == []  # the watchdog ended with the run


def test_a_loop_of_system_calls_stops_at_the_wall_budget() -> None:
    # Here the deadline can pass while the kernel model (Python) runs between two emu_start
    # calls, where stopping Unicorn has no effect: the next run must not start at all.
    code = "main:\n    sub rsp, 0x28\nagain:\n    call NtYieldExecution\n    jmp again"
    r = run(parse_scenario(asm_scenario(code, services=YIELD, extra=BUDGET), "calls.toml"))
    assert r.stop == "budget"
    assert isinstance(r.error, BudgetExceeded) and r.error.budget == "wall_time"
    kinds = {t.kind for t in r.trace}
    assert kinds == {"syscall", "sysret"} and len(r.trace.transitions) > 2
    assert _watchdogs() == []


def test_a_run_within_the_budget_is_not_stopped() -> None:
    code = "main:\n    sub rsp, 0x28\n    call NtYieldExecution\n    add rsp, 0x28\n    xor eax, eax\n    ret"
    r = run(parse_scenario(asm_scenario(code, services=YIELD, extra="[budgets]\nwall_time = 60\n"), "ok.toml"))
    assert r.error is None and r.stop == "exit" and r.exit_status == 0
    assert [t.kind for t in r.trace][:2] == ["syscall", "sysret"]
    assert _watchdogs() == []
