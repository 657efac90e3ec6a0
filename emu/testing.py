"""pytest plugin: test your detector against emu's ground truth, without Windows.

Registered as the ``emu`` pytest11 entry point, so installing emu makes these available in
any test suite (or load it explicitly: ``pytest -p emu.testing``)::

    from emu.testing import assert_detector_matches

    def my_detector(view):                      # a ThreadView: context, memory, modules
        ...                                     # truthy: "at ZwCallbackReturn"

    def test_my_detector_on_every_state():
        assert_detector_matches(my_detector, "scenarios/", explore=True)

    def test_views(emu_states):
        for state, view in emu_states("scenarios/nested_callbacks.toml"):
            assert bool(my_detector(view)) == state.pending

    def test_what_getthreadcontext_sees(assert_detector_matches):
        assert_detector_matches(my_nested_detector, "scenarios/", observer="user-context",
                                truth="waiting-in-callback")

Fixtures: ``emu_run(path)`` runs a scenario once per session and returns the
:class:`~emu.engine.Run`; ``emu_states(path, explore=False, observer=...)`` gives (State, ThreadView)
pairs for every state of the run (or every node of the explored graph) the observer sees;
``assert_detector_matches`` is the function below. Relative paths are tried from the
current folder, then from pytest's rootdir.

A failing :func:`assert_detector_matches` names every mismatching state: false positive or
negative, scenario, state id, its symbolic label and the transitions that led there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from emu.detection.score import ScenarioLike, ScoreReport
    from emu.detection.view import ThreadView
    from emu.engine import Run
    from emu.graph import StateGraph
    from emu.loader.image import Image
    from emu.trace import State

StatePairs = list[tuple["State", "ThreadView"]]


def assert_detector_matches(
    detector: Callable[[ThreadView], object],
    scenario: ScenarioLike | Iterable[ScenarioLike],
    explore: bool = False,
    allow: Sequence[str | Path] = (),
    observer: str = "kernel-debugger",
    truth: str = "seed",
) -> ScoreReport:
    """Fail unless ``detector`` agrees with the ground truth on every state of ``scenario``.

    ``scenario`` is a file, a folder of scenarios, a Scenario, or several. With ``explore``
    every node of the explored state graph is checked. ``observer`` (``kernel-debugger`` or
    ``user-context``) and ``truth`` (``seed`` or ``waiting-in-callback``) are as in
    :func:`emu.detection.score.score`. Returns the report when it passes.

    Raises:
        AssertionError: naming each false positive and false negative (scenario, state,
            label, the transitions before it), then the confusion matrices.
    """
    __tracebackhide__ = True
    from emu.detection.score import score

    report = score(detector, scenario, explore=explore, allow=allow, observer=observer, truth=truth)
    if not report.perfect:
        raise AssertionError(mismatch_message(report))
    return report


def mismatch_message(report: ScoreReport) -> str:
    """Every miss of a report, then its table: what a failing test prints."""
    n = len(report.misses)
    what = "nodes of the explored graphs" if report.explore else "states"
    lines = [
        f"detector {report.detector} disagrees with emu's ground truth on {n} of {report.total.total} {what}:",
        f"(the {report.truth} truth, on what a {report.observer} observer sees)",
    ]
    lines += [str(m) for m in report.misses]
    lines += ["", report.table()]
    return "\n".join(lines)


def _resolve(path: str | Path, root: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return root / p if (root / p).exists() else p


@pytest.fixture(scope="session")
def emu_run(request: pytest.FixtureRequest) -> Callable[[str | Path], Run]:
    """A factory: ``emu_run("scenarios/x.toml")`` runs the scenario (once per session) and returns the Run."""
    from emu.engine import run

    root = Path(request.config.rootpath)
    runs: dict[Path, Run] = {}

    def get(path: str | Path) -> Run:
        p = _resolve(path, root).resolve()
        if p not in runs:
            runs[p] = run(p)
        return runs[p]

    return get


@pytest.fixture(scope="session")
def emu_states(request: pytest.FixtureRequest, emu_run: Callable[[str | Path], Run]) -> Callable[..., StatePairs]:
    """A factory: ``emu_states(path, explore=False, observer="kernel-debugger")`` gives (State, ThreadView)
    for every state of the run (or, with ``explore=True``, every node of the explored graph) that the
    observer can see, each with that observer's view (see :mod:`emu.detection.observers`)."""
    from emu.detection.observers import check_observer, node_status, statuses, view_for
    from emu.exploration.explorer import Explorer
    from emu.scenario import load_scenario

    root = Path(request.config.rootpath)
    explored: dict[Path, tuple[Sequence[Image], StateGraph]] = {}

    def get(path: str | Path, explore: bool = False, observer: str = "kernel-debugger") -> StatePairs:
        check_observer(observer)
        if not explore:
            r = emu_run(path)
            known = statuses(r.trace)
            pairs = [(s, view_for(observer, r.images, s, known[s.id])) for s in r.trace.states]
            return [(s, v) for s, v in pairs if v is not None]
        p = _resolve(path, root).resolve()
        if p not in explored:
            explorer = Explorer(load_scenario(p))
            explored[p] = (explorer.process.images, explorer.run().graph)
        images, graph = explored[p]
        out = []
        for n in graph.nodes():
            view = view_for(observer, images, graph.state(n), node_status(graph, n))
            if view is not None:
                out.append((graph.state(n), view))
        return out

    return get


@pytest.fixture(name="assert_detector_matches")
def _assert_detector_matches_fixture(request: pytest.FixtureRequest) -> Callable[..., ScoreReport]:
    """:func:`assert_detector_matches` as a fixture, with relative paths also tried from pytest's rootdir."""
    root = Path(request.config.rootpath)

    def check(
        detector: Callable[[ThreadView], object],
        scenario: ScenarioLike | Iterable[ScenarioLike],
        explore: bool = False,
        allow: Sequence[str | Path] = (),
        observer: str = "kernel-debugger",
        truth: str = "seed",
    ) -> ScoreReport:
        __tracebackhide__ = True
        from emu.scenario import Scenario

        items = [scenario] if isinstance(scenario, (str, Path, Scenario)) else list(scenario)
        resolved = [s if isinstance(s, Scenario) else _resolve(s, root) for s in items]
        return assert_detector_matches(detector, resolved, explore, allow, observer, truth)

    return check
