"""The per-IP counting table (mpnet/iplimit.py) on its own: rows, sums, release, collisions.

One process plays several workers by attaching several counters to one table; one test forks a
real child to check that a row written there is seen here and is gone once released.
"""

from __future__ import annotations

import os

import pytest

from mpnet import iplimit
from mpnet.iplimit import IPCountTable


@pytest.fixture(autouse=True)
def _own_counter():
    """attach() sets this process's counter: put the previous one back afterwards."""
    saved = iplimit._counter
    yield
    iplimit._counter = saved


def _workers(table: IPCountTable, count: int) -> list[iplimit.IPCounter]:
    counters = []
    for pid in range(1000, 1000 + count):
        row = table.acquire()
        table.assign(pid, row)
        counters.append(table.attach(row))
    return counters


def test_counts_are_summed_over_the_rows_of_every_worker():
    table = IPCountTable(8)
    a, b, c = _workers(table, 3)
    key, other = ("echo", "192.0.2.1"), ("echo", "192.0.2.2")
    a.add(key)
    b.add(key)
    b.add(key)
    c.add(other)
    assert [w.count(key) for w in (a, b, c)] == [3, 3, 3]
    assert a.count(other) == 1
    assert a.count(("chat", "192.0.2.1")) == 0  # per service
    b.remove(key)
    assert c.count(key) == 2


def test_admit_holds_the_limit_across_workers_and_a_refusal_changes_nothing():
    table = IPCountTable(8)
    a, b = _workers(table, 2)
    key = ("echo", "198.51.100.7")
    assert a.admit(key, 3)
    assert b.admit(key, 3)
    assert b.admit(key, 3)
    assert not a.admit(key, 3)
    assert not b.admit(key, 3)
    assert a.count(key) == 3
    a.remove(key)
    assert b.admit(key, 3)
    assert not a.admit(key, 3)


def test_a_reaped_worker_leaves_nothing_counted_and_its_row_is_reused_zeroed():
    table = IPCountTable(4)
    a, b, c = _workers(table, 3)  # pids 1000, 1001, 1002 on rows 0, 1, 2
    key = ("echo", "203.0.113.5")
    for _ in range(5):
        b.add(key)  # then b is "killed": it never removes them
    a.add(key)
    assert c.count(key) == 6
    table.release(1001)
    assert c.count(key) == 1
    assert table.words[0] == 3  # row 2 is still in use: the sums still cover it
    row = table.acquire()
    assert row == 1  # the lowest free row
    table.assign(2000, row)
    fresh = table.attach(row)
    assert fresh.count(key) == 1
    fresh.add(key)
    assert a.count(key) == 2
    table.release(1002)
    table.release(2000)
    assert table.words[0] == 1  # only row 0 left: sums stop there
    assert a.count(key) == 1
    table.release(12345)  # a pid without a row (a checker): nothing happens


def test_without_a_free_row_a_worker_still_sees_the_others():
    table = IPCountTable(1)
    (a,) = _workers(table, 1)
    assert table.acquire() is None  # full: logged, and the worker counts privately
    private = table.attach(None)
    key = ("echo", "192.0.2.9")
    a.add(key)
    assert private.admit(key, 2)
    assert not private.admit(key, 2)  # sees a's connection and its own
    assert a.count(key) == 1  # a does not see the private one


def test_collisions_only_ever_overcount():
    """Small arrays force collisions: every count stays at least the truth, and with the
    default size and a thousand addresses nearly all are exact."""
    small = IPCountTable(2, buckets=64)
    a, b = _workers(small, 2)
    added: list[tuple[iplimit.IPCounter, tuple[str, str]]] = []
    truth: dict[tuple[str, str], int] = {}
    for i in range(500):
        key = ("svc", f"10.0.{i // 250}.{i % 250}")
        for _ in range(i % 3 + 1):
            worker = a if i % 2 else b
            worker.add(key)
            added.append((worker, key))
            truth[key] = truth.get(key, 0) + 1
    assert all(a.count(key) >= n for key, n in truth.items())
    for worker, key in added:
        worker.remove(key)
    assert not any(small.words[1:])  # every counter back to zero (word 0: rows in use)

    table = IPCountTable(2)
    a, b = _workers(table, 2)
    keys = [("svc", f"172.16.{i // 256}.{i % 256}") for i in range(1000)]
    for i, key in enumerate(keys):
        (a if i % 2 else b).add(key)
    counts = [a.count(key) for key in keys]
    assert min(counts) == 1
    assert sum(count != 1 for count in counts) <= 10  # expected about 0.2


def test_a_forked_worker_writes_a_row_the_master_reads_and_clears():
    table = IPCountTable(4)
    row = table.acquire()
    key = ("echo", "192.0.2.44")
    read_r, write_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker"
        try:
            os.close(read_r)
            counter = table.attach(row)
            for _ in range(3):
                counter.add(key)
            os.write(write_w, b"x")
        finally:
            os._exit(0)
    os.close(write_w)
    table.assign(pid, row)
    assert os.read(read_r, 1) == b"x"
    os.close(read_r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    reader = table.attach(table.acquire())
    assert reader.count(key) == 3  # written by the other process, seen here
    table.release(pid)
    assert reader.count(key) == 0


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        IPCountTable(0)
    with pytest.raises(ValueError):
        IPCountTable(2, buckets=100)
