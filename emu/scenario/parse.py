"""A scenario file as a whole: top-level keys, modules, thread, tables, expectations."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    ObjectSpec,
    PeSpec,
    Scenario,
    ThreadSpec,
)
from emu.scenario.reader import _NAME, _kind, _line_of, _Reader
from emu.scenario.refs import MAX_TABLE, _callback_table, _check_ref, _labels
from emu.scenario.steps import _services

THREAD_STARTS = ("auto", "rtl", "entry")

TOP_KEYS = {
    "scenario": "a table {name, description, profile}",
    "profile": f"a table of overrides ({', '.join(OVERRIDABLE)}, ssn)",
    "machine": "a table {system_call, unbound_imports, preempt_at_callback_return}",
    "budgets": "a table {instructions, wall_time, callback_depth, states, choice_depth, output_bytes, memory, process_memory, frontier}",
    "module": "an array of tables [[module]] {name, code, data}",
    "thread": "a table {entry, argument, start}, or an array of tables [[thread]] {name, entry, argument, start}",
    "object": "an array of tables [[object]] {kind, name, handle, signaled, manual_reset, owner}",
    "kernel_callback_table": 'a table {from = "module!export", size, <index> = "module!label"}',
    "services": "a table of [services.NtName] {ssn, steps}",
    "expect": "an array of tables [[expect]]",
    "memory": "an array of tables [[memory]] {name, start, size, perms}",
    "ntdll": "a table {path, base}: a PE ntdll instead of the built-in one",
    "pe": "an array of tables [[pe]] {path, name, base}: PE modules to load",
    "start": 'a table {dump = "x.dmp"}: start from a minidump instead of the threads\' entries',
}


def load_scenario(path: str | Path, allow: Sequence[str | Path] = ()) -> Scenario:
    """Read and validate a scenario file.

    Files the scenario names (PE images) must lie in the scenario's folder or below it,
    or under one of the ``allow`` folders (``--allow-path`` on the command line).

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
    return parse_scenario(text, file, allow)


def parse_scenario(text: str, file: str = "<scenario>", allow: Sequence[str | Path] = ()) -> Scenario:
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

    machine = r.table(
        doc.get("machine", {}),
        ("machine",),
        {
            "system_call": "0 or 1: KUSER_SHARED_DATA.SystemCall",
            "unbound_imports": '"error" or "trap"',
            "preempt_at_callback_return": "true or false: exploration may preempt a thread at NtCallbackReturn's entry",
        },
    )
    system_call = r.int_(machine, "system_call", ("machine",), 0, 0, 1)
    unbound = r.str_(machine, "unbound_imports", ("machine",), "error")
    if unbound not in ("error", "trap"):
        raise r.fail(("machine", "unbound_imports"), f'expected "error" or "trap", got {unbound!r}')
    preempt = machine.get("preempt_at_callback_return", False)
    if not isinstance(preempt, bool):
        raise r.fail(("machine", "preempt_at_callback_return"), f"expected true or false, got {_kind(preempt)}")
    files = _Files(r, file, allow)
    start = r.table(doc.get("start", {}), ("start",), {"dump": "a minidump file, relative to the scenario"})
    start_dump = files.file(start["dump"], ("start", "dump")) if "dump" in start else None
    if start_dump is None and "thread" not in doc:
        raise r.fail((), f"missing required key 'thread' ({TOP_KEYS['thread']})")
    ntdll = files.pe(doc["ntdll"], ("ntdll",), "ntdll") if "ntdll" in doc else None
    pe = files.pe_list(doc.get("pe", []))

    b = r.table(
        doc.get("budgets", {}),
        ("budgets",),
        {
            "instructions": "an integer",
            "wall_time": "seconds",
            "callback_depth": "an integer",
            "states": "an integer: states a run records or an exploration finds",
            "choice_depth": "an integer (exploration)",
            "output_bytes": "an integer: stack bytes kept with the recorded states",
            "memory": "an integer: bytes mapped into the address space",
            "process_memory": "an integer: bytes of resident memory an exploration may add to the process",
            "frontier": "an integer: options waiting on an exploration's work list",
        },
    )
    wall = b.get("wall_time", Budgets.wall_time)
    if not isinstance(wall, (int, float)) or isinstance(wall, bool) or not 0 < wall <= 3600:
        raise r.fail(("budgets", "wall_time"), f"expected seconds in (0, 3600], got {_kind(wall)}")
    budgets = Budgets(
        instructions=r.int_(b, "instructions", ("budgets",), 0, 1, 10**12) or None,
        wall_time=float(wall),
        callback_depth=r.int_(b, "callback_depth", ("budgets",), Budgets.callback_depth, 1, 1 << 20),
        states=r.int_(b, "states", ("budgets",), Budgets.states, 1, 1 << 32),
        choice_depth=r.int_(b, "choice_depth", ("budgets",), Budgets.choice_depth, 1, 1 << 20),
        output_bytes=r.int_(b, "output_bytes", ("budgets",), Budgets.output_bytes, 1, 1 << 40),
        memory=r.int_(b, "memory", ("budgets",), Budgets.memory, 1 << 16, 1 << 40),
        process_memory=r.int_(b, "process_memory", ("budgets",), Budgets.process_memory, 1 << 24, 1 << 44),
        frontier=r.int_(b, "frontier", ("budgets",), Budgets.frontier, 16, 1 << 32),
    )

    if "module" not in doc and not pe and start_dump is None:
        raise r.fail(
            (), "missing required key 'module' (an array of tables [[module]] {name, code, data}, or [[pe]] files)"
        )
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
    return Scenario(
        path=file, name=name, description=description, profile=profile, modules=modules, entry=entry,
        argument=argument, callback_table=table, callback_table_size=size, callback_table_from=table_from,
        services=services,
        budgets=budgets, expectations=expectations, system_call=system_call, memory=memory, ntdll=ntdll, pe=pe,
        unbound_imports="trap" if unbound == "trap" else "error", threads=threads, objects=objects, source=text,
        preempt_at_callback_return=preempt, start_dump=start_dump,
        profile_overrides=frozenset(doc.get("profile") or ()) if isinstance(doc.get("profile"), dict) else frozenset(),
    )  # fmt: skip


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
        allowed = {
            "path": "a PE file, relative to the scenario",
            "base": "a load address (default: the file's ImageBase)",
        }
        if fixed_name is None:
            allowed["name"] = "the module name (default: the file name without .dll)"
        r.table(obj, path, allowed, ("path",))
        r.str_(obj, "path", path)
        target = Path(self.file(obj["path"], path + ("path",)))
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
        allowed = {
            "entry": '"module!label" or "label"',
            "argument": "an integer passed in RDX",
            "start": '"auto", "rtl" (through ntdll!RtlUserThreadStart) or "entry"',
        }
        if many:
            allowed["name"] = "the thread's name (default: thread<N>)"
        r.table(th, path, allowed, ("entry",))
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
        out.append(ThreadSpec(name, entry, r.int_(th, "argument", path, 0), start))  # type: ignore[arg-type]
    return tuple(out)


def _objects(r: _Reader, obj: Any, threads: tuple[ThreadSpec, ...]) -> tuple[ObjectSpec, ...]:
    if not isinstance(obj, list):
        raise r.fail(("object",), "expected an array of tables [[object]]")
    out: list[ObjectSpec] = []
    for i, o in enumerate(obj):
        path: tuple[str | int, ...] = ("object", i)
        allowed = {
            "kind": '"event" or "mutex"',
            "name": "a name steps use",
            "handle": "the handle value code uses (default 0x100 + 4 * index)",
            "signaled": "event: set at the start",
            "manual_reset": "event: a notification event (stays set)",
            "owner": "mutex: the thread owning it at the start",
        }
        r.table(o, path, allowed, ("kind", "name"))
        kind = r.str_(o, "kind", path)
        if kind not in ("event", "mutex"):
            raise r.fail(path + ("kind",), f'expected "event" or "mutex", got {kind!r}')
        name = r.str_(o, "name", path)
        if any(x.name == name for x in out):
            raise r.fail(path + ("name",), f"object {name!r} is declared twice")
        handle = r.int_(o, "handle", path, 0x100 + 4 * i, 4, 0xFFFF_FFFF)
        if any(x.handle == handle for x in out):
            raise r.fail(path + ("handle",), f"handle {handle:#x} is used twice")
        flags = {}
        for key in ("signaled", "manual_reset"):
            v = o.get(key, False)
            if not isinstance(v, bool):
                raise r.fail(path + (key,), f"expected true or false, got {_kind(v)}")
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


def _modules(r: _Reader, obj: Any, allow_empty: bool = False) -> tuple[ModuleSpec, ...]:
    if not isinstance(obj, list) or (not obj and not allow_empty):
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
        value: Any
        if kind == "deadlock":
            if not isinstance(v, bool):
                raise r.fail(kp, f"expected true or false, got {_kind(v)}")
            value = v
        elif kind in ("truths", "explored_truths"):
            value = _truths(r, v, kp)
        elif kind in ("wait_chain", "explored_wait_chain"):
            value = r.str_(e, kind, path)
        elif kind in ("detections", "max_depth") or kind in EXPLORE_KINDS:
            value = r.int_(e, kind, path, None, 0, 1 << 32)
        elif kind == "fault":
            value = r.str_(e, kind, path)
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


def _truths(r: _Reader, v: Any, kp: tuple[str | int, ...]) -> dict[str, Any]:
    """``{observer = "user-context", seed = 1, waiting_in_callback = 2}``: counts per ground truth."""
    from emu.detection.observers import OBSERVERS, TRUTHS

    keys = {t.replace("-", "_"): f"an integer: states where the {t} truth holds" for t in TRUTHS}
    r.table(v, kp, {"observer": f"one of {', '.join(OBSERVERS)}", **keys})
    observer = r.str_(v, "observer", kp, "kernel-debugger")
    if observer not in OBSERVERS:
        raise r.fail(kp + ("observer",), f"unknown observer {observer!r} (valid: {', '.join(OBSERVERS)})")
    counts = {k: r.int_(v, k, kp, None, 0, 1 << 32) for k in keys if k in v}
    if not counts:
        raise r.fail(kp, f"expected at least one of: {', '.join(keys)}")
    return {"observer": observer, "counts": counts}
