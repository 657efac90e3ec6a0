"""Scenario documents for the fuzzers: hypothesis strategies over the known keys, and a TOML writer.

:func:`documents` draws a dict shaped like a scenario file (``[scenario]``, ``[[module]]``,
``[services.NtX]`` ...). ``wild`` documents mix anything TOML can hold into every key
(booleans, huge integers, nan, dates, nested arrays and tables, unknown keys); the others
are mostly valid, so that fuzzing reaches the build and the run behind the parser.
:func:`to_toml` writes a dict as TOML text, with ``[headers]`` or inline tables.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

from hypothesis import strategies as st

from emu.profile import profile_names
from emu.trace import KINDS
from emu.winnt import STATUS_BY_NAME

# --- TOML text from a dict ---------------------------------------------------------------
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _string(k)


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        if "\n" in v and '"""' not in v and "\\" not in v and not v.endswith('"') and _printable(v):
            return '"""\n' + v + '"""'
        return _string(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {type(v).__name__}")


def _printable(s: str) -> bool:
    return all(ch in "\n\t" or (ord(ch) >= 0x20 and ord(ch) != 0x7F) for ch in s)


def to_toml(doc: dict[str, Any], headers: bool = True) -> str:
    """TOML text for ``doc``: top-level tables as ``[headers]`` and arrays of tables as ``[[headers]]``
    when ``headers``, else everything inline (both are what people write)."""
    lines: list[str] = []
    tables: list[str] = []
    for k, v in doc.items():
        if headers and isinstance(v, dict) and v and all(not isinstance(x, dict) for x in v.values()):
            tables.append(f"[{_key(k)}]")
            tables.extend(f"{_key(kk)} = {_value(x)}" for kk, x in v.items())
            tables.append("")
        elif headers and isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                tables.append(f"[[{_key(k)}]]")
                tables.extend(f"{_key(kk)} = {_value(x)}" for kk, x in item.items())
                tables.append("")
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    return "\n".join(lines + [""] + tables)


# --- strategies: values --------------------------------------------------------------------
INTERESTING_INTS = [0, 1, -1, 2, 0xFF, 0x1000, 0xFFFF, 0x10000, 2**31 - 1, 2**32 - 1, 2**32, 2**63 - 1, -(2**63)]
scalars = st.one_of(
    st.booleans(),
    st.sampled_from(INTERESTING_INTS),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    st.dates(),
    st.times(),
)
keys = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


CODE = [
    "main:\n    xor eax, eax\n    ret",
    "main:\n    sub rsp, 0x28\n    call NtClose\n    add rsp, 0x28\n    ret",
    "main:\n    sub rsp, 0x28\n    call NtUserMessageCall\n    add rsp, 0x28\n    ret\non_message:\n    mov eax, 0x1234\n    ret",
    "main:\n    sub rsp, 0x28\n    call NtUserMessageCall\n    add rsp, 0x28\n    ret\non_message:\n    call ZwCallbackReturn\n    ret",
    "main:\n    jmp main",
    "main:\n    call ZwCallbackReturn\n    ret",
    "main:\n    mov eax, 0x46\n    mov r10, rcx\n    syscall\n    ret",
    "main:\n    lea rax, [rip + value]\n    mov eax, dword ptr [rax]\n    ret",
    "main:\n    ud2",
]
BAD_CODE = [
    "main:\n    nop ; unterminated\n    mov rax,",
    "main:\n    call nowhere",
    "main:\n    .skip 70000\n    ret",
    "",
]
DATA = ["", "value:\n    .long 0x5678", ".byte 1, 2, 3", "value: .quad main"]
REFS = ["app!main", "main", "app!on_message", "on_message"]
BAD_REFS = ["ntdll!NtClose", "nope!main", "a b", "", "app!nowhere"]
STATUSES = st.one_of(
    st.sampled_from(sorted(STATUS_BY_NAME)),
    st.sampled_from([0, 0xC0000008, 0xFFFFFFFF, "callback"]),
    st.integers(0, 2**32 - 1),
)
SERVICES = ["NtClose", "NtYieldExecution", "NtUserMessageCall"]
BAD_SERVICES = ["NtCallbackReturn", "NtBogus", "NtDelayExecution", "Close"]


def documents(wild: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Scenario documents: ``wild`` ones mix anything into every key; the others are mostly valid,
    so that the build and the run behind the parser get fuzzed too."""

    def val(plausible: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[Any]:
        if not wild:
            return plausible
        return st.one_of(plausible, plausible, anything, *([bad] if bad is not None else []))

    def pick(good: list[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
        return val(st.sampled_from(good), st.sampled_from(bad))

    def key(good: list[str], bad: list[str]) -> st.SearchStrategy[str]:
        return st.one_of(st.sampled_from(good), st.sampled_from(bad), keys) if wild else st.sampled_from(good)

    def table(
        required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
    ) -> st.SearchStrategy[dict[str, Any]]:
        strategy = st.fixed_dictionaries(required, optional=optional)
        return strategy | st.fixed_dictionaries(required, optional=optional | {"bogus": anything}) if wild else strategy

    def steps(depth: int) -> st.SearchStrategy[list[dict[str, Any]]]:
        api = st.integers(0, 3) | st.lists(st.integers(0, 3), min_size=1, max_size=3)
        callback = table(
            {"kind": st.just("callback"), "api": val(api, st.integers(-1, 2**33))},
            {"data": pick(["00 01 02", ""], ["zz", "0"]), "text": st.text(max_size=8)},
        )
        ret = table({"kind": st.just("return"), "status": val(STATUSES)}, {})
        middle = [callback]
        if depth > 0:
            options = st.dictionaries(st.sampled_from(["a", "b", "c"]), steps(depth - 1), min_size=1, max_size=3)
            middle.append(
                table(
                    {"kind": st.just("choice"), "name": pick(["c", "d"], ["", "x y"]), "options": val(options)},
                    {"default": pick(["a"], ["zz", ""])},
                )
            )
        body = st.lists(st.one_of(middle), max_size=3)
        if wild:
            return st.lists(st.one_of([*middle, ret]), max_size=4)
        return st.tuples(body, ret).map(lambda t: [*t[0], t[1]])

    services = st.dictionaries(
        key(SERVICES, BAD_SERVICES),
        table({"steps": val(steps(2))}, {"ssn": val(st.integers(0x2000, 0x2010), st.integers(-1, 0x10000))}),
        max_size=3,
    )
    kinds = ["detections", "max_depth", "exit_status", "fault", "sysret", "transitions", "callback_output"]
    expect_values: dict[str, st.SearchStrategy[Any]] = {
        "fault": st.text(max_size=10),
        "exit_status": STATUSES,
        "sysret": st.fixed_dictionaries({"service": pick(SERVICES, BAD_SERVICES), "status": STATUSES}),
        "transitions": st.dictionaries(st.sampled_from(sorted(KINDS)), st.integers(0, 5)),
        "callback_output": st.fixed_dictionaries({"api": st.integers(0, 3), "data": pick(["34 12 00 00"], ["x"])}),
        "detections": st.integers(0, 5),
        "max_depth": st.integers(0, 5),
    }
    expectation = st.sampled_from(kinds).flatmap(lambda k: st.fixed_dictionaries({k: val(expect_values[k])}))
    known = {
        "scenario": val(table({"name": st.text(max_size=8)}, {"profile": pick(profile_names(), ["win95", ""])})),
        "thread": val(table({"entry": pick(REFS, BAD_REFS)}, {"argument": st.sampled_from(INTERESTING_INTS)})),
        "module": val(
            st.lists(
                table(
                    {"name": pick(["app"], ["lib", "ntdll", "9x"]), "code": pick(CODE, BAD_CODE)},
                    {"data": pick(DATA, ["zz", ".ascii 'x'"])},
                ),
                min_size=1,
                max_size=1 if not wild else 2,
            )
        ),
    }
    optional = {
        "services": val(services),
        "kernel_callback_table": val(
            st.dictionaries(st.sampled_from(["0", "1", "2", "3"]), pick(REFS, BAD_REFS), max_size=3)
            | st.fixed_dictionaries({"size": st.integers(1, 8), "2": pick(REFS, BAD_REFS)}),
            st.dictionaries(st.sampled_from(["size", "x", "9999"]), anything),
        ),
        "budgets": val(
            table(
                {},
                {
                    "instructions": val(st.integers(1, 10**6), st.integers(-1, 10**13)),
                    "wall_time": val(st.floats(0.01, 10), st.floats(allow_nan=True) | st.integers()),
                    "callback_depth": val(st.integers(1, 8), st.integers(0, 2**21)),
                    "states": val(st.integers(1, 10), st.integers(-1, 0)),
                    "output_bytes": val(st.integers(1, 100)),
                    "memory": val(st.integers(1 << 16, 1 << 31)),
                },
            )
        ),
        "profile": val(
            table(
                {},
                {
                    "callback_stack_cost": val(st.integers(0x3000, 0x6000), st.integers(-1, 2**33)),
                    "callback_output_limit": val(st.integers(0, 16), st.integers(-1, 2**33)),
                    "dispatcher": pick(["stack", "registers"], ["heap"]),
                    "stub": pick(["win7", "win10"], ["x"]),
                    "ssn": st.dictionaries(
                        key(["NtClose", "NtUserMessageCall"], ["NtFoo", "Close"]), st.integers(0, 0x1100)
                    ),
                },
            )
        ),
        "machine": val(
            table({}, {"system_call": pick([0, 1], [-1, 2]), "unbound_imports": pick(["error", "trap"], ["x"])})
        ),
        "memory": val(
            st.lists(
                table(
                    {
                        "name": st.sampled_from(["m", "n"]),
                        "start": pick([0x10000, 0x20000, 0xFFFFF000], [0, 0x10001, 2**40]),
                        "size": pick([1, 0x1000, 0x10001], [0, 1 << 30, 1 << 31]),
                    },
                    {"perms": pick(["r", "rw", "rx", "rwx"], ["w", ""])},
                ),
                max_size=2,
            )
        ),
        "expect": val(st.lists(expectation, max_size=3)),
        "ntdll": val(
            table(
                {"path": pick(["bin/ntdll.dll"], ["/etc/passwd", "../x", "", "bin"])},
                {"base": val(st.sampled_from([0x7FF0_0000_0000, 0x1000_0000]), st.integers(-1, 2**48))},
            )
        ),
        "pe": val(
            st.lists(
                table(
                    {"path": pick(["bin/program.dll", "bin/callbacks.dll"], ["nope.dll"])},
                    {"name": st.text(max_size=6)},
                ),
                max_size=2,
            )
        ),
    }
    if wild:
        return st.fixed_dictionaries({}, optional=known | optional)
    return st.fixed_dictionaries(known, optional=optional)


DOCUMENTS = documents(wild=False) | documents(wild=True)
