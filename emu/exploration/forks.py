"""A machine saved at a choice point: what the explorer restores to follow another option."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emu.exploration.cpu import SavedCpu
    from emu.kernel.fork import KernelState
    from emu.snapshot import PageSnapshot
    from emu.symbolic.driver import Pick


# One per choice state: no instance dict. Not frozen: a frozen dataclass sets each field through
# object.__setattr__ (five times slower to build); nothing assigns a field after it is made.
# Compared and hashed by identity (eq=False), as the explorer uses it.
@dataclass(slots=True, eq=False)
class Fork:
    """A machine saved at a choice point."""

    cpu: SavedCpu  # the CPU context (emu.exploration.cpu)
    memory: PageSnapshot
    kernel: KernelState
    depth: int  # choices taken on the way here
    node: str  # the digest of the state the choice is made in
    path: tuple[str, ...] = ()  # the options taken from the start to here
    symbolic: Any = None  # the path's symbolic store (emu.symbolic), when the scenario declares values
    left: list[int] = field(default_factory=lambda: [0])  # options not yet followed (the work list's count)
    route: tuple[str | Pick, ...] = ()  # the path as options to resume with (a symbolic value's: its Pick)

    @property
    def records(self) -> tuple[int, ...]:
        """The trace records (state ids) the saved threads name: kept while this fork may be restored."""
        return tuple([t.state_id for t in self.kernel.threads])  # (a list first: no generator frame)
