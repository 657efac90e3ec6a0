"""Snapshots of a :class:`~emu.session.Session`: take, restore, save to a file and load.

A snapshot holds what the run's future depends on: the CPU (general registers, RIP,
RFLAGS, the GS and FS bases, XMM0-15 and MXCSR), user memory (the pages written since
the process was built, copy-on-write: :mod:`emu.snapshot`), the regions' protections,
the kernel model (threads with their callback stacks and waits, objects, the current
and next thread: :mod:`emu.kernel.fork`), and the trace up to that point. Restoring one and running on records exactly what the
run recorded after it was taken, byte for byte.

>>> import emu
>>> s = emu.Session("scenarios/nested_callbacks.toml")
>>> _ = s.run_until(lambda s: len(s.callback_stack()) == 2)
>>> snap = s.snapshot()
>>> first = s.finish()
>>> s.restore(snap)
>>> len(s.callback_stack()), s.position == snap.position
(2, True)
>>> s.finish().trace.raw_transitions == first.trace.raw_transitions
True

On disk (:meth:`Snapshot.save`, :meth:`Snapshot.load`) a snapshot is a zip archive with
two members, no pickled objects: ``snapshot.json`` (UTF-8 JSON, keys sorted: the format
name and version, the emu version that wrote it, the scenario's name and digest, the CPU,
the regions, the kernel model in the JSON of emu's minidump kernel stream
(:mod:`emu.dump.kernel_stream`) with a few more fields, and the
trace's records) and ``memory.bin`` (the written pages, 4 KiB each, in the order
``snapshot.json`` lists their addresses). A file written by another emu version, or
restored into a session of another scenario, is refused with one line
(:class:`~emu.errors.SnapshotError`). A Python service's position is its journal (what it
was sent and read), replayed when the file is restored, as forks do.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from unicorn import x86_const as x86

from emu.context import REGISTER_NAMES
from emu.dump.kernel_stream import KernelDoc, live_doc, objects_doc, thread_doc
from emu.errors import EmuError, SnapshotError
from emu.kernel.fork import KernelState, load_kernel, save_kernel
from emu.kernel.thread import KThread, ThreadServiceContext
from emu.loader.image import PAGE
from emu.regions import Region
from emu.snapshot import PageSnapshot
from emu.trace import RawState, RawTransition, Trace

if TYPE_CHECKING:
    from emu.scenario import Scenario
    from emu.session import Session

__all__ = ["Snapshot", "scenario_digest"]

SNAPSHOT_FORMAT = "emu-snapshot"
SNAPSHOT_VERSION = 2  # 2: the vectored handler lists live in guest memory (no "rtl" member)
_GPRS = (*REGISTER_NAMES, "gs_base", "fs_base", "mxcsr")  # the user context, then what it leaves out
_XMM = tuple(f"xmm{n}" for n in range(16))
_S_STACK, _S_CONTEXT, _S_CALLBACKS = (RawState._fields.index(f) for f in ("stack", "context", "callbacks"))
_T_DATA, _T_WOKE = (RawTransition._fields.index(f) for f in ("data", "woke"))


def scenario_digest(scenario: Scenario) -> str:
    """What a snapshot must match: the scenario file's text and the bytes of every file it loads."""
    h = hashlib.sha256(scenario.source.encode("utf-8"))
    paths = [p.path for p in (scenario.ntdll, *scenario.pe) if p is not None]
    for path in [*paths, scenario.start_dump]:
        if path is not None:
            try:
                h.update(Path(path).read_bytes())
            except OSError:
                h.update(str(path).encode("utf-8"))
    return h.hexdigest()


@dataclass
class Snapshot:
    """A session's state at one moment (see the module notes). Take one with
    :meth:`Session.snapshot <emu.session.Session.snapshot>`, give it back to
    :meth:`Session.restore <emu.session.Session.restore>`."""

    scenario: str  # the scenario's name
    digest: str  # scenario_digest of the scenario it was taken in
    position: int  # transitions recorded when it was taken
    cpu: dict[str, int]
    regions: tuple[Region, ...]
    pages: PageSnapshot
    states: tuple[tuple[Any, ...], ...]
    transitions: tuple[tuple[Any, ...], ...]
    started: bool
    stop: str | None
    error: str | None
    output_bytes: int
    kernel: KernelState | None = None  # in memory, for the session that took it
    kernel_doc: dict[str, Any] | None = None  # from a file (or once saved)
    owner: object = field(default=None, repr=False, compare=False)  # the session's token
    context: object = field(default=None, repr=False, compare=False)  # Unicorn's whole CPU context (in memory)
    source: str = ""  # the file it was loaded from

    # --- files ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the snapshot to ``path`` (a zip archive; see the module notes)."""
        from emu import __version__

        pages = sorted(self.pages.touched)
        doc = {
            "format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "emu": __version__,
            "scenario": {"name": self.scenario, "digest": self.digest},
            "position": self.position, "cpu": self.cpu,
            "regions": [[r.start, r.size, r.perms, r.label] for r in self.regions],
            "pages": pages, "kernel": self._kernel_doc(),
            "trace": {"states": [_state_json(s) for s in self.states],
                      "transitions": [_transition_json(t) for t in self.transitions]},
            "session": {"started": self.started, "stop": self.stop, "error": self.error,
                        "output_bytes": self.output_bytes},
        }  # fmt: skip
        memory = b"".join(self.pages.page(p) or bytes(PAGE) for p in pages)
        target = Path(path)
        try:
            with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
                for name, data in (("snapshot.json", json.dumps(doc, sort_keys=True).encode()), ("memory.bin", memory)):
                    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # same bytes every time
                    info.compress_type = zipfile.ZIP_DEFLATED
                    z.writestr(info, data)
        except OSError as e:
            raise SnapshotError(f"{target}: cannot write the snapshot ({e.strerror or e})") from None

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        """Read a snapshot file written by :meth:`save` (by this emu version).

        Raises:
            SnapshotError: not a snapshot file, a damaged one, or one from another emu version.
        """
        from emu import __version__

        where = str(path)

        def fail(why: str) -> NoReturn:
            raise SnapshotError(f"{where}: {why}")

        try:
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
                if not {"snapshot.json", "memory.bin"} <= names:
                    fail("not an emu snapshot (no snapshot.json and memory.bin inside)")
                raw, memory = z.read("snapshot.json"), z.read("memory.bin")
        except FileNotFoundError:
            fail("no such file")
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            fail(f"not an emu snapshot ({type(e).__name__}: {e})"[:200])
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            fail("snapshot.json is not JSON")
        if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
            fail(f"not an {SNAPSHOT_FORMAT!r} file")
        if doc.get("emu") != __version__ or doc.get("version") != SNAPSHOT_VERSION:
            fail(f"written by emu {doc.get('emu')!r} (format {doc.get('version')!r}); this is emu {__version__} "
                 f"(format {SNAPSHOT_VERSION}): take the snapshot again with this version")  # fmt: skip
        try:
            return _from_doc(doc, memory, where)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            fail(f"damaged snapshot.json ({type(e).__name__}: {e})"[:200])

    def _kernel_doc(self) -> dict[str, Any]:
        if self.kernel_doc is None:
            if self.kernel is None:
                raise EmuError("a snapshot without its kernel model")  # not reachable: take() sets one
            self.kernel_doc = _kernel_json(self.kernel)
        return self.kernel_doc


# --- taking and restoring ---------------------------------------------------------------------
def take(session: Session) -> Snapshot:
    """The session's state now (see :meth:`emu.session.Session.snapshot`)."""
    p = session.process
    m, k = p.machine, p.kernel
    if k.pending_choice is not None:
        raise EmuError("a snapshot while a choice waits for an answer")  # a Session answers every choice
    trace = p.trace
    return Snapshot(
        session.scenario.name, session.digest, len(trace), _cpu(session), tuple(m.regions), session.cow.take(),
        tuple(trace.raw_states), tuple(trace.raw_transitions), session.started, session.stop,
        None if session.error is None else str(session.error), k.recorder.output_bytes,
        kernel=save_kernel(k), owner=session.token, context=m.uc.context_save(),
    )  # fmt: skip


def restore(session: Session, snap: Snapshot) -> None:
    """Make ``snap`` the session's state (see :meth:`emu.session.Session.restore`)."""
    if snap.digest != session.digest:
        at = f"{snap.source}: " if snap.source else ""
        raise SnapshotError(
            f"{at}a snapshot of scenario {snap.scenario!r} ({snap.digest[:12]}), not of {session.scenario.name!r} "
            f"({session.digest[:12]}): restore it into a session of the scenario it was taken in"
        )
    p = session.process
    m, k = p.machine, p.kernel
    own = snap.owner is session.token
    _check_layout(session, snap)
    # The pages' copy-on-write layer maps, unmaps and protects regions back to the snapshot's
    # (a stack that grew past its guard page since, or before it was taken: emu.kernel.stack_guard).
    pages = snap.pages
    if pages.layout is None or not own:
        pages = PageSnapshot(pages.parent, pages.delta, tuple(snap.regions))
    session.cow.adopt(page for page in pages.touched if m.region_at(page) is not None)
    session.cow.restore(pages)
    state = snap.kernel if own and snap.kernel is not None else _kernel_state(session, snap._kernel_doc())
    load_kernel(k, state)
    p.thread = k.threads[p.thread.tid]  # the first thread, as restored (not the object built)
    if own and snap.context is not None:
        m.uc.context_restore(snap.context)
    _set_cpu(session, snap.cpu)
    trace = Trace(p.trace.symbolize)
    trace.thread_starts = list(p.trace.thread_starts)
    trace.raw_states = list(snap.states)
    trace.raw_transitions = list(snap.transitions)
    # What hooks noted before the snapshot's position (in memory only: a file keeps no notes).
    trace.notes = [n for n in p.trace.notes if n.after <= snap.position] if own else []
    p.trace = k.trace = k.recorder.trace = trace
    halt = p.halt  # a hook's stop after the snapshot is undone with the rest
    halt.halted, halt.reason, halt.by, halt.failure = False, None, "", None
    k.recorder.output_bytes = snap.output_bytes
    session.started = snap.started
    session.stop = snap.stop
    session.error = None if snap.error is None else EmuError(snap.error)
    session.forget_result()


def _check_layout(session: Session, snap: Snapshot) -> None:
    """Regions may have been mapped or unmapped since (a stack grows); what was mapped when the
    session was built (images, stacks, the scenario's memory) must be there in the snapshot."""
    have = {(r.start, r.size) for r in snap.regions}
    # Thread stacks live in host buffers mapped once: they never move (emu.machine.Machine.map).
    for r in session.process.machine.regions:
        if r.start in session.process.machine.host and (r.start, r.size) not in have:
            raise SnapshotError(
                f"{snap.source or 'snapshot'}: the memory layout differs from the session's "
                f"(no {r.label} at {r.start:#x}..{r.end:#x})"
            )


def _cpu(session: Session) -> dict[str, int]:
    regs = session.regs
    out = {n: regs[n] for n in _GPRS}
    out.update({n: regs[n] for n in _XMM})
    return out


def _set_cpu(session: Session, cpu: dict[str, int]) -> None:
    m = session.process.machine
    m.regs.write(REGISTER_NAMES, [cpu[n] for n in REGISTER_NAMES])
    for name in (*_GPRS[len(REGISTER_NAMES) :], *_XMM):
        m.uc.reg_write(getattr(x86, f"UC_X86_REG_{name.upper()}"), cpu[name])


# --- the kernel model as JSON ------------------------------------------------------------------
def _kernel_json(state: KernelState) -> dict[str, Any]:
    """The kernel stream's document for ``state``, with what a live run needs besides."""
    threads = []
    for t in state.threads:
        d = thread_doc(t, None, False, t.suspended)
        d["state_id"] = t.state_id
        d["announced"] = bool(t.suspended is not None and t.suspended.announced)
        threads.append(d)
    return {
        "current": state.current, "max_depth": state.max_depth, "threads": threads,
        "objects": objects_doc(state.objects), "next_thread": state.next_thread, "deadlock": list(state.deadlock),
    }  # fmt: skip


def _kernel_state(session: Session, d: dict[str, Any]) -> KernelState:
    """A saved kernel model rebuilt against this session's kernel and services."""
    k = session.process.kernel
    where = session.scenario.path

    def fail(why: str) -> NoReturn:
        raise SnapshotError(f"{where}: the snapshot's kernel model does not fit this scenario: {why}")

    profile: dict[str, object] = {"name": k.profile.name, "dispatcher": k.profile.dispatcher, "ssn": {}}
    state = {"id": 0, "kind": "initial", "thread": 0}
    full = live_doc(k, state, profile, d["threads"], d["current"])
    full["objects"] = d["objects"]
    full["max_depth"] = d["max_depth"]
    doc = KernelDoc(json.dumps(full).encode(), fail)
    threads: dict[int, KThread] = {}
    for i, td in enumerate(doc.threads):
        w = f"threads[{i}]"
        t = KThread(doc.number(td, "index", w), doc.number(td, "teb", w), doc.number(td, "stack_base", w),
                    doc.number(td, "stack_limit", w), doc.context(td.get("entry_context"), f"{w}.entry_context"))  # fmt: skip
        t.name = doc.text(td, "name", w)
        t.service_ctx = ThreadServiceContext(k, t)
        t.started, t.terminated = doc.flag(td, "started", w), doc.flag(td, "terminated", w)
        status = td.get("exit_status")
        t.exit_status = None if status is None else doc.number(td, "exit_status", w)
        mode = doc.choice(td, "mode", ("user", "kernel", "exited"), w)
        t.mode = "user" if mode == "user" else "kernel" if mode == "kernel" else "exited"
        t.state_id = doc.number(td, "state_id", w)
        t.callback_stack = doc.frames(td, w, k.registry, t.service_ctx)
        t.suspended = doc.suspended(td.get("suspended"), f"{w}.suspended", k.registry, t.service_ctx)
        if t.suspended is not None:
            t.suspended.announced = bool(td.get("announced"))
        threads[t.tid] = t
    return KernelState(tuple(threads.values()), doc.current, doc.max_depth, None, doc.objects(), d.get("next_thread"),
                       [str(x) for x in d.get("deadlock", [])])  # fmt: skip


# --- the trace's records as JSON --------------------------------------------------------------
def _state_json(s: tuple[Any, ...]) -> list[Any]:
    out = list(s)
    out[_S_CONTEXT] = list(s[_S_CONTEXT])
    out[_S_STACK] = s[_S_STACK].hex()
    out[_S_CALLBACKS] = [list(c) for c in s[_S_CALLBACKS]]
    return out


def _state_from(v: list[Any]) -> tuple[Any, ...]:
    v = list(v)
    if len(v) != len(RawState._fields):
        raise ValueError(f"a state record has {len(v)} fields, not {len(RawState._fields)}")
    v[_S_CONTEXT] = tuple(int(x) for x in v[_S_CONTEXT])
    v[_S_STACK] = bytes.fromhex(v[_S_STACK])
    v[_S_CALLBACKS] = tuple((int(a), str(n)) for a, n in v[_S_CALLBACKS])
    return tuple(v)


def _transition_json(t: tuple[Any, ...]) -> list[Any]:
    out = list(t)
    out[_T_DATA] = t[_T_DATA].hex()
    out[_T_WOKE] = list(t[_T_WOKE])
    return out


def _transition_from(v: list[Any]) -> tuple[Any, ...]:
    v = list(v)
    if len(v) != len(RawTransition._fields):
        raise ValueError(f"a transition record has {len(v)} fields, not {len(RawTransition._fields)}")
    v[_T_DATA] = bytes.fromhex(v[_T_DATA])
    v[_T_WOKE] = tuple(int(x) for x in v[_T_WOKE])
    return tuple(v)


def _from_doc(doc: dict[str, Any], memory: bytes, where: str) -> Snapshot:
    pages = [int(p) for p in doc["pages"]]
    if len(memory) != len(pages) * PAGE:
        raise ValueError(f"memory.bin holds {len(memory)} bytes for {len(pages)} pages")
    layer = PageSnapshot(None, {p: memory[i * PAGE : (i + 1) * PAGE] for i, p in enumerate(pages)})
    sess = doc["session"]
    return Snapshot(
        str(doc["scenario"]["name"]), str(doc["scenario"]["digest"]), int(doc["position"]),
        {str(n): int(v) for n, v in doc["cpu"].items()},
        tuple(Region(int(a), int(b), str(c), str(d)) for a, b, c, d in doc["regions"]), layer,
        tuple(_state_from(s) for s in doc["trace"]["states"]),
        tuple(_transition_from(t) for t in doc["trace"]["transitions"]),
        bool(sess["started"]), sess["stop"], sess["error"], int(sess["output_bytes"]),
        kernel_doc=doc["kernel"], source=where,
    )  # fmt: skip
