"""emu's kernel-model stream: what a dumped process needs, beyond its memory and contexts, to run on.

A user-mode dump holds the user side of every thread; the kernel side (KTHREAD.CallbackStack,
a system call entered but not yet served, a wait, the state of events and mutants) lives
in the kernel and no user-mode dump holds it. emu writes its model's part into a stream of
its own, ``EmuKernelStream`` (type 0x454D5502: 'EMU' + 2, above LastReservedStream as MS
``minidumpapiset.h`` leaves user streams), so that ``emu run --from-dump`` can go on from
the dumped state exactly. UTF-8 JSON, keys sorted; registers as lists in UserContext order
(rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8-r15, rip, rflags)::

    {"format": "emu-kernel", "version": 1,
     "state": {"id": 3, "kind": "syscall", "thread": 0},    # the recorded state the dump is of
                                                           # (a "fault" state adds "fault": the error;
                                                           # a fault in the kernel before its exception
                                                           # is delivered adds "raising": {"record":
                                                           # "<EXCEPTION_RECORD hex>", "fast_fail": false})
     "profile": {"name": "win10-22h2", "dispatcher": "stack", "ssn": {"NtCallbackReturn": 5, ...}},
     "current": 0, "max_depth": 1,
     "threads": [{"index": 0, "name": "thread0", "teb": ..., "stack_base": ..., "stack_limit": ...,
                  "started": true, "terminated": false, "exit_status": null,
                  "mode": "kernel", "service": "NtUserMessageCall", "pending": true,
                  "callback_stack": [{"api": 2, "user_frame": ..., "message": null,
                                      "trap": {"context": [...], "via": "syscall"},
                                      "service": <activation>}],
                  "suspended": null | {"kind": "entry" | "blocked", "trap": ..., "activation": ...,
                                       "resumed": false, "note": "", "on": [...], "timeout": false,
                                       "wake": <value>, "woken": false}}],
     "objects": {"objects": [{"handle": 256, "kind": "event", "name": "go", "manual_reset": false,
                              "signaled": false} | {"handle": ..., "kind": "mutant", "name": ...,
                              "owner": 1, "count": 1}],
                 "queues": [[thread, [<message>...]]], "waiters": [[handle, [thread...]]], "next_message": 1},
     "traps": [[address, "dll!name", "importer", "why it is unbound"]]}    # imports bound to traps

An activation is a scripted service's position, ``{"kind": "script", "service": name,
"levels": [[null, 1], ["option", 0]], "last": [status, "hex", result, length] | null}`` (the step index at
each level; below the first, the option of the choice that opened it), or a Python
service's journal, ``{"kind": "python", "service": name, "args": [...], "sent": [<value>...],
"reads": ["hex" or null, ...], "requests": ["repr", ...]}`` (replayed into a fresh generator, as forks
do; a replay that yields other requests than ``requests`` is refused). A value sent into a
service is ``null``, ``{"option": name}``, ``{"status": s, "output": "hex"}`` or
``{"message": [id, sender, receiver, api, "hex"]}`` or ``{"value": n}`` (a symbolic request's value). Scripts are looked up by name in the
scenario the run from the dump uses, so that the scenario serves what comes next.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeGuard

from emu.context import KTrapFrame, UserContext
from emu.kernel.objects import Event, Message, Mutant, ObjectTable
from emu.kernel.services import Activation, CallbackResult, ScriptActivation, ScriptStep, Sent, ServiceRegistry
from emu.kernel.services import ChoiceStep as KChoiceStep
from emu.kernel.thread import CallbackFrame, KThread, Suspended

if TYPE_CHECKING:
    from emu.kernel.core import Kernel
    from emu.kernel.services import ServiceContext

KERNEL_STREAM_FORMAT = "emu-kernel"
KERNEL_STREAM_VERSION = 1
STATE_KINDS = (
    "initial", "syscall", "sysret", "callback", "callback_return", "block", "exit", "fault", "exception", "continue",
    "unwind",
)  # fmt: skip
VIAS = ("syscall", "int 2Eh")
Fail = Callable[[str], NoReturn]
Json = dict[str, object]


# --- writing -------------------------------------------------------------------------------
def _regs(ctx: UserContext | tuple[int, ...]) -> list[int]:
    return [int(v) for v in ctx]


def _trap(trap: KTrapFrame) -> Json:
    return {"context": _regs(trap.ctx), "via": trap.via}


def _value(v: Sent | Message) -> object:
    if v is None:
        return None
    if isinstance(v, str):
        return {"option": v}
    if isinstance(v, int):
        return {"value": v}  # a symbolic request's concrete value (emu.kernel.symbolic)
    if isinstance(v, CallbackResult):
        return {"status": v.status, "output": v.output.hex(), "result": v.result, "length": v.length}
    return {"message": [v.id, v.sender, v.receiver, v.api, v.data.hex()]}


def _activation(act: Activation | ScriptActivation) -> Json:
    if isinstance(act, ScriptActivation):
        levels: list[list[object]] = []
        for k, (steps, i) in enumerate(act.stack):
            option = None
            if k:
                below, at = act.stack[k - 1]
                choice = below[at - 1]  # the choice that opened this level (the index moved past it)
                if isinstance(choice, KChoiceStep):
                    option = next((n for n, s in choice.options if s is steps), None)
            levels.append([option, i])
        last = None if act.last is None else [act.last.status, act.last.output.hex(), act.last.result, act.last.length]
        doc: Json = {"kind": "script", "service": act.spec.name, "levels": levels, "last": last}
        if act.args and act.spec.script_args:  # the arguments its write steps use (emu.kernel.user_write)
            doc["args"] = list(act.args)
        return doc
    return {
        "kind": "python", "service": act.spec.name, "args": list(act.args),
        "sent": [_value(v) for v in act.sent], "reads": [None if r is None else r.hex() for r in act.ctx.reads],
        "requests": [repr(r) for r in act.requests],
    }  # fmt: skip


def _frame(f: CallbackFrame) -> Json:
    return {
        "api": f.api, "user_frame": f.user_frame, "message": f.message_id, "trap": _trap(f.trap),
        "service": _activation(f.activation),
    }  # fmt: skip


def suspended_doc(s: Suspended) -> Json:
    return {
        "kind": s.kind, "trap": _trap(s.trap), "activation": None if s.activation is None else _activation(s.activation),
        "resumed": s.resumed, "note": s.note, "on": list(s.on), "timeout": s.timeout, "wake": _value(s.wake),
        "woken": s.woken,
    }  # fmt: skip


def thread_doc(t: KThread, service: str | None, pending: bool, suspended: Suspended | None) -> Json:
    """One thread's kernel side; ``suspended`` replaces the thread's own (the capture knows what comes next)."""
    return {
        "index": t.tid, "name": t.name, "teb": t.teb, "stack_base": t.stack_base, "stack_limit": t.stack_limit,
        "started": t.started, "terminated": t.terminated, "exit_status": t.exit_status, "mode": t.mode,
        "service": service, "pending": pending, "entry_context": _regs(t.entry_context),
        "callback_stack": [_frame(f) for f in t.callback_stack],
        "suspended": None if suspended is None else suspended_doc(suspended),
    }  # fmt: skip


def objects_doc(table: ObjectTable) -> Json:
    objs: list[Json] = []
    for h, o in sorted(table.objects.items()):
        if isinstance(o, Event):
            objs.append({"handle": h, "kind": "event", "name": o.name, "manual_reset": o.manual_reset,
                         "signaled": o.signaled})  # fmt: skip
        else:
            objs.append({"handle": h, "kind": "mutant", "name": o.name, "owner": o.owner, "count": o.count})
    return {
        "objects": objs,
        "queues": [[t, [_value(m) for m in q]] for t, q in sorted(table.queues.items()) if q],
        "waiters": [[h, list(w)] for h, w in sorted(table.waiters.items()) if w],
        "next_message": table.next_message,
    }


def encode(doc: Json) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


# --- reading -------------------------------------------------------------------------------
def _int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


class KernelDoc:
    """A parsed stream, checked as it is read; anything unexpected goes to ``fail`` (one line)."""

    def __init__(self, data: bytes, fail: Fail) -> None:
        self.fail = fail
        try:
            doc = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            fail(f"not emu's JSON ({type(e).__name__})")
        if not isinstance(doc, dict) or doc.get("format") != KERNEL_STREAM_FORMAT:
            fail(f"not an {KERNEL_STREAM_FORMAT!r} stream")
        if doc.get("version") != KERNEL_STREAM_VERSION:
            fail(f"version {doc.get('version')!r} is not {KERNEL_STREAM_VERSION}")
        self.doc: Json = doc
        state = self.table(doc, "state")
        self.kind = self.choice(state, "kind", STATE_KINDS, "state")
        self.state_id = self.number(state, "id", "state")
        self.state_thread = self.number(state, "thread", "state")
        profile = self.table(doc, "profile")
        self.profile_name = self.text(profile, "name", "profile")
        self.dispatcher = self.text(profile, "dispatcher", "profile")
        ssn = self.table(profile, "ssn", "profile")
        if not all(isinstance(k, str) and _int(v) and v <= 0xFFFF for k, v in ssn.items()):
            fail("profile.ssn must map service names to numbers up to 0xffff")
        self.ssn: dict[str, int] = {str(k): int(str(v)) for k, v in ssn.items()}
        cur = doc.get("current")
        self.current = None if cur is None else self.number(doc, "current", "")
        self.max_depth = self.number(doc, "max_depth", "")
        fault = state.get("fault", "")
        if not isinstance(fault, str):
            fail("state.fault must be a string")
        self.fault = fault
        raising = state.get("raising")
        self.raising: tuple[bytes, bool] | None = None
        if raising is not None:
            r = self.table_of(raising, "state.raising")
            self.raising = (
                self.hexbytes(r.get("record"), "state.raising.record"),
                self.flag(r, "fast_fail", "state.raising"),
            )
        traps = doc.get("traps", [])
        if not isinstance(traps, list) or not all(
            isinstance(t, list) and len(t) == 4 and _int(t[0]) and all(isinstance(x, str) for x in t[1:]) for t in traps
        ):
            fail("'traps' must be a list of [address, label, importer, reason]")
        self.traps: dict[int, tuple[str, str, str]] = {int(t[0]): (t[1], t[2], t[3]) for t in traps}
        threads = doc.get("threads")
        if not isinstance(threads, list) or not threads:
            fail("'threads' must be a non-empty list")
        self.threads: list[Json] = [self.table_of(t, f"threads[{i}]") for i, t in enumerate(threads)]

    # --- typed access ---------------------------------------------------------------------
    def table_of(self, v: object, where: str) -> Json:
        if not isinstance(v, dict):
            self.fail(f"{where} is not an object")
        return v

    def table(self, d: Json, key: str, where: str = "") -> Json:
        return self.table_of(d.get(key), f"{where}.{key}" if where else key)

    def number(self, d: Json, key: str, where: str) -> int:
        v = d.get(key)
        if not _int(v):
            self.fail(f"{where + '.' if where else ''}{key} must be an integer, got {v!r}"[:200])
        return v

    def text(self, d: Json, key: str, where: str) -> str:
        v = d.get(key)
        if not isinstance(v, str):
            self.fail(f"{where}.{key} must be a string")
        return v

    def flag(self, d: Json, key: str, where: str) -> bool:
        v = d.get(key)
        if not isinstance(v, bool):
            self.fail(f"{where}.{key} must be true or false")
        return v

    def choice(self, d: Json, key: str, allowed: tuple[str, ...], where: str) -> str:
        v = d.get(key)
        if v not in allowed:
            self.fail(f"{where}.{key} is {v!r}, expected one of {', '.join(allowed)}"[:240])
        return str(v)

    def hexbytes(self, v: object, where: str) -> bytes:
        if not isinstance(v, str):
            self.fail(f"{where} must be a hex string")
        try:
            return bytes.fromhex(v)
        except ValueError:
            self.fail(f"{where} is not hex")

    def context(self, v: object, where: str) -> UserContext:
        if not (isinstance(v, list) and len(v) == len(UserContext._fields) and all(_int(x) for x in v)):
            self.fail(f"{where} must be {len(UserContext._fields)} register values")
        return UserContext._make(v)

    def trap(self, v: object, where: str) -> KTrapFrame:
        d = self.table_of(v, where)
        return KTrapFrame(self.context(d.get("context"), f"{where}.context"), self.choice(d, "via", VIAS, where))

    def value(self, v: object, where: str) -> Sent | Message:
        if v is None:
            return None
        d = self.table_of(v, where)
        if "option" in d:
            return self.text(d, "option", where)
        if "value" in d:
            return self.number(d, "value", where)
        if "message" in d:
            m = d["message"]
            if not (isinstance(m, list) and len(m) == 5 and all(_int(x) for x in m[:4])):
                self.fail(f"{where}.message must be [id, sender, receiver, api, hex]")
            return Message(int(m[0]), int(m[1]), int(m[2]), int(m[3]), self.hexbytes(m[4], f"{where}.message[4]"))
        out = self.hexbytes(d.get("output", ""), f"{where}.output")
        # NtCallbackReturn's Result pointer and length (absent: none handed on)
        result = self.number(d, "result", where) if "result" in d else 0
        length = self.number(d, "length", where) if "length" in d else 0
        return CallbackResult(self.number(d, "status", where), out, result, length)

    # --- the kernel model -------------------------------------------------------------------
    def activation(
        self, v: object, where: str, registry: ServiceRegistry, ctx: ServiceContext
    ) -> Activation | ScriptActivation:
        d = self.table_of(v, where)
        name = self.text(d, "service", where)
        spec = registry.get(name)
        kind = self.choice(d, "kind", ("script", "python"), where)
        if spec is None or (spec.script is None) != (kind == "python"):
            how = "scripted [services." + name + "] steps" if kind == "script" else "a Python service " + name
            self.fail(f"{where}: the dumped thread is inside {name}, and the scenario has no {how} to go on with")
        if kind == "python":
            args, sent = d.get("args"), d.get("sent")
            reads = d.get("reads")
            if not (isinstance(args, list) and all(_int(a) for a in args) and len(args) == len(spec.arg_types)):
                self.fail(f"{where}.args must be {len(spec.arg_types)} integers ({name}'s arguments)")
            if not isinstance(sent, list) or not isinstance(reads, list):
                self.fail(f"{where}: 'sent' and 'reads' must be lists")
            values = [self.value(s, f"{where}.sent[{i}]") for i, s in enumerate(sent)]
            # A read of unreadable memory is journaled as None (null in the stream).
            data = [None if r is None else self.hexbytes(r, f"{where}.reads[{i}]") for i, r in enumerate(reads)]
            requests = d.get("requests", [])  # what it yielded (absent from older files: not checked)
            if not isinstance(requests, list) or not all(isinstance(r, str) for r in requests):
                self.fail(f"{where}: 'requests' must be a list of strings")
            return Activation.replay(spec, ctx, list(args), values, data, requests)
        script = spec.script
        assert script is not None  # checked above: a script's kind
        levels = d.get("levels")
        if not isinstance(levels, list) or not levels:
            self.fail(f"{where}.levels must be a non-empty list")
        stack: list[tuple[tuple[ScriptStep, ...], int]] = []
        steps: tuple[ScriptStep, ...] = script
        for k, level in enumerate(levels):
            if not (isinstance(level, list) and len(level) == 2 and _int(level[1])):
                self.fail(f"{where}.levels[{k}] must be [option, index]")
            option, i = level
            if k:
                below, at = stack[-1]
                choice = below[at - 1] if 0 < at <= len(below) else None
                if not isinstance(choice, KChoiceStep) or not isinstance(option, str):
                    self.fail(f"{where}.levels[{k}]: [services.{name}] has no choice there (the scenario differs)")
                branch = next((s for n, s in choice.options if n == option), None)
                if branch is None:
                    self.fail(f"{where}.levels[{k}]: choice {choice.name!r} has no option {option!r}")
                steps = branch
            if i > len(steps):
                self.fail(f"{where}.levels[{k}]: step {i} is past the {len(steps)} steps of [services.{name}]")
            stack.append((steps, i))
        args = d.get("args", [])
        if not (isinstance(args, list) and all(_int(a) for a in args)):
            self.fail(f"{where}.args must be a list of integers (the service's arguments)")
        act = ScriptActivation(spec, stack, ctx, list(args))
        last = d.get("last")
        if last is not None:
            # NtCallbackReturn's Status, the bytes recorded, and the Result pointer and length it
            # handed on (a later `output = "copy"` step copies from that pointer).
            if not (isinstance(last, list) and len(last) == 4 and all(_int(v) for v in (last[0], last[2], last[3]))):
                self.fail(f"{where}.last must be [status, hex, result, length] or null")
            out = self.hexbytes(last[1], f"{where}.last[1]")
            act.last = CallbackResult(int(last[0]), out, int(last[2]), int(last[3]))
        return act

    def frames(self, t: Json, where: str, registry: ServiceRegistry, ctx: ServiceContext) -> list[CallbackFrame]:
        frames = t.get("callback_stack")
        if not isinstance(frames, list):
            self.fail(f"{where}.callback_stack must be a list")
        out = []
        for j, f in enumerate(frames):
            w = f"{where}.callback_stack[{j}]"
            d = self.table_of(f, w)
            msg = d.get("message")
            if msg is not None and not _int(msg):
                self.fail(f"{w}.message must be an integer or null")
            act = self.activation(d.get("service"), f"{w}.service", registry, ctx)
            trap = self.trap(d.get("trap"), f"{w}.trap")
            out.append(CallbackFrame(act, trap, self.number(d, "api", w), self.number(d, "user_frame", w), msg))
        return out

    def suspended(self, v: object, where: str, registry: ServiceRegistry, ctx: ServiceContext) -> Suspended | None:
        if v is None:
            return None
        d = self.table_of(v, where)
        kind = self.choice(d, "kind", ("entry", "blocked"), where)
        act = d.get("activation")
        on = d.get("on")
        if not isinstance(on, list) or not all(isinstance(x, str) or _int(x) for x in on):
            self.fail(f"{where}.on must be a list of names and numbers")
        return Suspended(
            "entry" if kind == "entry" else "blocked", self.trap(d.get("trap"), f"{where}.trap"),
            None if act is None else self.activation(act, f"{where}.activation", registry, ctx),
            self.flag(d, "resumed", where), self.text(d, "note", where), tuple(on), self.flag(d, "timeout", where),
            self.value(d.get("wake"), f"{where}.wake"), self.flag(d, "woken", where),
        )  # fmt: skip

    def objects(self) -> ObjectTable:
        d = self.table(self.doc, "objects")
        table = ObjectTable(next_message=self.number(d, "next_message", "objects"))
        items = d.get("objects")
        if not isinstance(items, list):
            self.fail("objects.objects must be a list")
        for i, o in enumerate(items):
            w = f"objects.objects[{i}]"
            od = self.table_of(o, w)
            handle, name = self.number(od, "handle", w), self.text(od, "name", w)
            if self.choice(od, "kind", ("event", "mutant"), w) == "event":
                table.objects[handle] = Event(name, self.flag(od, "manual_reset", w), self.flag(od, "signaled", w))
            else:
                owner = od.get("owner")
                if owner is not None and not _int(owner):
                    self.fail(f"{w}.owner must be a thread index or null")
                table.objects[handle] = Mutant(name, owner, self.number(od, "count", w))
        for key in ("queues", "waiters"):
            pairs = d.get(key)
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and _int(p[0]) and isinstance(p[1], list) for p in pairs
            ):
                self.fail(f"objects.{key} must be a list of [number, list] pairs")
            for k, (n, items2) in enumerate(pairs):
                if key == "waiters":
                    if not all(_int(x) for x in items2):
                        self.fail(f"objects.waiters[{k}] must list thread indexes")
                    table.waiters[n] = list(items2)
                else:
                    msgs = [self.value(m, f"objects.queues[{k}][{j}]") for j, m in enumerate(items2)]
                    if not all(isinstance(m, Message) for m in msgs):
                        self.fail(f"objects.queues[{k}] must list messages")
                    table.queues[n] = [m for m in msgs if isinstance(m, Message)]
        return table


def live_doc(
    kernel: Kernel, state: Json, profile: Json, threads: list[Json], current: int | None
) -> Json:  # fmt: skip
    """The whole stream document (see the module notes)."""
    return {
        "format": KERNEL_STREAM_FORMAT, "version": KERNEL_STREAM_VERSION, "state": state, "profile": profile,
        "current": current, "max_depth": kernel.max_depth, "threads": threads, "objects": objects_doc(kernel.objects),
    }  # fmt: skip
