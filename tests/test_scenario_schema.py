"""The scenario model: typed expectations, keys made from the dataclasses, and the JSON Schema.

The shipped schema (``emu/data/scenario.schema.json``) must be what the generator makes
now; every shipped scenario must validate against it with the ``jsonschema`` package; and
what the reader rejects for its structure, the schema rejects too.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fuzz_documents import DOCUMENTS, to_toml
from fuzz_support import fast_settings
from hypothesis import given
from hypothesis import strategies as st

from emu.errors import ScenarioError
from emu.scenario import Budgets, ThreadSpec, load_scenario, parse_scenario
from emu.scenario.expectations import (
    EXPECTATIONS,
    CallbackOutput,
    Deadlock,
    Detection,
    ExitStatus,
    ExploredStates,
    Sysret,
    Transitions,
    Truths,
)
from emu.scenario.layout import BUDGETS, THREAD, TOP
from emu.scenario.schema import SHIPPED, main, schema_text

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "scenarios").rglob("*.toml"))
BASE_PATH = ROOT / "scenarios" / "callback_roundtrip.toml"
BASE = BASE_PATH.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SHIPPED.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(v: jsonschema.Draft7Validator, text: str) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(tomllib.loads(text))]


# --- the shipped file ---------------------------------------------------------------------------------
def test_the_shipped_schema_is_what_the_generator_makes() -> None:
    assert SHIPPED.read_text(encoding="utf-8") == schema_text(), "run: python -m emu.scenario.schema"


def test_the_generator_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    assert main([str(out)]) == 0
    assert main(["--check", str(out)]) == 0
    out.write_text(out.read_text().replace('"integer"', '"number"', 1))
    assert main(["--check", str(out)]) == 1
    assert main(["--check", str(tmp_path / "missing.json")]) == 1


@pytest.mark.parametrize("path", SCENARIOS, ids=[str(p.relative_to(ROOT / "scenarios")) for p in SCENARIOS])
def test_every_shipped_scenario_validates(validator: jsonschema.Draft7Validator, path: Path) -> None:
    assert schema_errors(validator, path.read_text(encoding="utf-8")) == []


# --- malformed files: rejected by the reader and by the schema ---------------------------------------
MALFORMED = {
    "unknown top-level table": ("[thread]\n", "[colour]\nred = 1\n\n[thread]\n"),
    "string for an integer": ("size = 4\n", 'size = "4"\n'),
    "missing thread entry": ('entry = "app!main"\n', "argument = 1\n"),
    "two kinds in one expect": ("detections = 1\n", "detections = 1\nmax_depth = 1\n"),
    "unknown expect kind": ("detections = 1\n", "detection_count = 1\n"),
    "unknown status name": ("exit_status = 0x1234", 'exit_status = "STATUS_NOT_A_THING"'),
    "unknown step kind": ('{ kind = "return", status = "callback" }', '{ kind = "sleep", status = "callback" }'),
    "system_call out of range": ("[thread]\n", "[machine]\nsystem_call = 2\n\n[thread]\n"),
    "zero wall time": ("[thread]\n", "[budgets]\nwall_time = 0\n\n[thread]\n"),
    "bad hex data": ("detections = 1\n", 'callback_output = { api = 2, data = "4" }\n'),
    "unknown observer": ("detections = 1\n", 'truths = { observer = "god", seed = 1 }\n'),
    "truths without a count": ("detections = 1\n", 'truths = { observer = "user-context" }\n'),
    "both data and text": ('text = "WM_PAINT"', 'text = "WM_PAINT", data = "00"'),
    "scripted NtCallbackReturn": ("[services.NtUserMessageCall]", "[services.NtCallbackReturn]"),
}


@pytest.mark.parametrize(("old", "new"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_scenarios_are_rejected_by_both(
    validator: jsonschema.Draft7Validator, tmp_path: Path, old: str, new: str
) -> None:
    assert BASE.count(old) == 1, old
    text = BASE.replace(old, new)
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScenarioError):
        load_scenario(path)
    assert schema_errors(validator, text), "the schema accepts what the reader rejects"


@fast_settings(120)
@given(doc=DOCUMENTS, headers=st.booleans())
def test_what_the_reader_accepts_the_schema_accepts(
    validator: jsonschema.Draft7Validator, doc: dict[str, Any], headers: bool
) -> None:
    text = to_toml(doc, headers)
    try:
        parse_scenario(text, str(ROOT / "scenarios" / "pe" / "fuzz.toml"))
    except ScenarioError:
        return
    assert schema_errors(validator, text) == []


# --- keys come from the model ----------------------------------------------------------------------------
def test_budget_and_thread_keys_are_the_dataclass_fields() -> None:
    assert list(BUDGETS.keys) == [f.name for f in dataclasses.fields(Budgets)]
    assert list(THREAD.keys) == [f.name for f in dataclasses.fields(ThreadSpec)]
    assert TOP.allowed["budgets"] == "a table {" + ", ".join(f.name for f in dataclasses.fields(Budgets)) + "}"


def test_each_expect_kind_is_its_own_class() -> None:
    assert len(set(EXPECTATIONS.values())) == len(EXPECTATIONS) == 17
    assert all(dataclasses.is_dataclass(c) and c.__dataclass_params__.frozen for c in EXPECTATIONS.values())  # type: ignore[attr-defined]


def test_expectations_are_read_into_typed_values() -> None:
    extra = """
[[expect]]
sysret = { service = "NtClose", status = "STATUS_INVALID_HANDLE" }
[[expect]]
callback_output = { api = 2, data = "57 4d 5f" }
[[expect]]
detection = { index = 1, rip = "ntdll!x" }
[[expect]]
transitions = { syscall = 3 }
[[expect]]
truths = { seed = 2 }
[[expect]]
deadlock = false
[[expect]]
explored_states = 9
"""
    s = parse_scenario(BASE + extra, str(BASE_PATH))
    got = s.expectations[-7:]
    # STATUS_INVALID_HANDLE is 0xC0000008 (ntstatus.h, MS-ERREF 2.3.1).
    assert got[0] == Sysret("NtClose", 0xC0000008, index=len(s.expectations) - 7, line=got[0].line)
    assert isinstance(got[1], CallbackOutput) and got[1].data == b"WM_"
    assert isinstance(got[2], Detection) and (got[2].number, got[2].rip, got[2].depth) == (1, "ntdll!x", None)
    assert isinstance(got[3], Transitions) and got[3].counts == {"syscall": 3}
    assert isinstance(got[4], Truths) and (got[4].observer, got[4].counts) == ("kernel-debugger", {"seed": 2})
    assert isinstance(got[5], Deadlock) and got[5].expected is False
    assert isinstance(got[6], ExploredStates) and got[6].count == 9
    text = (BASE + extra).splitlines()
    assert got[6].line is not None and text[got[6].line - 1] == "[[expect]]"
    assert s.expectations[3] == ExitStatus(0x1234, index=3, line=53)  # the [[expect]] header


def test_editors_are_pointed_at_the_shipped_schema() -> None:
    taplo = tomllib.loads((ROOT / ".taplo.toml").read_text(encoding="utf-8"))
    (rule,) = taplo["rule"]
    assert (ROOT / rule["schema"]["path"]).resolve() == SHIPPED
    assert any(Path(p).match(rule["include"][0]) for p in ["scenarios/pe/c_dispatcher.toml"])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "#:schema ../emu/data/scenario.schema.json" in readme and "schema.path =" in readme
    assert (BASE_PATH.parent / "../emu/data/scenario.schema.json").resolve() == SHIPPED
