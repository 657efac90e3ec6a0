"""Scoring a detector against the kernel model's ground truth, state by state.

A detector is any callable taking a :class:`~emu.detection.view.ThreadView` (what a debugger sees)
and answering truthy for "this thread is at ZwCallbackReturn while the kernel completes a
callback" (against the ``waiting-in-callback`` truth: "this thread waits inside a
callback"): a :class:`~emu.detection.view.Detection`, a verdict with ``__bool__``, ``True``, or
``None``/``False``. :func:`score` runs it on every state of every scenario (or every node of
every explored graph) that an observer sees and compares the answers with a ground truth
(:mod:`emu.detection.observers`: ``seed``, today's ``State.pending``, or ``waiting-in-callback``)::

    >>> import emu
    >>> from emu.detection.signals import naive_detector
    >>> forged = Path(emu.__file__).parent.parent / "scenarios" / "hard_no_callback_forged_frame.toml"
    >>> report = emu.score(naive_detector, forged)
    >>> (report.total.tp, report.total.fp, report.total.fn)
    (0, 2, 0)
    >>> report.misses[0].label
    'kernel | NtCallbackReturn | depth 0 | user at ntdll!ZwCallbackReturn+0x14 | Running'

Each false positive and false negative is named: scenario, state (``s3``) or node (``n4``),
the state's symbolic label and the last transitions that led there.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from emu.detection.observers import KERNEL_DEBUGGER, SEED, ThreadStatus, check_observer, check_truth, is_true, view_for
from emu.detection.view import ThreadView
from emu.errors import EmuError, ScenarioError
from emu.graph import state_label
from emu.loader.image import Image
from emu.scenario import Scenario, load_scenario
from emu.trace import State
from emu.winnt import status_name

HISTORY = 3  # transitions shown before each mismatching state
ScenarioLike = str | Path | Scenario


@dataclass
class Confusion:
    """True/false positives and negatives (positive: the detector says the truth holds)."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def add(self, truth: bool, said: bool) -> Literal["TP", "FP", "TN", "FN"]:
        if said and truth:
            self.tp += 1
            return "TP"
        if said:
            self.fp += 1
            return "FP"
        if truth:
            self.fn += 1
            return "FN"
        self.tn += 1
        return "TN"

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.total if self.total else 1.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn}


@dataclass(frozen=True)
class Miss:
    """A state where the detector and the ground truth disagree."""

    kind: Literal["FP", "FN"]
    scenario: str
    state: str  # "s3" in a run, "n4" in an explored graph
    label: str  # state_label(...) | thread state, e.g. "kernel | ... | depth 1 | user at ... | Running"
    path: tuple[str, ...]  # the last transitions that led there, oldest first
    evidence: tuple[str, ...] = ()  # what the detector said, when its answer carries evidence

    def __str__(self) -> str:
        lines = [f"{self.kind} {self.scenario} {self.state}: {self.label}"]
        lines += [f"    after {p}" for p in self.path]
        lines += [f"    detector: {e}" for e in self.evidence]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind, "scenario": self.scenario, "state": self.state, "label": self.label,
            "path": list(self.path), "evidence": list(self.evidence),
        }  # fmt: skip


@dataclass
class ScenarioScore:
    """One scenario's confusion matrix and misses."""

    scenario: str
    path: str
    confusion: Confusion = field(default_factory=Confusion)
    misses: list[Miss] = field(default_factory=list)
    stopped: str | None = None  # why the run or exploration ended early (a fault, a budget)

    def as_dict(self) -> dict[str, object]:
        return {
            "scenario": self.scenario, "path": self.path, **self.confusion.as_dict(), "states": self.confusion.total,
            "stopped": self.stopped, "misses": [m.as_dict() for m in self.misses],
        }  # fmt: skip


@dataclass
class ScoreReport:
    """A detector's confusion matrix per scenario and in total, with every miss named."""

    detector: str
    explore: bool
    scenarios: list[ScenarioScore]
    observer: str = KERNEL_DEBUGGER  # whose view the detector got (emu.detection.observers.OBSERVERS)
    truth: str = SEED  # the ground truth it was compared with (emu.detection.observers.TRUTHS)

    @property
    def total(self) -> Confusion:
        return sum((s.confusion for s in self.scenarios), Confusion())

    @property
    def misses(self) -> list[Miss]:
        return [m for s in self.scenarios for m in s.misses]

    @property
    def false_positives(self) -> list[Miss]:
        return [m for m in self.misses if m.kind == "FP"]

    @property
    def false_negatives(self) -> list[Miss]:
        return [m for m in self.misses if m.kind == "FN"]

    @property
    def perfect(self) -> bool:
        """True when the detector matches the ground truth on every state."""
        return not self.misses

    def as_dict(self) -> dict[str, object]:
        return {
            "detector": self.detector, "explore": self.explore, "observer": self.observer, "truth": self.truth,
            "total": self.total.as_dict(),
            "perfect": self.perfect, "scenarios": [s.as_dict() for s in self.scenarios],
        }  # fmt: skip

    def table(self) -> str:
        """The confusion matrices, one row per scenario and a total."""
        unit = "nodes" if self.explore else "states"
        width = max([len(s.scenario) for s in self.scenarios] + [len("total")])
        head = f"{'scenario':<{width}}  {unit:>6}  {'TP':>4}  {'FP':>4}  {'TN':>4}  {'FN':>4}"
        rows = [head, "-" * len(head)]
        for s in [*self.scenarios, ScenarioScore("total", "", self.total)]:
            c = s.confusion
            note = f"  (stopped: {s.stopped})" if s.stopped else ""
            rows.append(f"{s.scenario:<{width}}  {c.total:>6}  {c.tp:>4}  {c.fp:>4}  {c.tn:>4}  {c.fn:>4}{note}")
            if s.scenario != "total" and s is self.scenarios[-1]:
                rows.append("-" * len(head))
        return "\n".join(rows)

    def __str__(self) -> str:
        t = self.total
        out = [
            f"detector {self.detector} on {len(self.scenarios)} scenario(s)",
            f"the {self.truth} truth, on the states a {self.observer} observer sees",
            self.table(),
        ]
        out.append(f"accuracy {t.accuracy:.1%}, precision {t.precision:.1%}, recall {t.recall:.1%}")
        for title, misses in (("false positives", self.false_positives), ("false negatives", self.false_negatives)):
            if misses:
                out.append(f"\n{title} ({len(misses)}):")
                out.extend(str(m) for m in misses)
        if self.perfect:
            out.append("the detector matches the ground truth on every state")
        return "\n".join(out)


def detector_name(detector: Callable[[ThreadView], object]) -> str:
    module = getattr(detector, "__module__", None)
    name = getattr(detector, "__qualname__", None) or type(detector).__name__
    return f"{module}:{name}" if module else str(name)


def _evidence(answer: object) -> tuple[str, ...]:
    evidence = getattr(answer, "evidence", None)
    if isinstance(evidence, (tuple, list)) and all(isinstance(e, str) for e in evidence):
        return tuple(evidence)[:4]
    if answer is not None and not isinstance(answer, bool):
        return (" ".join(str(answer).split())[:200],)
    return ()


def _judge(
    detector: Callable[[ThreadView], object], view: ThreadView, state: State, where: str
) -> tuple[bool, tuple[str, ...]]:
    try:
        answer = detector(view)
    except Exception as e:
        e.add_note(f"emu.score: the detector raised on {where}")
        raise
    return bool(answer), _evidence(answer)


def _transition_text(kind: str, service: str | None, status: str, where: str) -> str:
    parts = [kind, service or "", f"-> {status}" if status else "", where]
    return " ".join(p for p in parts if p)


def _seen(
    detector: Callable[[ThreadView], object], images: Sequence[Image], state: State, status: ThreadStatus,
    observer: str, truth: str, where: str,
) -> tuple[bool, bool, tuple[str, ...]] | None:  # fmt: skip
    """(truth, the detector's answer, its evidence) for a state the observer sees, else None."""
    view = view_for(observer, images, state, status)
    if view is None:
        return None
    said, evidence = _judge(detector, view, state, where)
    return is_true(truth, state, status), said, evidence


def score_run(
    detector: Callable[[ThreadView], object], scenario: Scenario, history: int = HISTORY,
    observer: str = KERNEL_DEBUGGER, truth: str = SEED,
) -> ScenarioScore:  # fmt: skip
    """Score a detector on every state of one run of ``scenario`` that ``observer`` sees."""
    from emu.detection.observers import statuses
    from emu.engine import run

    r = run(scenario)
    result = ScenarioScore(scenario.name, scenario.path, stopped=None if r.error is None else f"{r.stop}: {r.error}")
    into = {t.dst: t for t in r.trace.transitions}
    known = statuses(r.trace)
    for state in r.trace.states:
        got = _seen(detector, r.images, state, known[state.id], observer, truth, f"{scenario.name} s{state.id}")
        if got is None:
            continue
        true, said, evidence = got
        kind = result.confusion.add(true, said)
        if kind in ("FP", "FN"):
            chain: list[str] = []
            sid = state.id
            while sid in into and len(chain) < history:
                t = into[sid]
                chain.append(
                    f"step {t.step}: " + _transition_text(t.kind, t.service, t.status_name, f"at {t.rip_symbol}")
                )
                sid = t.src
            label = f"{state_label(state, r.symbolize)} | {known[state.id]}"
            result.misses.append(Miss(kind, scenario.name, f"s{state.id}", label, tuple(reversed(chain)), evidence))
    return result


def score_exploration(
    detector: Callable[[ThreadView], object], scenario: Scenario, history: int = HISTORY,
    observer: str = KERNEL_DEBUGGER, truth: str = SEED,
) -> ScenarioScore:  # fmt: skip
    """Score a detector on every node of the graph that exploring ``scenario`` finds that ``observer`` sees."""
    from emu.detection.observers import node_status
    from emu.exploration.explorer import Explorer

    explorer = Explorer(scenario)
    try:
        exp = explorer.run()
    except EmuError as e:  # the explorer could not finish: nothing to score, and the report says why
        return ScenarioScore(scenario.name, scenario.path, stopped=f"exploration failed: {e}")
    images: Sequence[Image] = explorer.process.images
    graph = exp.graph
    stopped = f"budget {exp.stopped_by}" if exp.stopped_by else None
    result = ScenarioScore(scenario.name, scenario.path, stopped=stopped)
    for node in graph.nodes():
        state = graph.state(node)
        status = node_status(graph, node)
        got = _seen(detector, images, state, status, observer, truth, f"{scenario.name} {node}")
        if got is None:
            continue
        true, said, evidence = got
        kind = result.confusion.add(true, said)
        if kind in ("FP", "FN"):
            path = graph.path_to(node)
            steps = []
            for u, v in list(itertools.pairwise(path))[-history:]:
                edge = graph.lean.edges[u, v]["edge"]
                status_text = "" if edge.status is None else status_name(edge.status)
                steps.append(f"{u} -> {v}: " + _transition_text(edge.kind, edge.service, status_text, ""))
            label = f"{state_label(state, graph.symbolize)} | {status}"
            result.misses.append(Miss(kind, scenario.name, node, label, tuple(steps), evidence))
    return result


def scenario_paths(scenarios: ScenarioLike | Iterable[ScenarioLike]) -> list[ScenarioLike]:
    """One path or Scenario per item; a folder stands for its ``*.toml`` files, sorted."""
    items: Iterable[ScenarioLike] = [scenarios] if isinstance(scenarios, (str, Path, Scenario)) else scenarios
    out: list[ScenarioLike] = []
    for item in items:
        if not isinstance(item, Scenario) and Path(item).is_dir():
            out.extend(sorted(Path(item).glob("*.toml")))
        else:
            out.append(item)
    return out


def score(
    detector: Callable[[ThreadView], object],
    scenarios: ScenarioLike | Iterable[ScenarioLike],
    explore: bool = False,
    allow: Sequence[str | Path] = (),
    history: int = HISTORY,
    observer: str = KERNEL_DEBUGGER,
    truth: str = SEED,
) -> ScoreReport:
    """Run ``detector`` over every state of every scenario and compare with the ground truth.

    Args:
        detector: a callable taking a ThreadView; a truthy answer means "the truth holds here".
        scenarios: a scenario file, a Scenario, a folder of scenarios, or several of them.
        explore: score every node of the explored state graph instead of one run's states.
        allow: folders PE files named by the scenarios may come from (``--allow-path``).
        history: how many transitions to show before each mismatching state.
        observer: whose view the detector gets, ``kernel-debugger`` (every state) or
            ``user-context`` (only states GetThreadContext, a suspend or a minidump can
            catch, see :mod:`emu.detection.observers`); the states it cannot see are not scored.
        truth: ``seed`` (the seed's instant, ``State.pending``) or ``waiting-in-callback``
            (blocked in the kernel at a nested system call inside a callback).

    Returns:
        A :class:`ScoreReport`: confusion matrices per scenario and in total, misses named.

    Raises:
        ObserverError: an unknown observer or truth (the message lists the valid ones).
        ScenarioError: a scenario file is invalid, or there is no scenario to score (a
            folder without ``*.toml`` files); the detector's own exceptions propagate, with
            a note naming the state.
    """
    check_observer(observer)
    check_truth(truth)
    items = scenario_paths(scenarios)
    if not items:
        given = [scenarios] if isinstance(scenarios, (str, Path, Scenario)) else list(scenarios)
        names = ", ".join(str(getattr(g, "path", g)) for g in given) or "(nothing given)"
        raise ScenarioError(names, "", "no scenario files to score (a folder is searched for *.toml)")
    scores = []
    for item in items:
        sc = item if isinstance(item, Scenario) else load_scenario(item, allow)
        scores.append((score_exploration if explore else score_run)(detector, sc, history, observer, truth))
    return ScoreReport(detector_name(detector), explore, scores, observer, truth)
