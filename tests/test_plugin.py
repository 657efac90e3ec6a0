"""The pytest plugin (emu.testing), run inside pytester: fixtures and assert_detector_matches.

The plugin is loaded with ``-p emu.testing`` and the entry-point name ``emu`` blocked, so the
tests behave the same whether or not the installed emu registers the ``pytest11`` entry point.
"""

from __future__ import annotations

import pytest

from conftest import ROOT

pytest_plugins = ["pytester"]

PLUGIN = ("-p", "no:emu", "-p", "emu.testing", "-p", "no:cacheprovider")
FORGED = ROOT / "scenarios" / "hard_no_callback_forged_frame.toml"
NESTED = ROOT / "scenarios" / "nested_callbacks.toml"
CHOICE = ROOT / "scenarios" / "choice_nested_depth.toml"


def test_fixtures_give_runs_states_and_views(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        f"""
        from emu.detection.view import ThreadView

        def test_run(emu_run):
            r = emu_run(r"{NESTED}")
            assert r.exit_status == 0x4444 and emu_run(r"{NESTED}") is r  # once per session

        def test_states(emu_states):
            pairs = emu_states(r"{NESTED}")
            assert len(pairs) == 18 and all(isinstance(v, ThreadView) for _, v in pairs)
            assert [s.id for s, _ in pairs if s.pending] == [7, 10, 13]
            assert all(v.context == s.context for s, v in pairs)

        def test_explored_states(emu_states):
            pairs = emu_states(r"{CHOICE}", explore=True)
            assert len(pairs) == 18 and sorted(s.depth for s, _ in pairs if s.pending) == [1, 2, 3]
        """
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=3)


def test_assert_detector_matches_passes_and_fails_with_named_states(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        f"""
        from emu.detection.signals import combined_detector, naive_detector
        from emu.testing import assert_detector_matches

        def test_combined():
            report = assert_detector_matches(combined_detector, r"{FORGED}", explore=True)
            assert report.perfect and report.total.tn == 5

        def test_naive():
            assert_detector_matches(naive_detector, r"{FORGED}")

        def test_naive_as_fixture(assert_detector_matches):
            assert_detector_matches(naive_detector, [r"{FORGED}"], explore=True)
        """
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: detector emu.detection.signals:naive_detector disagrees with emu's ground truth on 2 of 5 states:",
            "*FP hard_no_callback_forged_frame s1: kernel | NtCallbackReturn | depth 0 | user at ntdll!ZwCallbackReturn+0x14 | Running",
            "*    after step 0: syscall NtCallbackReturn at ntdll!ZwCallbackReturn+0x14",
            "*    detector: RIP ntdll!ZwCallbackReturn+0x14 is just after the system call instruction of ntdll!ZwCallbackReturn",
            "*FP hard_no_callback_forged_frame s2: user | depth 0 | user at ntdll!ZwCallbackReturn+0x14 | Running",
            "*    after step 0: syscall NtCallbackReturn at ntdll!ZwCallbackReturn+0x14",
            "*    after step 1: sysret NtCallbackReturn -> STATUS_NO_CALLBACK_ACTIVE at ntdll!ZwCallbackReturn+0x14",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*disagrees with emu's ground truth on 2 of 5 nodes of the explored graphs:",
            "*FP hard_no_callback_forged_frame n1: kernel | NtCallbackReturn | depth 0 | user at ntdll!ZwCallbackReturn+0x14 | Running",
            "*    after n0 -> n1: syscall NtCallbackReturn",
        ]
    )


def test_a_users_own_detector_and_relative_paths_from_the_rootdir(pytester: pytest.Pytester) -> None:
    scenarios = pytester.mkdir("scenarios")
    (scenarios / "forged.toml").write_text(FORGED.read_text())
    pytester.makepyfile(
        """
        def my_rule(view):
            ntdll = view.module("ntdll")
            stub = ntdll.export("ZwCallbackReturn")
            return view.kernel_mode is not False and view.context.rip == stub + 0x14

        def test_mine(assert_detector_matches):
            assert_detector_matches(my_rule, "scenarios/forged.toml")
        """
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*detector test_a_users_own_detector_and_relative_paths_from_the_rootdir:my_rule disagrees*1 of 5 states:",
            "*FP hard_no_callback_forged_frame s1: kernel | NtCallbackReturn | depth 0 | *",
            "*scenario * states    TP    FP    TN    FN",
            "*hard_no_callback_forged_frame*5     0     1     4     0",
        ]
    )
