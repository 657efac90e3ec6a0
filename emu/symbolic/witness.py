"""Running a scenario with concrete values for its symbolic declarations (a witness).

``emu explore --json`` gives, for each pending state, one witness that reaches it; ``emu run
FILE --witness st=0xc0000008 --witness Buffer=0f000000...`` runs with those values. A status
is a number (any base Python reads: ``0x...``), an input hex bytes of the declared size. A
name that occurs again on the run is ``name#2``, ``name#3``, ... as in the exploration.
"""

from __future__ import annotations

from emu.kernel import KernelHooks
from emu.kernel.symbolic import Symbolic
from emu.kernel.thread import KThread


class WitnessError(ValueError):
    """A witness that does not fit the scenario's declarations."""


def parse_witness(items: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` items as a table (values are checked against the declaration when used)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise WitnessError(f"expected NAME=VALUE (e.g. st=0xc0000008 or Buffer=0f000000), got {item!r}")
        out[name.strip()] = value.strip().replace(" ", "")
    return out


class WitnessAnswer:
    """KernelHooks.symbolic for a single run: each symbolic request takes the witness's value, else its default."""

    def __init__(self, witness: dict[str, str]) -> None:
        self.witness = witness
        self.counts: dict[str, int] = {}
        self.used: set[str] = set()
        self.errors: list[str] = []

    def __call__(self, thread: KThread, req: Symbolic) -> int:
        n = self.counts.get(req.name, 0) + 1
        self.counts[req.name] = n
        name = req.name if n == 1 else f"{req.name}#{n}"
        raw = self.witness.get(name)
        if raw is None:
            return req.default
        self.used.add(name)
        try:
            if req.where == "status":
                value = int(raw, 0)
                if not 0 <= value <= 0xFFFF_FFFF:
                    raise ValueError
            else:
                data = bytes.fromhex(raw)
                if len(data) != req.bits // 8:
                    self.errors.append(f"witness {name}: expected {req.bits // 8} bytes, got {len(data)}")
                    return req.default
                value = int.from_bytes(data, "little")
        except ValueError:
            kind = "a status (0..0xffffffff)" if req.where == "status" else "hex bytes"
            self.errors.append(f"witness {name}: expected {kind}, got {raw!r}")
            return req.default
        if req.domain and value not in req.domain:
            self.errors.append(f"witness {name}: {value:#x} is not in its declared domain")
            return req.default
        return value

    def unused(self) -> list[str]:
        return sorted(set(self.witness) - self.used)


def witness_hooks(witness: dict[str, str]) -> tuple[KernelHooks, WitnessAnswer]:
    answer = WitnessAnswer(witness)
    return KernelHooks(symbolic=answer), answer
