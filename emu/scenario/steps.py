"""Service scripts: callback, return and choice steps (choices nest, inline or as named blocks)."""

from __future__ import annotations

from typing import Any

from emu.profile import Profile
from emu.scenario.layout import API, SERVICE, SSN, STEP_KINDS, STEPS
from emu.scenario.model import (
    OUTPUT_USES,
    CallbackStep,
    ChoiceStep,
    ObjectStep,
    ReturnStep,
    ServiceScript,
    Step,
    WriteStep,
)
from emu.scenario.reader import _NAME, _dotted, _kind, _Reader
from emu.scenario.symbolic import MAX_WRITE_OFFSET, Names, read_arg, read_data, read_status


def _services(
    r: _Reader,
    obj: Any,
    profile: Profile,
    table_size: int,
    check_numbers: bool = True,
    threads: tuple[str, ...] = (),
    objects: tuple[str, ...] = (),
) -> dict[str, ServiceScript]:
    r.table(obj, ("services",), {k: "" for k in obj} if isinstance(obj, dict) else {})
    out: dict[str, ServiceScript] = {}
    names = Names()  # symbolic names, across all services
    for name, body in obj.items():
        path: tuple[str | int, ...] = ("services", name)
        if not name.startswith("Nt") or not _NAME.match(name):
            raise r.fail(path, "expected a service name in the Nt spelling, e.g. NtUserMessageCall")
        if name in ("NtCallbackReturn", "NtTerminateThread"):
            raise r.fail(path, f"{name} is built into the kernel model and cannot be scripted")
        r.table(body, path, SERVICE.allowed, SERVICE.required)
        ssn = SSN.read(r, body, "ssn", path, -1)
        if check_numbers and ssn < 0 and name not in profile.ssn:
            raise r.fail(path, f"{name} has no number in profile {profile.name}: give 'ssn = 0x...'")
        blocks = body.get("blocks", {})
        if not isinstance(blocks, dict):
            raise r.fail(path + ("blocks",), f"expected a table of named step arrays, got {_kind(blocks)}")
        reader = _StepReader(r, table_size, path, blocks, threads, objects, names)
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


class _StepReader:
    """Reads step arrays; choices nest (inline arrays or names of ``blocks``), to a bounded depth."""

    def __init__(
        self,
        r: _Reader,
        table_size: int,
        service: tuple[str | int, ...],
        blocks: dict[str, Any],
        threads: tuple[str, ...] = (),
        objects: tuple[str, ...] = (),
        names: Names | None = None,
    ) -> None:
        self.names = names or Names()
        self.threads = threads
        self.objects = objects
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
                out.append(self._return(st, sp))
            elif kind == "choice":
                out.append(self._choice(st, sp))
            elif kind == "write":
                out.append(self._write(st, sp))
            elif kind in ("wait", "set", "release", "send"):
                out.append(self._object(kind, st, sp))
            else:
                raise r.fail(sp + ("kind",), f"expected {STEP_KINDS}, got {_kind(kind)}")
        return tuple(out)

    def _return(self, st: dict[str, Any], sp: tuple[str | int, ...]) -> ReturnStep:
        r = self.r
        r.table(st, sp, STEPS["return"].allowed, STEPS["return"].required)
        v = st["status"]
        if isinstance(v, dict):
            default, decl = read_status(r, v, sp + ("status",))
            self.names.claim(r, decl.name, "a status", sp + ("status",))
            if "output" in st:
                raise r.fail(sp + ("output",), "a symbolic status cannot also use the callback's output")
            return ReturnStep(default, symbolic=decl)
        status = None if v == "callback" else r.status(v, sp + ("status",), ('"callback"',))
        output = r.str_(st, "output", sp, "")
        if "output" in st and output not in OUTPUT_USES:
            raise r.fail(sp + ("output",), f"expected one of {', '.join(map(repr, OUTPUT_USES))}, got {output!r}")
        return ReturnStep(status, output=output)

    def _callback(self, st: dict[str, Any], sp: tuple[str | int, ...]) -> CallbackStep:
        r = self.r
        r.table(st, sp, STEPS["callback"].allowed, STEPS["callback"].required)
        raw = st["api"]
        apis = raw if isinstance(raw, list) and raw else [raw]
        for api in apis:
            where = sp + ("api",)
            if not isinstance(api, int) or isinstance(api, bool) or not 0 <= api <= 0xFFFF_FFFF:
                raise r.fail(where, f"expected an api number or a non-empty array of them, got {_kind(api)}")
            if api >= self.table_size:
                raise r.fail(
                    where, f"callback index {api} is out of range (kernel_callback_table size {self.table_size})"
                )
        if "data" in st and "text" in st:
            raise r.fail(sp, "give either 'data' or 'text', not both")
        if isinstance(st.get("data"), dict):
            data, name = read_data(r, st["data"], sp + ("data",))
            self.names.claim(r, name, f"a callback input of {len(data)} byte(s)", sp + ("data",))
            return CallbackStep(apis[0], data, by_depth=tuple(apis) if isinstance(raw, list) else (), symbolic=name)
        data = r.hexdata(st["data"], sp + ("data",)) if "data" in st else r.str_(st, "text", sp, "").encode()
        return CallbackStep(apis[0], data, by_depth=tuple(apis) if isinstance(raw, list) else ())

    def _write(self, st: dict[str, Any], sp: tuple[str | int, ...]) -> WriteStep:
        r = self.r
        spec = STEPS["write"]
        r.table(st, sp, spec.allowed, spec.required)
        arg = read_arg(r, st["at"], sp + ("at",))
        offset = r.int_(st, "offset", sp, 0, 0, MAX_WRITE_OFFSET)
        raw = st["data"]
        if isinstance(raw, dict):
            data, name = read_data(r, raw, sp + ("data",))
            self.names.claim(r, name, f"a write of {len(data)} byte(s)", sp + ("data",))
            return WriteStep(arg, data, offset, symbolic=name)
        data = r.hexdata(raw, sp + ("data",))
        if not data:
            raise r.fail(sp + ("data",), "expected at least one byte to write")
        return WriteStep(arg, data, offset)

    def _object(self, kind: str, st: dict[str, Any], sp: tuple[str | int, ...]) -> ObjectStep:
        r = self.r
        if kind == "send":
            send = STEPS["send"]
            r.table(st, sp, send.allowed, send.required)
            to = r.str_(st, "to", sp)
            if to not in self.threads:
                raise r.fail(sp + ("to",), f"no thread named {to!r} (threads: {', '.join(self.threads) or 'none'})")
            api = API.read(r, st, "api", sp)
            if api >= self.table_size:
                raise r.fail(
                    sp + ("api",),
                    f"callback index {api} is out of range (kernel_callback_table size {self.table_size})",
                )
            data = r.hexdata(st["data"], sp + ("data",)) if "data" in st else r.str_(st, "text", sp, "").encode()
            return ObjectStep("send", to, api=api, data=data)
        r.table(st, sp, STEPS[kind].allowed, STEPS[kind].required)
        name = r.str_(st, "object", sp)
        if name not in self.objects:
            raise r.fail(sp + ("object",), f"no object named {name!r} (objects: {', '.join(self.objects) or 'none'})")
        timeout = st.get("timeout", False)
        if not isinstance(timeout, bool):
            raise r.fail(sp + ("timeout",), f"expected true or false, got {_kind(timeout)}")
        return ObjectStep(kind, name, timeout=timeout)  # type: ignore[arg-type]

    def _choice(self, st: dict[str, Any], sp: tuple[str | int, ...]) -> ChoiceStep:
        r = self.r
        r.table(st, sp, STEPS["choice"].allowed, STEPS["choice"].required)
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
