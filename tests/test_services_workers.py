"""Python services with worker processes: sent by reference (``"package.module:name"``), a
registry object found by the module that holds it, or refused in one line; hooks refused."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from test_services import COUNTER, counter_registry, exit_statuses, write_module

from conftest import asm_scenario
from emu.errors import ExtensionError
from emu.exploration.explorer import explore
from emu.exploration.parallel import explore_parallel
from emu.hooks import Hit, Hooks
from emu.scenario import parse_scenario
from emu.services import reference


def test_a_registry_a_module_holds_goes_to_the_workers_by_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))  # workers start with this process's sys.path
    module = importlib.import_module(write_module(tmp_path))
    assert reference(module.registry) == f"{module.__name__}:registry"
    scenario = parse_scenario(asm_scenario(COUNTER), "t.toml")
    one = explore(scenario, services=module.registry)
    # split_factor=1: the coordinator hands the work out at the first choice, so the second
    # call of the service (and its choice) happens only in the workers.
    two = explore_parallel(scenario, 2, split_factor=1, services=module.registry)
    assert two.complete and two.graph.to_json() == one.graph.to_json()
    assert exit_statuses(two.graph) == [2, 3, 4]


def test_a_registry_no_module_holds_is_refused_in_one_line() -> None:
    scenario = parse_scenario(asm_scenario(COUNTER), "t.toml")
    with pytest.raises(ExtensionError) as e:
        explore(scenario, services=counter_registry(), workers=2)
    message = str(e.value)
    assert "\n" not in message and e.value.kind == "service"
    assert message.startswith("services (NtQuerySystemInformation): worker processes import services by name")
    assert '"package.module:name"' in message


def test_hooks_with_workers_are_refused_in_one_line() -> None:
    hooks = Hooks()

    @hooks.transition()
    def every(hit: Hit) -> None:
        pass

    with pytest.raises(ExtensionError, match=r"^hooks run in this process: explore with one worker"):
        explore(parse_scenario(asm_scenario(COUNTER), "t.toml"), hooks=hooks, workers=2)
