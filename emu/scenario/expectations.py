"""The ``[[expect]]`` kinds: one frozen dataclass each, with how its value is read and its JSON Schema.

An ``[[expect]]`` table holds exactly one of the kinds below (and an optional ``note``).
A kind whose value is a single TOML value (``detections = 1``) declares its :attr:`shape`; a
kind whose value is a table (``sysret = { service = "NtClose", status = 0 }``) declares its
keys on its fields. :data:`EXPECTATIONS` lists the classes in the order messages name them;
``EXPECT_KINDS`` (the allowed keys) and the schema are made from it.
"""

from __future__ import annotations

from dataclasses import field, fields
from typing import Any, ClassVar

from emu.records import record
from emu.scenario.keys import JSON, Boolean, Integer, Key, Path, Shape, Status, Table, Text, field_names, key, table_of
from emu.scenario.keys import HexBytes as Hex
from emu.scenario.reader import _line_of, _Reader
from emu.vocabulary import KERNEL_DEBUGGER, KINDS, OBSERVERS, TRUTHS

COUNT = Integer(0, 1 << 32)


@record(frozen=True, kw_only=True)
class _Kind:
    """What every expectation has: its place in the file (``index`` of ``[[expect]]``, 1-based ``line``)."""

    kind: ClassVar[str]
    about: ClassVar[str]  # what the expectation says, after its value's description
    index: int = 0
    line: int | None = None

    @classmethod
    def help(cls) -> str:
        raise NotImplementedError

    @classmethod
    def read(cls, r: _Reader, entry: dict[str, Any], path: Path, index: int) -> _Kind:
        raise NotImplementedError

    @classmethod
    def value_schema(cls) -> JSON:
        raise NotImplementedError


@record(frozen=True, kw_only=True)
class _Single(_Kind):
    """A kind whose value is one TOML value, read into the class's one value field."""

    shape: ClassVar[Shape]
    noun: ClassVar[str]

    @classmethod
    def help(cls) -> str:
        return f"{cls.noun}: {cls.about}"

    @classmethod
    def read(cls, r: _Reader, entry: dict[str, Any], path: Path, index: int) -> _Kind:
        (name,) = (f.name for f in fields(cls) if f.name not in ("index", "line"))
        value = {name: cls.shape.read(r, entry, cls.kind, path)}
        return cls(**value, index=index, line=_line_of(r.text, path))

    @classmethod
    def value_schema(cls) -> JSON:
        return cls.shape.schema()


@record(frozen=True, kw_only=True)
class _Tabled(_Kind):
    """A kind whose value is a table: its keys are the class's fields that declare one."""

    @classmethod
    def table(cls) -> Table:
        return table_of(cls)

    @classmethod
    def help(cls) -> str:
        return f"a table {cls.table().listing}: {cls.about}"

    @classmethod
    def read(cls, r: _Reader, entry: dict[str, Any], path: Path, index: int) -> _Kind:
        t, kp = cls.table(), path + (cls.kind,)
        v = r.table(entry[cls.kind], kp, t.allowed, t.required)
        names = field_names(cls)
        values = {names[name]: k.shape.read(r, v, name, kp) for name, k in t.keys.items() if name in v}
        return cls(**values, index=index, line=_line_of(r.text, path))

    @classmethod
    def value_schema(cls) -> JSON:
        return cls.table().schema()


# --- one run --------------------------------------------------------------------------------------
@record(frozen=True)
class Detections(_Single):
    """How many detections the run reports."""

    kind = "detections"
    noun, shape, about = "an integer", COUNT, "how many states the detector reports"
    count: int


@record(frozen=True)
class Detection(_Tabled):
    """The ``index``-th detection; each other key given must match."""

    kind = "detection"
    about = "the index-th detection has these values"
    number: int = field(default=0, metadata=key("an integer", Integer(), name="index"))
    rip: str | None = field(default=None, metadata=key("a symbol", Text()))
    return_address: str | None = field(default=None, metadata=key("a symbol", Text()))
    depth: int | None = field(default=None, metadata=key("an integer", Integer()))
    api: int | None = field(default=None, metadata=key("an integer", Integer()))

    def wanted(self) -> dict[str, object]:
        """The values this expectation names, by the keys of a detection's ``as_dict``."""
        given = {"rip": self.rip, "return_address": self.return_address, "depth": self.depth, "api": self.api}
        return {k: v for k, v in given.items() if v is not None}


@record(frozen=True)
class ExitStatus(_Single):
    """The thread's exit status."""

    kind = "exit_status"
    noun, shape, about = "an NTSTATUS", Status(), "the thread's exit status"
    status: int


@record(frozen=True)
class MaxDepth(_Single):
    """The deepest callback nesting the run reaches."""

    kind = "max_depth"
    noun, shape, about = "an integer", COUNT, "the deepest callback nesting reached"
    depth: int


@record(frozen=True)
class Sysret(_Tabled):
    """Some return from the named service carried the named status."""

    kind = "sysret"
    about = "some return from that service carried that status"
    service: str = field(metadata=key("a service name", Text(), required=True))
    status: int = field(metadata=key("an NTSTATUS", Status(), required=True))


@record(frozen=True)
class CallbackOutput(_Tabled):
    """Some callback for the api handed back exactly these bytes."""

    kind = "callback_output"
    about = "some callback for api returned exactly these bytes"
    api: int = field(metadata=key("an integer", Integer(), required=True))
    data: bytes = field(metadata=key("hex bytes", Hex(), required=True))


def _transition_kinds() -> tuple[str, ...]:
    return KINDS


@record(frozen=True)
class Transitions(_Kind):
    """How many transitions of each kind the trace holds (kinds not named are not checked)."""

    kind = "transitions"
    about = "how many transitions of each kind"
    counts: dict[str, int]

    @classmethod
    def table(cls) -> Table:
        return Table({k: Key("a count", COUNT) for k in _transition_kinds()})

    @classmethod
    def help(cls) -> str:
        return f"a table {{kind = count}}: {cls.about}"

    @classmethod
    def read(cls, r: _Reader, entry: dict[str, Any], path: Path, index: int) -> _Kind:
        kp = path + (cls.kind,)
        v = r.table(entry[cls.kind], kp, cls.table().allowed)
        return cls({k: COUNT.read(r, v, k, kp) for k in v}, index=index, line=_line_of(r.text, path))

    @classmethod
    def value_schema(cls) -> JSON:
        return cls.table().schema()


@record(frozen=True)
class Fault(_Single):
    """The run stops with an error whose message contains this text."""

    kind = "fault"
    noun, shape, about = "a string", Text(), "the run stops with an error whose message contains it"
    text: str


@record(frozen=True)
class Deadlock(_Single):
    """Whether the run ends with threads waiting on each other."""

    kind = "deadlock"
    noun, shape, about = "true or false", Boolean(), "the run ends with threads waiting on each other"
    expected: bool


@record(frozen=True)
class WaitChain(_Single):
    """Some wait chain at the run's end contains this text."""

    kind = "wait_chain"
    noun, shape, about = "a string", Text(), "some wait chain of the run's end contains it"
    text: str


def _truth_table() -> Table:
    """``observer`` and one count per ground truth, in TOML spelling (``waiting_in_callback``)."""
    keys = {"observer": Key(f"one of {', '.join(OBSERVERS)}", Text(words=tuple(OBSERVERS)))}
    for t in TRUTHS:
        keys[t.replace("-", "_")] = Key(f"an integer: states where the {t} truth holds", COUNT)
    return Table(keys)


@record(frozen=True)
class _TruthCounts(_Kind):
    """States where each named ground truth holds and the observer can see them."""

    observer: str
    counts: dict[str, int]  # by TOML key: seed, waiting_in_callback

    @classmethod
    def help(cls) -> str:
        return f"a table {_truth_table().listing}: {cls.about}"

    @classmethod
    def read(cls, r: _Reader, entry: dict[str, Any], path: Path, index: int) -> _Kind:
        kp, t = path + (cls.kind,), _truth_table()
        v = r.table(entry[cls.kind], kp, t.allowed)
        observer = r.str_(v, "observer", kp, KERNEL_DEBUGGER)
        if observer not in OBSERVERS:
            raise r.fail(kp + ("observer",), f"unknown observer {observer!r} (valid: {', '.join(OBSERVERS)})")
        truths = [k for k in t.keys if k != "observer"]
        counts = {k: COUNT.read(r, v, k, kp) for k in truths if k in v}
        if not counts:
            raise r.fail(kp, f"expected at least one of: {', '.join(truths)}")
        return cls(observer, counts, index=index, line=_line_of(r.text, path))

    @classmethod
    def value_schema(cls) -> JSON:
        t = _truth_table()
        out = t.schema()
        out["anyOf"] = [{"required": [k]} for k in t.keys if k != "observer"]
        return out


@record(frozen=True)
class Truths(_TruthCounts):
    """How many states of the run each ground truth holds in."""

    kind = "truths"
    about = (
        "states where each ground truth holds that the observer (kernel-debugger, the default, or user-context) can see"
    )


# --- an exploration -----------------------------------------------------------------------------------
@record(frozen=True)
class ExploredTruths(_TruthCounts):
    """How many explored states each ground truth holds in."""

    kind = "explored_truths"
    about = "the same over the explored graph's nodes"


@record(frozen=True)
class ExploredStates(_Single):
    """How many distinct states exploring finds."""

    kind = "explored_states"
    noun, shape, about = "an integer", COUNT, "distinct states `emu explore` finds"
    count: int


@record(frozen=True)
class ExploredMerges(_Single):
    """How many states exploring reaches along more than one edge."""

    kind = "explored_merges"
    noun, shape, about = "an integer", COUNT, "states `emu explore` reaches along more than one edge"
    count: int


@record(frozen=True)
class ExploredPending(_Single):
    """How many explored states have a callback return pending."""

    kind = "explored_pending"
    noun, shape, about = "an integer", COUNT, "callback-return pending states `emu explore` finds"
    count: int


@record(frozen=True)
class ExploredDeadlocks(_Single):
    """How many deadlocked states exploring finds."""

    kind = "explored_deadlocks"
    noun, shape, about = "an integer", COUNT, "deadlocked states `emu explore` finds"
    count: int


@record(frozen=True)
class ExploredWaitChain(_Single):
    """Some explored state's wait chain contains this text."""

    kind = "explored_wait_chain"
    noun, shape, about = "a string", Text(), "some explored state's wait chain contains it"
    text: str


Expectation = (
    Detections | Detection | ExitStatus | MaxDepth | Sysret | CallbackOutput | Transitions | Fault | Deadlock
    | WaitChain | Truths | ExploredTruths | ExploredStates | ExploredMerges | ExploredPending | ExploredDeadlocks
    | ExploredWaitChain
)  # fmt: skip
EXPECTATIONS: dict[str, type[_Kind]] = {
    c.kind: c
    for c in (
        Detections, Detection, ExitStatus, MaxDepth, Sysret, CallbackOutput, Transitions, Fault, Deadlock,
        WaitChain, Truths, ExploredTruths, ExploredStates, ExploredMerges, ExploredPending, ExploredDeadlocks,
        ExploredWaitChain,
    )
}  # fmt: skip
EXPLORE_KINDS = frozenset(k for k in EXPECTATIONS if k.startswith("explored_"))
NOTE = Key("a string", Text())


def expect_kinds() -> dict[str, str]:
    """Each kind and what its value holds: the keys an ``[[expect]]`` table may have (besides ``note``)."""
    return {k: c.help() for k, c in EXPECTATIONS.items()}


def read_expectation(r: _Reader, entry: Any, index: int) -> Expectation:
    """One ``[[expect]]`` table: exactly one kind (and maybe a note), its value checked."""
    path: Path = ("expect", index)
    allowed = {**dict.fromkeys(EXPECTATIONS, ""), "note": NOTE.help}
    r.table(entry, path, allowed)
    kinds = [k for k in entry if k != "note"]
    if len(kinds) != 1:
        raise r.fail(path, f"expected exactly one of: {', '.join(EXPECTATIONS)}")
    if "note" in entry:
        NOTE.shape.read(r, entry, "note", path)
    out = EXPECTATIONS[kinds[0]].read(r, entry, path, index)
    return out  # type: ignore[return-value]
