"""Checking a run against its scenario's ``[[expect]]`` entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from emu.scenario import EXPLORE_KINDS, Expectation
from emu.winnt import status_name

if TYPE_CHECKING:
    from emu.detection.observers import ThreadStatus
    from emu.engine import Run
    from emu.exploration.explorer import Exploration
    from emu.trace import State


@dataclass(frozen=True)
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


def check(run: Run) -> list[Outcome]:
    """Evaluate the expectations of the run's scenario about one run (not the ``explored_*`` ones)."""
    return [_check(run, e) for e in run.scenario.expectations if e.kind not in EXPLORE_KINDS]


def check_exploration(exp: Exploration) -> list[Outcome]:
    """Evaluate the ``explored_*`` expectations against an exploration."""
    got = {
        "explored_states": exp.states,
        "explored_merges": exp.merges,
        "explored_pending": len(exp.pending),
        "explored_deadlocks": len(exp.deadlocks),
    }
    out = []
    for e in exp.scenario.expectations:
        if e.kind == "explored_wait_chain":
            chains = [str(exp.graph.lean.nodes[n].get("wait_chains", "")) for n in exp.graph.nodes()]
            hit = next((c for c in chains if e.value in c), None)
            out.append(
                Outcome(e, hit is not None, f"a wait chain containing {e.value!r}: {'found' if hit else 'none'}")
            )
            continue
        if e.kind == "explored_truths":
            from emu.detection.observers import node_status

            g = exp.graph
            pairs = [(g.state(n), node_status(g, n)) for n in g.nodes()]
            out.append(_truth_outcome(e, pairs, "explored nodes"))
            continue
        if e.kind in EXPLORE_KINDS:
            what = e.kind.removeprefix("explored_")
            out.append(Outcome(e, got[e.kind] == e.value, f"explored {what}: {got[e.kind]}, expected {e.value}"))
    return out


def _truth_outcome(e: Expectation, pairs: list[tuple[State, ThreadStatus]], unit: str) -> Outcome:
    """Count the states where each ground truth holds and the expectation's observer can see them."""
    from emu.detection.observers import is_true, visible

    observer = e.value["observer"]
    seen = [(s, st) for s, st in pairs if visible(observer, s, st)]
    wrong = []
    for key, want in e.value["counts"].items():
        got = sum(is_true(key.replace("_", "-"), s, st) for s, st in seen)
        if got != want:
            wrong.append(f"{key}: {got}, expected {want}")
    what = f"{unit} a {observer} observer sees"
    return Outcome(e, not wrong, f"{what}: " + ("; ".join(wrong) if wrong else "truth counts match"))


def _check(run: Run, e: Expectation) -> Outcome:
    v = e.value
    if e.kind == "detections":
        count = len(run.detections)
        return Outcome(e, count == v, f"{count} detection(s), expected {v}")
    if e.kind == "detection":
        dets = run.detections
        i = v["index"]
        if i >= len(dets):
            return Outcome(e, False, f"no detection #{i} (only {len(dets)})")
        d = dets[i].as_dict()
        d["api"] = d.pop("api_number")
        wrong = [f"{k} is {d[k]!r}, expected {want!r}" for k, want in v.items() if k != "index" and d[k] != want]
        return Outcome(e, not wrong, "; ".join(wrong) or f"detection #{i} matches")
    if e.kind == "exit_status":
        status = run.exit_status
        shown = "none (the thread did not exit)" if status is None else status_name(status)
        return Outcome(e, status == v, f"exit status {shown}, expected {status_name(v)}")
    if e.kind == "fault":
        msg = "" if run.error is None else str(run.error)
        shown = repr(msg) if msg else "no error (the run finished)"
        return Outcome(e, bool(msg) and v in msg, f"stopped with {shown}; expected an error containing {v!r}")
    if e.kind == "deadlock":
        got = bool(run.deadlock)
        shown = "; ".join(run.deadlock) if run.deadlock else "no deadlock"
        return Outcome(e, got == v, f"{shown}; expected {'a deadlock' if v else 'none'}")
    if e.kind == "wait_chain":
        ok = any(v in chain for chain in run.deadlock)
        return Outcome(e, ok, f"wait chains: {'; '.join(run.deadlock) or 'none'}; expected one containing {v!r}")
    if e.kind == "truths":
        from emu.detection.observers import statuses

        return _truth_outcome(e, list(zip(run.trace.states, statuses(run.trace), strict=True)), "states")
    if e.kind == "max_depth":
        return Outcome(e, run.max_depth == v, f"max callback depth {run.max_depth}, expected {v}")
    if e.kind == "sysret":
        seen = [t.status for t in run.trace if t.kind == "sysret" and t.service == v["service"]]
        ok = v["status"] in seen
        shown = ", ".join(status_name(s) for s in seen if s is not None) or "none"
        return Outcome(e, ok, f"sysret statuses of {v['service']}: {shown}; expected {status_name(v['status'])}")
    if e.kind == "callback_output":
        outs = [t.data for t in run.trace if t.kind == "callback_return" and t.api == v["api"]]
        ok = v["data"] in outs
        shown = "; ".join(o.hex(" ") if o else "(empty)" for o in outs) or "no callback return"
        return Outcome(e, ok, f"outputs of api {v['api']}: {shown}; expected {v['data'].hex(' ')}")
    # transitions
    counts = run.trace.kinds()
    wrong = [f"{k}: {counts.get(k, 0)}, expected {n}" for k, n in v.items() if counts.get(k, 0) != n]
    return Outcome(e, not wrong, "; ".join(wrong) or "transition counts match")
