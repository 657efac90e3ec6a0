"""``@record`` (emu.records): classes that behave as ``@dataclass`` ones, methods written on first use.

Each check builds the same class twice, once with ``@dataclass`` and once with ``@record``, and
compares what a user can observe: construction, defaults, repr, equality, hashing, frozenness,
``dataclasses.fields``/``replace``/``asdict``, inheritance and ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from emu.records import record


def _pair(frozen: bool, kw_only: bool = False) -> tuple[type[Any], type[Any]]:
    def body() -> dict[str, Any]:
        return {
            "__doc__": "A record.",
            "__annotations__": {"x": "int", "y": "str", "z": "tuple[int, ...]", "k": "ClassVar[int]"},
            "y": "s",
            "z": field(default_factory=tuple, repr=False),
            "k": 3,
            "__module__": __name__,
        }

    std: type[Any] = dataclass(frozen=frozen, kw_only=kw_only)(type("R", (), body()))
    ours = record(frozen=frozen, kw_only=kw_only)(type("R", (), body()))
    return std, ours


@pytest.mark.parametrize("frozen", [True, False])
def test_a_record_behaves_as_the_dataclass_of_the_same_class(frozen: bool) -> None:
    std, ours = _pair(frozen)
    for cls in (std, ours):
        assert [f.name for f in dataclasses.fields(cls)] == ["x", "y", "z"]  # the ClassVar is no field
    a, b = std(1), ours(1)
    assert repr(a) == repr(b) == "R(x=1, y='s')"  # z asked to stay out of the repr
    assert ours(1, "t", (2,)) == ours(1, "t", (2,)) != ours(2)
    assert ours(1) != std(1)  # another class: not equal, as between two dataclasses
    assert dataclasses.asdict(b) == dataclasses.asdict(a) == {"x": 1, "y": "s", "z": ()}
    assert dataclasses.replace(b, y="u") == ours(1, "u")
    assert ours.__match_args__ == std.__match_args__ == ("x", "y", "z")
    assert ours.__dataclass_params__.frozen is frozen and ours.__dataclass_params__.eq is True
    with pytest.raises(TypeError):
        ours()  # x has no default
    if frozen:
        assert hash(ours(1, "t", (2,))) == hash(std(1, "t", (2,))) == hash((1, "t", (2,)))
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'x'"):
            b.x = 2
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field 'y'"):
            del b.y
    else:
        assert ours.__hash__ is None and std.__hash__ is None  # eq without frozen: unhashable
        b.x = 5
        assert b == ours(5)


@record(frozen=True, kw_only=True)
class _Base:
    """Where every kind is: its index."""

    index: int = 0


@record(frozen=True)
class _Leaf(_Base):
    """A kind with one value, checked after construction."""

    kind: ClassVar[str] = "leaf"
    value: int
    notes: list[str] = field(default_factory=list, compare=False)

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError("negative")


def test_inherited_fields_kw_only_defaults_and_post_init() -> None:
    leaf = _Leaf(4, index=2)
    assert repr(leaf) == "_Leaf(index=2, value=4, notes=[])"
    assert leaf == _Leaf(4, index=2, notes=["other"])  # notes take no part in comparing
    assert pickle.loads(pickle.dumps(leaf)) == leaf
    assert leaf.notes is not _Leaf(4).notes  # one new list each
    with pytest.raises(ValueError, match="negative"):
        _Leaf(-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        leaf.index = 3  # type: ignore[misc]


def test_a_record_inherits_frozenness_as_a_dataclass_does() -> None:
    with pytest.raises(TypeError, match="cannot inherit non-frozen dataclass from a frozen one"):

        @record
        class _Thawed(_Base):  # type: ignore[misc]
            """Not frozen, on a frozen base."""

    @record
    class _Open:
        """Not frozen."""

        a: int = 0

    with pytest.raises(TypeError, match="cannot inherit frozen dataclass from a non-frozen one"):

        @record(frozen=True)
        class _Frozen(_Open):  # type: ignore[misc]
            """Frozen, on a base that is not."""

    @dataclass(frozen=True)
    class _Std(_Base):
        """A plain dataclass on a record."""

        b: int = 1

    assert _Std(b=2, index=1) == _Std(index=1, b=2) and repr(_Std()).endswith("_Std(index=0, b=1)")
    # lent to the subclass's pass and given back
    assert _Base.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_methods_the_class_defines_are_kept() -> None:
    @record(frozen=True)
    class _Own:
        """With its own repr and equality."""

        a: int

        def __repr__(self) -> str:
            return "own"

        def __eq__(self, other: object) -> bool:
            return isinstance(other, _Own)

    assert repr(_Own(1)) == "own" and _Own(1) == _Own(2)
    assert hash(_Own(1)) == hash((1,))  # frozen with eq: the fields' hash, as @dataclass adds it


def test_init_has_the_signature_and_body_of_the_dataclass_one() -> None:
    def body() -> dict[str, Any]:
        return {
            "__doc__": "Every kind of field.",
            "__annotations__": {"a": "int", "b": "list[int]", "c": "int", "d": "dict[str, int]", "e": "str"},
            "b": field(default_factory=list),
            "c": field(default=7, init=False),
            "d": field(default_factory=dict, init=False),
            "e": field(default="k", kw_only=True),
            "__module__": __name__,
        }

    for frozen in (True, False):
        std: type[Any] = dataclass(frozen=frozen)(type("S", (), body()))
        ours = record(frozen=frozen)(type("S", (), body()))
        x, y = std(1, e="z"), ours(1, e="z")  # (the first call writes ours)
        made, model = ours.__dict__["__init__"], std.__dict__["__init__"]
        assert inspect.signature(made) == inspect.signature(model)
        assert made.__annotations__ == model.__annotations__ and made.__qualname__ == "S.__init__"
        assert vars(y) == vars(x) == {"a": 1, "b": [], "d": {}, "e": "z"} and y.c == 7  # c: from the class
        assert ours(2, [3]).b == [3] and ours(2).b is not ours(2).b


@pytest.mark.parametrize("frozen", [True, False])
def test_signature_and_help_show_the_fields_before_any_instance(frozen: bool) -> None:
    std, ours = _pair(frozen)
    assert not inspect.isfunction(vars(ours)["__init__"])  # a placeholder: not written yet
    assert inspect.signature(ours) == inspect.signature(std)
    assert str(inspect.signature(ours)) == "(x: 'int', y: 'str' = 's', z: 'tuple[int, ...]' = <factory>) -> None"
    assert inspect.isfunction(vars(ours)["__init__"])  # asking wrote it, as a first call would
    assert ours(1).y == "s"


def test_a_field_without_default_after_one_with_is_refused_at_once() -> None:
    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):

        @record
        class _Bad:
            """Out of order."""

            a: int = 0
            b: int  # type: ignore[misc]
