"""Fuzzing the scenario loader: random and mutated TOML → a Scenario or a ScenarioError, never another exception.

Three sources of input:

* documents built by hypothesis from the known keys (``[scenario]``, ``[[module]]``,
  ``[services.NtX]`` ...), each value either plausible (a real profile name, assembly that
  assembles, a step table) or anything TOML can hold (booleans, huge integers, nan, dates,
  nested arrays and tables), written out as TOML text by :func:`to_toml`;
* raw random text, some of it from a TOML-ish alphabet;
* the shipped ``scenarios/**/*.toml`` with byte flips, line deletions and duplications,
  key renames, value replacements and truncations.

Whenever the text parses, the scenario is also built and run with low budgets
(:func:`run_bounded`): building may raise only EmuError subclasses, running returns a Run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from fuzz_documents import CODE, DOCUMENTS, to_toml
from fuzz_support import (
    FAST,
    Tally,
    fast_settings,
    no_hang,
    run_bounded,
    slow_only,
    slow_settings,
    tally,
)
from hypothesis import given
from hypothesis import strategies as st

from conftest import asm_scenario
from emu.engine import build
from emu.errors import ScenarioError
from emu.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "scenarios").rglob("*.toml"))
SHIPPED_TEXT = [(p, p.read_text(encoding="utf-8")) for p in SHIPPED]

# --- strategies: mutations of the shipped files -----------------------------------------------
KNOWN_KEYS = [
    "scenario",
    "name",
    "profile",
    "module",
    "code",
    "data",
    "thread",
    "entry",
    "argument",
    "kernel_callback_table",
    "size",
    "services",
    "steps",
    "kind",
    "api",
    "status",
    "expect",
    "detections",
    "budgets",
    "instructions",
    "pe",
    "ntdll",
    "path",
    "base",
    "memory",
    "machine",
    "system_call",
    "blocks",
    "options",
    "default",
    "text",
]
literals = st.sampled_from(
    [
        '""',
        "0",
        "-1",
        "0xFFFFFFFFFFFFFFFF",
        "1e400",
        "nan",
        "true",
        "[]",
        "{}",
        '"x"',
        "[1, [2]]",
        "{ a = 1 }",
        "1979-05-27T07:32:00Z",
        '"""\nmain:\n ret\n"""',
        "'lit'",
        "99999999999999999999",
    ]
)
_KEY_SITE = re.compile(r"(?m)(?:^\s*|[{,]\s*|^\s*\[\[?\s*)([A-Za-z_][A-Za-z0-9_.]*)(?=\s*[=\]])")
_VALUE_SITE = re.compile(r"=\s*([^\n,}\]]+)")

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("byte"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("delete_line"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("dup_line"), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
    st.tuples(
        st.just("rename"), st.integers(0, 1 << 16), st.sampled_from(KNOWN_KEYS) | st.from_regex(r"\A[a-z_]{1,6}\Z")
    ),
    st.tuples(st.just("value"), st.integers(0, 1 << 16), literals),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.text(max_size=6)),
)


def mutate(text: str, ops: list[tuple[str, int, Any]]) -> bytes:
    """Apply the mutations in order; the result may no longer be UTF-8."""
    data = text.encode()
    for op, pos, arg in ops:
        if op in ("flip", "byte", "truncate", "insert"):
            i = pos % (len(data) + 1)
            if op == "flip" and i < len(data):
                data = data[:i] + bytes([data[i] ^ (1 << arg)]) + data[i + 1 :]
            elif op == "byte" and i < len(data):
                data = data[:i] + bytes([arg]) + data[i + 1 :]
            elif op == "truncate":
                data = data[:i]
            elif op == "insert":
                data = data[:i] + str(arg).encode() + data[i:]
            continue
        s = data.decode("utf-8", "surrogateescape")
        lines = s.split("\n")
        if op == "delete_line" and lines:
            del lines[pos % len(lines)]
            s = "\n".join(lines)
        elif op == "dup_line" and lines:
            lines.insert(arg % (len(lines) + 1), lines[pos % len(lines)])
            s = "\n".join(lines)
        elif op in ("rename", "value"):
            sites = list((_KEY_SITE if op == "rename" else _VALUE_SITE).finditer(s))
            if sites:
                m = sites[pos % len(sites)]
                s = s[: m.start(1)] + str(arg) + s[m.end(1) :]
        data = s.encode("utf-8", "surrogateescape")
    return data


# --- the properties ----------------------------------------------------------------------------
def check_text(text: str, file: str, t: Tally) -> str:
    """Parse, and when that succeeds build and run: the outcome's label (any other exception fails)."""
    with no_hang(case=text):
        try:
            r = run_bounded(parse_scenario(text, file))
        except AssertionError:
            raise
        except Exception as e:
            return t.record(e)  # re-raises anything that is not an EmuError
        return t.record(r.error)  # "ok" for a clean exit, else the typed error that stopped the run


def check_bytes(data: bytes, file: Path, t: Tally) -> str:
    """Like check_text, for mutated bytes: text that is not UTF-8 goes through load_scenario's file path."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / file.name
            p.write_bytes(data)
            with no_hang():
                try:
                    load_scenario(p)
                except Exception as e:
                    return t.record(e)
            raise AssertionError("load_scenario accepted a file that is not UTF-8") from None
    return check_text(text, str(file), t)


def _documents(pytestconfig: pytest.Config, doc: dict[str, Any], headers: bool, suite: str) -> None:
    text = to_toml(doc, headers)
    check_text(text, str(ROOT / "scenarios" / "pe" / "fuzz.toml"), tally(suite, pytestconfig))


def _raw(pytestconfig: pytest.Config, text: str, suite: str) -> None:
    check_text(text, "<fuzz>", tally(suite, pytestconfig))


def _mutants(pytestconfig: pytest.Config, which: int, ops: list[tuple[str, int, Any]], suite: str) -> None:
    path, text = SHIPPED_TEXT[which % len(SHIPPED_TEXT)]
    check_bytes(mutate(text, ops), path, tally(suite, pytestconfig))


raw_text = st.text(st.characters(codec="utf-8")) | st.text(
    alphabet="[]{}=.\"'\n #,_-!0123456789abcdemnprstuxyz", max_size=200
)
flags = st.booleans()
picks = st.integers(0, 1 << 16)
op_lists = st.lists(mutation, min_size=1, max_size=4)


# fast profile: derandomized, part of the default run
@fast_settings(250)
@given(doc=DOCUMENTS, headers=flags)
def test_random_documents(pytestconfig: pytest.Config, doc: dict[str, Any], headers: bool) -> None:
    _documents(pytestconfig, doc, headers, "scenario: documents (fast)")


@FAST
@given(text=raw_text)
def test_random_text(pytestconfig: pytest.Config, text: str) -> None:
    _raw(pytestconfig, text, "scenario: raw text (fast)")


@fast_settings(200)
@given(which=picks, ops=op_lists)
def test_mutated_shipped_scenarios(pytestconfig: pytest.Config, which: int, ops: list[tuple[str, int, Any]]) -> None:
    _mutants(pytestconfig, which, ops, "scenario: mutants (fast)")


def test_every_shipped_scenario_runs_bounded() -> None:
    """The unmutated bases parse and run under the fuzz budgets: the mutants start from valid input."""
    for path, text in SHIPPED_TEXT:
        r = run_bounded(parse_scenario(text, str(path)))
        assert r.stop in ("exit", "fault"), (path, r.error)


def test_to_toml_writes_valid_toml() -> None:
    import tomllib

    doc = {"scenario": {"name": 'q"\\\n\x01'}, "module": [{"name": "app", "code": CODE[1]}], "x": [1.5, float("inf")]}
    for headers in (True, False):
        back = tomllib.loads(to_toml(doc, headers))
        assert json.dumps(back, default=str, sort_keys=True) == json.dumps(doc, default=str, sort_keys=True)


# slow profile: -m slow
@slow_only
@slow_settings(25_000)
@given(doc=DOCUMENTS, headers=flags)
def test_random_documents_slow(pytestconfig: pytest.Config, doc: dict[str, Any], headers: bool) -> None:
    _documents(pytestconfig, doc, headers, "scenario: documents")


@slow_only
@slow_settings(15_000)
@given(text=raw_text)
def test_random_text_slow(pytestconfig: pytest.Config, text: str) -> None:
    _raw(pytestconfig, text, "scenario: raw text")


@slow_only
@slow_settings(25_000)
@given(which=picks, ops=op_lists)
def test_mutated_shipped_scenarios_slow(
    pytestconfig: pytest.Config, which: int, ops: list[tuple[str, int, Any]]
) -> None:
    _mutants(pytestconfig, which, ops, "scenario: mutants")


# --- bugs the fuzzers found, fixed: each test pins the fix ----------------------------------------
def _build_in_subprocess(code: str, budgets: str = "", timeout: float = 30.0) -> str:
    """Build a one-module scenario in a fresh interpreter: the one-line outcome, or "timeout"."""
    script = (
        "import sys\n"
        "from emu.engine import build\n"
        "from emu.errors import EmuError\n"
        "from emu.scenario import parse_scenario\n"
        "try:\n"
        "    build(parse_scenario(sys.stdin.read()))\n"
        "    print('built')\n"
        "except EmuError as e:\n"
        "    print(type(e).__name__)\n"
    )
    text = asm_scenario(code, extra=budgets)
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], input=text, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    return (
        (out.stdout.strip() or out.stderr.strip().splitlines()[-1])
        if out.returncode == 0
        else out.stderr.strip().splitlines()[-1]
    )


def test_assembly_that_hangs_keystone_is_a_scenario_error() -> None:
    assert _build_in_subprocess("main:\n    ~\n    ret") == "ScenarioError"


def test_non_ascii_assembly_is_a_scenario_error() -> None:
    with pytest.raises(ScenarioError):
        build(parse_scenario(asm_scenario('main:\n    ret\nmsg: .ascii "café"')))


def test_huge_skip_hits_the_memory_budget_quickly() -> None:
    outcome = _build_in_subprocess("main:\n    ret\n    .skip 0x10000000", "[budgets]\nmemory = 0x100000")
    assert outcome in ("BudgetExceeded", "ScenarioError")
