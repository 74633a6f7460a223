"""The open connections of one service, oldest first, linked through the connections themselves.

A worker must find every open connection of a service (a graceful stop closes them, the timeout
sweep visits them, a limit counts them) but most of them sit idle for hours, so what this costs
per connection matters more than how fast it is walked. A dict or a set keyed by the connection
costs 30-50 B per entry at 10,000-50,000 connections (a compact table that doubles in size,
half empty just after it grew); two slots in each connection pointing to its older and newer
neighbour cost 16 B, and adding or removing one is O(1) with no table to grow.

The contract with the element type: two slots, ``_older`` and ``_newer``, that this class alone
writes, both None while the object is not in any list (set them so in ``__init__``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar


class Linked(Protocol):
    _older: Any
    _newer: Any


T = TypeVar("T", bound=Linked)


class OpenConnections(Generic[T]):
    """An insertion-ordered set of :class:`Linked` objects, each in at most one such set (the
    membership test trusts that); iteration walks a snapshot, so members may be added or removed
    while the caller visits the others."""

    __slots__ = ("_count", "_newest", "_oldest")

    def __init__(self) -> None:
        self._oldest: Any = None
        self._newest: Any = None
        self._count = 0

    def add(self, item: T) -> None:
        """Append *item*, which must not be in any list."""
        newest = self._newest
        item._older = newest
        if newest is None:
            self._oldest = item
        else:
            newest._newer = item
        self._newest = item
        self._count += 1

    def discard(self, item: T) -> bool:
        """Remove *item*; whether it was here (False: nothing done)."""
        older, newer = item._older, item._newer
        if newer is None:
            if self._newest is not item:
                return False
            self._newest = older
        else:
            newer._older = older
        if older is None:
            self._oldest = newer
        else:
            older._newer = newer
        item._older = item._newer = None
        self._count -= 1
        return True

    def __contains__(self, item: T) -> bool:
        return item._newer is not None or self._newest is item

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[T]:
        """The members at the time of the call, oldest first (a list walked after it is built,
        so that visiting one may remove it or others)."""
        members: list[T] = []
        item = self._oldest
        while item is not None:
            members.append(item)
            item = item._newer
        return iter(members)
