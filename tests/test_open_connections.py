"""workers/open_connections.py: a service's open connections, linked through the connections."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mpnet.workers.open_connections import OpenConnections


class Item:
    __slots__ = ("_newer", "_older", "name")

    def __init__(self, name: int) -> None:
        self.name = name
        self._older: Item | None = None
        self._newer: Item | None = None

    def __repr__(self) -> str:
        return f"Item({self.name})"


def test_members_come_out_oldest_first_and_leave_from_anywhere():
    items = [Item(n) for n in range(5)]
    members: OpenConnections[Item] = OpenConnections()
    for item in items:
        members.add(item)
    assert list(members) == items and len(members) == 5
    assert members.discard(items[2]) and members.discard(items[0]) and members.discard(items[4])
    assert list(members) == [items[1], items[3]] and len(members) == 2
    assert [item in members for item in items] == [False, True, False, True, False]
    assert not members.discard(items[2])  # gone already: nothing changes
    assert list(members) == [items[1], items[3]] and len(members) == 2


def test_the_only_member_is_a_member():
    item, members = Item(0), OpenConnections[Item]()
    assert item not in members and not members.discard(item)
    members.add(item)
    assert item in members and list(members) == [item]
    assert members.discard(item) and item not in members and list(members) == []
    members.add(item)  # a removed item may come back
    assert list(members) == [item]


def test_members_may_leave_or_join_while_the_others_are_visited():
    items = [Item(n) for n in range(5)]
    members: OpenConnections[Item] = OpenConnections()
    for item in items[:4]:
        members.add(item)
    visited = []
    for item in members:  # as a sweep that closes connections while new ones arrive
        visited.append(item)
        members.discard(item)
        if item is items[0]:
            members.discard(items[3])  # one not visited yet leaves
            members.add(items[4])  # a newcomer
    assert visited == items[:4]  # the members when the walk began
    assert list(members) == [items[4]]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=60))
def test_behaves_as_an_insertion_ordered_set(operations):
    items = [Item(n) for n in range(8)]
    members: OpenConnections[Item] = OpenConnections()
    model: dict[Item, None] = {}
    for adding, index in operations:
        item = items[index]
        if adding and item not in model:
            members.add(item)
            model[item] = None
        elif not adding:
            assert members.discard(item) == (model.pop(item, 0) is None)
        assert list(members) == list(model) and len(members) == len(model)
        assert [item in members for item in items] == [item in model for item in items]
