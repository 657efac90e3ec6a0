"""Explored states' records with their equal parts shared, to keep memory per state small.

Register values recur from state to state (addresses, counters that stay put), and a
stack at the same call site often holds the same bytes: a node keeps one int object per
register value and one bytes object per stack content seen, shared with every other
node's that are equal (about 32 bytes a register and 200 bytes a stack each).
"""

from __future__ import annotations

from typing import Any

from emu.context import UserContext
from emu.trace import State

# Distinct stack contents remembered to share equal ones (then forgotten and begun again).
STACK_MEMO = 1 << 16
assert len(State._fields) == 11, "SharedParts.state spells out the RawState fields"


class SharedParts:
    """Builds nodes' :class:`State` records from raw ones, sharing equal parts."""

    __slots__ = ("ints", "stacks")

    def __init__(self) -> None:
        self.ints: dict[int, int] = {}  # one int object per register value seen
        self.stacks: dict[bytes, bytes] = {}  # one bytes object per stack content seen

    def state(self, raw: tuple[Any, ...]) -> State:
        """The typed record of a raw one (RawState layout)."""
        ints, stacks = self.ints, self.stacks
        if len(stacks) > STACK_MEMO:
            stacks.clear()  # later equal stacks are shared among themselves
        # tuple.__new__: the fields are known to be complete (the NamedTuple constructors check).
        ctx = tuple.__new__(UserContext, map(ints.setdefault, raw[3], raw[3]))
        stack = stacks.setdefault(raw[4], raw[4])
        return tuple.__new__(
            State, (raw[0], raw[1], raw[2], ctx, stack, raw[5], raw[6], raw[7], raw[8], raw[9], raw[10])
        )
