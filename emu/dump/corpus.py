"""A corpus for detectors in any language: one minidump per state, and the ground truth for each.

``emu corpus SCENARIO... -o DIR`` writes, per scenario, ``DIR/<scenario>/s<id>.dmp`` for every
state of its run (``--explore``: ``n<id>.dmp`` for every state of its explored graph), and
``DIR/labels.json`` with what the kernel model knows of each dump: the state, its thread
(index, name, thread id as the dump's ThreadList has it), mode, RIP, callback depth, the
thread's KTHREAD_STATE, both ground truths (``seed``: the thread sits at ZwCallbackReturn
while the kernel completes the callback; ``waiting-in-callback``: blocked at a nested
system call inside a callback) and, per observer (:mod:`emu.detection.observers`), whether
it can stop the thread there and what it then reads (RIP, RSP) and may conclude. The same
table as tab-separated text, ``labels.tsv``, is for readers without a JSON library.

Each dump is the process as it was at the state (:mod:`emu.dump.live`), with emu's kernel
stream, so ``emu run --from-dump`` can also go on from any of them. Every file is written
atomically with the umask's mode; the same scenarios give the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emu.detection.observers import (
    OBSERVERS,
    TRUTHS,
    ThreadStatus,
    context_seen,
    is_true,
    node_status,
    statuses,
    visible,
)
from emu.dump.live import LiveState, capture, provisional_run
from emu.dump.write import thread_id, write_minidump
from emu.engine import Process
from emu.errors import OutputExists
from emu.exploration.explorer import Explorer
from emu.kernel import KThread
from emu.kernel.services import Choice
from emu.scenario import Scenario
from emu.trace import State
from emu.writing import write_atomic

CORPUS_FORMAT = "emu-corpus"
CORPUS_VERSION = 1
TSV_COLUMNS = (
    "file", "scenario", "state", "thread_id", "mode", "rip", "depth", "thread_state", "seed", "waiting_in_callback",
    "kernel_debugger_sees", "user_context_sees",
)  # fmt: skip


@dataclass(frozen=True)
class Label:
    """One dump of the corpus and the truth about it."""

    file: str
    scenario: str
    state: str
    record: State
    name: str
    status: ThreadStatus
    symbol: str

    def as_dict(self) -> dict[str, object]:
        s = self.record
        truths = {t: is_true(t, s, self.status) for t in TRUTHS}
        observers = {}
        for o in OBSERVERS:
            ctx = context_seen(o, s, self.status)
            observers[o] = {
                "sees": visible(o, s, self.status),
                "rip": None if ctx is None else f"{ctx.rip:#x}", "rsp": None if ctx is None else f"{ctx.rsp:#x}",
                "truths": {t: truths[t] and ctx is not None for t in TRUTHS},
            }  # fmt: skip
        return {
            "file": self.file, "scenario": self.scenario, "state": self.state,
            "thread": {"index": s.thread, "name": self.name, "thread_id": thread_id(s.thread)},
            "mode": s.mode, "rip": f"{s.rip:#x}", "rip_symbol": self.symbol, "rsp": f"{s.rsp:#x}",
            "depth": s.depth, "api": s.api, "service": s.service,
            "thread_state": self.status.state, "wait_reason": self.status.wait_reason,
            "truths": truths, "observers": observers,
        }  # fmt: skip

    def tsv(self) -> str:
        d = self.as_dict()
        truths, obs = d["truths"], d["observers"]
        assert isinstance(truths, dict) and isinstance(obs, dict)
        cells = [
            self.file, self.scenario, self.state, f"{thread_id(self.record.thread):#x}", self.record.mode,
            f"{self.record.rip:#x}", str(self.record.depth), self.status.state,
            *(str(int(truths[t])) for t in TRUTHS), *(str(int(obs[o]["sees"])) for o in OBSERVERS),
        ]  # fmt: skip
        return "\t".join(cells)


def refuse_nonempty(out: Path, force: bool) -> None:
    """A corpus folder that holds files is kept unless the user said --force."""
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExists(f"{out} exists and is not empty: pass --force to write the corpus into it")


def write_corpus(
    scenarios: list[Scenario], out: Path, *, explore: bool = False, force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Label]:  # fmt: skip
    """Write the dumps and labels of ``scenarios`` under ``out``; the labels, in file order."""
    refuse_nonempty(out, force)
    labels: list[Label] = []
    taken: set[str] = set()
    for sc in scenarios:
        folder = sc.name
        n = 2
        while folder in taken:
            folder, n = f"{sc.name}-{n}", n + 1
        taken.add(folder)
        found = _explored(sc, out, folder) if explore else _run_states(sc, out, folder)
        labels += found
        if progress is not None:
            progress(f"{sc.name}: {len(found)} dumps in {out / folder}")
    doc = {
        "format": CORPUS_FORMAT, "version": CORPUS_VERSION, "truths": TRUTHS, "observers": OBSERVERS,
        "dumps": [label.as_dict() for label in labels],
    }  # fmt: skip
    write_atomic(out / "labels.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")
    write_atomic(out / "labels.tsv", "\t".join(TSV_COLUMNS) + "\n" + "".join(label.tsv() + "\n" for label in labels))
    return labels


def _dump_sink(out: Path, folder: str, name_of: Callable[[int], str | None]) -> Callable[[Process, LiveState], None]:
    def sink(process: Process, live: LiveState) -> None:
        name = name_of(live.state)
        if name is not None:
            pr = provisional_run(process)
            write_minidump(pr, pr.trace.state(live.state), out / folder / f"{name}.dmp", live=live)

    return sink


def _run_states(sc: Scenario, out: Path, folder: str) -> list[Label]:
    r = capture(sc, lambda sid: True, _dump_sink(out, folder, lambda sid: f"s{sid}"))
    known = statuses(r.trace)
    names = {t.tid: t.name for t in r.threads.values()}
    return [
        Label(f"{folder}/s{s.id}.dmp", sc.name, f"s{s.id}", s, names.get(s.thread, ""), known[s.id], r.symbolize(s.rip))
        for s in r.trace.states
    ]


class _PathExplorer(Explorer):
    """The explorer, also noting the options (one per choice) that first lead to each state."""

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario)
        self.paths: dict[str, tuple[str, ...]] = {}
        self._fresh: list[str] = []

    def _observe(self, sid: int, thread: KThread) -> None:
        before = len(self.nodes)
        super()._observe(sid, thread)
        if len(self.nodes) > before:
            self._fresh.append(next(reversed(self.nodes)))

    def _after_segment(self, result: object, work: object, depth: int, path: tuple[str, ...]) -> None:
        for d in self._fresh:
            self.paths.setdefault(d, path)
        self._fresh.clear()
        super()._after_segment(result, work, depth, path)  # type: ignore[arg-type]


class _Guide:
    """One run along an option path (then defaults), dumping the explored states it passes through."""

    def __init__(self, path: tuple[str, ...], wanted: dict[str, State]) -> None:
        self.path = path
        self.wanted = wanted
        self.process: Process | None = None
        self.consumed = 0 if not path else -1  # states from here on come after the path's last option
        self.taken = 0
        self.done: dict[int, str] = {}  # state id -> node

    def built(self, process: Process) -> None:
        self.process = process

    def choose(self, thread: KThread, choice: Choice) -> str | None:
        i = self.taken
        self.taken += 1
        if i + 1 == len(self.path) and self.process is not None:
            self.consumed = len(self.process.trace.raw_states)
        return self.path[i] if i < len(self.path) else choice.default

    def want(self, sid: int) -> bool:
        if self.process is None or self.consumed < 0 or sid < self.consumed:
            return False
        raw = self.process.trace.raw_state(sid)
        for node, target in self.wanted.items():
            if node not in self.done.values() and raw.thread == target.thread and tuple(raw[2:]) == tuple(target[2:]):
                self.done[sid] = node
                return True
        return False


def _explored(sc: Scenario, out: Path, folder: str) -> list[Label]:
    """Each node of the explored graph: run again along the options that first reached it, and dump it there."""
    ex = _PathExplorer(sc)
    graph = ex.run().graph
    by_path: dict[tuple[str, ...], dict[str, State]] = {}
    for node, attrs in graph.lean.nodes(data=True):
        path = ex.paths.get(str(attrs["digest"]))
        if path is not None:
            by_path.setdefault(path, {})[str(node)] = graph.state(str(node))
    names = {t.tid: t.name for t in ex.kernel.threads.values()}
    labels: list[Label] = []
    for path, wanted in sorted(by_path.items()):
        guide = _Guide(path, wanted)
        capture(sc, guide.want, _dump_sink(out, folder, guide.done.get), guide.choose, built=guide.built)
        for node in guide.done.values():
            st = wanted[node]
            status = node_status(graph, node)
            labels.append(
                Label(
                    f"{folder}/{node}.dmp",
                    sc.name,
                    node,
                    st,
                    names.get(st.thread, ""),
                    status,
                    ex.trace.symbolize(st.rip),
                )
            )
    labels.sort(key=lambda lab: int(lab.state[1:]))
    return labels
