"""How a scenario file's keys are described once: what a key holds (the words error messages use),
how its value is read and bounded, and what it is as JSON Schema.

A :class:`Key` pairs a description with a *shape* (:class:`Integer`, :class:`Text`,
:class:`Boolean`, :class:`Status`, :class:`HexBytes`, :class:`Seconds`, or :class:`Schema`
for values the reader checks by hand). A :class:`Table` is an ordered set of keys; the
dataclasses of :mod:`emu.scenario.model` carry their keys in field metadata (:func:`key`), so
the reader's allowed keys, the help texts and the JSON Schema all come from the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Protocol

from emu.records import record
from emu.scenario.reader import _kind, _Reader
from emu.winnt import STATUS_BY_NAME

JSON = dict[str, Any]
Path = tuple[str | int, ...]
_META = "emu.scenario.key"


class Shape(Protocol):
    """A value's type and bounds: how it is read (with the reader's one-line errors) and its JSON Schema."""

    def read(self, r: _Reader, obj: dict[str, Any], key: str, path: Path) -> Any: ...

    def schema(self) -> JSON: ...


@record(frozen=True)
class Integer:
    """An integer in ``lo..hi`` (TOML integers are 64-bit signed; emu reads unsigned ones by default)."""

    lo: int = 0
    hi: int = 2**64 - 1

    def read(self, r: _Reader, obj: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
        return r.int_(obj, key, path, default, self.lo, self.hi)

    def schema(self) -> JSON:
        return {"type": "integer", "minimum": self.lo, "maximum": self.hi}


@record(frozen=True)
class Text:
    """A string; ``words`` lists the only ones allowed, ``pattern`` a regular expression it must match."""

    words: tuple[str, ...] = ()
    pattern: str = ""

    def read(self, r: _Reader, obj: dict[str, Any], key: str, path: Path, default: str | None = None) -> str:
        return r.str_(obj, key, path, default)

    def schema(self) -> JSON:
        if self.words:
            return {"enum": list(self.words)}
        return {"type": "string", "pattern": self.pattern} if self.pattern else {"type": "string"}


@record(frozen=True)
class Boolean:
    """A key whose value is true or false (false when absent)."""

    def read(self, r: _Reader, obj: dict[str, Any], key: str, path: Path) -> bool:
        v = obj.get(key, False)
        if not isinstance(v, bool):
            raise r.fail(path + (key,), f"expected true or false, got {_kind(v)}")
        return v

    def schema(self) -> JSON:
        return {"type": "boolean"}


@record(frozen=True)
class Status:
    """An NTSTATUS by number or by name (``STATUS_...``); ``also`` names other words allowed."""

    also: tuple[str, ...] = ()

    def read(self, r: _Reader, obj: dict[str, Any], key: str, path: Path) -> int:
        return r.status(obj[key], path + (key,), tuple(f'"{w}"' for w in self.also))

    def schema(self) -> JSON:
        return {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": 0xFFFF_FFFF},
                {"enum": [*self.also, *sorted(STATUS_BY_NAME)]},
            ]
        }


@record(frozen=True)
class HexBytes:
    """Bytes written as hex pairs, spaces allowed between them (``bytes.fromhex``)."""

    def read(self, r: _Reader, obj: dict[str, Any], key: str, path: Path) -> bytes:
        return r.hexdata(obj[key], path + (key,))

    def schema(self) -> JSON:
        return {"type": "string", "pattern": r"^\s*([0-9A-Fa-f]{2}\s*)*$"}


@record(frozen=True)
class Seconds:
    """A duration in seconds, more than 0 and at most ``hi``."""

    hi: float

    def read(self, r: _Reader, obj: dict[str, Any], key: str, path: Path, default: float | None = None) -> float:
        if key not in obj and default is None:
            raise r.fail(path, f"missing required key '{key}'")
        v = obj.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= self.hi:
            raise r.fail(path + (key,), f"expected seconds in (0, {self.hi:g}], got {_kind(v)}")
        return float(v)

    def schema(self) -> JSON:
        return {"type": "number", "exclusiveMinimum": 0, "maximum": self.hi}


@record(frozen=True)
class Schema:
    """A value the reader checks by its own code; only its JSON Schema is declared here."""

    json: JSON

    def read(self, r: _Reader, obj: dict[str, Any], key: str, path: Path) -> Any:
        return obj[key]

    def schema(self) -> JSON:
        return self.json


@record(frozen=True)
class Key:
    """One key of a table: what it holds, in the words of error messages, and its shape."""

    help: str
    shape: Shape
    required: bool = False
    name: str = ""  # the TOML key, when it is not the field's name


def key(help: str, shape: Shape, required: bool = False, name: str = "") -> dict[str, Key]:
    """Field metadata: the field is read from a TOML key (its own name unless ``name`` says otherwise)."""
    return {_META: Key(help, shape, required, name)}


@record(frozen=True)
class Table:
    """An ordered set of keys: the reader's allowed keys, a help listing, and a JSON Schema object."""

    keys: dict[str, Key]

    @property
    def allowed(self) -> dict[str, str]:
        return {k: v.help for k, v in self.keys.items()}

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.keys.items() if v.required)

    @property
    def listing(self) -> str:
        """``{a, b, c}``, as help texts show a table."""
        return "{" + ", ".join(self.keys) + "}"

    def only(self, *names: str) -> Table:
        """These keys, in this order (a table read in two forms, or with the reader's own order)."""
        return Table({n: self.keys[n] for n in names})

    def schema(self, **extra: JSON) -> JSON:
        """A closed JSON Schema object (unknown keys are errors, as for the reader)."""
        out: JSON = {
            "type": "object",
            "properties": {k: {"description": v.help, **v.shape.schema()} for k, v in self.keys.items()} | extra,
            "additionalProperties": False,
        }
        if self.required:
            out["required"] = list(self.required)
        return out


def table_of(cls: type, skip: Iterable[str] = ()) -> Table:
    """The table a model dataclass is read from: its fields that name a key, in field order."""
    skipped = set(skip)
    out: dict[str, Key] = {}
    for f in dataclasses.fields(cls):
        if _META in f.metadata and f.name not in skipped:
            k: Key = f.metadata[_META]
            out[k.name or f.name] = k
    return Table(out)


def field_names(cls: type) -> dict[str, str]:
    """TOML key -> field name, for the fields of a model dataclass that are read from a key."""
    return {f.metadata[_META].name or f.name: f.name for f in dataclasses.fields(cls) if _META in f.metadata}
