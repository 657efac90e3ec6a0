"""A scenario file as a whole: top-level keys, modules, thread, tables, expectations."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emu.errors import ScenarioError
from emu.profile import DEFAULT_PROFILE, OVERRIDABLE, PROFILE_CHOICES, Profile, get_profile, profile_names
from emu.scenario.expectations import Expectation, read_expectation
from emu.scenario.keys import Boolean, Integer, Key, Seconds
from emu.scenario.layout import (
    BUDGETS,
    MACHINE,
    MAX_TABLE,
    MEMORY,
    MODULE,
    NTDLL,
    OBJECT,
    PE,
    PROFILE,
    PYTHON,
    PYTHON_REF,
    SCENARIO,
    START,
    THREAD_MANY,
    THREAD_ONE,
    TOP,
)
from emu.scenario.model import (
    MEMORY_MAX,
    THREAD_STARTS,
    Budgets,
    MemorySpec,
    ModuleSpec,
    ObjectSpec,
    PeSpec,
    Scenario,
    ThreadSpec,
)
from emu.scenario.reader import _NAME, _kind, _Reader
from emu.scenario.refs import _callback_table, _check_ref, _labels
from emu.scenario.steps import _services

TOP_KEYS = TOP.allowed


def load_scenario(path: str | Path, allow: Sequence[str | Path] = (), allow_python: bool = False) -> Scenario:
    """Read and validate a scenario file.

    Files the scenario names (PE images) must lie in the scenario's folder or below it,
    or under one of the ``allow`` folders (``--allow-path`` on the command line).
    ``allow_python`` lets a build import the Python its ``[python]`` table names
    (``--allow-python``); reading the file never runs it.

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
    return parse_scenario(text, file, allow, allow_python)


def parse_scenario(
    text: str, file: str = "<scenario>", allow: Sequence[str | Path] = (), allow_python: bool = False
) -> Scenario:
    """Validate scenario text (see :func:`load_scenario`); relative paths are from ``file``'s folder."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        line = int(m.group(1)) if m else None
        raise ScenarioError(file, "", f"not valid TOML: {msg}", line) from None
    except RecursionError:  # tomllib recurses once per nesting level
        raise ScenarioError(file, "", "not readable: arrays or tables nested too deeply") from None
    r = _Reader(file, text)
    r.table(doc, (), TOP_KEYS, ("scenario",))

    head = r.table(doc["scenario"], ("scenario",), SCENARIO.allowed, SCENARIO.required)
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

    machine = r.table(doc.get("machine", {}), ("machine",), MACHINE.allowed)
    system_call = _integer(MACHINE.keys["system_call"]).read(r, machine, "system_call", ("machine",), 0)
    unbound = r.str_(machine, "unbound_imports", ("machine",), "error")
    if unbound not in ("error", "trap"):
        raise r.fail(("machine", "unbound_imports"), f'expected "error" or "trap", got {unbound!r}')
    preempt = Boolean().read(r, machine, "preempt_at_callback_return", ("machine",))
    exceptions = r.str_(machine, "exceptions", ("machine",), "deliver")
    stack_reserve = _integer(MACHINE.keys["stack_reserve"]).read(r, machine, "stack_reserve", ("machine",), 0x1000)
    if stack_reserve % 0x1000:
        raise r.fail(("machine", "stack_reserve"), f"expected a multiple of 0x1000 (a page), got {stack_reserve:#x}")
    if exceptions not in ("deliver", "stop"):
        raise r.fail(("machine", "exceptions"), f'expected "deliver" or "stop", got {exceptions!r}')
    files = _Files(r, file, allow)
    start = r.table(doc.get("start", {}), ("start",), START.allowed)
    start_dump = files.file(start["dump"], ("start", "dump")) if "dump" in start else None
    if start_dump is None and "thread" not in doc:
        raise r.fail((), f"missing required key 'thread' ({TOP_KEYS['thread']})")
    ntdll = files.pe(doc["ntdll"], ("ntdll",), "ntdll") if "ntdll" in doc else None
    pe = files.pe_list(doc.get("pe", []))

    budgets = _budgets(r, r.table(doc.get("budgets", {}), ("budgets",), BUDGETS.allowed))

    if "module" not in doc and not pe and start_dump is None:
        raise r.fail((), f"missing required key 'module' ({TOP.allowed['module']}, or [[pe]] files)")
    modules = _modules(r, doc.get("module", []), allow_empty=bool(pe) or start_dump is not None)
    taken = {m.name.lower() for m in modules}
    for i, spec in enumerate(pe):
        # A [[pe]] named win32u replaces the built-in win32u (its stubs give the win32k SSNs).
        if spec.name.lower() in taken | {"ntdll"}:
            raise r.fail(("pe", i, "name"), f"module name {spec.name!r} is already taken")
        taken.add(spec.name.lower())
    labels = {(m.name, lab) for m in modules for lab in _labels(m)}
    external = tuple(spec.name for spec in pe)

    threads = _threads(r, doc["thread"], modules, labels, external) if "thread" in doc else ()
    entry, argument = (threads[0].entry, threads[0].argument) if threads else ("", 0)
    objects = _objects(r, doc.get("object", []), threads)

    table, size, table_from = _callback_table(r, doc.get("kernel_callback_table", {}), modules, labels, external)
    # With a PE ntdll the service numbers come from its code, known only once it is loaded.
    if start_dump is not None and "kernel_callback_table" not in doc:
        size = 0  # the table is the dump's own (PEB.KernelCallbackTable in its memory)
    services = _services(
        r, doc.get("services", {}), profile, size or MAX_TABLE,
        check_numbers=ntdll is None and not any(p.name.lower() == "win32u" for p in pe),
        threads=tuple(t.name for t in threads), objects=tuple(o.name for o in objects),
    )  # fmt: skip
    expectations = _expectations(r, doc.get("expect", []))
    memory = _memory(r, doc.get("memory", []))
    python = r.table(doc.get("python", {}), ("python",), PYTHON.allowed)
    python_services = _python_ref(r, python)
    return Scenario(
        path=file, name=name, description=description, profile=profile, modules=modules, entry=entry,
        argument=argument, callback_table=table, callback_table_size=size, callback_table_from=table_from,
        services=services,
        budgets=budgets, expectations=expectations, system_call=system_call, memory=memory, ntdll=ntdll, pe=pe,
        unbound_imports="trap" if unbound == "trap" else "error", threads=threads, objects=objects, source=text,
        preempt_at_callback_return=preempt, exceptions="stop" if exceptions == "stop" else "deliver",
        stack_reserve=stack_reserve,
        start_dump=start_dump, python_services=python_services, allow_python=allow_python,
        profile_overrides=frozenset(doc.get("profile") or ()) if isinstance(doc.get("profile"), dict) else frozenset(),
    )  # fmt: skip


def _python_ref(r: _Reader, python: dict[str, object]) -> tuple[str, ...]:
    """[python] services: a "package.module:name" reference, checked for shape only (nothing is imported)."""
    if "services" not in python:
        return ()
    ref = r.str_(python, "services", ("python",))
    if not re.fullmatch(PYTHON_REF, ref):
        raise r.fail(("python", "services"), f'expected "package.module:name", got {ref!r}')
    return (ref,)


class _Files:
    """PE paths: relative to the scenario's folder, confined to it (or to allowed folders), readable."""

    def __init__(self, r: _Reader, file: str, allow: Sequence[str | Path]) -> None:
        self.r = r
        self.folder = (Path(file).parent if file != "<scenario>" else Path.cwd()).resolve()
        self.allowed = [self.folder, *(Path(a).resolve() for a in allow)]

    def pe_list(self, obj: Any) -> tuple[PeSpec, ...]:
        if not isinstance(obj, list):
            raise self.r.fail(("pe",), "expected an array of tables [[pe]] {path, name, base}")
        return tuple(self.pe(m, ("pe", i), None) for i, m in enumerate(obj))

    def file(self, value: Any, path: tuple[str | int, ...]) -> str:
        """A file the scenario names: relative to its folder, inside an allowed folder, readable."""
        r = self.r
        if not isinstance(value, str):
            raise r.fail(path, f"expected a file name (a string), got {_kind(value)}")
        target = (self.folder / value).resolve()
        if not any(target == a or a in target.parents for a in self.allowed):
            raise r.fail(path, f"{target} is outside the scenario's folder {self.folder}: pass --allow-path to read it")
        if not target.is_file():
            raise r.fail(path, f"{target} does not exist or is not a file")
        try:
            with target.open("rb"):
                pass
        except OSError as e:
            raise r.fail(path, f"cannot read {target} ({e.strerror or e})") from None
        return str(target)

    def pe(self, obj: Any, path: tuple[str | int, ...], fixed_name: str | None) -> PeSpec:
        r = self.r
        table = NTDLL if fixed_name is not None else PE
        r.table(obj, path, table.allowed, table.required)
        target = (self.folder / r.str_(obj, "path", path)).resolve()
        if not any(target == a or a in target.parents for a in self.allowed):
            raise r.fail(
                path + ("path",),
                f"{target} is outside the scenario's folder {self.folder}: pass --allow-path to read it",
            )
        if not target.is_file():
            raise r.fail(path + ("path",), f"{target} does not exist or is not a file")
        try:
            with target.open("rb"):
                pass
        except OSError as e:
            raise r.fail(path + ("path",), f"cannot read {target} ({e.strerror or e})") from None
        name = fixed_name or r.str_(obj, "name", path, target.stem)
        if not _NAME.match(name):
            raise r.fail(path + ("name",), f"expected a module name (letters, digits, _), got {name!r}")
        base = r.int_(obj, "base", path, -1, -1, 0x7FFF_FFFF_0000) if "base" in obj else None
        if base is not None and base % 0x1000:
            raise r.fail(path + ("base",), f"expected a page-aligned address, got {base:#x}")
        return PeSpec(str(target), name, base)


def _threads(
    r: _Reader, obj: Any, modules: tuple[ModuleSpec, ...], labels: set[tuple[str, str]], external: tuple[str, ...]
) -> tuple[ThreadSpec, ...]:
    many = isinstance(obj, list)
    items = obj if many else [obj]
    if many and not items:
        raise r.fail(("thread",), "expected one or more [[thread]] tables")
    out: list[ThreadSpec] = []
    for i, th in enumerate(items):
        path: tuple[str | int, ...] = ("thread", i) if many else ("thread",)
        table = THREAD_MANY if many else THREAD_ONE
        r.table(th, path, table.allowed, table.required)
        entry = r.str_(th, "entry", path)
        _check_ref(r, entry, path + ("entry",), modules, labels, external)
        name = r.str_(th, "name", path, f"thread{i}")
        if not _NAME.match(name):
            raise r.fail(path + ("name",), f"expected a name (letters, digits, _), got {name!r}")
        if any(t.name == name for t in out):
            raise r.fail(path + ("name",), f"thread {name!r} is declared twice")
        start = r.str_(th, "start", path, "auto")
        if start not in THREAD_STARTS:
            raise r.fail(path + ("start",), f'expected "auto", "rtl" or "entry", got {start!r}')
        argument = _integer(table.keys["argument"]).read(r, th, "argument", path, 0)
        out.append(ThreadSpec(name, entry, argument, start))  # type: ignore[arg-type]
    return tuple(out)


def _objects(r: _Reader, obj: Any, threads: tuple[ThreadSpec, ...]) -> tuple[ObjectSpec, ...]:
    if not isinstance(obj, list):
        raise r.fail(("object",), "expected an array of tables [[object]]")
    out: list[ObjectSpec] = []
    for i, o in enumerate(obj):
        path: tuple[str | int, ...] = ("object", i)
        r.table(o, path, OBJECT.allowed, OBJECT.required)
        kind = r.str_(o, "kind", path)
        if kind not in ("event", "mutex"):
            raise r.fail(path + ("kind",), f'expected "event" or "mutex", got {kind!r}')
        name = r.str_(o, "name", path)
        if any(x.name == name for x in out):
            raise r.fail(path + ("name",), f"object {name!r} is declared twice")
        handle = _integer(OBJECT.keys["handle"]).read(r, o, "handle", path, 0x100 + 4 * i)
        if any(x.handle == handle for x in out):
            raise r.fail(path + ("handle",), f"handle {handle:#x} is used twice")
        flags = {}
        for key in ("signaled", "manual_reset"):
            v = Boolean().read(r, o, key, path)
            if v and kind != "event":
                raise r.fail(path + (key,), f"only an event has '{key}'")
            flags[key] = v
        owner = r.str_(o, "owner", path, "") or None
        if owner is not None and kind != "mutex":
            raise r.fail(path + ("owner",), "only a mutex has an owner")
        if owner is not None and not any(t.name == owner for t in threads):
            raise r.fail(
                path + ("owner",), f"no thread named {owner!r} (threads: {', '.join(t.name for t in threads)})"
            )
        out.append(
            ObjectSpec(
                "event" if kind == "event" else "mutex", name, handle, flags["signaled"], flags["manual_reset"], owner
            )
        )
    return tuple(out)


def _memory(r: _Reader, obj: Any) -> tuple[MemorySpec, ...]:
    if not isinstance(obj, list):
        raise r.fail(("memory",), "expected an array of tables [[memory]]")
    out: list[MemorySpec] = []
    for i, m in enumerate(obj):
        path: tuple[str | int, ...] = ("memory", i)
        r.table(m, path, MEMORY.allowed, MEMORY.required)
        name = r.str_(m, "name", path)
        start = _integer(MEMORY.keys["start"]).read(r, m, "start", path)
        size = _integer(MEMORY.keys["size"]).read(r, m, "size", path)
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
    r.table(obj, ("profile",), PROFILE.allowed)
    fields: dict[str, Any] = {}
    for key, typ in OVERRIDABLE.items():
        if key not in obj:
            continue
        if typ is int:
            fields[key] = _integer(PROFILE.keys[key]).read(r, obj, key, ("profile",))
        else:
            fields[key] = r.str_(obj, key, ("profile",))
    for key, values in PROFILE_CHOICES.items():
        if key in fields and fields[key] not in values:
            raise r.fail(("profile", key), f"expected one of {', '.join(values)}, got {fields[key]!r}")
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


def _modules(r: _Reader, obj: Any, allow_empty: bool = False) -> tuple[ModuleSpec, ...]:
    if not isinstance(obj, list) or (not obj and not allow_empty):
        raise r.fail(("module",), "expected one or more [[module]] tables")
    out: list[ModuleSpec] = []
    seen: set[str] = set()
    for i, m in enumerate(obj):
        path: tuple[str | int, ...] = ("module", i)
        r.table(m, path, MODULE.allowed, MODULE.required)
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


def _expectations(r: _Reader, obj: Any) -> tuple[Expectation, ...]:
    if not isinstance(obj, list):
        raise r.fail(("expect",), "expected an array of tables [[expect]]")
    return tuple(read_expectation(r, e, i) for i, e in enumerate(obj))


def _budgets(r: _Reader, b: dict[str, Any]) -> Budgets:
    """The ``[budgets]`` table: each key a field of :class:`Budgets`, with the bounds declared there."""
    path: tuple[str | int, ...] = ("budgets",)
    wall = BUDGETS.keys["wall_time"].shape
    assert isinstance(wall, Seconds), wall
    values: dict[str, Any] = {"wall_time": wall.read(r, b, "wall_time", path, Budgets.wall_time)}
    for name, k in BUDGETS.keys.items():
        if name == "wall_time":
            continue
        if isinstance(k.shape, Seconds):  # solver_time
            values[name] = k.shape.read(r, b, name, path, getattr(Budgets, name))
            continue
        default = getattr(Budgets, name)
        if default is None:  # instructions: not counted unless given
            values[name] = _integer(k).read(r, b, name, path, 0) or None
        else:
            values[name] = _integer(k).read(r, b, name, path, default)
    return Budgets(**values)


def _integer(k: Key) -> Integer:
    """The integer shape of a key the model declares as one."""
    assert isinstance(k.shape, Integer), k
    return k.shape
