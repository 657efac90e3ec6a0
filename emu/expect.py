"""Checking a run against its scenario's ``[[expect]]`` entries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from emu.records import record
from emu.scenario import EXPLORE_KINDS, Expectation
from emu.scenario.expectations import (
    CallbackOutput,
    Deadlock,
    Detection,
    Detections,
    ExitStatus,
    ExploredDeadlocks,
    ExploredMerges,
    ExploredPending,
    ExploredStates,
    ExploredTruths,
    ExploredWaitChain,
    Fault,
    MaxDepth,
    Sysret,
    Transitions,
    Truths,
    WaitChain,
)
from emu.winnt import status_name

if TYPE_CHECKING:
    from emu.detection.observers import ThreadStatus
    from emu.detection.view import Detection as Found
    from emu.engine import RunResult
    from emu.exploration.result import Exploration
    from emu.trace import State


@record(frozen=True)
class Outcome:
    """One expectation's verdict, with a message naming what was expected and what happened."""

    expectation: Expectation
    passed: bool
    message: str

    @property
    def where(self) -> str:
        e = self.expectation
        line = f" (line {e.line})" if e.line else ""
        return f"expect[{e.index}].{e.kind}{line}"


def check(run: RunResult, detections: Sequence[Found]) -> list[Outcome]:
    """Evaluate the expectations of the run's scenario about one run (not the ``explored_*`` ones),
    given the built-in detector's findings over it."""
    return [_check(run, e, detections) for e in run.scenario.expectations if e.kind not in EXPLORE_KINDS]


def check_exploration(exp: Exploration) -> list[Outcome]:
    """Evaluate the ``explored_*`` expectations against an exploration."""
    out = []
    for e in exp.scenario.expectations:
        match e:
            case ExploredWaitChain(text=want):
                chains = [str(exp.graph.lean.nodes[n].get("wait_chains", "")) for n in exp.graph.nodes()]
                hit = next((c for c in chains if want in c), None)
                found = "found" if hit else "none"
                out.append(Outcome(e, hit is not None, f"a wait chain containing {want!r}: {found}"))
            case ExploredTruths():
                from emu.detection.observers import node_status

                g = exp.graph
                pairs = [(g.state(n), node_status(g, n)) for n in g.nodes()]
                out.append(_truth_outcome(e, pairs, "explored nodes"))
            case ExploredStates(count=want):
                out.append(_count(e, "states", exp.states, want))
            case ExploredMerges(count=want):
                out.append(_count(e, "merges", exp.merges, want))
            case ExploredPending(count=want):
                out.append(_count(e, "pending", len(exp.pending), want))
            case ExploredDeadlocks(count=want):
                out.append(_count(e, "deadlocks", len(exp.deadlocks), want))
    return out


def _count(e: Expectation, what: str, got: int, want: int) -> Outcome:
    return Outcome(e, got == want, f"explored {what}: {got}, expected {want}")


def _truth_outcome(e: Truths | ExploredTruths, pairs: list[tuple[State, ThreadStatus]], unit: str) -> Outcome:
    """Count the states where each ground truth holds and the expectation's observer can see them."""
    from emu.detection.observers import is_true, visible

    seen = [(s, st) for s, st in pairs if visible(e.observer, s, st)]
    wrong = []
    for key, want in e.counts.items():
        got = sum(is_true(key.replace("_", "-"), s, st) for s, st in seen)
        if got != want:
            wrong.append(f"{key}: {got}, expected {want}")
    what = f"{unit} a {e.observer} observer sees"
    return Outcome(e, not wrong, f"{what}: " + ("; ".join(wrong) if wrong else "truth counts match"))


def _check(run: RunResult, e: Expectation, dets: Sequence[Found]) -> Outcome:
    match e:
        case Detections(count=want):
            count = len(dets)
            return Outcome(e, count == want, f"{count} detection(s), expected {want}")
        case Detection(number=i):
            if i >= len(dets):
                return Outcome(e, False, f"no detection #{i} (only {len(dets)})")
            d = dets[i].as_dict()
            d["api"] = d.pop("api_number")
            wrong = [f"{k} is {d[k]!r}, expected {want!r}" for k, want in e.wanted().items() if d[k] != want]
            return Outcome(e, not wrong, "; ".join(wrong) or f"detection #{i} matches")
        case ExitStatus(status=want):
            status = run.exit_status
            shown = "none (the thread did not exit)" if status is None else status_name(status)
            return Outcome(e, status == want, f"exit status {shown}, expected {status_name(want)}")
        case Fault(text=want):
            msg = "" if run.error is None else str(run.error)
            shown = repr(msg) if msg else "no error (the run finished)"
            return Outcome(e, bool(msg) and want in msg, f"stopped with {shown}; expected an error containing {want!r}")
        case Deadlock(expected=want):
            got = bool(run.deadlock)
            shown = "; ".join(run.deadlock) if run.deadlock else "no deadlock"
            return Outcome(e, got == want, f"{shown}; expected {'a deadlock' if want else 'none'}")
        case WaitChain(text=want):
            ok = any(want in chain for chain in run.deadlock)
            chains = "; ".join(run.deadlock) or "none"
            return Outcome(e, ok, f"wait chains: {chains}; expected one containing {want!r}")
        case Truths():
            from emu.detection.observers import statuses

            return _truth_outcome(e, list(zip(run.trace.states, statuses(run.trace), strict=True)), "states")
        case MaxDepth(depth=want):
            return Outcome(e, run.max_depth == want, f"max callback depth {run.max_depth}, expected {want}")
        case Sysret(service=service, status=want):
            seen = [t.status for t in run.trace if t.kind == "sysret" and t.service == service]
            shown = ", ".join(status_name(s) for s in seen if s is not None) or "none"
            return Outcome(e, want in seen, f"sysret statuses of {service}: {shown}; expected {status_name(want)}")
        case CallbackOutput(api=api, data=want):
            outs = [t.data for t in run.trace if t.kind == "callback_return" and t.api == api]
            shown = "; ".join(o.hex(" ") if o else "(empty)" for o in outs) or "no callback return"
            return Outcome(e, want in outs, f"outputs of api {api}: {shown}; expected {want.hex(' ')}")
        case Transitions(counts=want):
            counts = run.trace.kinds()
            wrong = [f"{k}: {counts.get(k, 0)}, expected {n}" for k, n in want.items() if counts.get(k, 0) != n]
            return Outcome(e, not wrong, "; ".join(wrong) or "transition counts match")
    raise TypeError(f"{e.kind} is evaluated against an exploration, not a run")
