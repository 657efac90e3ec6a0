"""A scenario file as a whole: top-level keys, modules, thread, tables, expectations."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from emu.asm import labels_in
from emu.errors import ScenarioError
from emu.profile import DEFAULT_PROFILE, DISPATCHERS, OVERRIDABLE, STUB_SHAPES, Profile, get_profile, profile_names
from emu.scenario.model import (
    EXPECT_KINDS,
    EXPLORE_KINDS,
    MEMORY_MAX,
    MEMORY_MIN,
    Budgets,
    Expectation,
    MemorySpec,
    ModuleSpec,
    Scenario,
)
from emu.scenario.reader import _ID, _NAME, _kind, _line_of, _Reader
from emu.scenario.steps import _services

TOP_KEYS = {
    "scenario": "a table {name, description, profile}",
    "profile": f"a table of overrides ({', '.join(OVERRIDABLE)}, ssn)",
    "machine": "a table {system_call}",
    "budgets": "a table {instructions, wall_time, callback_depth, states, choice_depth}",
    "module": "an array of tables [[module]] {name, code, data}",
    "thread": "a table {entry, argument}",
    "kernel_callback_table": 'a table {size, <index> = "module!label"}',
    "services": "a table of [services.NtName] {ssn, steps}",
    "expect": "an array of tables [[expect]]",
    "memory": "an array of tables [[memory]] {name, start, size, perms}",
}


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file.

    Raises:
        ScenarioError: one line naming the file, the key path and what was expected.
    """
    p = Path(path)
    file = str(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ScenarioError(file, "", f"cannot read the file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ScenarioError(file, "", f"not UTF-8 text (byte {e.start})") from None
    return parse_scenario(text, file)


def parse_scenario(text: str, file: str = "<scenario>") -> Scenario:
    """Validate scenario text (see :func:`load_scenario`)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        line = int(m.group(1)) if m else None
        raise ScenarioError(file, "", f"not valid TOML: {msg}", line) from None
    r = _Reader(file, text)
    r.table(doc, (), TOP_KEYS, ("scenario", "module", "thread"))

    head = r.table(
        doc["scenario"],
        ("scenario",),
        {"name": "a string", "description": "a string", "profile": "a profile name"},
        ("name",),
    )
    name = r.str_(head, "name", ("scenario",))
    description = r.str_(head, "description", ("scenario",), "")
    pname = r.str_(head, "profile", ("scenario",), DEFAULT_PROFILE)
    try:
        profile = get_profile(pname)
    except KeyError:
        raise r.fail(
            ("scenario", "profile"), f"unknown profile {pname!r} (known: {', '.join(profile_names())})"
        ) from None
    profile = _profile_overrides(r, doc.get("profile"), profile)

    machine = r.table(doc.get("machine", {}), ("machine",), {"system_call": "0 or 1: KUSER_SHARED_DATA.SystemCall"})
    system_call = r.int_(machine, "system_call", ("machine",), 0, 0, 1)

    b = r.table(
        doc.get("budgets", {}),
        ("budgets",),
        {
            "instructions": "an integer",
            "wall_time": "seconds",
            "callback_depth": "an integer",
            "states": "an integer (exploration)",
            "choice_depth": "an integer (exploration)",
        },
    )
    wall = b.get("wall_time", Budgets.wall_time)
    if not isinstance(wall, (int, float)) or isinstance(wall, bool) or not 0 < wall <= 3600:
        raise r.fail(("budgets", "wall_time"), f"expected seconds in (0, 3600], got {_kind(wall)}")
    budgets = Budgets(
        instructions=r.int_(b, "instructions", ("budgets",), Budgets.instructions, 1, 10**12),
        wall_time=float(wall),
        callback_depth=r.int_(b, "callback_depth", ("budgets",), Budgets.callback_depth, 1, 1 << 20),
        states=r.int_(b, "states", ("budgets",), Budgets.states, 1, 1 << 32),
        choice_depth=r.int_(b, "choice_depth", ("budgets",), Budgets.choice_depth, 1, 1 << 20),
    )

    modules = _modules(r, doc["module"])
    labels = {(m.name, lab) for m in modules for lab in _labels(m)}

    th = r.table(
        doc["thread"],
        ("thread",),
        {"entry": '"module!label" or "label"', "argument": "an integer passed in RDX"},
        ("entry",),
    )
    entry = r.str_(th, "entry", ("thread",))
    _check_ref(r, entry, ("thread", "entry"), modules, labels)
    argument = r.int_(th, "argument", ("thread",), 0)

    table, size = _callback_table(r, doc.get("kernel_callback_table", {}), modules, labels)
    services = _services(r, doc.get("services", {}), profile, size)
    expectations = _expectations(r, doc.get("expect", []))
    memory = _memory(r, doc.get("memory", []))
    return Scenario(
        path=file, name=name, description=description, profile=profile, modules=modules, entry=entry,
        argument=argument, callback_table=table, callback_table_size=size, services=services,
        budgets=budgets, expectations=expectations, system_call=system_call, memory=memory, source=text,
    )  # fmt: skip


def _memory(r: _Reader, obj: Any) -> tuple[MemorySpec, ...]:
    if not isinstance(obj, list):
        raise r.fail(("memory",), "expected an array of tables [[memory]]")
    out: list[MemorySpec] = []
    for i, m in enumerate(obj):
        path: tuple[str | int, ...] = ("memory", i)
        r.table(
            m,
            path,
            {
                "name": "a label",
                "start": "a page-aligned address",
                "size": "bytes",
                "perms": '"r", "rw", "rx" or "rwx"',
            },
            ("name", "start", "size"),
        )
        name = r.str_(m, "name", path)
        start = r.int_(m, "start", path, None, MEMORY_MIN, MEMORY_MAX)
        size = r.int_(m, "size", path, None, 1, 1 << 30)
        perms = r.str_(m, "perms", path, "rw")
        if start % 0x1000:
            raise r.fail(path + ("start",), f"expected a page-aligned address (a multiple of 0x1000), got {start:#x}")
        if start + size > MEMORY_MAX:
            raise r.fail(path + ("size",), f"the region ends at {start + size:#x}, past {MEMORY_MAX:#x}")
        if perms not in ("r", "rw", "rx", "rwx"):
            raise r.fail(path + ("perms",), f'expected "r", "rw", "rx" or "rwx", got {perms!r}')
        for other in out:
            if start < other.start + other.size and other.start < start + size:
                raise r.fail(path + ("start",), f"overlaps [[memory]] '{other.name}' at {other.start:#x}")
        out.append(MemorySpec(name, start, size, perms))
    return tuple(out)


def _profile_overrides(r: _Reader, obj: Any, profile: Profile) -> Profile:
    if obj is None:
        return profile
    allowed = {k: f"a {t.__name__}" for k, t in OVERRIDABLE.items()} | {"ssn": "a table {NtName = number}"}
    r.table(obj, ("profile",), allowed)
    fields: dict[str, Any] = {}
    for key, typ in OVERRIDABLE.items():
        if key not in obj:
            continue
        if typ is int:
            fields[key] = r.int_(obj, key, ("profile",), None, 0, 1 << 32)
        else:
            fields[key] = r.str_(obj, key, ("profile",))
    if "dispatcher" in fields and fields["dispatcher"] not in DISPATCHERS:
        raise r.fail(
            ("profile", "dispatcher"), f"expected one of {', '.join(DISPATCHERS)}, got {fields['dispatcher']!r}"
        )
    if "stub" in fields and fields["stub"] not in STUB_SHAPES:
        raise r.fail(("profile", "stub"), f"expected one of {', '.join(STUB_SHAPES)}, got {fields['stub']!r}")
    if "ssn" in obj:
        ssn = r.table(
            obj["ssn"], ("profile", "ssn"), {k: "" for k in obj["ssn"]} if isinstance(obj["ssn"], dict) else {}
        )
        fields["ssn"] = {}
        for k in ssn:
            if not k.startswith("Nt") or not _NAME.match(k):
                raise r.fail(("profile", "ssn", k), "expected a service name in the Nt spelling, e.g. NtClose")
            fields["ssn"][k] = r.int_(ssn, k, ("profile", "ssn"), None, 0, 0xFFFF)
    return profile.with_overrides(**fields)


def _modules(r: _Reader, obj: Any) -> tuple[ModuleSpec, ...]:
    if not isinstance(obj, list) or not obj:
        raise r.fail(("module",), "expected one or more [[module]] tables")
    out: list[ModuleSpec] = []
    seen: set[str] = set()
    for i, m in enumerate(obj):
        path: tuple[str | int, ...] = ("module", i)
        r.table(
            m,
            path,
            {"name": "a module name", "code": "assembly text", "data": "assembly text (data directives)"},
            ("name", "code"),
        )
        name = r.str_(m, "name", path)
        if not _NAME.match(name) or name.lower() in ("ntdll", "win32u"):
            raise r.fail(
                path + ("name",), f"expected a module name (letters, digits, _), not a built-in module, got {name!r}"
            )
        if name.lower() in seen:
            raise r.fail(path + ("name",), f"module {name!r} is declared twice")
        seen.add(name.lower())
        out.append(ModuleSpec(name, r.str_(m, "code", path), r.str_(m, "data", path, "")))
    return tuple(out)


def _labels(m: ModuleSpec) -> list[str]:
    return labels_in(m.data) + labels_in(m.code)


def _check_ref(
    r: _Reader, ref: str, path: tuple[str | int, ...], modules: tuple[ModuleSpec, ...], labels: set[tuple[str, str]]
) -> None:
    if not _ID.match(ref):
        raise r.fail(path, f'expected "module!label" or "label", got {ref!r}')
    mod, bang, lab = ref.partition("!")
    if bang:
        if mod.lower() in ("ntdll", "win32u"):
            return  # checked against the built images when the run is built
        if not any(m.name == mod for m in modules):
            raise r.fail(path, f"no module named {mod!r} (declared: {', '.join(m.name for m in modules)})")
        if (mod, lab) not in labels:
            raise r.fail(path, f"module {mod!r} has no label {lab!r}")
    else:
        owners = [mod for (mod, lab) in labels if lab == ref]
        if not owners:
            raise r.fail(path, f"no module defines label {ref!r}")
        if len(owners) > 1:
            raise r.fail(
                path, f'label {ref!r} is defined in several modules ({", ".join(sorted(owners))}); write "module!{ref}"'
            )


def _callback_table(
    r: _Reader, obj: Any, modules: tuple[ModuleSpec, ...], labels: set[tuple[str, str]]
) -> tuple[dict[int, str], int]:
    path: tuple[str | int, ...] = ("kernel_callback_table",)
    if not isinstance(obj, dict):
        raise r.fail(path, f"expected a table, got {_kind(obj)}")
    entries: dict[int, str] = {}
    for key, val in obj.items():
        if key == "size":
            continue
        if not key.isdigit():
            raise r.fail(path + (key,), f"unknown key '{key}' (expected 'size' or an api number such as 2)")
        if not isinstance(val, str):
            raise r.fail(path + (key,), f'expected "module!label", got {_kind(val)}')
        _check_ref(r, val, path + (key,), modules, labels)
        entries[int(key)] = val
    need = max(entries, default=-1) + 1
    size = r.int_(obj, "size", path, max(need, 1), 1, 4096)
    for idx in entries:
        if idx >= size:
            raise r.fail(path + (str(idx),), f"callback index {idx} is out of range (table size {size})")
    return dict(sorted(entries.items())), size


def _expectations(r: _Reader, obj: Any) -> tuple[Expectation, ...]:
    if not isinstance(obj, list):
        raise r.fail(("expect",), "expected an array of tables [[expect]]")
    out: list[Expectation] = []
    for i, e in enumerate(obj):
        path: tuple[str | int, ...] = ("expect", i)
        r.table(e, path, EXPECT_KINDS | {"note": "a string"})
        kinds = [k for k in e if k != "note"]
        if len(kinds) != 1:
            raise r.fail(path, f"expected exactly one of: {', '.join(EXPECT_KINDS)}")
        kind = kinds[0]
        v = e[kind]
        kp = path + (kind,)
        if kind in ("detections", "max_depth") or kind in EXPLORE_KINDS:
            value: Any = r.int_(e, kind, path, None, 0, 1 << 32)
        elif kind == "exit_status":
            value = r.status(v, kp)
        elif kind == "detection":
            r.table(
                v,
                kp,
                {
                    "index": "an integer",
                    "rip": "a symbol",
                    "return_address": "a symbol",
                    "depth": "an integer",
                    "api": "an integer",
                },
            )
            value = {"index": r.int_(v, "index", kp, 0)}
            for k in ("rip", "return_address"):
                if k in v:
                    value[k] = r.str_(v, k, kp)
            for k in ("depth", "api"):
                if k in v:
                    value[k] = r.int_(v, k, kp)
        elif kind == "sysret":
            r.table(v, kp, {"service": "a service name", "status": "an NTSTATUS"}, ("service", "status"))
            value = {"service": r.str_(v, "service", kp), "status": r.status(v["status"], kp + ("status",))}
        elif kind == "callback_output":
            r.table(v, kp, {"api": "an integer", "data": "hex bytes"}, ("api", "data"))
            value = {"api": r.int_(v, "api", kp), "data": r.hexdata(v["data"], kp + ("data",))}
        else:  # transitions
            from emu.trace import KINDS

            r.table(v, kp, {k: "a count" for k in KINDS})
            value = {k: r.int_(v, k, kp, None, 0, 1 << 32) for k in v}
        out.append(Expectation(kind, value, i, _line_of(r.text, path)))
    return tuple(out)
