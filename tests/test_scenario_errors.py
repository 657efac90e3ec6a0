"""Malformed scenarios: each must fail with one exact, one-line ScenarioError.

Every case starts from the valid ``scenarios/callback_roundtrip.toml``, changes one
thing, writes the copy into ``tmp_path`` and asserts the whole of ``str(error)``:
``FILE[:LINE] [key.path]: message``. Expected line numbers are found in the mutated
text by a unique needle (not taken from the validator), so edits to the comments of
the base scenario do not break these tests, while a wrong line still does.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from emu.engine import build
from emu.errors import ScenarioError
from emu.profile import profile_names
from emu.scenario import load_scenario
from emu.winnt import STATUS_BY_NAME

BASE_PATH = Path(__file__).resolve().parent.parent / "scenarios" / "callback_roundtrip.toml"
BASE = BASE_PATH.read_text(encoding="utf-8")

TOP_KEYS = "scenario, profile, machine, budgets, module, thread, object, kernel_callback_table, services, expect, memory, ntdll, pe, start, python"
EXPECT_KINDS = "detections, detection, exit_status, max_depth, sysret, callback_output, transitions, fault, deadlock, wait_chain, truths, explored_truths, explored_states, explored_merges, explored_pending, explored_deadlocks, explored_wait_chain"
STEPS_MULTILINE = """steps = [
    { kind = "callback", api = 2, text = "WM_PAINT" },
    { kind = "return", status = "callback" },
]"""


# --- helpers ------------------------------------------------------------------------
def mutate(old: str, new: str, text: str = BASE) -> str:
    """``text`` with the one occurrence of ``old`` replaced (fails if not exactly one)."""
    assert text.count(old) == 1, f"mutation anchor {old!r} occurs {text.count(old)} times in the base scenario"
    return text.replace(old, new)


def line(text: str, needle: str) -> int:
    """1-based number of the one line of ``text`` that contains ``needle``."""
    hits = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    assert len(hits) == 1, f"needle {needle!r} is on lines {hits}, expected exactly one"
    return hits[0]


def write(tmp_path: Path, text: str | bytes, name: str = "scenario.toml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def load_error(path: Path) -> str:
    """The one-line message load_scenario raises for ``path``."""
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return one_line(str(info.value))


def build_error(path: Path) -> str:
    """The one-line message building the run raises (the file itself validates)."""
    scenario = load_scenario(path)
    with pytest.raises(ScenarioError) as info:
        build(scenario)
    return one_line(str(info.value))


def one_line(message: str) -> str:
    assert "\n" not in message and "\r" not in message, f"error is not one line: {message!r}"
    return message


# --- the base is valid, so each failure below comes from its mutation ---------------
def test_base_scenario_is_valid_and_builds() -> None:
    build(load_scenario(BASE_PATH))


# --- file level ---------------------------------------------------------------------
def test_file_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    assert load_error(path) == f"{path}: cannot read the file ({os.strerror(errno.ENOENT)})"


def test_not_utf8(tmp_path: Path) -> None:
    data = BASE.encode("utf-8")
    anchor = b'text = "WM_PAINT"'
    assert data.count(anchor) == 1
    data = data.replace(anchor, b'text = "WM_\xffPAINT"')
    bad = data.index(b"\xff")
    path = write(tmp_path, data)
    assert load_error(path) == f"{path}: not UTF-8 text (byte {bad})"


def test_invalid_toml_syntax(tmp_path: Path) -> None:
    text = mutate("size = 4\n", "size = = 4\n")
    path = write(tmp_path, text)
    assert load_error(path) == f"{path}:{line(text, 'size = = 4')}: not valid TOML: Invalid value"


def test_invalid_toml_unterminated_string(tmp_path: Path) -> None:
    text = mutate('entry = "app!main"\n', 'entry = "app!main\n')
    path = write(tmp_path, text)
    assert load_error(path) == f"{path}:{line(text, 'entry =')}: not valid TOML: Illegal character '\\n'"


def test_invalid_toml_duplicate_key(tmp_path: Path) -> None:
    text = mutate("size = 4\n", "size = 4\nsize = 5\n")
    path = write(tmp_path, text)
    assert load_error(path) == f"{path}:{line(text, 'size = 5')}: not valid TOML: Cannot overwrite a value"


# --- structure: unknown keys, missing keys, wrong types ------------------------------
def test_unknown_top_level_key(tmp_path: Path) -> None:
    text = BASE + "\n[colour]\nred = 1\n"
    path = write(tmp_path, text)
    assert load_error(path) == (f"{path}:{line(text, '[colour]')} [colour]: unknown key 'colour' (allowed: {TOP_KEYS})")


def test_unknown_key_in_thread(tmp_path: Path) -> None:
    text = mutate('entry = "app!main"\n', 'entry = "app!main"\nstack = 4096\n')
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'stack = 4096')} [thread.stack]: unknown key 'stack' (allowed: entry, argument, start)"
    )


def test_wrong_type_string_for_integer(tmp_path: Path) -> None:
    text = mutate("size = 4\n", 'size = "4"\n')
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'size = ')} [kernel_callback_table.size]: expected an integer, got string '4'"
    )


def test_wrong_type_integer_for_string(tmp_path: Path) -> None:
    text = mutate('entry = "app!main"', "entry = 5")
    path = write(tmp_path, text)
    assert load_error(path) == f"{path}:{line(text, 'entry = 5')} [thread.entry]: expected a string, got integer 5"


def test_missing_thread_entry(tmp_path: Path) -> None:
    text = mutate('entry = "app!main"\n', "argument = 1\n")
    path = write(tmp_path, text)
    assert load_error(path) == (
        f'{path}:{line(text, "[thread]")} [thread]: missing required key \'entry\' ("module!label" or "label")'
    )


def test_missing_thread_table(tmp_path: Path) -> None:
    text = mutate('[thread]\nentry = "app!main"\n', "")
    path = write(tmp_path, text)
    assert (
        load_error(path)
        == f"{path}: missing required key 'thread' (a table {{entry, argument, start}}, or an array of tables [[thread]] {{name, entry, argument, start}})"
    )


def test_missing_scenario_name(tmp_path: Path) -> None:
    text = mutate('name = "callback_roundtrip"\n', "")
    path = write(tmp_path, text)
    assert load_error(path) == f"{path}:{line(text, '[scenario]')} [scenario]: missing required key 'name' (a string)"


# --- profile --------------------------------------------------------------------------
def test_unknown_profile(tmp_path: Path) -> None:
    text = mutate('profile = "win10-22h2"', 'profile = "win11-24h2"')
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'profile = ')} [scenario.profile]: unknown profile 'win11-24h2' "
        f"(known: {', '.join(profile_names())})"
    )


def test_bad_dispatcher_override(tmp_path: Path) -> None:
    text = mutate("[thread]\n", '[profile]\ndispatcher = "heap"\n\n[thread]\n')
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'dispatcher = ')} [profile.dispatcher]: expected one of stack, registers, got 'heap'"
    )


# --- references: callback table and thread entry ---------------------------------------
def test_callback_table_entry_unknown_label(tmp_path: Path) -> None:
    text = mutate('2 = "app!on_message"', '2 = "app!on_mesage"')
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'on_mesage')} [kernel_callback_table.2]: module 'app' has no label 'on_mesage'"
    )


def test_callback_table_entry_unknown_module(tmp_path: Path) -> None:
    text = mutate('2 = "app!on_message"', '2 = "gui!on_message"')
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'gui!on_message')} [kernel_callback_table.2]: no module named 'gui' (declared: app)"
    )


def test_thread_entry_unknown_module(tmp_path: Path) -> None:
    text = mutate('entry = "app!main"', 'entry = "gui!main"')
    path = write(tmp_path, text)
    assert load_error(path) == f"{path}:{line(text, 'gui!main')} [thread.entry]: no module named 'gui' (declared: app)"


def test_callback_table_index_beyond_size(tmp_path: Path) -> None:
    text = mutate('2 = "app!on_message"', '7 = "app!on_message"')
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, '7 = ')} [kernel_callback_table.7]: callback index 7 is out of range (table size 4)"
    )


def test_thread_entry_unknown_ntdll_export_at_build(tmp_path: Path) -> None:
    # ntdll references are checked against the built image, so this surfaces in build().
    text = mutate('entry = "app!main"', 'entry = "ntdll!NoSuchExport"')
    path = write(tmp_path, text)
    assert build_error(path) == (
        f"{path}:{line(text, 'NoSuchExport')} [thread.entry]: 'ntdll!NoSuchExport' names no symbol in the loaded images"
    )


# --- services ---------------------------------------------------------------------------
def test_callback_api_out_of_range_one_line_steps(tmp_path: Path) -> None:
    text = mutate(STEPS_MULTILINE, 'steps = [{ kind = "callback", api = 9 }, { kind = "return", status = "callback" }]')
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'api = 9')} [services.NtUserMessageCall.steps[0].api]: "
        "callback index 9 is out of range (kernel_callback_table size 4)"
    )


def test_callback_api_out_of_range(tmp_path: Path) -> None:
    text = mutate("api = 2,", "api = 9,")
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'api = 9')} [services.NtUserMessageCall.steps[0].api]: "
        "callback index 9 is out of range (kernel_callback_table size 4)"
    )


def test_step_unknown_kind(tmp_path: Path) -> None:
    text = mutate('{ kind = "return", status = "callback" }', '{ kind = "sleep", status = "callback" }')
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'sleep')} [services.NtUserMessageCall.steps[1].kind]: "
        'expected "callback", "return", "choice", "write", "wait", "set", "release" or "send", got string \'sleep\''
    )


def test_last_step_not_return(tmp_path: Path) -> None:
    text = mutate('    { kind = "return", status = "callback" },\n', "")
    path = write(tmp_path, text)
    assert load_error(path) == (
        f'{path}:{line(text, "steps = [")} [services.NtUserMessageCall.steps]: the last step must be a "return" step (or a choice whose options all return)'
    )


# --- expectations -------------------------------------------------------------------------
def test_expect_two_kinds(tmp_path: Path) -> None:
    text = mutate("detections = 1\n", "detections = 1\nmax_depth = 1\n")
    path = write(tmp_path, text)
    first_expect = text.splitlines().index("[[expect]]") + 1
    assert load_error(path) == f"{path}:{first_expect} [expect[0]]: expected exactly one of: {EXPECT_KINDS}"


def test_expect_unknown_kind(tmp_path: Path) -> None:
    text = mutate("detections = 1\n", "detection_count = 1\n")
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'detection_count')} [expect[0].detection_count]: "
        f"unknown key 'detection_count' (allowed: {EXPECT_KINDS}, note)"
    )


def test_unknown_status_name(tmp_path: Path) -> None:
    text = mutate("exit_status = 0x1234", 'exit_status = "STATUS_NOT_A_THING"')
    path = write(tmp_path, text)
    assert load_error(path) == (
        f"{path}:{line(text, 'STATUS_NOT_A_THING')} [expect[3].exit_status]: expected an NTSTATUS "
        f"(0..0xffffffff or one of {', '.join(sorted(STATUS_BY_NAME))}), got string 'STATUS_NOT_A_THING'"
    )


# --- assembly (raised when the run is built) -------------------------------------------------
def test_assembly_bad_mnemonic(tmp_path: Path) -> None:
    text = mutate("    xor ecx, ecx ", "    xorr ecx, ecx")
    path = write(tmp_path, text)
    code_line = line(text, "xorr") - line(text, 'code = """')
    assert build_error(path) == (
        f"{path}:{line(text, 'xorr')} [module[0].code]: assembly does not assemble: "
        f"line {code_line} of the code: Invalid mnemonic in 'xorr ecx, ecx'"
    )


def test_assembly_undefined_symbol(tmp_path: Path) -> None:
    text = mutate("    call NtUserMessageCall", "    call NtUserMessageCal")
    path = write(tmp_path, text)
    code_line = line(text, "call NtUserMessageCal") - line(text, 'code = """')
    assert build_error(path) == (
        f"{path}:{line(text, 'call NtUserMessageCal')} [module[0].code]: assembly does not assemble: "
        f"line {code_line} of the code: undefined symbol 'NtUserMessageCal' in 'call NtUserMessageCal'"
    )


def test_assembly_error_code_starting_on_quote_line(tmp_path: Path) -> None:
    text = mutate('code = """\nmain:\n', 'code = """main:\n')
    text = mutate("    xor ecx, ecx ", "    xorr ecx, ecx", text)
    path = write(tmp_path, text)
    assert build_error(path) == (
        f"{path}:{line(text, 'xorr')} [module[0].code]: assembly does not assemble: "
        "line 3 of the code: Invalid mnemonic in 'xorr ecx, ecx'"
    )


# --- the CLI prints the same single line and exits 2 ------------------------------------------
@pytest.mark.parametrize(
    ("old", "new", "needle", "expected"),
    [
        ("size = 4\n", 'size = "4"\n', "size = ", "[kernel_callback_table.size]: expected an integer, got string '4'"),
        (
            "    call NtUserMessageCall",
            "    call NtUserMessageCal",
            "call NtUserMessageCal",
            "[module[0].code]: assembly does not assemble: line 5 of the code: "
            "undefined symbol 'NtUserMessageCal' in 'call NtUserMessageCal'",
        ),
    ],
    ids=["validator", "assembly"],
)
def test_cli_run_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, needle: str, expected: str
) -> None:
    from emu.cli.main import main

    text = mutate(old, new)
    path = write(tmp_path, text)
    code = main(["run", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), f"stderr is not exactly one line: {err!r}"
    assert err == f"{path}:{line(text, needle)} {expected}\n"
