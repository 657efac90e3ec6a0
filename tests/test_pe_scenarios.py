"""Scenarios that load real PE files built by mingw-w64: a third-party ntdll, compiled callbacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pe_fixtures import PeFixtures, pe_fixtures_or_fail

from emu.cli.main import main
from emu.detection.view import detect_callback_return_pending, view_of
from emu.engine import build, run
from emu.errors import ScenarioError
from emu.exploration.explorer import explore
from emu.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
PE_DIR = ROOT / "scenarios" / "pe"
PE_SCENARIOS = sorted(PE_DIR.glob("*.toml"))


@pytest.fixture(scope="module")
def pe_bin() -> Path:
    """The DLLs the PE scenarios name, copied into scenarios/pe/bin/ (git-ignored)."""
    built: PeFixtures = pe_fixtures_or_fail()
    out = PE_DIR / "bin"
    out.mkdir(exist_ok=True)
    for dll in built.dlls:
        shutil.copyfile(dll, out / Path(dll).name)
    return out


@pytest.mark.parametrize("path", PE_SCENARIOS, ids=lambda p: p.stem)
def test_pe_scenario_meets_expectations_and_the_detector_agrees(pe_bin: Path, path: Path) -> None:
    r = run(path)
    failed = [f"{o.where}: {o.message}" for o in r.outcomes if not o.passed]
    assert not failed, failed
    for s in r.trace.states:
        assert (detect_callback_return_pending(view_of(r, s)) is not None) == s.pending, s.id


def test_service_numbers_come_from_the_loaded_ntdll(pe_bin: Path) -> None:
    p = build(PE_DIR / "third_party_ntdll.toml")
    assert p.ssn_table["NtCallbackReturn"] == 0x05
    assert p.ssn_table["NtUserMessageCall"] == 0x1007  # a win32k number, in this ntdll's code
    assert "NtUserCallOneParam" not in p.ssn_table  # the profile knows it, the code does not
    assert not any("SSN" in n for n in p.notes)


def test_disagreement_with_the_profile_is_reported_not_guessed(pe_bin: Path) -> None:
    text = (
        (PE_DIR / "third_party_ntdll.toml")
        .read_text()
        .replace('dispatcher = "registers"', 'dispatcher = "registers"\nssn = { NtClose = 0x0C }')
    )
    p = build(parse_scenario(text, str(PE_DIR / "disagree.toml")))
    assert p.ssn_table["NtClose"] == 0x0F
    # One summary line per image; the list is in the details (`emu run --verbose`).
    assert "ntdll.dll numbers 1 service(s) differently from profile win10-22h2; its code is used" in p.notes[0]
    assert "ntdll.dll: NtClose SSN 0xf in its code, 0xc in profile win10-22h2" in p.details


def test_the_image_decides_the_dispatcher_convention(pe_bin: Path) -> None:
    # Without [profile] dispatcher, the convention comes from the dispatcher's code and the run works.
    text = (PE_DIR / "third_party_ntdll.toml").read_text().replace('[profile]\ndispatcher = "registers"\n', "")
    p = build(parse_scenario(text, str(PE_DIR / "conv.toml")))
    assert p.profile.dispatcher == "registers" and p.kernel.profile.dispatcher == "registers"
    assert any("dispatcher convention 'registers' from the code" in d for d in p.details)
    r = p.run()
    assert r.error is None and r.ok, [o.message for o in r.outcomes if not o.passed]


def test_a_profile_dispatcher_the_file_sets_wins_and_is_noted(pe_bin: Path) -> None:
    text = (PE_DIR / "third_party_ntdll.toml").read_text().replace('dispatcher = "registers"', 'dispatcher = "stack"')
    p = build(parse_scenario(text, str(PE_DIR / "conv.toml")))
    assert p.kernel.profile.dispatcher == "stack"
    assert any("looks like the 'registers' convention" in n and "'stack' is used" in n for n in p.notes)


def test_unbound_import_is_a_load_error_by_default(pe_bin: Path) -> None:
    text = (PE_DIR / "unbound_import_trap.toml").read_text().replace('unbound_imports = "trap"', "")
    with pytest.raises(ScenarioError) as e:
        build(parse_scenario(text, str(PE_DIR / "strict.toml")))
    assert str(e.value).startswith(f"{PE_DIR / 'strict.toml'}: callbacks: cannot bind import ntdll.dll!")
    assert str(e.value).endswith(
        '[machine] unbound_imports = "trap" loads it anyway and stops the run only if it is called'
    )
    assert "\n" not in str(e.value)


def test_missing_pe_file_and_confinement(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        '[scenario]\nname = "x"\n[ntdll]\npath = "nope.dll"\n[thread]\nentry = "ntdll!RtlUserThreadStart"\n'
        '[[module]]\nname = "app"\ncode = "main: ret"\n'
    )
    with pytest.raises(ScenarioError) as e:
        load_scenario(scenario)
    assert str(e.value) == f"{scenario}:4 [ntdll.path]: {tmp_path / 'nope.dll'} does not exist or is not a file"
    outside = tmp_path / "other"
    outside.mkdir()
    (outside / "ntdll.dll").write_bytes(b"MZ")
    inner = tmp_path / "inner"
    inner.mkdir()
    s2 = inner / "s.toml"
    s2.write_text(scenario.read_text().replace("nope.dll", "../other/ntdll.dll"))
    with pytest.raises(ScenarioError) as e:
        load_scenario(s2)
    assert "is outside the scenario's folder" in str(e.value) and "--allow-path" in str(e.value)
    assert load_scenario(s2, allow=[outside]).ntdll is not None


def test_explore_and_cli_on_a_pe_scenario(pe_bin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = explore(PE_DIR / "third_party_ntdll.toml")
    assert exp.complete and len(exp.pending) == 2
    assert main(["run", str(PE_DIR / "third_party_ntdll.toml")]) == 0
    assert "callbacks!CallbackCallsNtCallbackReturn+0x14" in capsys.readouterr().out
