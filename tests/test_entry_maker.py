"""The kernel's per-profile shortcut for KiUserCallbackDispatcher's entry registers agrees
with ``entry_registers`` (the documented derivation) for every profile and any trap frame."""

from __future__ import annotations

import dataclasses
import random
from typing import Literal

import pytest

from emu.context import UserContext
from emu.kernel.callout import entry_maker, entry_registers
from emu.profile import get_profile, profile_names


@pytest.mark.parametrize("name", profile_names())
@pytest.mark.parametrize("policy", ["wrk", "windows10", "reactos"])
def test_entry_maker_matches_entry_registers(name: str, policy: Literal["wrk", "windows10", "reactos"]) -> None:
    profile = dataclasses.replace(get_profile(name), dispatcher_registers=policy)
    rnd = random.Random(7)
    for _ in range(200):
        trap = UserContext(*[rnd.getrandbits(64) for _ in UserContext._fields])
        rsp, dispatcher = rnd.getrandbits(64), rnd.getrandbits(64)
        made = entry_maker(profile, dispatcher)(trap, rsp)
        assert made == entry_registers(profile, trap, rsp, dispatcher)[0]
        # Under every policy the dispatcher is entered by SYSRET: RIP = RCX = its address.
        assert made[UserContext._fields.index("rip")] == made[UserContext._fields.index("rcx")] == dispatcher
        assert made[UserContext._fields.index("rsp")] == rsp
