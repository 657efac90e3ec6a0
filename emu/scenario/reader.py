"""Typed access to parsed TOML, with one-line errors naming the file, key path and line."""

from __future__ import annotations

import re
from typing import Any

from emu.errors import ScenarioError
from emu.winnt import STATUS_BY_NAME

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ID = re.compile(r"^[A-Za-z_.$?][\w.$?@]*(![A-Za-z_.$?][\w.$?@]*)?$")


class _Reader:
    """Typed access to the parsed TOML with errors that name the file, key and line."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.text = text

    def fail(self, path: tuple[str | int, ...], message: str) -> ScenarioError:
        return ScenarioError(self.file, _dotted(path), message, _line_of(self.text, path))

    def table(
        self, obj: Any, path: tuple[str | int, ...], allowed: dict[str, str], required: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise self.fail(path, f"expected a table, got {_kind(obj)}")
        for key in obj:
            if key not in allowed:
                raise self.fail(path + (key,), f"unknown key '{key}' (allowed: {', '.join(allowed)})")
        for key in required:
            if key not in obj:
                raise self.fail(path, f"missing required key '{key}' ({allowed[key]})")
        return obj

    def int_(
        self,
        obj: dict[str, Any],
        key: str,
        path: tuple[str | int, ...],
        default: int | None = None,
        lo: int = 0,
        hi: int = 2**64 - 1,
    ) -> int:
        if key not in obj:
            if default is None:
                raise self.fail(path, f"missing required key '{key}'")
            return default
        v = obj[key]
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(path + (key,), f"expected an integer, got {_kind(v)}")
        if not lo <= v <= hi:
            # Echo in the base the value was written in (TOML keeps no base: look at the text).
            line = _line_of(self.text, path + (key,))
            src = self.text.splitlines()[line - 1] if line else ""
            hexa = re.search(rf"\b{re.escape(key)}\s*=\s*[+-]?0x", src) is not None
            fmt = "#x" if hexa else "d"
            raise self.fail(path + (key,), f"expected an integer in {lo:{fmt}}..{hi:{fmt}}, got {v:{fmt}}")
        return v

    def str_(self, obj: dict[str, Any], key: str, path: tuple[str | int, ...], default: str | None = None) -> str:
        if key not in obj:
            if default is None:
                raise self.fail(path, f"missing required key '{key}'")
            return default
        v = obj[key]
        if not isinstance(v, str):
            raise self.fail(path + (key,), f"expected a string, got {_kind(v)}")
        return v

    def status(self, v: Any, path: tuple[str | int, ...], also: tuple[str, ...] = ()) -> int:
        """An NTSTATUS by number or name; ``also`` names the other words the caller accepts (shown in the error)."""
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFF_FFFF:
            return v
        if isinstance(v, str) and v in STATUS_BY_NAME:
            return STATUS_BY_NAME[v]
        names = ", ".join([*also, *sorted(STATUS_BY_NAME)])
        raise self.fail(path, f"expected an NTSTATUS (0..0xffffffff or one of {names}), got {_kind(v)}")

    def hexdata(self, v: Any, path: tuple[str | int, ...]) -> bytes:
        if not isinstance(v, str):
            raise self.fail(path, f'expected a hex string such as "48 69 00", got {_kind(v)}')
        try:
            return bytes.fromhex(v)
        except ValueError:
            raise self.fail(path, f'expected hex bytes such as "48 69 00", got {v!r}') from None


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return f"float {v}"
    if isinstance(v, str):
        return f"string {v[:40]!r}"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _line_of(text: str, path: tuple[str | int, ...]) -> int | None:
    """Best-effort line of a key path in TOML text (tomllib keeps no positions).

    Finds the deepest ``[table]`` / ``[[array]]`` header on the path, then the key
    below it, then (for ``key[j].sub``) the j-th inline table of that array.
    """
    if not path:
        return None
    lines = text.splitlines()
    names = [p for p in path if isinstance(p, str)]
    start, depth, rest = 0, 0, list(path)
    for d in range(len(names), 0, -1):
        header = re.compile(rf"^\s*\[\[?\s*{re.escape('.'.join(names[:d]))}\s*\]\]?\s*(#.*)?$")
        hits = [i for i, line in enumerate(lines) if header.match(line)]
        if hits:
            pos = _position_after(path, names[d - 1])
            rest = list(path[pos:])
            if lines[hits[0]].lstrip().startswith("[["):
                # An [[array]] header: the index after its name picks the entry.
                index = rest.pop(0) if rest and isinstance(rest[0], int) else 0
                start = hits[min(int(index), len(hits) - 1)]
            else:
                start = hits[0]
            depth = d
            break
    line = start
    found = bool(depth)
    while rest:
        key = rest.pop(0)
        if isinstance(key, int):
            hit = _nth_inline_table(lines, line, key)
            if hit is None:
                break
            line = hit
            continue
        pat = re.compile(rf"(^|[{{,])\s*{re.escape(key)}\s*=")
        for i in range(line, len(lines)):
            if i > line and re.match(r"^\s*\[", lines[i]):
                i = -1
                break
            if pat.search(lines[i]):
                break
        else:
            i = -1
        if i < 0:
            break
        line, found = i, True
    return line + 1 if found else None


def _position_after(path: tuple[str | int, ...], name: str) -> int:
    for i, p in enumerate(path):
        if p == name:
            return i + 1
    return len(path)


def _nth_inline_table(lines: list[str], start: int, n: int) -> int | None:
    """Line of the n-th top-level ``{`` of the array that begins on line ``start``."""
    count, depth, quote = -1, 0, ""
    for i in range(start, len(lines)):
        line = lines[i] if i > start else lines[i][lines[i].find("=") + 1 :]
        for ch in line:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                break
            elif ch == "[":
                depth += 1
            elif ch == "]":
                depth -= 1
                if depth <= 0:
                    return None
            elif ch == "{" and depth == 1:
                count += 1
                if count == n:
                    return i
    return None
