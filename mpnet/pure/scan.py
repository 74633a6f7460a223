"""A stable cursor over the keys of a dict that changes between calls: Redis's ``SCAN``.

Guarantee (Redis's): a full iteration (from cursor 0 until the cursor is 0 again) returns every
key that was present for the whole iteration at least once; a key added or removed meanwhile may
or may not be returned. Unlike Redis, a key is returned at most once per index.

How: each key has a fixed *position*, a 30-bit hash of its bytes (CRC-32, the same in every
process). An iteration visits positions in increasing order; the cursor is the next position to
visit plus the iteration's start time (milliseconds, modulo 2**32). To answer without sorting
every call, the keys are sorted by position once into an :class:`ScanIndex`; an index built at
or after an iteration's start holds every key present for that whole iteration, so it may serve
that iteration (whichever process built it: the cursor says when the iteration started). The
caller must still check that each returned key exists now.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Callable, Iterable

POSITION_BITS = 31  # positions 0 .. 2**30 (one past the largest hash) fit
STAMP_MODULUS = 2**32
LARGEST_CURSOR = STAMP_MODULUS * 2**POSITION_BITS - 1  # 2**63 - 1: fits a signed 64-bit int


class CursorError(ValueError):
    """Not a cursor this scanner gave out."""


def key_position(key: bytes) -> int:
    """The key's place in every iteration: the same in every process and every run."""
    return zlib.crc32(key) >> 2


def decode_cursor(raw: bytes) -> tuple[int, int] | None:
    """``(start stamp, position)`` of a cursor, None for 0 (a new iteration); CursorError if
    *raw* is not a decimal cursor this module made."""
    if not raw.isdigit() or len(raw) > 20:
        raise CursorError("invalid cursor")
    cursor = int(raw)
    if cursor == 0:
        return None
    if cursor > LARGEST_CURSOR:
        raise CursorError("invalid cursor")
    position = cursor & (2**POSITION_BITS - 1)
    if position == 0 or position > 2**30:
        raise CursorError("invalid cursor")
    return cursor >> POSITION_BITS, position


def encode_cursor(stamp: int, position: int) -> int:
    return (stamp % STAMP_MODULUS) << POSITION_BITS | position


class ScanIndex:
    """The keys of one moment, sorted by position (references to the keys, not copies)."""

    __slots__ = ("built", "keys", "positions")

    def __init__(self, keys: Iterable[bytes], built: int) -> None:
        pairs = sorted((key_position(key), key) for key in keys)
        self.positions = [position for position, _ in pairs]
        self.keys = [key for _, key in pairs]
        self.built = built % STAMP_MODULUS

    def serves(self, stamp: int) -> bool:
        """Whether this index was built at or after *stamp* (within half the stamp's range)."""
        return (self.built - stamp) % STAMP_MODULUS < STAMP_MODULUS // 2

    def page(self, position: int, count: int) -> tuple[list[bytes], int]:
        """About *count* keys from *position* on (whole hash groups, so no key is skipped) and
        the position after them, 0 when the iteration is complete."""
        positions = self.positions
        start = bisect.bisect_left(positions, position)
        end = min(start + count, len(positions))
        if end == len(positions):
            return self.keys[start:end], 0
        last = positions[end - 1]
        end = bisect.bisect_right(positions, last, end)
        if end == len(positions):
            return self.keys[start:end], 0
        return self.keys[start:end], last + 1


class Scanner:
    """One process's SCAN state: the latest index, rebuilt when an iteration starts or when it
    is older than the iteration it would serve."""

    def __init__(self) -> None:
        self.index: ScanIndex | None = None

    def scan(
        self, cursor: bytes, count: int, keys: Callable[[], Iterable[bytes]], now: int
    ) -> tuple[int, list[bytes]]:
        """The next cursor (0: done) and the candidate keys for *cursor*; *keys* lists the
        current keys, *now* is the wall clock in milliseconds. CursorError for a bad cursor."""
        decoded = decode_cursor(cursor)
        stamp, position = (now, 0) if decoded is None else decoded
        index = self.index
        if decoded is None or index is None or not index.serves(stamp):
            index = self.index = ScanIndex(keys(), now)
        found, after = index.page(position, count)
        return (encode_cursor(stamp, after) if after else 0), found
