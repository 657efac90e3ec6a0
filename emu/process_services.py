"""The system services of a built process: their numbers, as the loaded images decide
them; the scenario's ``[services.*]`` scripts in the kernel's terms; and the services an
explorer may interleave threads at."""

from __future__ import annotations

from emu.errors import ScenarioError
from emu.kernel import ServiceRegistry, UserCallback, builtin_services
from emu.kernel.objects import ReleaseMutant, SendMessage, SetEvent, Wait
from emu.kernel.services import ChoiceStep as KChoiceStep
from emu.kernel.services import ScriptReturn, ScriptStep
from emu.kernel.standard_services import get_message_service
from emu.kernel.symbolic import SymbolicReturn
from emu.kernel.user_write import ScriptWrite
from emu.loader.image import Image
from emu.process_start import file_name, missing_export
from emu.profile import Profile
from emu.scenario import CallbackStep, ChoiceStep, ObjectStep, Scenario, Step, WriteStep

__all__ = [
    "PREEMPTIBLE_AT_ENTRY",
    "SHARED_SERVICES",
    "registry_for",
    "script_steps",
    "service_numbers",
    "touches_shared",
    "uses_callbacks",
]

# Services that touch what several threads share: where an explorer interleaves threads.
# NtCallbackReturn is not one: it never waits (WRK ke/amd64/callout.asm NtCallbackReturn:
# `cli`, restore the trap frame, callback stack and InitialStack, return into
# KeUserModeCallback). A thread can only be preempted between KiSystemCall64's `sti` and
# that `cli`, and it is then Ready; a scenario asks for that with
# [machine] preempt_at_callback_return = true (PREEMPTIBLE_AT_ENTRY).
SHARED_SERVICES = frozenset(
    {
        "NtWaitForSingleObject",
        "NtSetEvent",
        "NtReleaseMutant",
        "NtUserGetMessage",
        "NtTerminateThread",
    }
)
PREEMPTIBLE_AT_ENTRY = frozenset({"NtCallbackReturn"})


def script_steps(steps: tuple[Step, ...], threads: dict[str, int], handles: dict[str, int]) -> list[ScriptStep]:
    """A scenario's service steps as the kernel's script: callbacks, writes, choices, object requests, a status."""
    out: list[ScriptStep] = []
    for st in steps:
        if isinstance(st, CallbackStep):
            out.append(UserCallback(st.api, st.data, st.by_depth, symbolic=st.symbolic))
        elif isinstance(st, WriteStep):
            out.append(ScriptWrite(st.arg, st.data, st.offset, st.symbolic))
        elif isinstance(st, ChoiceStep):
            options = tuple((n, tuple(script_steps(o, threads, handles))) for n, o in st.options)
            out.append(KChoiceStep(st.name, st.default, options))
        elif isinstance(st, ObjectStep):
            if st.kind == "send":
                out.append(SendMessage(threads[st.target], st.api, st.data))
            elif st.kind == "wait":
                out.append(Wait(handles[st.target], st.timeout))
            elif st.kind == "set":
                out.append(SetEvent(handles[st.target]))
            else:
                out.append(ReleaseMutant(handles[st.target]))
        elif st.symbolic is not None:
            out.append(SymbolicReturn(st.symbolic.name, st.symbolic.domain, st.status or 0))
        elif st.output:
            out.append(ScriptReturn(st.status, st.output))  # type: ignore[arg-type]
        else:
            out.append(st.status)
    return out


def registry_for(scenario: Scenario, threads: dict[str, int]) -> tuple[ServiceRegistry, frozenset[str]]:
    """The kernel's services for ``scenario`` (built-in ones, then its scripts) and the
    services that touch shared state; ``threads`` numbers the scenario's threads by name."""
    registry = builtin_services(ServiceRegistry())
    if "NtUserGetMessage" not in scenario.services:
        get_message_service(registry)
    handles = {o.name: o.handle for o in scenario.objects}
    shared = set(SHARED_SERVICES)
    if scenario.preempt_at_callback_return:
        shared |= PREEMPTIBLE_AT_ENTRY
    for name, script in scenario.services.items():
        steps = script_steps(script.steps, threads, handles)
        registry.add_script(name, steps)
        if touches_shared(steps):
            shared.add(name)
    return registry, frozenset(shared)


def touches_shared(steps: list[ScriptStep]) -> bool:
    for st in steps:
        if isinstance(st, (Wait, SetEvent, ReleaseMutant, SendMessage)):
            return True
        if isinstance(st, KChoiceStep) and any(touches_shared(list(o)) for _, o in st.options):
            return True
    return False


def uses_callbacks(s: Scenario) -> bool:
    """Whether the scenario can call back into user mode (a callback or a sent message, or a table entry)."""

    def any_callback(steps: tuple[Step, ...]) -> bool:
        for st in steps:
            if isinstance(st, CallbackStep) or (isinstance(st, ObjectStep) and st.kind == "send"):
                return True
            if isinstance(st, ChoiceStep) and any(any_callback(o) for _, o in st.options):
                return True
        return False

    return any(any_callback(script.steps) for script in s.services.values()) or bool(s.callback_table)


def service_numbers(
    scenario: Scenario, ntdll: Image, images: list[Image], explicit: dict[str, int], notes: list[str],
    details: list[str],
) -> tuple[dict[str, int], Profile]:  # fmt: skip
    """Service numbers and the profile with the dispatcher convention, from the loaded code.

    The images decide: SSNs come from the stubs of a foreign ntdll and of a loaded
    win32u PE, the dispatcher convention from a foreign KiUserCallbackDispatcher's
    code. The profile gives defaults, and a ``[profile]`` key the file sets wins.
    ``explicit`` are the numbers the scenario gives itself (``ssn = 0x...``); what a
    reader should know goes to ``notes`` and ``details``.
    """
    s = scenario
    foreign = s.ntdll is not None
    profile = s.profile
    table: dict[str, int] = {} if foreign else dict(profile.ssn)
    coded: list[Image] = [ntdll] if foreign else []
    coded += [img for img in images if img.name.lower() == "win32u" and img.path is not None]
    if coded:  # reading stubs takes capstone: loaded only when there is foreign code to read
        from emu.loader.stubs import compare_with_profile, guess_dispatcher_convention, service_table
    for img in coded:
        found = service_table(img)
        table.update(found)
        diffs = compare_with_profile(found, profile)
        if diffs:
            notes.append(
                f"{file_name(img)} numbers {len(diffs)} service(s) differently from profile {profile.name}; "
                f"its code is used (emu run --verbose lists them)"
            )
        details.extend(
            f"{file_name(img)}: {d.service} SSN {d.in_code:#x} in its code, {d.in_profile:#x} in profile {profile.name}"
            for d in diffs
        )
    if foreign:
        guess = guess_dispatcher_convention(ntdll)
        if "dispatcher" in s.profile_overrides:
            if guess.convention not in ("unknown", profile.dispatcher):
                notes.append(
                    f"{file_name(ntdll)}'s KiUserCallbackDispatcher looks like the '{guess.convention}' "
                    f"convention ({guess.evidence}); [profile] dispatcher = '{profile.dispatcher}' is used"
                )
        elif guess.convention == "unknown":
            notes.append(
                f"the entry convention of {file_name(ntdll)}'s KiUserCallbackDispatcher cannot be read from "
                f"its code; the profile's '{profile.dispatcher}' is used (set [profile] dispatcher to choose)"
            )
        else:
            profile = profile.with_overrides(dispatcher=guess.convention)
            details.append(f"dispatcher convention '{guess.convention}' from the code: {guess.evidence}")
    if foreign or coded:
        for name in s.services:
            if name not in table and name not in explicit:
                where = ", ".join(file_name(i) for i in coded)
                raise ScenarioError(
                        s.path, f"services.{name}",
                        f"{name} has no stub in {where} and no 'ssn = 0x...' (add one to script it)",
                        s.line_of("services", name),
                    )  # fmt: skip
        if uses_callbacks(s) and "NtCallbackReturn" not in table and "NtCallbackReturn" not in explicit:
            raise missing_export(
                s,
                ntdll,
                "NtCallbackReturn",
                "callbacks return through it; a stub with a readable SSN is needed, or "
                "[profile] ssn = { NtCallbackReturn = 0x... }",
                also="ZwCallbackReturn",
            )
    return {**table, **explicit}, profile
