"""How a caller steers a kernel run: who answers choices, who watches states, when to stop.

A single run uses the defaults (every choice takes its default, nobody watches, never
stop early). The explorer passes its own hooks when it builds the process, so nothing
is swapped into a running kernel from outside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from emu.kernel.services import Choice
from emu.kernel.symbolic import Symbolic
from emu.records import record

if TYPE_CHECKING:
    from emu.kernel.thread import KThread


def take_default(thread: KThread, choice: Choice) -> str | None:
    """A single run: every choice takes the option the scenario names as its default."""
    return choice.default


def suspend(thread: KThread, choice: Choice) -> str | None:
    """Exploration: suspend at every choice; the explorer forks and resumes with each option."""
    return None


def declared_default(thread: KThread, request: Symbolic) -> int | None:
    """A single run: a symbolic value takes the default its declaration gives."""
    return request.default


def never() -> bool:
    return False


@record(frozen=True)
class KernelHooks:
    """The caller's side of a run.

    ``choose`` answers a Choice with an option name, or None to suspend the service
    (``Kernel.pending_choice``; ``Kernel.resume`` continues it). ``observe`` is called
    with (state id, thread) after each recorded state. ``stop`` is asked after each
    stretch of user code the machine runs: True ends ``Process.drive`` with "stopped".
    ``budget_states``: False when the trace spans many paths and the caller budgets
    distinct states itself (the explorer).
    """

    choose: Callable[[KThread, Choice], str | None] = take_default
    observe: Callable[[int, KThread], None] | None = None
    stop: Callable[[], bool] = never
    budget_states: bool = True
    # Answers a symbolic value (emu.kernel.symbolic) with a concrete one, or None to suspend
    # the service there as at a choice (an explorer forks and resumes with each value).
    symbolic: Callable[[KThread, Symbolic], int | None] = declared_default
