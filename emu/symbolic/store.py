"""What a path knows symbolically: which registers and bytes hold expressions over the declared
symbolic values, the flags of the last symbolic compare, and the path condition.

One :class:`Store` belongs to one path of an exploration; the explorer saves and loads it with
the machine at every fork (:meth:`Store.copy`). Every entry keeps the concrete value the
location held when it was written, so a location that code emu does not follow overwrote (the
kernel model, an instruction outside the supported subset) is seen to be stale and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import z3

Expr = Any  # a z3 bit-vector expression
Cond = Any  # a z3 boolean expression

# Registers a system call's return clobbers (Intel SDM SYSRET: RIP <- RCX, RFLAGS <- R11; RAX = status).
SYSRET_CLOBBERS = ("rax", "rcx", "r11")


# z3 variables by (name, kind, size): making one costs more than looking it up.
_SYMS: dict[tuple[str, str, int], tuple[Expr, ...]] = {}


@dataclass(frozen=True)
class Var:
    """A symbolic value introduced on a path: a status (one 32-bit variable) or bytes (one per
    byte: a callback's input, or bytes a service writes into the caller's memory)."""

    name: str  # unique on the path: "st", then "st#2" for the second time the same step runs
    where: str  # "status", "data" (a callback's input) or "write" (a service's write)
    size: int  # bytes
    value: int  # the concrete value this path's run gave it (little-endian for data)
    fork: int  # the explorer's fork taken where it was introduced (its index in the driver)
    domain: tuple[int, ...] = ()
    at: int = 0  # "write": the address the bytes go to

    @property
    def syms(self) -> tuple[Expr, ...]:
        key = (self.name, self.where, self.size)
        out = _SYMS.get(key)
        if out is None:
            if self.where == "status":
                out = (z3.BitVec(self.name, 32),)
            else:
                out = tuple(z3.BitVec(f"{self.name}[{i}]", 8) for i in range(self.size))
            _SYMS[key] = out
        return out

    def values(self) -> list[tuple[Expr, Expr]]:
        """Each z3 variable with this path's value (for substitution)."""
        syms = self.syms
        if len(syms) == 1:
            return [(syms[0], z3.BitVecVal(self.value, 32))]
        raw = self.value.to_bytes(self.size, "little")
        return [(s, z3.BitVecVal(raw[i], 8)) for i, s in enumerate(syms)]

    def expr(self) -> Expr:
        """The whole value as one bit-vector (data: little-endian)."""
        s = self.syms
        return s[0] if len(s) == 1 else z3.Concat(*reversed(s))

    def declared(self) -> Cond | None:
        """What the declaration allows (None: any value)."""
        if not self.domain:
            return None
        e = self.expr()
        return z3.Or(*[e == v for v in self.domain])


@dataclass(frozen=True)
class Step:
    """One constraint of a path condition: ``cond`` held at ``site`` (an address and a readable place)."""

    cond: Cond
    site: int
    where: str
    kind: str = "branch"  # "branch", "target" (an address or jump target fixed), "fixed" (concretized)


@dataclass
class Flags:
    """RFLAGS after an instruction with symbolic operands: each flag a z3 Bool, None (concrete:
    read RFLAGS) or a string (why emu does not know it). ``cmp``/``test`` keep their operands
    so conditions read as comparisons."""

    zf: Cond | str | None
    sf: Cond | str | None
    cf: Cond | str | None
    of: Cond | str | None
    op: str = ""  # "cmp" or "test" (then a, b are the operands), or "" (a is the result)
    a: Expr = None
    b: Expr = None


@dataclass
class Store:
    regs: dict[str, tuple[Expr, int | None]] = field(default_factory=dict)  # canonical name -> (expr, concrete)
    mem: dict[int, tuple[Expr, int | None]] = field(default_factory=dict)  # address -> (8-bit expr, concrete)
    flags: Flags | None = None
    saved: dict[tuple[int, int], dict[str, tuple[Expr, int | None]]] = field(default_factory=dict)
    pc: tuple[Step, ...] = ()
    decisions: int = 0  # branches on symbolic values so far on this path
    bound: int = 0  # decisions below this index are fixed (their other side is someone else's work)
    replay_until: int = -1  # the explorer replays known states until this decision is taken
    expect: tuple[int, int] | None = None  # (decision index, site): where the planned side is taken
    vars: tuple[Var, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    witness: dict[str, int] = field(default_factory=dict)  # the values this path's run gives
    asked: Var | None = None  # a symbolic request the kernel is suspended at
    intro: tuple[Var, int] | None = None  # a value given, to be tainted at the thread's next state
    notes: tuple[str, ...] = ()  # what made this path incomplete (unsupported, concretized, solver)

    def copy(self) -> Store:
        return replace(
            self,
            regs=dict(self.regs),
            mem=dict(self.mem),
            flags=None if self.flags is None else replace(self.flags),
            saved={k: dict(v) for k, v in self.saved.items()},
            counts=dict(self.counts),
            witness=dict(self.witness),
        )

    @property
    def live(self) -> bool:
        return bool(self.regs or self.mem or self.flags)

    def assumptions(self) -> list[Cond]:
        return [c for v in self.vars if (c := v.declared()) is not None]
