"""Values the kernel hands to user mode that a scenario declares symbolic.

A service asks for one with a :class:`Symbolic` request (a scripted return whose status is
declared ``{ symbolic = "st" }``, a callback whose input is ``{ symbolic = 16 }``, or a write
step whose bytes are, :mod:`emu.kernel.user_write`). The caller's
:class:`~emu.kernel.hooks.KernelHooks` answers with a concrete value: a single run takes the
declared default (or a witness's value); an explorer suspends the service there, forks, and
resumes it with each value a solver finds (:mod:`emu.symbolic`).
"""

from __future__ import annotations

from typing import Literal

from emu.records import record


@record(frozen=True)
class Symbolic:
    """A request for a symbolic value: a status (32 bits), a callback's input or bytes a service
    writes into the caller's memory at ``address`` (``bits`` = 8 x bytes).

    ``domain``: the values allowed (empty: any value of that width); ``default``: the value a
    single run takes. ``options`` is empty so code that lists a choice's options sees none.
    """

    name: str
    bits: int
    where: Literal["status", "data", "write"]
    domain: tuple[int, ...] = ()
    default: int = 0
    options: tuple[str, ...] = ()
    address: int = 0  # "write": where the bytes go (emu.kernel.user_write)


@record(frozen=True)
class SymbolicReturn:
    """A scripted return whose status is symbolic."""

    name: str
    domain: tuple[int, ...] = ()
    default: int = 0

    def request(self) -> Symbolic:
        return Symbolic(self.name, 32, "status", self.domain, self.default)
