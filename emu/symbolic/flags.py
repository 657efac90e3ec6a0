"""Conditions on RFLAGS after an instruction with symbolic operands (Intel SDM vol. 1, appendix B,
"EFLAGS condition codes"): as z3 booleans when they depend on symbolic values, else concrete."""

from __future__ import annotations

from typing import Any

import z3

from emu.symbolic.regs import CF, OF, SF, ZF
from emu.symbolic.store import Expr, Flags

# A jcc/setcc/cmovcc suffix and its canonical name.
CONDITIONS = {
    "o": "o", "no": "no", "b": "b", "c": "b", "nae": "b", "ae": "ae", "nb": "ae", "nc": "ae",
    "e": "e", "z": "e", "ne": "ne", "nz": "ne", "be": "be", "na": "be", "a": "a", "nbe": "a",
    "s": "s", "ns": "ns", "p": "p", "pe": "p", "np": "np", "po": "np", "l": "l", "nge": "l",
    "ge": "ge", "nl": "ge", "le": "le", "ng": "le", "g": "g", "nle": "g",
}  # fmt: skip


# The flags each condition reads.
NEEDS = {
    "e": "z", "ne": "z", "s": "s", "ns": "s", "b": "c", "ae": "c", "o": "o", "no": "o",
    "be": "cz", "a": "cz", "l": "so", "ge": "so", "le": "zso", "g": "zso",
}  # fmt: skip


class Unsupported(Exception):
    """An instruction or flag the executor cannot express; the operands get concretized."""


def _flag(flags: Flags, name: str, rflags: int) -> Any:
    v = getattr(flags, name)
    if isinstance(v, str):
        raise Unsupported(v)
    if v is None:
        bit = {"zf": ZF, "sf": SF, "cf": CF, "of": OF}[name]
        return z3.BoolVal(bool(rflags & bit))
    return v


def condition(f: Flags | None, cc: str, rflags: int) -> Any:
    """Condition ``cc`` as a z3 Bool, or None when it cannot vary (concrete flags or a constant).
    After cmp and test it reads as a comparison of the operands."""
    if f is None:
        return None
    if cc in ("p", "np"):
        raise Unsupported("the parity flag of a symbolic result (not modelled)")
    if f.op == "cmp":
        a, b = f.a, f.b
        table = {
            "e": a == b, "ne": a != b, "b": z3.ULT(a, b), "ae": z3.UGE(a, b), "be": z3.ULE(a, b),
            "a": z3.UGT(a, b), "l": a < b, "ge": a >= b, "le": a <= b, "g": a > b,
        }  # fmt: skip
        if cc in table:
            return table[cc]
    if f.op == "test":
        r = f.a
        table = {
            "e": r == 0,
            "ne": r != 0,
            "s": r < 0,
            "ns": r >= 0,
            "l": r < 0,
            "ge": r >= 0,
            "le": r <= 0,
            "g": r > 0,
        }
        if cc in table:
            return table[cc]
    need = NEEDS[cc]
    zf, sf, cf, of = (_flag(f, n, rflags) if n[0] in need else None for n in ("zf", "sf", "cf", "of"))
    if cc in ("e", "ne", "s", "ns", "b", "ae", "o", "no"):
        flag = {"e": zf, "ne": zf, "s": sf, "ns": sf, "b": cf, "ae": cf, "o": of, "no": of}[cc]
        out = flag if cc in ("e", "s", "b", "o") else z3.Not(flag)
    elif cc == "be":
        out = z3.Or(cf, zf)
    elif cc == "a":
        out = z3.And(z3.Not(cf), z3.Not(zf))
    elif cc == "l":
        out = sf != of
    elif cc == "ge":
        out = sf == of
    elif cc == "le":
        out = z3.Or(zf, sf != of)
    else:  # g
        out = z3.And(z3.Not(zf), sf == of)
    s = z3.simplify(out)
    return None if z3.is_true(s) or z3.is_false(s) else out


def holds(cc: str, fl: int) -> bool:
    """Condition ``cc`` on concrete RFLAGS."""
    zf, sf, cf, of = bool(fl & ZF), bool(fl & SF), bool(fl & CF), bool(fl & OF)
    return {
        "e": zf, "ne": not zf, "s": sf, "ns": not sf, "b": cf, "ae": not cf, "be": cf or zf,
        "a": not cf and not zf, "o": of, "no": not of, "l": sf != of, "ge": sf == of,
        "le": zf or sf != of, "g": not zf and sf == of, "p": bool(fl & 4), "np": not fl & 4,
    }[cc]  # fmt: skip


def add_overflow(a: Expr, b: Expr, r: Expr) -> Any:
    return ((~(a ^ b)) & (a ^ r)) < 0


def sub_overflow(a: Expr, b: Expr, r: Expr) -> Any:
    return ((a ^ b) & (a ^ r)) < 0
