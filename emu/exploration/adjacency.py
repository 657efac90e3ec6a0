"""A state graph whose per-node adjacency maps are small: most explored states have one or two neighbours.

networkx keeps, for every node, a dict of its successors and one of its predecessors.
A dict holding one entry costs about 184 bytes (the object and an eight-slot key table);
an explored state graph has two such maps per state and most hold one or two entries,
so they are a third of its memory. :class:`Neighbors` is a mapping that holds up to two
entries in its own four fields (64 bytes) and moves them into a dict when a third
comes; :class:`CompactDiGraph` is a networkx ``DiGraph`` that uses it as its adjacency
map factory (``adjlist_inner_dict_factory``, the hook networkx documents for
subclasses), so every networkx function, view and export works on it unchanged.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping, MutableMapping, ValuesView
from typing import Any

import networkx as nx


class _Marker:
    __slots__ = ()


_FREE: Any = _Marker()  # an empty field
_MANY: Any = _Marker()  # the first key field when the entries are in the dict held as the first value


class Neighbors(MutableMapping[Any, Any]):
    """A dict-like map from neighbour to edge data, in insertion order like a dict."""

    __slots__ = ("_k0", "_k1", "_v0", "_v1")

    def __init__(self, entries: Mapping[Any, Any] | None = None) -> None:
        self._k0: Any = _FREE
        self._k1: Any = _FREE
        self._v0: Any = None
        self._v1: Any = None
        if entries:
            for k, v in entries.items():
                self[k] = v

    def _pairs(self) -> tuple[tuple[Any, Any], ...]:
        k0 = self._k0
        if k0 is _MANY:
            return tuple(self._v0.items())
        if k0 is _FREE:
            return ()
        if self._k1 is _FREE:
            return ((k0, self._v0),)
        return ((k0, self._v0), (self._k1, self._v1))

    def __getitem__(self, key: Any) -> Any:
        k0 = self._k0
        if k0 is _MANY:
            return self._v0[key]
        if k0 is not _FREE and (k0 is key or k0 == key):
            return self._v0
        k1 = self._k1
        if k1 is not _FREE and (k1 is key or k1 == key):
            return self._v1
        raise KeyError(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        k0 = self._k0
        if k0 is _MANY:
            self._v0[key] = value
        elif k0 is _FREE:
            hash(key)  # an unhashable key is refused, as a dict refuses it
            self._k0, self._v0 = key, value
        elif k0 is key or k0 == key:
            self._v0 = value
        elif self._k1 is _FREE:
            hash(key)
            self._k1, self._v1 = key, value
        elif self._k1 is key or self._k1 == key:
            self._v1 = value
        else:
            self._v0 = {k0: self._v0, self._k1: self._v1, key: value}
            self._k0, self._k1, self._v1 = _MANY, _FREE, None

    def __delitem__(self, key: Any) -> None:
        k0 = self._k0
        if k0 is _MANY:
            del self._v0[key]
        elif k0 is not _FREE and (k0 is key or k0 == key):
            self._k0, self._v0, self._k1, self._v1 = self._k1, self._v1, _FREE, None
        elif self._k1 is not _FREE and (self._k1 is key or self._k1 == key):
            self._k1, self._v1 = _FREE, None
        else:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        k0 = self._k0
        if k0 is _MANY:
            return key in self._v0
        k1 = self._k1
        return (k0 is not _FREE and (k0 is key or k0 == key)) or (k1 is not _FREE and (k1 is key or k1 == key))

    def __iter__(self) -> Iterator[Any]:
        k0 = self._k0
        if k0 is _MANY:
            return iter(self._v0)
        return iter([k for k in (k0, self._k1) if k is not _FREE])

    def __len__(self) -> int:
        k0 = self._k0
        if k0 is _MANY:
            return len(self._v0)
        return (k0 is not _FREE) + (self._k1 is not _FREE)

    def items(self) -> ItemsView[Any, Any]:
        return self._v0.items() if self._k0 is _MANY else _Items(self)

    def values(self) -> ValuesView[Any]:
        return self._v0.values() if self._k0 is _MANY else _Values(self)

    def copy(self) -> dict[Any, Any]:
        """A plain dict of the same entries (what a dict's ``copy`` gives)."""
        return dict(self._pairs())

    def __repr__(self) -> str:
        return repr(dict(self._pairs()))

    def __reduce__(self) -> tuple[type[Neighbors], tuple[dict[Any, Any]]]:
        return (Neighbors, (dict(self._pairs()),))


class _Items(ItemsView[Any, Any]):
    _mapping: Neighbors

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._mapping._pairs())


class _Values(ValuesView[Any]):
    _mapping: Neighbors

    def __iter__(self) -> Iterator[Any]:
        return iter([v for _, v in self._mapping._pairs()])


class CompactDiGraph(nx.DiGraph):  # type: ignore[misc]
    """A networkx ``DiGraph`` whose nodes keep their successors and predecessors in :class:`Neighbors`."""

    adjlist_inner_dict_factory = Neighbors
