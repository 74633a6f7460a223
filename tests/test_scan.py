"""mpnet.pure.scan: SCAN's cursor returns every key present for a whole iteration, whatever
changes between the calls, whichever index (process) answers each call."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpnet.pure.scan import (
    LARGEST_CURSOR,
    CursorError,
    ScanIndex,
    Scanner,
    decode_cursor,
    encode_cursor,
    key_position,
)


def full_scan(scanners: list[Scanner], keys: set[bytes], count: int, churn, start: int = 1000):
    """Iterate to the end, alternating between *scanners* (workers), calling *churn(step)*
    between pages; the keys returned."""
    seen: list[bytes] = []
    cursor, now, step = b"0", start, 0
    while True:
        scanner = scanners[step % len(scanners)]
        next_cursor, found = scanner.scan(cursor, count, lambda: set(keys), now)
        seen += found
        if next_cursor == 0:
            return seen
        cursor, now, step = b"%d" % next_cursor, now + 7, step + 1
        churn(step)
        assert step < 100_000


def test_every_key_once_without_changes() -> None:
    keys = {b"key:%d" % i for i in range(1000)}
    seen = full_scan([Scanner()], keys, 10, lambda step: None)
    assert sorted(seen) == sorted(keys)


@settings(max_examples=200, deadline=None)
@given(
    initial=st.sets(st.binary(max_size=6), max_size=60),
    changes=st.lists(st.tuples(st.booleans(), st.binary(max_size=6)), max_size=80),
    count=st.integers(1, 15),
    workers=st.integers(1, 3),
)
def test_keys_present_throughout_are_returned(initial, changes, count, workers) -> None:
    keys = set(initial)
    removed: set[bytes] = set()

    def churn(step: int) -> None:
        for add, key in changes[step % 7 :: 7][:3]:
            if add:
                keys.add(key)
            elif key in keys:
                keys.discard(key)
                removed.add(key)

    seen = full_scan([Scanner() for _ in range(workers)], keys, count, churn)
    assert (initial - removed) <= set(seen)


def test_colliding_positions_are_never_split_across_pages() -> None:
    index = ScanIndex([b"a", b"b", b"c"], built=0)
    index.positions = [5, 5, 5]  # as if three keys shared one hash
    found, after = index.page(0, 1)
    assert (found, after) == (index.keys, 0)


def test_an_index_older_than_the_iteration_is_rebuilt() -> None:
    keys = {b"a", b"b", b"c"}
    scanner = Scanner()
    cursor, _ = scanner.scan(b"0", 1, lambda: set(keys), now=5000)
    other = Scanner()
    other.scan(b"0", 100, lambda: {b"a"}, now=1000)  # an index built before the iteration
    keys.add(b"late")
    _, found = other.scan(b"%d" % cursor, 100, lambda: set(keys), now=6000)
    assert len(found) >= 2  # served from a fresh index, not the stale one with one key


def test_cursor_round_trip_and_bounds() -> None:
    assert decode_cursor(b"0") is None
    assert decode_cursor(b"%d" % encode_cursor(2**32 + 5, 77)) == (5, 77)
    assert encode_cursor(2**32 - 1, 2**30) <= LARGEST_CURSOR < 2**63
    assert 0 <= key_position(b"x" * 100) < 2**30
    assert key_position(b"abc") == 0x352441C2 >> 2  # CRC-32: the same in every process


@pytest.mark.parametrize(
    "raw", [b"-1", b"abc", b"1.5", b"", b"%d" % 2**63, b"%d" % 2**64, b"%d" % (2**31)]
)
def test_bad_cursors(raw: bytes) -> None:
    with pytest.raises(CursorError):
        Scanner().scan(raw, 10, lambda: [], now=0)
