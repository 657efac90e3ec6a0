"""Following a fork's first option in place, with the kernel model handed over, finds the same graph.

Right after a fork is saved the machine is still in its state: depth-first exploration follows
the first option without a restore, and the fork keeps the kernel model's own objects instead
of a copy. A fork restored later must still hold the state it was saved in, so the graph (and
its exported bytes) must equal the one found when every option is restored from a copy.
"""

from __future__ import annotations

from typing import Any

import pytest

import emu.exploration.explorer as explorer_module
from conftest import ROOT
from emu.exploration.explorer import Explorer
from emu.exploration.restoring import stay
from emu.scenario import load_scenario

# Choices under callbacks, events waited on by two threads, deadlocks on some paths.
CASES = ["choice_nested_depth", "choice_callback_or_not", "callback_waits_on_event", "threads_deadlock_sometimes"]


def _explore(name: str, strategy: str) -> tuple[str, dict[str, Any]]:
    result = Explorer(load_scenario(ROOT / "scenarios" / f"{name}.toml"), strategy).run()  # type: ignore[arg-type]
    return result.graph.to_json(), result.summary()


@pytest.mark.parametrize("strategy", ["dfs", "bfs"])
@pytest.mark.parametrize("name", CASES)
def test_in_place_and_handed_over_match_restoring_copies(
    name: str, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stays: list[object] = []

    def counting_stay(ex: Explorer, fork: Any) -> None:
        stays.append(fork)
        stay(ex, fork)

    monkeypatch.setattr(explorer_module, "stay", counting_stay)
    fast = _explore(name, strategy)
    # Every fork saved with a copy of the kernel model, every option restored from it.
    monkeypatch.setattr(explorer_module, "owns_threads", lambda ex: False)
    before = len(stays)
    slow = _explore(name, strategy)
    assert len(stays) == before  # no fork was followed in place this time
    assert fast == slow
    if strategy == "dfs" and name == "choice_nested_depth":
        # Depth-first, the first option of a fork below the start is followed in place (the
        # start's fork holds the process's own thread objects: it is always restored from a copy).
        assert before > 0


def test_a_fork_followed_in_place_is_restored_intact() -> None:
    # choice_nested_depth: after the first option's whole subtree ran on the handed-over kernel
    # model, the second option starts from the fork's state (its callback stack included).
    dfs = Explorer(load_scenario(ROOT / "scenarios" / "choice_nested_depth.toml"), "dfs").run()
    bfs = Explorer(load_scenario(ROOT / "scenarios" / "choice_nested_depth.toml"), "bfs").run()
    assert dfs.graph.to_json() == bfs.graph.to_json()
    # 0-3 nested callbacks, each level "deeper" or "stop": every depth is reached.
    depths = {dfs.graph.state(n).depth for n in dfs.graph.nodes()}
    assert depths == {0, 1, 2, 3}
