"""``@record``: a dataclass whose generated methods are made on first use, not at import.

``dataclasses.dataclass`` writes ``__init__``, ``__repr__``, ``__eq__`` and ``__hash__`` as
source text and compiles each with ``exec`` when the class statement runs: about a
millisecond per frozen class, most of ``emu run``'s import time for the ~100 records it
imports, although one run calls ``__init__`` on fewer than half of them and ``__repr__``,
``__eq__`` or ``__hash__`` on almost none.

``@record`` takes the same arguments as ``@dataclass`` (``frozen``, ``eq``, ``kw_only``,
``init``, ``repr``). The class statement only collects the fields (``dataclasses.fields``,
``replace`` and ``asdict`` work at once, and ``__dataclass_params__`` says what was asked
for); each of the four methods is a placeholder until it is first called, when it is written
as ``@dataclass`` would have written it and put on the class: ``__init__`` here, from the
same text the standard library makes (one ``exec``), the others by the standard library
itself, on a scratch class with the same fields. A frozen record's ``__setattr__`` and
``__delattr__`` are set at once; they do what the ones ``@dataclass`` writes do. The checks
``@dataclass`` makes when the class is made (a field without a default after one with; frozen
and non-frozen bases) are made then too, with the same messages.

A class without a docstring gets the full ``@dataclass`` at once: its ``__doc__`` is made
from ``__init__``'s signature. ``order``, ``unsafe_hash`` and ``slots`` are not offered (use
``@dataclass`` for those).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from types import MethodType
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["record"]

T = TypeVar("T", bound=type)


@overload
def record(cls: T, /) -> T: ...


@overload
def record(
    *, init: bool = True, repr: bool = True, eq: bool = True, frozen: bool = False, kw_only: bool = False
) -> Callable[[T], T]: ...


@dataclass_transform(field_specifiers=(dataclasses.field, dataclasses.Field))
def record(
    cls: T | None = None, /, *, init: bool = True, repr: bool = True, eq: bool = True, frozen: bool = False,
    kw_only: bool = False,
) -> T | Callable[[T], T]:  # fmt: skip
    """Make ``cls`` a dataclass (as ``@dataclass(...)`` with the same arguments) whose methods are written on first use."""

    def wrap(c: T) -> T:
        return _make(c, init=init, repr=repr, eq=eq, frozen=frozen, kw_only=kw_only)

    return wrap if cls is None else wrap(cls)


def _make(cls: T, *, init: bool, repr: bool, eq: bool, frozen: bool, kw_only: bool) -> T:
    if not cls.__doc__:  # dataclass would make the docstring from __init__'s signature: let it
        dataclasses.dataclass(cls, init=init, repr=repr, eq=eq, frozen=frozen, kw_only=kw_only)
        return cls
    own = cls.__dict__
    # What @dataclass would add (it never replaces a method the class body defines).
    wanted = [
        name
        for name, on in (("__init__", init), ("__repr__", repr), ("__eq__", eq))
        if on and name not in own
    ]  # fmt: skip
    class_hash = own.get("__hash__", dataclasses.MISSING)
    explicit_hash = not (class_hash is dataclasses.MISSING or (class_hash is None and "__eq__" in own))
    # dataclasses' hash table (unsafe_hash False): eq and frozen -> a hash of the fields; eq alone -> unhashable.
    hash_action = None if not eq or explicit_hash else ("add" if frozen else "none")
    _fields_only(cls, frozen, kw_only)
    if init:
        _check_defaults(cls)
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    params.init, params.repr, params.eq, params.frozen = init, repr, eq, frozen  # as @dataclass records them
    if frozen:
        _freeze(cls)
    for name in wanted:
        setattr(cls, name, _placeholder(cls, name, frozen))
    if hash_action == "add":
        cls.__hash__ = _placeholder(cls, "__hash__", frozen)  # type: ignore[method-assign]
    elif hash_action == "none":
        cls.__hash__ = None  # type: ignore[assignment]
    return cls


def _fields_only(cls: type, frozen: bool, kw_only: bool) -> None:
    """Let ``dataclasses`` collect the fields and write no method (not even frozenness's two: :func:`_freeze`)."""
    bases = [getattr(b, "__dataclass_params__", None) for b in cls.__mro__[1:]]
    params = list({id(p): p for p in bases if p is not None}.values())
    if params:  # the checks @dataclass makes, in its words
        if not frozen and any(p.frozen for p in params):
            raise TypeError("cannot inherit non-frozen dataclass from a frozen one")
        if frozen and not any(p.frozen for p in params):
            raise TypeError("cannot inherit frozen dataclass from a non-frozen one")
    lent = [p for p in params if p.frozen]
    for p in lent:  # for the moment of the call: a non-frozen pass over frozen bases is what is wanted here
        p.frozen = False
    try:
        dataclasses.dataclass(cls, init=False, repr=False, eq=False, kw_only=kw_only)
    finally:
        for p in lent:
            p.frozen = True


def _check_defaults(cls: type) -> None:
    """@dataclass's one check of ``__init__``'s parameters, made when the class is, as it makes it."""
    seen_default = False
    for f in dataclasses.fields(cls):
        if not f.init or f.kw_only:
            continue
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")


def _freeze(cls: type) -> None:
    """``__setattr__`` and ``__delattr__`` as a frozen dataclass has them (written out once, here)."""
    names = frozenset(f.name for f in dataclasses.fields(cls))
    owner: Any = cls  # (typed loosely: mypy does not take a variable class as super()'s first argument)
    for name in ("__setattr__", "__delattr__"):
        if name in cls.__dict__:
            raise TypeError(f"Cannot overwrite attribute {name} in class {cls.__name__}")

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is owner or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        super(owner, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is owner or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        super(owner, self).__delattr__(name)

    for fn in (__setattr__, __delattr__):
        fn.__qualname__ = f"{cls.__qualname__}.{fn.__name__}"
        setattr(cls, fn.__name__, fn)


class _Placeholder:
    """A method not written yet: the first call (or a look at its signature) writes it onto the class."""

    __slots__ = ("__name__", "__qualname__", "cls", "frozen", "name")

    def __init__(self, cls: type, name: str, frozen: bool) -> None:
        self.cls, self.name, self.frozen = cls, name, frozen
        self.__name__, self.__qualname__ = name, f"{cls.__qualname__}.{name}"

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        return self if obj is None else MethodType(self, obj)

    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        return _write(self.cls, self.name, self.frozen)(obj, *args, **kwargs)

    @property
    def __signature__(self) -> Any:
        """The written method's (so ``inspect.signature`` and help show the fields before any call)."""
        import inspect

        return inspect.signature(_write(self.cls, self.name, self.frozen))


def _placeholder(cls: type, name: str, frozen: bool) -> Callable[..., Any]:
    return _Placeholder(cls, name, frozen)


def _write(cls: type, name: str, frozen: bool) -> Callable[..., Any]:
    """``name`` as ``@dataclass`` writes it for ``cls``'s fields, now on ``cls``."""
    written = _write_init(cls, frozen) if name == "__init__" else None
    if written is not None:  # the common case, made directly: a scratch dataclass costs three times as much
        setattr(cls, name, written)
        return written
    fields = dataclasses.fields(cls)
    scratch: dict[str, Any] = {
        "__annotations__": {f.name: f.type for f in fields},
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        **{f.name: f for f in fields},
    }
    if hasattr(cls, "__post_init__"):  # the written __init__ calls it when the class has one
        scratch["__post_init__"] = cls.__post_init__
    on_init, on_repr, on_eq = name == "__init__", name == "__repr__", name in ("__eq__", "__hash__")
    # frozen changes only how __init__ stores the fields; a hash comes with eq and unsafe_hash
    model: type = dataclasses.dataclass(
        type(cls.__name__, (), scratch), init=on_init, repr=on_repr, eq=on_eq,
        frozen=frozen and on_init, unsafe_hash=name == "__hash__",
    )  # fmt: skip
    method: Callable[..., Any] = model.__dict__[name]
    setattr(cls, name, method)
    return method


_HAS_FACTORY = getattr(dataclasses, "_HAS_DEFAULT_FACTORY", "<factory>")  # the default shown for a factory's parameter


def _write_init(cls: type, frozen: bool) -> Callable[..., Any] | None:
    """``__init__`` with the text ``@dataclass`` gives it (the standard library's ``_init_fn``), in
    one ``exec``; None for a class with an ``InitVar`` (left to the scratch dataclass)."""
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    pseudo = [f for n, f in cls.__dataclass_fields__.items() if n not in names]  # type: ignore[attr-defined]
    if any("InitVar" in str(f.type) for f in pseudo):
        return None
    me = "__dataclass_self__" if "self" in names else "self"
    env: dict[str, Any] = {
        "__dataclass_HAS_DEFAULT_FACTORY__": _HAS_FACTORY, "__dataclass_builtins_object__": object,
        "__dataclass_return_type__": None,
    }  # fmt: skip
    positional: list[str] = []
    keyword: list[str] = []
    body: list[str] = []
    missing = dataclasses.MISSING
    for f in fields:
        env[f"__dataclass_type_{f.name}__"] = f.type
        dflt = f"__dataclass_dflt_{f.name}__"
        value: str | None = f.name if f.init else None
        if f.default_factory is not missing:
            env[dflt] = f.default_factory
            value = (
                f"{dflt}() if {f.name} is __dataclass_HAS_DEFAULT_FACTORY__ else {f.name}" if f.init else f"{dflt}()"
            )
        elif f.init and f.default is not missing:
            env[dflt] = f.default
        if value is not None:
            store = f"__dataclass_builtins_object__.__setattr__({me},{f.name!r},{value})"
            body.append(store if frozen else f"{me}.{f.name}={value}")
        if f.init:
            default = ""
            if f.default_factory is not missing:
                default = "=__dataclass_HAS_DEFAULT_FACTORY__"
            elif f.default is not missing:
                default = f"={dflt}"
            (keyword if f.kw_only else positional).append(f"{f.name}:__dataclass_type_{f.name}__{default}")
    if hasattr(cls, "__post_init__"):
        body.append(f"{me}.__post_init__()")
    args = ",".join([me, *positional, *(["*", *keyword] if keyword else [])])
    lines = "\n".join(f"  {line}" for line in body or ["pass"])
    text = (
        f"def __create_fn__({', '.join(env)}):\n"
        f" def __init__({args})->__dataclass_return_type__:\n{lines}\n"
        " return __init__"
    )
    module = sys.modules.get(cls.__module__)
    space: dict[str, Any] = {}
    # (compiled without this module's `from __future__ import annotations`, as dataclasses compiles it)
    exec(compile(text, "<string>", "exec", dont_inherit=True), module.__dict__ if module is not None else {}, space)
    made: Callable[..., Any] = space["__create_fn__"](**env)
    made.__qualname__ = f"{cls.__qualname__}.__init__"
    return made
