"""Every table a scenario file may hold, declared once: the reader takes its allowed keys and
bounds from here, and :mod:`emu.scenario.schema` writes the same tables out as JSON Schema.

Tables that are a model dataclass (``[budgets]``, ``[[module]]``, ``[[thread]]``,
``[[object]]``, ``[[memory]]``, ``[[pe]]``) come from the dataclass's fields; the others
(``[scenario]``, ``[machine]``, ``[profile]``, services and their steps) are declared here.
"""

from __future__ import annotations

from emu.profile import OVERRIDABLE, PROFILE_CHOICES, profile_names
from emu.scenario.expectations import EXPECTATIONS, NOTE
from emu.scenario.keys import JSON, Boolean, HexBytes, Integer, Key, Schema, Status, Table, Text, table_of
from emu.scenario.model import OUTPUT_USES, Budgets, MemorySpec, ModuleSpec, ObjectSpec, PeSpec, ThreadSpec
from emu.scenario.reader import _ID
from emu.scenario.symbolic import ARG_PATTERN, DATA_SCHEMA, MAX_WRITE_OFFSET, STATUS_SCHEMA

MAX_TABLE = 4096  # emu's cap on KernelCallbackTable entries (not a Windows limit)


def _ref(name: str) -> JSON:
    return {"$ref": f"#/definitions/{name}"}


def _array(of: JSON, at_least: int = 0) -> JSON:
    out: JSON = {"type": "array", "items": of}
    if at_least:
        out["minItems"] = at_least
    return out


SERVICE_NAME = r"^Nt[A-Za-z0-9_]*$"

SCENARIO = Table(
    {
        "name": Key("a string", Text(), required=True),
        "description": Key("a string", Text()),
        "profile": Key("a profile name", Text(words=tuple(profile_names()))),
    }
)
MACHINE = Table(
    {
        "system_call": Key("0 or 1: KUSER_SHARED_DATA.SystemCall", Integer(0, 1)),
        "unbound_imports": Key('"error" or "trap"', Text(words=("error", "trap"))),
        "preempt_at_callback_return": Key(
            "true or false: exploration may preempt a thread at NtCallbackReturn's entry", Boolean()
        ),
        "exceptions": Key(
            '"deliver" (a fault becomes a Windows exception) or "stop" (the run stops at the first fault)',
            Text(words=("deliver", "stop")),
        ),
        "stack_reserve": Key(
            "bytes of each thread stack reserved below its guard page, a multiple of 0x1000 (default 0x1000):"
            " the room its guard page moves down into as the stack grows",
            Integer(0x1000, 0x100_0000),
        ),
    }
)
_WORDS = PROFILE_CHOICES
PROFILE = Table(
    {
        **{
            k: Key(f"a {t.__name__}", Integer(0, 1 << 32) if t is int else Text(words=_WORDS.get(k, ())))
            for k, t in OVERRIDABLE.items()
        },
        "ssn": Key(
            "a table {NtName = number}",
            Schema(
                {
                    "type": "object",
                    "propertyNames": {"pattern": SERVICE_NAME},
                    "additionalProperties": Integer(0, 0xFFFF).schema(),
                }
            ),
        ),
    }
)
BUDGETS = table_of(Budgets)
MODULE = table_of(ModuleSpec)
THREAD = table_of(ThreadSpec)
THREAD_ONE = THREAD.only("entry", "argument", "start")  # [thread]: the one thread, named thread0
THREAD_MANY = THREAD.only("entry", "argument", "start", "name")  # [[thread]], in the reader's order
OBJECT = table_of(ObjectSpec)
MEMORY = table_of(MemorySpec)
PE = table_of(PeSpec).only("path", "base", "name")
NTDLL = PE.only("path", "base")  # the name is ntdll
CALLBACK_TABLE_SIZE = Integer(1, MAX_TABLE)
SSN = Integer(-1, 0xFFFF)  # -1: none given, the profile's number
SERVICE = Table(
    {
        "ssn": Key("a system service number", SSN),
        "steps": Key("an array of steps", Schema(_ref("steps")), required=True),
        "blocks": Key(
            "a table of named step arrays", Schema({"type": "object", "additionalProperties": _ref("steps")})
        ),
    }
)

# --- steps: a table tagged by its "kind" ------------------------------------------------------------------
API = Integer(0, 0xFFFF_FFFF)


def _kind(word: str) -> Key:
    return Key("", Schema({"const": word}), required=True)


STEPS: dict[str, Table] = {
    "callback": Table(
        {
            "kind": _kind("callback"),
            "api": Key(
                "an api number, or an array of them by callback depth (the last repeats)",
                Schema({"anyOf": [API.schema(), _array(API.schema(), 1)]}),
                required=True,
            ),
            "data": Key(
                "hex bytes, or { symbolic = N } (N symbolic bytes)",
                Schema({"anyOf": [HexBytes().schema(), DATA_SCHEMA]}),
            ),
            "text": Key("a string sent as bytes", Text()),
        }
    ),
    "return": Table(
        {
            "kind": _kind("return"),
            "status": Key(
                'an NTSTATUS, "callback", or { symbolic = "name" }',
                Schema({"anyOf": [Status(("callback",)).schema(), STATUS_SCHEMA]}),
                True,
            ),
            "output": Key(
                '"probe" or "copy": use the last callback\'s Result first (a fault: STATUS_ACCESS_VIOLATION)',
                Text(words=OUTPUT_USES),
            ),
        }
    ),
    "choice": Table(
        {
            "kind": _kind("choice"),
            "name": Key("a name", Text(), required=True),
            "default": Key("the option a single run takes", Text()),
            "options": Key(
                'a table {option = [steps] or "block"}',
                Schema(
                    {
                        "type": "object",
                        "minProperties": 1,
                        "additionalProperties": {"anyOf": [{"type": "string"}, _ref("steps")]},
                    }
                ),
                required=True,
            ),
        }
    ),
    "write": Table(
        {
            "kind": _kind("write"),
            "at": Key(
                'the argument holding the address: "arg1".."arg16"',
                Schema({"type": "string", "pattern": ARG_PATTERN}),
                required=True,
            ),
            "offset": Key("bytes past that address", Integer(0, MAX_WRITE_OFFSET)),
            "data": Key(
                "hex bytes, or { symbolic = N } (N symbolic bytes)",
                Schema({"anyOf": [HexBytes().schema(), DATA_SCHEMA]}),
                required=True,
            ),
        }
    ),
    "wait": Table(
        {
            "kind": _kind("wait"),
            "object": Key("an [[object]] name", Text(), required=True),
            "timeout": Key("true: the wait may expire", Boolean()),
        }
    ),
    "set": Table({"kind": _kind("set"), "object": Key("an [[object]] name", Text(), required=True)}),
    "release": Table({"kind": _kind("release"), "object": Key("an [[object]] name", Text(), required=True)}),
    "send": Table(
        {
            "kind": _kind("send"),
            "to": Key("the receiving thread", Text(), required=True),
            "api": Key("its callback", API, required=True),
            "data": Key("hex bytes", HexBytes()),
            "text": Key("a string", Text()),
        }
    ),
}
STEP_KINDS = ", ".join(f'"{k}"' for k in list(STEPS)[:-1]) + f' or "{list(STEPS)[-1]}"'


def _step_schema(kind: str, t: Table) -> JSON:
    out = t.schema()
    if "data" in t.keys and "text" in t.keys:
        out["not"] = {"required": ["data", "text"]}  # either bytes or a string, not both
    return out


def _expect_schema() -> JSON:
    one = []
    for kind, cls in EXPECTATIONS.items():
        v = {"description": cls.help(), **cls.value_schema()}
        one.append(
            {
                "type": "object",
                "properties": {kind: v, "note": {"description": NOTE.help, **NOTE.shape.schema()}},
                "required": [kind],
                "additionalProperties": False,
            }
        )
    return {"description": "exactly one kind of expectation, and an optional note", "oneOf": one}


START = Table({"dump": Key("a minidump file, relative to the scenario", Text())})
PYTHON_REF = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
PYTHON = Table(
    {
        "services": Key(
            '"package.module:name", a ServiceRegistry of Python services (run only with --allow-python)',
            Text(pattern=PYTHON_REF),
        )
    }
)
CALLBACK_TABLE_HELP = 'a table {from = "module!export", size, <index> = "module!label"}'
TOP = Table(
    {
        "scenario": Key(f"a table {SCENARIO.listing}", Schema(SCENARIO.schema()), required=True),
        "profile": Key(f"a table of overrides ({', '.join(PROFILE.keys)})", Schema(PROFILE.schema())),
        "machine": Key(f"a table {MACHINE.listing}", Schema(MACHINE.schema())),
        "budgets": Key(f"a table {BUDGETS.listing}", Schema(BUDGETS.schema())),
        "module": Key(f"an array of tables [[module]] {MODULE.listing}", Schema(_array(MODULE.schema()))),
        "thread": Key(
            f"a table {THREAD_ONE.listing}, or an array of tables [[thread]] {THREAD.listing}",
            Schema({"oneOf": [THREAD_ONE.schema(), _array(THREAD_MANY.schema(), 1)]}),
        ),  # required unless [start] dump gives the threads (emu.scenario.parse checks that)
        "object": Key(f"an array of tables [[object]] {OBJECT.listing}", Schema(_array(OBJECT.schema()))),
        "kernel_callback_table": Key(
            CALLBACK_TABLE_HELP,
            Schema(
                {
                    "type": "object",
                    "properties": {
                        "from": {"type": "string", "pattern": r"^[^!]+![^!]+$"},
                        "size": CALLBACK_TABLE_SIZE.schema(),
                    },
                    "patternProperties": {r"^[0-9]+$": {"type": "string", "pattern": _ID.pattern}},
                    "additionalProperties": False,
                }
            ),
        ),
        "services": Key(
            f"a table of [services.NtName] {SERVICE.listing}",
            Schema(
                {
                    "type": "object",
                    "propertyNames": {
                        "pattern": SERVICE_NAME,
                        "not": {"enum": ["NtCallbackReturn", "NtTerminateThread"]},  # built into the kernel model
                    },
                    "additionalProperties": SERVICE.schema(),
                }
            ),
        ),
        "expect": Key("an array of tables [[expect]]", Schema(_array(_ref("expect")))),
        "memory": Key(f"an array of tables [[memory]] {MEMORY.listing}", Schema(_array(MEMORY.schema()))),
        "ntdll": Key(f"a table {NTDLL.listing}: a PE ntdll instead of the built-in one", Schema(NTDLL.schema())),
        "pe": Key(f"an array of tables [[pe]] {PE.listing}: PE modules to load", Schema(_array(PE.schema()))),
        "start": Key(
            'a table {dump = "x.dmp"}: start from a minidump instead of the threads\' entries', Schema(START.schema())
        ),
        "python": Key(f"a table {PYTHON.listing}: Python code the run loads", Schema(PYTHON.schema())),
    }
)


def definitions() -> dict[str, JSON]:
    """The schema's shared parts: step arrays (choices nest) and one ``[[expect]]`` entry."""
    step = {"oneOf": [_step_schema(k, t) for k, t in STEPS.items()]}
    return {"steps": _array(_ref("step")), "step": step, "expect": _expect_schema()}
