"""NtCallbackReturn passes a pointer; what becomes of it is the service's business.

WRK ``ke/amd64/callout.asm`` NtCallbackReturn: ``mov [CuOutputBuffer], rcx`` and
``mov [CuOutputLength], edx`` (the Result pointer and length, stored for the caller of
KeUserModeCallback), ``mov eax, r8d`` (Status is returned as given). Nothing reads the
buffer there. A caller such as win32k probes and copies it under SEH, and a fault becomes
its own status (ReactOS ``win32ss/user/ntuser/callback.c`` co_IntCallWindowProc).
ProbeForRead (WRK ``base/ntos/inc/ex.h``) checks only the range: a zero length passes,
otherwise Address + Length must not pass MM_USER_PROBE_ADDRESS nor wrap.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from emu.api import Run, run
from emu.errors import ScenarioError
from emu.kernel.result import probe_range, use_output
from emu.profile import get_profile
from emu.scenario import parse_scenario

AV = 0xC0000005  # STATUS_ACCESS_VIOLATION (ntstatus.h)
CALLBACK_STATUS = 0x1234


def _variant(root: Path, result: str, length: int, output: str | None) -> Run:
    """callback_large_output with another Result pointer and length, Status 0x1234, and a
    service that returns the callback's status after using the output as told."""
    text = (root / "scenarios/callback_large_output.toml").read_text()
    text = text.replace("    lea rcx, [rip + reply]", f"    mov rcx, {result}")
    text = text.replace("    mov edx, 64 ", f"    mov edx, {length} ")
    text = text.replace("    xor r8d, r8d              ; Status = STATUS_SUCCESS", f"    mov r8d, {CALLBACK_STATUS:#x}")
    use = f', output = "{output}"' if output else ""
    text = text.replace(
        '{ kind = "return", status = 0x600D, output = "copy" }', f'{{ kind = "return", status = "callback"{use} }}'
    )
    text = text.split("[[expect]]")[0]  # this variant checks what the test says
    assert f"mov rcx, {result}" in text and 'status = "callback"' in text
    return run(parse_scenario(text, str(root / "scenarios" / "result_variant.toml")))


def _outcome(r: Run) -> tuple[int | None, int | None, str]:
    (ret,) = [t for t in r.trace if t.kind == "callback_return"]
    (sysret,) = [t for t in r.trace if t.kind == "sysret" and t.service == "NtUserMessageCall"]
    return ret.status, sysret.status, sysret.detail


def test_an_unreadable_result_leaves_the_callbacks_status_alone(root: Path) -> None:
    # 0x10 is in user space (ProbeForRead's range check passes) but nothing is mapped there.
    r = _variant(root, "0x10", 64, None)
    assert r.error is None
    ret, service, _ = _outcome(r)
    assert ret == CALLBACK_STATUS  # NtCallbackReturn: Status unchanged, not STATUS_ACCESS_VIOLATION
    assert service == CALLBACK_STATUS  # a service that never touches the buffer returns it as well
    (back,) = [t for t in r.trace if t.kind == "callback_return"]
    assert back.data == b"" and "not readable" in back.detail


def test_the_services_copy_of_an_unreadable_result_is_its_access_violation(root: Path) -> None:
    ret, service, detail = _outcome(_variant(root, "0x10", 64, "copy"))
    assert (ret, service) == (CALLBACK_STATUS, AV)
    assert "faults: STATUS_ACCESS_VIOLATION" in detail
    # A probe only checks the range, and 0x10 + 64 lies in user space: it passes.
    assert _outcome(_variant(root, "0x10", 64, "probe"))[1] == CALLBACK_STATUS


def test_a_kernel_address_fails_the_probe_and_a_zero_length_checks_nothing(root: Path) -> None:
    kernel = "0xFFFF800000000000"
    for use in ("probe", "copy"):
        ret, service, detail = _outcome(_variant(root, kernel, 64, use))
        assert (ret, service) == (CALLBACK_STATUS, AV) and "not in user space" in detail
        # ProbeForRead with Length 0 does no checking, and there is nothing to copy.
        assert _outcome(_variant(root, kernel, 0, use))[1] == CALLBACK_STATUS


def test_the_copy_gets_the_bytes_the_trace_recorded(root: Path) -> None:
    r = run(root / "scenarios/callback_large_output.toml")
    (back,) = [t for t in r.trace if t.kind == "callback_return"]
    assert back.data == bytes(range(0x10, 0x50)) and back.status == 0
    (sysret,) = [t for t in r.trace if t.kind == "sysret" and t.service == "NtUserMessageCall"]
    assert sysret.status == 0x600D and "copied 0x40 byte(s)" in sysret.detail


@pytest.mark.parametrize(
    ("profile", "user_space"),
    # MM_USER_PROBE_ADDRESS is the top of user space minus a 64 KiB no-access region: 8 TB
    # of user space up to Windows 8 (WRK mm/amd64/miamd.h layout), 128 TB from Windows 8.1
    # (MS docs "Memory Limits for Windows and Windows Server Releases").
    [("win7-sp1", 8 << 40), ("win10-22h2", 128 << 40), ("win11-23h2", 128 << 40)],
)
def test_probe_range_ends_at_mm_user_probe_address(profile: str, user_space: int) -> None:
    limit = get_profile(profile).user_probe_address
    assert limit == user_space - 0x10000
    assert probe_range(limit - 0x40, 0x40, limit)  # ends exactly at the limit: accepted
    assert not probe_range(limit - 0x3F, 0x40, limit)  # one byte past it
    assert not probe_range((1 << 64) - 0x10, 0x20, limit)  # wraps
    assert probe_range(1 << 63, 0, limit)  # zero length: no check
    out = use_output("copy", limit - 0x40, 0x40, limit, lambda a, n: None)
    assert out.status == AV  # in range, but the read faults


def test_an_unknown_output_use_is_one_line(root: Path) -> None:
    text = (root / "scenarios/callback_large_output.toml").read_text().replace('output = "copy"', 'output = "read"')
    with pytest.raises(ScenarioError) as e:
        parse_scenario(text, "x.toml")
    msg = str(e.value)
    assert "\n" not in msg and "services.NtUserMessageCall.steps[1].output" in msg
    assert "expected one of 'probe', 'copy', got 'read'" in msg
