"""Path conditions in readable form: ``Buffer[0:4] == 0x0000000F and st < 0``.

Comparisons print signed ones plainly (``<``) and unsigned ones with a ``u`` (``<u``); consecutive
input bytes read little-endian print as a slice (``Buffer[0:4]``); numbers print in hex at the
width of the value they are compared with.
"""

from __future__ import annotations

import re
from typing import Any

import z3

_BYTE = re.compile(r"^(.+)\[(\d+)\]$")

_BINARY = {
    z3.Z3_OP_BADD: "+", z3.Z3_OP_BSUB: "-", z3.Z3_OP_BMUL: "*", z3.Z3_OP_BAND: "&", z3.Z3_OP_BOR: "|",
    z3.Z3_OP_BXOR: "^", z3.Z3_OP_BSHL: "<<", z3.Z3_OP_BLSHR: ">>u", z3.Z3_OP_BASHR: ">>",
}  # fmt: skip
_COMPARE = {
    z3.Z3_OP_EQ: "==", z3.Z3_OP_DISTINCT: "!=", z3.Z3_OP_SLT: "<", z3.Z3_OP_SLEQ: "<=", z3.Z3_OP_SGT: ">", z3.Z3_OP_SGEQ: ">=",
    z3.Z3_OP_ULT: "<u", z3.Z3_OP_ULEQ: "<=u", z3.Z3_OP_UGT: ">u", z3.Z3_OP_UGEQ: ">=u",
}  # fmt: skip
_NEGATED = {
    "==": "!=",
    "!=": "==",
    "<": ">=",
    "<=": ">",
    ">": "<=",
    ">=": "<",
    "<u": ">=u",
    "<=u": ">u",
    ">u": "<=u",
    ">=u": "<u",
}


def condition(c: Any) -> str:
    """One constraint, readable."""
    k = c.decl().kind() if z3.is_app(c) else None
    if k == z3.Z3_OP_NOT:
        inner = c.arg(0)
        ik = inner.decl().kind()
        if ik in _COMPARE and inner.num_args() == 2:
            return _compare(inner, negate=True)
        return f"not ({condition(inner)})"
    if k in _COMPARE and c.num_args() == 2 and z3.is_bv(c.arg(0)):
        return _compare(c)
    if k == z3.Z3_OP_AND:
        return " and ".join(condition(a) for a in c.children())
    if k == z3.Z3_OP_OR:
        return "(" + " or ".join(condition(a) for a in c.children()) + ")"
    if z3.is_true(c):
        return "true"
    if z3.is_false(c):
        return "false"
    return str(c)


def _compare(c: Any, negate: bool = False) -> str:
    op = _COMPARE[c.decl().kind()]
    if negate:
        op = _NEGATED[op]
    a, b = c.arg(0), c.arg(1)
    if z3.is_bv_value(a) and not z3.is_bv_value(b):
        a, b = b, a
        op = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
    signed = op in ("<", "<=", ">", ">=")
    return f"{expr(z3.simplify(a))} {op} {expr(z3.simplify(b), signed)}"


def expr(e: Any, signed: bool = False) -> str:
    """A bit-vector expression, readable."""
    if z3.is_bv_value(e):
        v, bits = e.as_long(), e.size()
        if signed and v >> (bits - 1):
            return str(v - (1 << bits))
        if signed and v < 10:
            return str(v)
        return f"{v:#0{bits // 4 + 2}x}"
    sliced = _slice(e)
    if sliced:
        return sliced
    k = e.decl().kind() if z3.is_app(e) else None
    if k == z3.Z3_OP_UNINTERPRETED:
        return str(e)
    if k in _BINARY:
        return "(" + f" {_BINARY[k]} ".join(expr(a) for a in e.children()) + ")"
    if k == z3.Z3_OP_BNOT:
        return f"~{expr(e.arg(0))}"
    if k == z3.Z3_OP_BNEG:
        return f"-{expr(e.arg(0))}"
    if k == z3.Z3_OP_EXTRACT:
        hi, lo = e.params()
        return f"{expr(e.arg(0))}[bits {lo}..{hi}]"
    if k in (z3.Z3_OP_ZERO_EXT, z3.Z3_OP_SIGN_EXT):
        return expr(e.arg(0), signed)
    return str(e)


def _slice(e: Any) -> str | None:
    """Input bytes name[i+n-1] .. name[i] concatenated (a little-endian load): ``name[i:i+n]``."""
    if z3.is_app(e) and e.decl().kind() == z3.Z3_OP_UNINTERPRETED:
        return None
    parts = _concat_parts(e)
    if len(parts) < 2:
        return None
    found = []
    for p in parts:
        m = _BYTE.match(p.decl().name()) if z3.is_app(p) and p.decl().kind() == z3.Z3_OP_UNINTERPRETED else None
        if m is None:
            return None
        found.append((m.group(1), int(m.group(2))))
    names = {n for n, _ in found}
    idx = [i for _, i in found]
    if len(names) != 1 or idx != list(range(idx[0], idx[0] - len(idx), -1)):
        return None
    lo = idx[-1]
    return f"{found[0][0]}[{lo}:{lo + len(idx)}]"


def _concat_parts(e: Any) -> list[Any]:
    """The leaves of a (possibly nested) concatenation, most significant first."""
    if not (z3.is_app(e) and e.decl().kind() == z3.Z3_OP_CONCAT):
        return []
    out: list[Any] = []
    for p in e.children():
        out.extend(_concat_parts(p) or [p])
    return out


def path_condition(conds: list[Any], cache: dict[int, str] | None = None) -> str:
    """A whole path condition; "true" when nothing was asked of the symbolic values. ``cache``
    keeps each constraint's text by its z3 id (paths share their prefixes)."""
    if not conds:
        return "true"
    if cache is None:
        return " and ".join(condition(c) for c in conds)
    out = []
    for c in conds:
        key = c.get_id()
        text = cache.get(key)
        if text is None:
            text = cache[key] = condition(c)
        out.append(text)
    return " and ".join(out)
