"""Reading symbolic declarations in service steps.

``status = { symbolic = "st" }`` (optionally ``domain = "ntstatus"`` or a list of statuses, and
``default``) and ``data = { symbolic = 16 }`` (optionally ``name`` and ``default`` hex bytes),
in a callback step (its input) or a write step (bytes written into the caller's memory). One
name stands for one kind of value: a status, an input or a write of one size; a name declared
again in another shape is an error (a witness ``name=...`` could not say which it means).
"""

from __future__ import annotations

import re
from typing import Any

from emu.scenario.keys import JSON
from emu.scenario.model import SymbolicStatus
from emu.scenario.reader import _dotted, _kind, _Reader

Path = tuple[str | int, ...]
_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
MAX_SYMBOLIC_BYTES = 256
MAX_WRITE_OFFSET = 0xFFFF
ARG_PATTERN = r"^arg([1-9]|1[0-6])$"  # a service's arguments 1..16 (emu.kernel.user_write)
_ARG = re.compile(ARG_PATTERN)
DOMAIN_WORDS = ("ntstatus",)

STATUS_SCHEMA: JSON = {
    "type": "object",
    "required": ["symbolic"],
    "additionalProperties": False,
    "properties": {
        "symbolic": {"type": "string", "pattern": _VAR.pattern},
        "domain": {
            "anyOf": [{"enum": list(DOMAIN_WORDS)}, {"type": "array", "minItems": 1, "items": {}}],
        },
        "default": {},
    },
}
DATA_SCHEMA: JSON = {
    "type": "object",
    "required": ["symbolic"],
    "additionalProperties": False,
    "properties": {
        "symbolic": {"type": "integer", "minimum": 1, "maximum": MAX_SYMBOLIC_BYTES},
        "name": {"type": "string", "pattern": _VAR.pattern},
        "default": {"type": "string"},
    },
}


def _name(r: _Reader, v: Any, path: Path) -> str:
    if not isinstance(v, str) or not _VAR.match(v):
        raise r.fail(path, f"expected a name for the symbolic value (letters, digits, _), got {_kind(v)}")
    return v


def _keys(r: _Reader, v: dict[str, Any], path: Path, allowed: tuple[str, ...]) -> None:
    for k in v:
        if k not in allowed:
            raise r.fail(path + (k,), f"unknown key {k!r} (expected {', '.join(allowed)})")


def read_status(r: _Reader, v: dict[str, Any], path: Path) -> tuple[int, SymbolicStatus]:
    """``status = { symbolic = "st", domain = ..., default = ... }``: (default status, declaration)."""
    _keys(r, v, path, ("symbolic", "domain", "default"))
    if "symbolic" not in v:
        raise r.fail(path, 'expected an NTSTATUS or a table { symbolic = "name" }')
    name = _name(r, v["symbolic"], path + ("symbolic",))
    domain: tuple[int, ...] = ()
    raw = v.get("domain", "ntstatus")
    if isinstance(raw, list):
        if not raw:
            raise r.fail(path + ("domain",), "expected a non-empty array of statuses (an empty domain has no value)")
        domain = tuple(dict.fromkeys(r.status(s, path + ("domain", i)) for i, s in enumerate(raw)))
    elif raw not in DOMAIN_WORDS:
        raise r.fail(path + ("domain",), f'expected "ntstatus" or an array of statuses, got {_kind(raw)}')
    default = r.status(v["default"], path + ("default",)) if "default" in v else (domain[0] if domain else 0)
    if domain and default not in domain:
        raise r.fail(path + ("default",), f"the default {default:#x} is not in the domain")
    return default, SymbolicStatus(name, domain)


def read_data(r: _Reader, v: dict[str, Any], path: Path) -> tuple[bytes, str]:
    """``data = { symbolic = 16, name = "Buffer", default = "hex" }``: (default bytes, name)."""
    _keys(r, v, path, ("symbolic", "name", "default"))
    size = v.get("symbolic")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SYMBOLIC_BYTES:
        raise r.fail(path + ("symbolic",), f"expected a byte count 1..{MAX_SYMBOLIC_BYTES}, got {_kind(size)}")
    name = _name(r, v.get("name", "Buffer"), path + ("name",))
    data = r.hexdata(v["default"], path + ("default",)) if "default" in v else bytes(size)
    if len(data) != size:
        raise r.fail(path + ("default",), f"expected {size} bytes, got {len(data)}")
    return data, name


def read_arg(r: _Reader, v: Any, path: Path) -> int:
    """``at = "arg3"``: the argument's number (1-based)."""
    m = _ARG.match(v) if isinstance(v, str) else None
    if m is None:
        raise r.fail(path, f'expected the argument that holds the address, "arg1".."arg16", got {_kind(v)}')
    return int(m.group(1))


class Names:
    """The symbolic names a scenario declares, with their shape and first place."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, Path]] = {}

    def claim(self, r: _Reader, name: str, shape: str, path: Path) -> None:
        old = self.seen.setdefault(name, (shape, path))
        if old[0] != shape:
            raise r.fail(
                path,
                f"symbolic name {name!r} is already {old[0]} at {_dotted(old[1])}; give this {shape} another name",
            )
