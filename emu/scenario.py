"""Scenario files: TOML in, frozen dataclasses out, or one line saying what is wrong.

A scenario is data only: it never executes host Python. Every error is a
:class:`ScenarioError` naming the file, the key path, the line where it can be
found, and what was expected.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from emu.asm import labels_in
from emu.errors import ScenarioError
from emu.profile import DEFAULT_PROFILE, DISPATCHERS, OVERRIDABLE, STUB_SHAPES, Profile, get_profile, profile_names
from emu.winnt import STATUS_BY_NAME


@dataclass(frozen=True)
class ModuleSpec:
    """A module assembled from the scenario: ``code`` (rx) and optional ``data`` (rw)."""

    name: str
    code: str
    data: str = ""


@dataclass(frozen=True)
class CallbackStep:
    """Call back into user mode: KernelCallbackTable[api](data)."""

    api: int
    data: bytes = b""
    kind: Literal["callback"] = "callback"


@dataclass(frozen=True)
class ReturnStep:
    """Finish the service. ``status`` is an NTSTATUS, or None for the last callback's status."""

    status: int | None
    kind: Literal["return"] = "return"


@dataclass(frozen=True)
class ChoiceStep:
    """The kernel chooses between named alternatives (each a tuple of steps); a run takes ``default``."""

    name: str
    default: str
    options: tuple[tuple[str, tuple[Step, ...]], ...]
    kind: Literal["choice"] = "choice"


Step = CallbackStep | ReturnStep | ChoiceStep


@dataclass(frozen=True)
class ServiceScript:
    name: str
    steps: tuple[Step, ...]
    ssn: int | None = None


@dataclass(frozen=True)
class Budgets:
    """Limits on a run; hitting one stops it with BudgetExceeded (exit code 3)."""

    instructions: int = 5_000_000  # per run, or per segment between two choices when exploring
    wall_time: float = 20.0  # per run, or for a whole exploration
    callback_depth: int = 1024
    states: int = 100_000  # exploration: distinct states
    choice_depth: int = 256  # exploration: choices along one path


@dataclass(frozen=True)
class Expectation:
    """One ``[[expect]]`` entry: a ``kind`` and its value, with where it was written."""

    kind: str
    value: Any
    index: int
    line: int | None = None


@dataclass(frozen=True)
class MemorySpec:
    """Extra memory mapped at a fixed address (zero-filled)."""

    name: str
    start: int
    size: int
    perms: str


@dataclass(frozen=True)
class Scenario:
    path: str
    name: str
    description: str
    profile: Profile
    modules: tuple[ModuleSpec, ...]
    entry: str
    argument: int
    callback_table: dict[int, str]
    callback_table_size: int
    services: dict[str, ServiceScript]
    budgets: Budgets
    expectations: tuple[Expectation, ...]
    system_call: int = 0
    memory: tuple[MemorySpec, ...] = ()
    source: str = field(default="", repr=False)

    def line_of(self, *path: str | int) -> int | None:
        return _line_of(self.source, path)


EXPECT_KINDS: dict[str, str] = {
    "detections": "an integer: how many states the detector reports",
    "detection": "a table {index, rip, return_address, depth, api}",
    "exit_status": "an NTSTATUS: the thread's exit status",
    "max_depth": "an integer: the deepest callback nesting reached",
    "sysret": "a table {service, status}: some return from that service carried that status",
    "callback_output": "a table {api, data}: some callback for api returned exactly these bytes",
    "transitions": "a table {kind = count}: how many transitions of each kind",
    "explored_states": "an integer: distinct states `emu explore` finds",
    "explored_merges": "an integer: states `emu explore` reaches along more than one edge",
    "explored_pending": "an integer: callback-return pending states `emu explore` finds",
}
EXPLORE_KINDS = frozenset(k for k in EXPECT_KINDS if k.startswith("explored_"))

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ID = re.compile(r"^[A-Za-z_.$?][\w.$?@]*(![A-Za-z_.$?][\w.$?@]*)?$")


class _Reader:
    """Typed access to the parsed TOML with errors that name the file, key and line."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.text = text

    def fail(self, path: tuple[str | int, ...], message: str) -> ScenarioError:
        return ScenarioError(self.file, _dotted(path), message, _line_of(self.text, path))

    def table(
        self, obj: Any, path: tuple[str | int, ...], allowed: dict[str, str], required: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise self.fail(path, f"expected a table, got {_kind(obj)}")
        for key in obj:
            if key not in allowed:
                raise self.fail(path + (key,), f"unknown key '{key}' (allowed: {', '.join(allowed)})")
        for key in required:
            if key not in obj:
                raise self.fail(path, f"missing required key '{key}' ({allowed[key]})")
        return obj

    def int_(
        self,
        obj: dict[str, Any],
        key: str,
        path: tuple[str | int, ...],
        default: int | None = None,
        lo: int = 0,
        hi: int = 2**64 - 1,
    ) -> int:
        if key not in obj:
            if default is None:
                raise self.fail(path, f"missing required key '{key}'")
            return default
        v = obj[key]
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(path + (key,), f"expected an integer, got {_kind(v)}")
        if not lo <= v <= hi:
            raise self.fail(path + (key,), f"expected an integer in {lo:#x}..{hi:#x}, got {v:#x}")
        return v

    def str_(self, obj: dict[str, Any], key: str, path: tuple[str | int, ...], default: str | None = None) -> str:
        if key not in obj:
            if default is None:
                raise self.fail(path, f"missing required key '{key}'")
            return default
        v = obj[key]
        if not isinstance(v, str):
            raise self.fail(path + (key,), f"expected a string, got {_kind(v)}")
        return v

    def status(self, v: Any, path: tuple[str | int, ...]) -> int:
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFF_FFFF:
            return v
        if isinstance(v, str) and v in STATUS_BY_NAME:
            return STATUS_BY_NAME[v]
        raise self.fail(
            path, f"expected an NTSTATUS (0..0xffffffff or one of {', '.join(sorted(STATUS_BY_NAME))}), got {_kind(v)}"
        )

    def hexdata(self, v: Any, path: tuple[str | int, ...]) -> bytes:
        if not isinstance(v, str):
            raise self.fail(path, f'expected a hex string such as "48 69 00", got {_kind(v)}')
        try:
            return bytes.fromhex(v)
        except ValueError:
            raise self.fail(path, f'expected hex bytes such as "48 69 00", got {v!r}') from None


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return f"float {v}"
    if isinstance(v, str):
        return f"string {v[:40]!r}"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _line_of(text: str, path: tuple[str | int, ...]) -> int | None:
    """Best-effort line of a key path in TOML text (tomllib keeps no positions).

    Finds the deepest ``[table]`` / ``[[array]]`` header on the path, then the key
    below it, then (for ``key[j].sub``) the j-th inline table of that array.
    """
    if not path:
        return None
    lines = text.splitlines()
    names = [p for p in path if isinstance(p, str)]
    start, depth, rest = 0, 0, list(path)
    for d in range(len(names), 0, -1):
        header = re.compile(rf"^\s*\[\[?\s*{re.escape('.'.join(names[:d]))}\s*\]\]?\s*(#.*)?$")
        hits = [i for i, line in enumerate(lines) if header.match(line)]
        if hits:
            pos = _position_after(path, names[d - 1])
            rest = list(path[pos:])
            if lines[hits[0]].lstrip().startswith("[["):
                # An [[array]] header: the index after its name picks the entry.
                index = rest.pop(0) if rest and isinstance(rest[0], int) else 0
                start = hits[min(int(index), len(hits) - 1)]
            else:
                start = hits[0]
            depth = d
            break
    line = start
    found = bool(depth)
    while rest:
        key = rest.pop(0)
        if isinstance(key, int):
            hit = _nth_inline_table(lines, line, key)
            if hit is None:
                break
            line = hit
            continue
        pat = re.compile(rf"(^|[{{,])\s*{re.escape(key)}\s*=")
        for i in range(line, len(lines)):
            if i > line and re.match(r"^\s*\[", lines[i]):
                i = -1
                break
            if pat.search(lines[i]):
                break
        else:
            i = -1
        if i < 0:
            break
        line, found = i, True
    return line + 1 if found else None


def _position_after(path: tuple[str | int, ...], name: str) -> int:
    for i, p in enumerate(path):
        if p == name:
            return i + 1
    return len(path)


def _nth_inline_table(lines: list[str], start: int, n: int) -> int | None:
    """Line of the n-th top-level ``{`` of the array that begins on line ``start``."""
    count, depth, quote = -1, 0, ""
    for i in range(start, len(lines)):
        line = lines[i] if i > start else lines[i][lines[i].find("=") + 1 :]
        for ch in line:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                break
            elif ch == "[":
                depth += 1
            elif ch == "]":
                depth -= 1
                if depth <= 0:
                    return None
            elif ch == "{" and depth == 1:
                count += 1
                if count == n:
                    return i
    return None


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

# Where scenario memory may go: below the images, away from emu's own layout (stacks and
# allocations start at 4 GiB, images near 0x7FFA_0000_0000).
MEMORY_MIN, MEMORY_MAX = 0x10000, 0x1_0000_0000


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


def _services(r: _Reader, obj: Any, profile: Profile, table_size: int) -> dict[str, ServiceScript]:
    r.table(obj, ("services",), {k: "" for k in obj} if isinstance(obj, dict) else {})
    out: dict[str, ServiceScript] = {}
    for name, body in obj.items():
        path: tuple[str | int, ...] = ("services", name)
        if not name.startswith("Nt") or not _NAME.match(name):
            raise r.fail(path, "expected a service name in the Nt spelling, e.g. NtUserMessageCall")
        if name in ("NtCallbackReturn", "NtTerminateThread"):
            raise r.fail(path, f"{name} is built into the kernel model and cannot be scripted")
        allowed = {
            "ssn": "a system service number",
            "steps": "an array of steps",
            "blocks": "a table of named step arrays",
        }
        r.table(body, path, allowed, ("steps",))
        ssn = r.int_(body, "ssn", path, -1, -1, 0xFFFF)
        if ssn < 0 and name not in profile.ssn:
            raise r.fail(path, f"{name} has no number in profile {profile.name}: give 'ssn = 0x...'")
        blocks = body.get("blocks", {})
        if not isinstance(blocks, dict):
            raise r.fail(path + ("blocks",), f"expected a table of named step arrays, got {_kind(blocks)}")
        reader = _StepReader(r, table_size, path, blocks)
        steps = reader.steps(body["steps"], path + ("steps",))
        if not steps:
            raise r.fail(path + ("steps",), "expected a non-empty array of steps")
        if not _ends(steps):
            last = steps[-1]
            if isinstance(last, ChoiceStep):
                loose = next(n for n, opt in last.options if not _ends(opt))
                raise r.fail(
                    path + ("steps",), f"option '{loose}' of choice '{last.name}' does not end with a \"return\" step"
                )
            raise r.fail(
                path + ("steps",), 'the last step must be a "return" step (or a choice whose options all return)'
            )
        out[name] = ServiceScript(name, tuple(steps), None if ssn < 0 else ssn)
    return out


def _ends(steps: tuple[Step, ...] | list[Step]) -> bool:
    """Does every way through these steps finish with a return?"""
    if not steps:
        return False
    last = steps[-1]
    if isinstance(last, ReturnStep):
        return True
    return isinstance(last, ChoiceStep) and all(_ends(opt) for _, opt in last.options)


STEP_KINDS = '"callback", "return" or "choice"'


class _StepReader:
    """Reads step arrays; choices nest (inline arrays or names of ``blocks``), to a bounded depth."""

    def __init__(self, r: _Reader, table_size: int, service: tuple[str | int, ...], blocks: dict[str, Any]) -> None:
        self.r = r
        self.table_size = table_size
        self.service = service
        self.blocks = blocks
        self.depth = 0

    def steps(self, raw: Any, path: tuple[str | int, ...]) -> tuple[Step, ...]:
        r = self.r
        if not isinstance(raw, list):
            raise r.fail(path, f"expected an array of steps, got {_kind(raw)}")
        out: list[Step] = []
        for j, st in enumerate(raw):
            sp = path + (j,)
            if not isinstance(st, dict) or "kind" not in st:
                raise r.fail(sp, f"expected a step table with 'kind' = {STEP_KINDS}")
            kind = st["kind"]
            if kind == "callback":
                out.append(self._callback(st, sp))
            elif kind == "return":
                r.table(st, sp, {"kind": "", "status": 'an NTSTATUS or "callback"'}, ("status",))
                v = st["status"]
                out.append(ReturnStep(None if v == "callback" else r.status(v, sp + ("status",))))
            elif kind == "choice":
                out.append(self._choice(st, sp))
            else:
                raise r.fail(sp + ("kind",), f"expected {STEP_KINDS}, got {_kind(kind)}")
        return tuple(out)

    def _callback(self, st: dict[str, Any], sp: tuple[str | int, ...]) -> CallbackStep:
        r = self.r
        r.table(
            st,
            sp,
            {"kind": "", "api": "an api number", "data": "hex bytes", "text": "a string sent as bytes"},
            ("api",),
        )
        api = r.int_(st, "api", sp, None, 0, 0xFFFF_FFFF)
        if api >= self.table_size:
            raise r.fail(
                sp + ("api",), f"callback index {api} is out of range (kernel_callback_table size {self.table_size})"
            )
        if "data" in st and "text" in st:
            raise r.fail(sp, "give either 'data' or 'text', not both")
        data = r.hexdata(st["data"], sp + ("data",)) if "data" in st else r.str_(st, "text", sp, "").encode()
        return CallbackStep(api, data)

    def _choice(self, st: dict[str, Any], sp: tuple[str | int, ...]) -> ChoiceStep:
        r = self.r
        allowed = {
            "kind": "",
            "name": "a name",
            "default": "the option a single run takes",
            "options": 'a table {option = [steps] or "block"}',
        }
        r.table(st, sp, allowed, ("name", "options"))
        name = r.str_(st, "name", sp)
        opts = st["options"]
        if not isinstance(opts, dict) or not opts:
            raise r.fail(sp + ("options",), f"expected a non-empty table of options, got {_kind(opts)}")
        default = r.str_(st, "default", sp, next(iter(opts)))
        if default not in opts:
            raise r.fail(sp + ("default",), f"'{default}' is not one of the options ({', '.join(opts)})")
        self.depth += 1
        if self.depth > 16:
            raise r.fail(sp, "choices nest more than 16 deep (a block that names itself?)")
        options: list[tuple[str, tuple[Step, ...]]] = []
        for opt, val in opts.items():
            op = sp + ("options", opt)
            if isinstance(val, str):
                if val not in self.blocks:
                    known = ", ".join(self.blocks) or "none"
                    raise r.fail(op, f"no block named '{val}' in [{_dotted(self.service)}.blocks] (blocks: {known})")
                options.append((opt, self.steps(self.blocks[val], self.service + ("blocks", val))))
            else:
                options.append((opt, self.steps(val, op)))
        self.depth -= 1
        return ChoiceStep(name, default, tuple(options))


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
