"""Linking a scenario module's assembly against the modules already loaded, as a linker does.

Compiled code calls a function another DLL exports through the caller's import address
table: the linker gives the module one 8-byte slot per imported function (``__imp_NtClose``)
and the compiler emits ``call qword ptr [rip + __imp_NtClose]`` (``FF 15 rel32``, 6 bytes).
The loader writes each target's address into its slot, so the call reaches the target
wherever it is loaded, and the return address is the byte after those 6 bytes (MS docs,
"PE Format", Import Address Table; "x64 software conventions").

:func:`link` rewrites a module's text, line for line, before keystone sees it:

* ``call NAME`` / ``jmp NAME`` to a name another module exports become calls (jumps)
  through ``__imp_NAME``; calls to the module's own labels stay ``call rel32``.
* ``[__imp_NAME]`` is read RIP-relative (``[rip + __imp_NAME]``), as MASM reads it in x64.
* ``[NAME]`` / ``[rip + NAME]`` (plus constants) for another module's name become an exact
  RIP-relative operand when the name is within rel32 reach, and one clear error when not;
  keystone would otherwise encode a truncated displacement without a word.
* a conditional jump to another module's name out of reach is an error naming the fix.

Other uses (``mov rax, NtClose``, ``.quad NtClose``) keep the absolute address.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import field

from emu.loader.asm import _KEYWORDS, _LEADING_LABELS, _REGISTER, _TOKEN, ORIGIN, AssemblyError
from emu.records import record

__all__ = ["IMPORT_PREFIX", "REL32_REACH", "Linked", "Lookup", "link"]

IMPORT_PREFIX = "__imp_"  # the name MSVC and GNU ld give an import's IAT slot
# A rel32 operand reaches +-2 GiB from the end of its instruction; the margin covers any
# place inside a module (emu's modules sit 16 MiB apart).
REL32_REACH = (1 << 31) - (64 << 20)

Lookup = Callable[[str], tuple[str, int] | None]
"""A name another module exports → (that module's name, the address), else None."""

_NAME = r"[A-Za-z_.$?][\w.$?@]*"
_BRANCH = re.compile(rf"^(call|jmp)\s+({_NAME})\s*$", re.IGNORECASE)
_BARE_IMPORT = re.compile(rf"\[\s*({IMPORT_PREFIX}[\w.$?@]+)\s*\]")
_MEMORY = re.compile(r"\[([^\]]*)\]")
_JUMPS = re.compile(r"^(j[a-z]+|loop[a-z]*|call|jmp)$", re.IGNORECASE)


@record
class Linked:
    """A module's text after :func:`link`: the same lines, rewritten where needed."""

    source: str
    imports: list[str] = field(default_factory=list)  # names that need an IAT slot, in first-use order
    original: dict[int, str] = field(default_factory=dict)  # 1-based line -> the text as written


def link(source: str, local: set[str], lookup: Lookup, base: int) -> Linked:
    """Rewrite cross-module references in comment-free assembly that will be assembled at ``base``.

    Args:
        source: the text (comments already stripped), one statement a line.
        local: labels the module defines itself (they shadow other modules' names).
        lookup: where another module's name lives.
        base: the address the text is assembled at (``ORIGIN`` is defined there).

    Raises:
        AssemblyError: a reference that cannot be encoded, with the line and what to write.

    >>> far = lambda n: ("ntdll", 0x1_7000_1000) if n == "NtYieldExecution" else None
    >>> out = link("main: call NtYieldExecution", {"main"}, far, 0x7FFA_C000_1000)
    >>> out.source, out.imports
    ('main: call qword ptr [rip + __imp_NtYieldExecution]', ['NtYieldExecution'])
    """
    out = Linked(source="")
    lines = source.splitlines()
    for i, line in enumerate(lines, 1):
        head = _LEADING_LABELS.match(line)
        cut = head.end() if head else 0
        body = line[cut:].strip()
        if not body:
            continue
        if body.startswith("."):  # a directive: `.quad __imp_NtClose` still needs the slot
            _note_slots(body, local, lookup, out.imports)
            continue
        new = _link_statement(body, i, line, local, lookup, base, out.imports)
        if new != body:
            out.original[i] = line
            lines[i - 1] = line[:cut] + new
    out.source = "\n".join(lines)
    return out


def _external(name: str, local: set[str], lookup: Lookup) -> tuple[str, int] | None:
    if name in local or _REGISTER.match(name) or name.lower() in _KEYWORDS:
        return None
    return lookup(name)


def _link_statement(
    body: str, i: int, line: str, local: set[str], lookup: Lookup, base: int, imports: list[str]
) -> str:
    m = _BRANCH.match(body)
    if m and _external(m.group(2), local, lookup) is not None:
        name = m.group(2)
        if name not in imports:
            imports.append(name)
        return f"{m.group(1)} qword ptr [rip + {IMPORT_PREFIX}{name}]"
    body = _BARE_IMPORT.sub(r"[rip + \1]", body)
    _note_slots(body, local, lookup, imports)
    body = _MEMORY.sub(lambda mm: f"[{_memory(mm.group(1), i, line, local, lookup, base)}]", body)
    mnemonic = body.split(None, 1)[0]
    if _JUMPS.match(mnemonic):
        outside = _MEMORY.sub("", body)[len(mnemonic) :]
        for token in _TOKEN.findall(outside):
            hit = _external(token, local, lookup)
            if hit is not None and not _reaches(hit[1], base):
                raise AssemblyError(
                    f"'{token}' ({hit[0]}, at {hit[1]:#x}) is out of rel32 reach of this module's code at {base:#x}: "
                    f"a '{mnemonic}' cannot get there; jump through its import slot, "
                    f"'jmp qword ptr [rip + {IMPORT_PREFIX}{token}]', from a label of your own",
                    i, line,
                )  # fmt: skip
    return body


def _note_slots(body: str, local: set[str], lookup: Lookup, imports: list[str]) -> None:
    """Add the imports whose slots (``__imp_NAME``) a statement names."""
    for token in _TOKEN.findall(body):
        if token.startswith(IMPORT_PREFIX) and token not in local:
            target = token[len(IMPORT_PREFIX) :]
            if target not in local and lookup(target) is not None and target not in imports:
                imports.append(target)


def _reaches(address: int, base: int) -> bool:
    return abs(address - base) <= REL32_REACH


def _memory(inner: str, i: int, line: str, local: set[str], lookup: Lookup, base: int) -> str:
    """A memory operand naming another module's symbol as an exact RIP-relative one, or an error."""
    terms = [t.strip() for t in re.split(r"([+-])", inner)]
    names = [(t, hit) for t in terms if (hit := _external(t, local, lookup)) is not None]
    if not names:
        return inner
    name, (module, address) = names[0]
    signs = ["+", *terms[1::2]]
    values = terms[0::2]
    rest: list[str] = []
    simple = len(names) == 1
    for sign, value in zip(signs, values, strict=True):
        if value == name or value.lower() == "rip":
            simple = simple and sign == "+"
        elif _is_number(value):
            rest.append(f"{sign} {value}")
        else:
            simple = False
    if not simple:
        raise AssemblyError(
            f"'{name}' ({module}, at {address:#x}) cannot be a 32-bit displacement here: "
            f"load its address first ('mov rax, {name}') and address through the register",
            i, line,
        )  # fmt: skip
    if not _reaches(address, base):
        raise AssemblyError(
            f"'{name}' ({module}, at {address:#x}) is out of rel32 reach of this module's code at {base:#x}: "
            f"take its address from its import slot ('mov rax, [rip + {IMPORT_PREFIX}{name}]') "
            f"or as a 64-bit constant ('mov rax, {name}')",
            i, line,
        )  # fmt: skip
    delta = address - base
    offset = f"+ {delta:#x}" if delta >= 0 else f"- {-delta:#x}"
    return " ".join(["rip +", ORIGIN, offset, *rest])


def _is_number(text: str) -> bool:
    try:
        int(text, 0)
    except ValueError:
        return False
    return True
