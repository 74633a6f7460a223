"""``max_connections_per_ip`` across every worker of a service, with no message on the accept path.

The master maps one anonymous shared region before it forks any worker (:class:`IPCountTable`).
The region is divided into *rows*: every live worker owns one, handed out by the master when it
forks the worker and zeroed and freed when it reaps it, so a worker killed with SIGKILL leaves
nothing counted. Only its worker writes a row, so no lock is needed; a count sums all the rows.
Rows in use are at most: the slots, plus the workers still draining after reloads or ``TTOU``.

Within a row, counts are kept count-min-sketch style: ``HASHES`` arrays of ``buckets`` uint32
counters, each array indexed by its own bits of ``hash((service, ip))``. A connection increments
one counter per array in its worker's row and decrements the same ones when it closes, so the
rows stay exact. A count is the minimum over the arrays of the sum over the rows: never less
than the true number of connections; more only when other open (service, ip) pairs share the
bucket in every array. With *k* distinct pairs open, that happens to about (k / buckets) **
HASHES of them (k = 1000: 0.02%), and it can only refuse a connection, never admit one too many.
Python's ``str`` hash is keyed SipHash: forked workers share the master's key, so they agree on
the buckets, and a client cannot choose addresses that collide.

Admission increments first and counts afterwards (:meth:`IPCounter.admit`): two workers
accepting connections of one address at the same moment see each other's increment, so at the
limit both may refuse (a spurious refusal under a simultaneous burst) but they do not both
admit. That relies on a plain store becoming visible to the other processes before the many
instructions of Python that follow it read their rows, which holds in practice but is not a
formal fence; were it ever late, the overshoot is at most one per concurrently accepting worker.
"""

from __future__ import annotations

import heapq
import logging
import mmap
import sys
from collections.abc import Hashable

log = logging.getLogger("mpnet.iplimit")

HASHES = 2  # IPCounter is written for two arrays per row
BUCKETS = 1 << 16
MIN_ROWS = 64
_WORD = 4  # bytes of one uint32 counter
_HEADER_WORDS = mmap.PAGESIZE // _WORD  # word 0: rows in use (written by the master only)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


class IPCountTable:
    """The shared region: *rows* rows of ``HASHES`` x *buckets* counters.

    Master side: :meth:`acquire` a row before forking a worker, :meth:`assign` it to the
    child's pid after the fork, :meth:`release` the pid once reaped. Worker side:
    :meth:`attach` (in the child) makes :func:`counter` return that row's :class:`IPCounter`.
    """

    def __init__(self, rows: int, buckets: int = BUCKETS) -> None:
        if rows < 1 or buckets < 2 or buckets & (buckets - 1) or buckets > 1 << 16:
            raise ValueError("rows must be positive and buckets a power of two up to 65536")
        self.rows = rows
        self.buckets = buckets
        self.bits = buckets.bit_length() - 1
        self.row_words = HASHES * buckets
        self.row_bytes = self.row_words * _WORD
        size = _HEADER_WORDS * _WORD + rows * self.row_bytes
        # Pages are allocated only when first written: a row costs memory for the buckets its
        # worker's connections touch, not its full size.
        flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        self._map = mmap.mmap(-1, size, flags=flags)
        self.words = memoryview(self._map).cast("I")
        self._free = list(range(rows))  # a heap: the lowest free row first keeps sums short
        self._taken: set[int] = set()
        self._owners: dict[int, int] = {}

    @classmethod
    def for_workers(cls, workers: int) -> IPCountTable:
        """Room for reloads (two generations of every slot), ``TTIN`` and long drains."""
        return cls(max(MIN_ROWS, 4 * workers))

    # -- master side ------------------------------------------------------------------------

    def acquire(self) -> int | None:
        """A zeroed row for a worker about to be forked, or None when every row is taken (that
        worker then counts its own connections privately: the others do not see them)."""
        if not self._free:
            log.warning(
                "all %d per-IP counting rows are in use: a new worker's connections are not "
                "seen by the other workers' max_connections_per_ip",
                self.rows,
            )
            return None
        row = heapq.heappop(self._free)
        self._taken.add(row)
        self._publish()
        return row

    def assign(self, pid: int, row: int | None) -> None:
        if row is not None:
            self._owners[pid] = row

    def release(self, pid: int) -> None:
        """The worker *pid* is gone (reaped): zero its row and make it available again."""
        row = self._owners.pop(pid, None)
        if row is None:
            return
        start = _HEADER_WORDS * _WORD + row * self.row_bytes
        if self.row_bytes % mmap.PAGESIZE == 0:
            self._map.madvise(mmap.MADV_REMOVE, start, self.row_bytes)  # zero, and free the pages
        else:
            self._map[start : start + self.row_bytes] = bytes(self.row_bytes)
        self._taken.discard(row)
        heapq.heappush(self._free, row)
        self._publish()

    def _publish(self) -> None:
        """Tell the workers how many rows to sum (an aligned 32-bit store, read as a whole)."""
        self.words[0] = max(self._taken) + 1 if self._taken else 0

    # -- worker side ------------------------------------------------------------------------

    def attach(self, row: int | None) -> IPCounter:
        """In the forked worker: count this process's connections in *row*."""
        global _counter
        _counter = IPCounter(self, row)
        return _counter


class IPCounter:
    """One process's view of an :class:`IPCountTable`: counts every row, writes only its own
    (*row*; None: a private one the other processes do not see)."""

    __slots__ = ("_bits", "_buckets", "_mask", "_own", "_own_base", "_row_words", "_words")

    def __init__(self, table: IPCountTable, row: int | None) -> None:
        self._words = table.words
        self._row_words = table.row_words
        self._bits = table.bits
        self._buckets = table.buckets
        self._mask = table.buckets - 1
        self._own: memoryview | None = None
        self._own_base = 0
        if row is None:
            self._own = memoryview(bytearray(table.row_bytes)).cast("I")
        else:
            self._own_base = _HEADER_WORDS + row * table.row_words

    def _offsets(self, key: Hashable) -> tuple[int, int]:
        """Offset of *key*'s counter in each of the two arrays of a row."""
        h, mask = hash(key), self._mask
        return h & mask, self._buckets + ((h >> self._bits) & mask)

    def count(self, key: Hashable) -> int:
        """Open connections of *key* in every worker (never fewer than the truth)."""
        return self._count(*self._offsets(key))

    def _count(self, first: int, second: int) -> int:
        words, step = self._words, self._row_words
        stop = _HEADER_WORDS + words[0] * step
        a = sum(words[_HEADER_WORDS + first : stop : step])
        b = sum(words[_HEADER_WORDS + second : stop : step])
        own = self._own
        if own is not None:
            a += own[first]
            b += own[second]
        return a if a < b else b

    def _add(self, first: int, second: int, delta: int) -> None:
        own = self._own if self._own is not None else self._words
        base = self._own_base
        own[base + first] += delta
        own[base + second] += delta

    def add(self, key: Hashable) -> None:
        self._add(*self._offsets(key), 1)

    def remove(self, key: Hashable) -> None:
        """Undo one :meth:`add` of *key* by this process."""
        self._add(*self._offsets(key), -1)

    def admit(self, key: Hashable, limit: int) -> bool:
        """Count one more connection of *key* if that keeps every worker's total within
        *limit*; else change nothing and return False (see the module docstring)."""
        first, second = self._offsets(key)
        self._add(first, second, 1)
        if self._count(first, second) <= limit:
            return True
        self._add(first, second, -1)
        return False


_counter: IPCounter | None = None


def counter() -> IPCounter:
    """This process's counter: the row the master attached, else (a process not forked by a
    master, such as a test's) a table of its own with one row."""
    if _counter is None:
        table = IPCountTable(1)
        return table.attach(table.acquire())
    return _counter
