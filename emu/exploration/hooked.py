"""Hooks (:mod:`emu.hooks`) in an exploration: they fire on every path, and what they note or
stop lands in the state graph.

``emu.explore(scenario, hooks=hooks)`` attaches the hooks to the explorer's one machine, so
they fire on every path it follows, forked copies included (Unicorn's hooks and the kernel
model's watchers live on the machine, not in what a fork saves). Where a hook's output goes:

- a note made between two states is kept on the edge between them (the graph's ``notes``
  edge attribute); a transition hook's note, on the edge of that transition;
- a note made after a path's last state (the path ended: a hook stopped it, a thread
  deadlocked) is kept on that state (the ``notes`` node attribute);
- :meth:`Hit.stop <emu.hooks.Hit.stop>` ends that path only: its last state gets
  ``hook_stop`` (the reason) and :attr:`Exploration.hook_stops` lists it; the other paths
  go on. A hook that raises ends its path as a fault (:attr:`Exploration.faults`).

Past a merge (a state already explored) a path's notes are dropped: that future is
explored once, from the state's first arrival. A state a hook stopped at is not a merge
point: another path reaching it goes on (and its hooks decide again).

Hook objects are shared by every path, as with qiling's hooks and its ``save``/``restore``
or dumpulator's callbacks: the explorer forks the machine and the kernel model, never the
Python objects a hook keeps (a counter counts over the whole exploration). What varies per
path lives in the machine: read it through the hit. Exports stay the same for either
strategy as long as hooks decide and note from what they see, not from such counts; the
notes on one edge or state reached from several paths are kept once each, sorted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.exploration.canonical import node_order
from emu.graph import StateGraph
from emu.hooks import Hooks

if TYPE_CHECKING:
    from emu.exploration.explorer import Explorer
    from emu.exploration.forks import Fork
    from emu.exploration.result import Exploration
    from emu.kernel import KThread

Note = tuple[str, str]  # (hook, text)
Key = str | tuple[str, str]  # a state's digest, or an edge's (source digest, target digest)


class PathHooks:
    """The explorer's side of a set of hooks: routes notes and stops to states and edges."""

    def __init__(self, explorer: Explorer, hooks: Hooks) -> None:
        self.ex = explorer
        self.buffer: list[Note] = []  # notes since the path's last state (they belong to the next edge)
        self.edge: tuple[str, str] | None = None  # the edge just recorded, and its transition notes
        self.open: list[Note] = []
        self.notes: dict[Key, dict[tuple[Note, ...], None]] = {}  # each arrival's notes, once
        self.stops: set[tuple[str, str]] = set()  # (state digest, reason)
        self.held: dict[tuple[str, ...], tuple[Note, ...]] = {}  # notes before a choice, by the fork's path
        recorder = explorer.kernel.recorder
        inner = recorder.observe

        def observe(sid: int, thread: KThread) -> None:
            was_merged = explorer._merged_at is not None
            before = explorer._last
            if inner is not None:
                inner(sid, thread)
            self._close()
            if not was_merged and before is not None:
                self.edge, self.open, self.buffer = (before, explorer._last or ""), self.buffer, []

        recorder.observe = observe  # before the hooks' own wrapper: transition hooks see the edge open
        self.attached = hooks.attach(explorer.process)
        self.attached.sink = self._note

    def _note(self, by: str, text: str, rip: int, in_transition: bool) -> None:
        if in_transition:
            if self.edge is not None:
                self.open.append((by, text))
        elif self.ex._merged_at is None:
            self.buffer.append((by, text))

    def _keep(self, key: Key, notes: list[Note] | tuple[Note, ...]) -> None:
        if notes:
            self.notes.setdefault(key, {})[tuple(notes)] = None

    def _close(self) -> None:
        if self.edge is not None:
            self._keep(self.edge, self.open)
        self.edge, self.open = None, []

    # --- the explorer's calls --------------------------------------------------------
    def segment_done(self, result: Exploration) -> None:
        """A segment ended: a hook's stop or failure ends the path; leftover notes go to its last state."""
        ex = self.ex
        self._close()
        halt = ex.process.halt
        merged = ex._merged_at is not None
        last = ex._last or ""
        if halt.halted:
            if not merged:
                if halt.failure is not None:
                    result.faults.append((last, str(halt.failure)))
                else:
                    self.stops.add((last, halt.reason or halt.by))
                ex.kernel.pending_choice = None  # the path ends here, whatever the kernel was about to ask
                ex._known.discard(last)  # another path reaching this state goes on
            halt.halted, halt.reason, halt.by, halt.failure = False, None, "", None
        if merged:
            self.buffer = []
        elif ex.kernel.pending_choice is None:
            self._keep(last, self.buffer)
            self.buffer = []
        # else: a choice waits; forked() keeps the notes for every option's path

    def forked(self, fork: Fork) -> None:
        if self.buffer:
            self.held[fork.path] = tuple(self.buffer)
        self.buffer = []

    def restored(self, fork: Fork) -> None:
        self._close()
        self.buffer = list(self.held.get(fork.path, ()))

    # --- the result ----------------------------------------------------------------
    def annotate(self, graph: StateGraph) -> None:
        """Give nodes and edges their notes, and stopped nodes their reason (graph attributes)."""
        lean = graph.lean
        names = {str(a.get("digest")): str(n) for n, a in lean.nodes(data=True)}
        by_name: dict[Key, set[tuple[Note, ...]]] = {}
        for key, arrivals in self.notes.items():
            if isinstance(key, tuple):
                u, v = names.get(key[0]), names.get(key[1])
                if u is None or v is None or not lean.has_edge(u, v):
                    continue
                named: Key = (u, v)
            elif key in names:
                named = names[key]
            else:
                continue
            by_name.setdefault(named, set()).update(arrivals)
        for named, distinct in by_name.items():
            text = "\n".join(f"{by}: {t}" for notes in sorted(distinct) for by, t in notes)
            attrs = lean.edges[named] if isinstance(named, tuple) else lean.nodes[named]
            attrs["notes"] = text
        for d, reason in sorted(self.stops):
            if d in names:
                a = lean.nodes[names[d]]
                a["hook_stop"] = "; ".join(sorted({*str(a.get("hook_stop", "")).split("; "), reason} - {""}))

    def named_stops(self, graph: StateGraph) -> list[tuple[str, str]]:
        """The states hooks stopped at, by node id, in node order."""
        names = {str(a.get("digest")): str(n) for n, a in graph.lean.nodes(data=True)}
        return sorted({(names.get(d, d), r) for d, r in self.stops}, key=lambda s: (node_order(s[0]), s[1]))
