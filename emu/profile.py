"""Profiles: the Windows build a run models (SSN table, stub shape, dispatcher convention).

Profiles and SSN tables are package data (``emu/data/profiles.toml``,
``emu/data/syscalls.toml``); this module only reads them and applies overrides.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import field
from functools import cache
from importlib import resources
from typing import Any, Literal

from emu.records import record

Dispatcher = Literal["stack", "registers"]
DispatcherRegisters = Literal["wrk", "windows10", "reactos"]
CalloutFrame = Literal["wrk", "reactos"]
StubShape = Literal["win7", "win10"]
CallbackException = Literal["swallow", "fatal"]
CALLBACK_EXCEPTIONS: tuple[str, ...] = ("swallow", "fatal")

DEFAULT_PROFILE = "win10-22h2"
DISPATCHERS: tuple[str, ...] = ("stack", "registers")
DISPATCHER_REGISTERS: tuple[str, ...] = ("wrk", "windows10", "reactos")
CALLOUT_FRAMES: tuple[str, ...] = ("wrk", "reactos")
STUB_SHAPES: tuple[str, ...] = ("win7", "win10")


@record(frozen=True)
class Profile:
    """A modelled Windows build. ``ssn`` maps service names (Nt spelling) to numbers."""

    name: str
    title: str
    major: int
    minor: int
    build: int
    stub: StubShape
    dispatcher: Dispatcher
    dispatcher_registers: DispatcherRegisters
    callout_frame: CalloutFrame
    kernel_stack_size: int
    kernel_stack_commit: int
    callback_stack_cost: int
    callback_output_limit: int
    user_probe_address: int
    # What an exception that leaves a user-mode callback unhandled does (KiUserCallbackDispatcherHandler):
    # "swallow" (Windows 7 SP1, MS KB976038) or "fatal" (STATUS_FATAL_USER_CALLBACK_EXCEPTION).
    callback_exception: CallbackException = "fatal"
    ssn: dict[str, int] = field(default_factory=dict)
    ssn_source: str = ""

    def with_overrides(self, **fields: Any) -> Profile:
        """A copy with some fields replaced; ``ssn`` entries are merged, not replaced."""
        ssn = dict(self.ssn)
        ssn.update(fields.pop("ssn", {}) or {})
        return dataclasses.replace(self, ssn=ssn, **fields)

    def service_name(self, ssn: int) -> str | None:
        return self._by_number().get(ssn)

    def _by_number(self) -> dict[int, str]:
        return {v: k for k, v in sorted(self.ssn.items())}


# The string-valued profile keys and the values each may take.
PROFILE_CHOICES: dict[str, tuple[str, ...]] = {
    "dispatcher": DISPATCHERS,
    "dispatcher_registers": DISPATCHER_REGISTERS,
    "callout_frame": CALLOUT_FRAMES,
    "stub": STUB_SHAPES,
    "callback_exception": CALLBACK_EXCEPTIONS,
}

OVERRIDABLE: dict[str, type] = {
    "stub": str,
    "dispatcher": str,
    "dispatcher_registers": str,
    "callout_frame": str,
    "kernel_stack_size": int,
    "kernel_stack_commit": int,
    "callback_stack_cost": int,
    "callback_output_limit": int,
    "callback_exception": str,
}


@cache
def _data(name: str) -> dict[str, Any]:
    with resources.files("emu.data").joinpath(name).open("rb") as f:
        return tomllib.load(f)


def profile_names() -> list[str]:
    return sorted(_data("profiles.toml"))


def get_profile(name: str = DEFAULT_PROFILE) -> Profile:
    """The named profile with its SSN table.

    >>> get_profile("win10-22h2").ssn["NtCallbackReturn"]
    5
    >>> get_profile("win7-sp1").ssn["NtCallbackReturn"]
    2
    """
    profiles = _data("profiles.toml")
    if name not in profiles:
        raise KeyError(name)
    p = profiles[name]
    tables = _data("syscalls.toml").get(name, {})
    return Profile(
        name=name,
        title=p["title"],
        major=p["major"],
        minor=p["minor"],
        build=p["build"],
        stub=p["stub"],
        dispatcher=p["dispatcher"],
        dispatcher_registers=p["dispatcher_registers"],
        callout_frame=p["callout_frame"],
        kernel_stack_size=p["kernel_stack_size"],
        kernel_stack_commit=p["kernel_stack_commit"],
        callback_stack_cost=p["callback_stack_cost"],
        callback_output_limit=p["callback_output_limit"],
        user_probe_address=p["user_probe_address"],
        callback_exception=p["callback_exception"],
        ssn=dict(tables.get("services", {})),
        ssn_source=tables.get("source", ""),
    )
