"""What the fuzz suites share: hypothesis settings, the ``slow`` gate, a hang watchdog, outcome tallies.

Two profiles (``tests/test_fuzz_*.py``):

* **fast**, in the default test run: ``FAST`` settings, derandomized (the same examples on
  every run, so CI is deterministic), a few hundred cases per suite, seconds in total.
* **slow**, with ``python -m pytest -q -m slow``: :func:`slow_settings` with tens of
  thousands of random cases per test (≥ 100 k in total). At the end of the session a table
  of the counts is printed: cases, successes, ``ScenarioError`` / ``ImageError`` / other
  ``EmuError`` outcomes.

The ``slow`` marker is declared in ``pyproject.toml``. :func:`slow_only` marks a test
``slow`` *and* skips it unless a ``-m`` expression selects it, so no conftest hook is
needed: a plain ``python -m pytest`` skips the slow tests; ``-m slow`` runs only them
(pytest deselects every test without the marker).

A hang is a failure too: :func:`no_hang` arms :mod:`faulthandler`, which dumps every
thread's traceback and ends the process if one case takes longer than its limit, even
when the time is spent inside Unicorn's C code where no Python exception can land. The
input of the case is in ``$TMPDIR/emu-fuzz-last-case`` (:data:`LAST_CASE`) for replaying.

:func:`run_bounded` builds and runs a scenario under low budgets and checks the Run's
shape. Nothing is recognised or counted as "known": any exception other than an ``EmuError``
(a ``TypeError`` included) fails the case, and hypothesis reports its input. A bug found and
not fixed yet gets a test of its own with the literal input that reproduces it, marked
``pytest.mark.xfail(strict=True)`` (the fix makes that test pass, which fails the suite until
the mark goes). The fuzzers are never taught to skip or count it, so they fail whenever they
meet it again.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar

import pytest
from hypothesis import HealthCheck, settings

from emu.api import Run
from emu.engine import build
from emu.errors import EmuError, ImageError, ScenarioError
from emu.scenario import Budgets, Scenario

F = TypeVar("F", bound=Callable[..., object])

# A case slower than this is a hang: faulthandler prints the stacks and exits the process.
HANG_SECONDS = 60.0
RUN_SECONDS = 0.5  # the wall-time budget of each fuzzed run
LAST_CASE = Path(tempfile.gettempdir()) / "emu-fuzz-last-case"  # the input being tried, for replaying a hang

FAST = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fast_settings(max_examples: int) -> settings:
    """The fast profile with another number of examples."""
    return settings(FAST, max_examples=max_examples)


def slow_settings(max_examples: int) -> settings:
    """The slow profile: random (not derandomized), so each run explores new inputs; failures print a blob."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=False,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


def _selects_slow(markexpr: str) -> bool:
    return bool(re.search(r"(?<!not )\bslow\b", markexpr))


def slow_only(fn: F) -> F:
    """Mark ``fn`` slow, and skip it unless ``-m`` selects slow tests (no conftest hook needed)."""
    gate = pytest.mark.skipif(
        "not __import__('fuzz_support')._selects_slow(config.getoption('markexpr'))",
        reason="slow fuzz profile: run with -m slow",
    )
    marked: F = pytest.mark.slow(gate(fn))
    return marked


_HANG_OUT: list[TextIO] = []  # the terminal's stderr, kept before pytest's capture hides it


@contextmanager
def no_hang(seconds: float = HANG_SECONDS, case: str | bytes | None = None) -> Iterator[None]:
    """Fail loudly (tracebacks, process exit) if the block runs longer than ``seconds``.

    ``case`` is written to :data:`LAST_CASE` first, so that the input of a hang can be replayed.
    """
    if case is not None:
        LAST_CASE.write_bytes(case.encode("utf-8", "surrogateescape") if isinstance(case, str) else case)
    faulthandler.dump_traceback_later(seconds, exit=True, file=_HANG_OUT[0] if _HANG_OUT else sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def outcome_of(error: BaseException | None) -> str:
    """A tally label: ``ok``, ``ScenarioError``, ``ImageError`` or ``EmuError:<subclass>``."""
    if error is None:
        return "ok"
    if isinstance(error, ScenarioError):
        return "ScenarioError"
    if isinstance(error, ImageError):
        return "ImageError"
    if isinstance(error, EmuError):
        return f"EmuError:{type(error).__name__}"
    raise error  # anything else is a bug: let hypothesis report it with its traceback


@dataclass
class Tally:
    """Outcomes of one suite's cases."""

    name: str
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, label: str) -> None:
        self.counts[label] += 1

    def record(self, error: BaseException | None) -> str:
        """Count an outcome and return its label; a non-EmuError is counted as a crash and re-raised."""
        try:
            label = outcome_of(error)
        except BaseException:
            self.add("crash")
            raise
        self.add(label)
        return label

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        c = self.counts
        scen, img, ok, crash = c["ScenarioError"], c["ImageError"], c["ok"], c["crash"]
        other = {k.removeprefix("EmuError:"): v for k, v in sorted(c.items()) if k.startswith("EmuError:")}
        shown = ", ".join(f"{k} {v}" for k, v in other.items()) or "-"
        return (
            f"{self.name:<28} {self.cases:>8} {ok:>8} {scen:>13} {img:>10} {sum(other.values()):>10}"
            f" {crash:>6}  ({shown})"
        )


TALLIES: dict[str, Tally] = {}
_REPORTING: list[bool] = []


def tally(name: str, config: pytest.Config) -> Tally:
    """The session's tally for a suite; the first call arranges for the table to be printed at the end."""
    if not _REPORTING:
        _REPORTING.append(True)
        if _selects_slow(config.getoption("markexpr")):  # the fast profile's counts stay quiet
            config.add_cleanup(_print_tallies)
        capman = config.pluginmanager.getplugin("capturemanager")
        if capman is not None and not _HANG_OUT:
            # Under fd capture, fd 2 is a temporary file that a dying process never shows.
            with capman.global_and_fixture_disabled():
                _HANG_OUT.append(os.fdopen(os.dup(2), "w"))
    return TALLIES.setdefault(name, Tally(name))


def _print_tallies() -> None:
    if not TALLIES:
        return
    out = sys.stdout
    head = f"{'fuzz suite':<28} {'cases':>8} {'ok':>8} {'ScenarioError':>13} {'ImageError':>10} {'EmuError':>10} {'crash':>6}  (EmuError subclasses)"
    out.write("\n" + head + "\n" + "-" * len(head) + "\n")
    total = Tally("total")
    for t in TALLIES.values():
        out.write(t.line() + "\n")
        total.counts.update(t.counts)
    out.write(total.line() + "\n")
    out.write(
        f"crashes (non-EmuError exceptions): {total.counts['crash']}; "
        "a hang would have ended the run with faulthandler's tracebacks\n"
    )
    out.flush()


def run_bounded(s: Scenario) -> Run:
    """Build (only EmuError may escape) and run with low budgets (a Run comes back, error or not)."""
    b = s.budgets
    s = dataclasses.replace(
        s,
        budgets=Budgets(
            instructions=min(b.instructions or 20_000, 20_000),
            wall_time=min(b.wall_time, RUN_SECONDS),
            callback_depth=min(b.callback_depth, 64),
            states=min(b.states, 10_000),
            choice_depth=b.choice_depth,
            output_bytes=min(b.output_bytes, 1 << 20),
            memory=min(b.memory, 256 << 20),
        ),
    )
    r = Run.of(build(s).run())
    assert isinstance(r, Run)
    assert r.error is None or isinstance(r.error, EmuError), repr(r.error)
    assert r.stop in ("exit", "deadlock", "fault", "budget"), r.stop
    # A deadlock ends a run without an error (threads left waiting on each other): a wait chain says why.
    assert (r.error is None) == (r.stop in ("exit", "deadlock")), (r.stop, r.error)
    assert bool(r.deadlock) == (r.stop == "deadlock"), (r.stop, r.deadlock)
    # No wall-clock bound here: the run's own wall_time budget (RUN_SECONDS) stops runaway guest
    # code, and no_hang() ends the process loudly if anything hangs.
    r.detections  # noqa: B018 - the detector runs on every state; it must not raise either
    r.outcomes  # noqa: B018 - and the scenario's [[expect]] entries are evaluated
    return r
