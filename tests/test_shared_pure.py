"""Tests for the pure parts of the shared tables (mpnet.pure.replica, mpnet.journal): writes,
atomics, the journal, the Store, and the replica logic of SharedTable (driven without processes:
the test plays the master).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import random
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mpnet.journal
from mpnet.journal import StateFileError, Store, replay_journal
from mpnet.pure.frames import decode_payload, encode
from mpnet.pure.messages import from_wire, to_wire
from mpnet.pure.replica import SharedError, apply_write, run_atomic
from mpnet.workers.shared import SharedState, SharedTable

OTHER_PID = 10**9  # "another worker": never this process's pid

# -- apply_write ---------------------------------------------------------------------------------


def test_apply_write_set_del_clear_update() -> None:
    data: dict[Any, Any] = {}
    apply_write(data, "set", ["a", 1])
    apply_write(data, "set", [b"b", [1, {"x": None}]])
    assert data == {"a": 1, b"b": [1, {"x": None}]}
    apply_write(data, "set", ["a", 2])
    apply_write(data, "del", ["a"])
    apply_write(data, "del", ["missing"])  # deleting a missing key is not an error
    assert data == {b"b": [1, {"x": None}]}
    apply_write(data, "update", [{"c": 3, 4: "four"}])
    assert data == {b"b": [1, {"x": None}], "c": 3, 4: "four"}
    apply_write(data, "clear", [])
    assert data == {}


def test_apply_write_unknown_op() -> None:
    with pytest.raises(ValueError, match="'frobnicate'"):
        apply_write({}, "frobnicate", [])


# -- run_atomic ----------------------------------------------------------------------------------


def atomic(data: dict[Any, Any], op: str, *args: Any) -> tuple[Any, Any]:
    """Run the atomic op like the master does: decide, then apply the effect."""
    before = copy.deepcopy(data)
    answer, effect = run_atomic(data, op, list(args))
    assert data == before  # deciding never mutates; only the effect write does
    if effect is not None:
        apply_write(data, effect[0], effect[1])
    return answer, effect


def test_incr() -> None:
    data: dict[Any, Any] = {}
    assert atomic(data, "incr", "n", 1) == (1, ["set", ["n", 1]])
    assert atomic(data, "incr", "n", 41) == (42, ["set", ["n", 42]])
    assert atomic(data, "incr", "n", -50) == (-8, ["set", ["n", -8]])
    assert atomic(data, "incr", "big", 2**80) == (2**80, ["set", ["big", 2**80]])
    assert data == {"n": -8, "big": 2**80}


@pytest.mark.parametrize("current", ["7", 1.5, True, None, [1], {"a": 1}, b"1"])
def test_incr_of_a_non_int_is_refused(current: Any) -> None:
    data = {"k": current}
    with pytest.raises(SharedError, match="'k' is not an integer"):
        run_atomic(data, "incr", ["k", 1])
    assert data == {"k": current}


@pytest.mark.parametrize("amount", [1.0, True, "1", None])
def test_incr_by_a_non_int_is_refused(amount: Any) -> None:
    with pytest.raises(SharedError):
        run_atomic({"k": 1}, "incr", ["k", amount])


def test_setdefault() -> None:
    data: dict[Any, Any] = {"x": 0}
    assert atomic(data, "setdefault", "k", [1, 2]) == ([1, 2], ["set", ["k", [1, 2]]])
    assert atomic(data, "setdefault", "k", "other") == ([1, 2], None)
    assert atomic(data, "setdefault", "x", 5) == (0, None)
    assert atomic(data, "setdefault", "n", None) == (None, ["set", ["n", None]])
    assert data == {"x": 0, "k": [1, 2], "n": None}


def test_setdefault_non_plain_value() -> None:
    with pytest.raises(TypeError, match="set is not plain data"):
        run_atomic({}, "setdefault", ["k", {1}])


def test_cas_success_and_failure() -> None:
    data: dict[Any, Any] = {"k": 1, "s": "x", "l": [1, 2]}
    assert atomic(data, "cas", "k", 1, 2) == (True, ["set", ["k", 2]])
    assert atomic(data, "cas", "k", 1, 3) == (False, None)
    assert atomic(data, "cas", "s", "x", None) == (True, ["set", ["s", None]])
    assert atomic(data, "cas", "l", [1, 2], [3]) == (True, ["set", ["l", [3]]])
    assert atomic(data, "cas", "missing", "x", 1) == (False, None)
    assert data == {"k": 2, "s": None, "l": [3]}


@pytest.mark.parametrize(
    ("current", "expected"),
    [(1, True), (True, 1), (0, False), (False, 0), (1, 1.0), (1.0, 1), ("1", 1), (b"a", "a")],
)
def test_cas_type_mismatch_fails(current: Any, expected: Any) -> None:
    data = {"k": current}
    assert atomic(data, "cas", "k", expected, "new") == (False, None)
    assert data == {"k": current}
    assert type(data["k"]) is type(current)


def test_cas_on_a_missing_key_expects_none() -> None:
    data: dict[Any, Any] = {}
    assert atomic(data, "cas", "k", None, 1) == (True, ["set", ["k", 1]])
    assert atomic(data, "cas", "k", None, 2) == (False, None)
    assert data == {"k": 1}


def test_delete_if() -> None:
    data: dict[Any, Any] = {"k": 1, "n": None, "l": [1]}
    assert atomic(data, "delete_if", "k", 2) == (False, None)
    assert atomic(data, "delete_if", "k", True) == (False, None)  # 1 is not True
    assert atomic(data, "delete_if", "k", 1.0) == (False, None)
    assert atomic(data, "delete_if", "k", 1) == (True, ["del", ["k"]])
    assert atomic(data, "delete_if", "k", 1) == (False, None)
    assert atomic(data, "delete_if", "missing", None) == (False, None)  # missing is not None
    assert atomic(data, "delete_if", "n", None) == (True, ["del", ["n"]])
    assert atomic(data, "delete_if", "l", [1]) == (True, ["del", ["l"]])
    assert data == {}


def test_cas_non_plain_new_value() -> None:
    with pytest.raises(TypeError, match="object is not plain data"):
        run_atomic({"k": 1}, "cas", ["k", 1, object()])


def test_pop() -> None:
    data: dict[Any, Any] = {"k": [1], "n": None}
    assert atomic(data, "pop", "k", "dflt") == ([1], ["del", ["k"]])
    assert atomic(data, "pop", "k", "dflt") == ("dflt", None)
    assert atomic(data, "pop", "n", "dflt") == (None, ["del", ["n"]])
    assert data == {}


def test_atomic_unknown_op_and_bad_key() -> None:
    with pytest.raises(SharedError, match="'explode'"):
        run_atomic({}, "explode", ["k"])
    with pytest.raises(TypeError, match="not list"):
        run_atomic({}, "incr", [["k"], 1])
    with pytest.raises(TypeError, match="NoneType"):
        run_atomic({}, "pop", [None, 1])


# -- the journal ---------------------------------------------------------------------------------

RECORDS: list[tuple[str, str, list[Any]]] = [
    ("t", "set", ["a", 1]),
    ("t", "set", ["b", [1, 2, {"deep": None}]]),
    ("u", "update", [{"x": b"\x00\x01", 5: None, True: 2.5}]),
    ("t", "del", ["a"]),
    ("u", "clear", []),
    ("t", "set", ["big", 2**70]),
    ("u", "set", ["é", "ünïcode"]),
    ("t", "del", ["never-there"]),
]


def record(payload: bytes) -> bytes:
    """The record format documented in Store's docstring."""
    return len(payload).to_bytes(4, "big") + zlib.crc32(payload).to_bytes(4, "big") + payload


class Journal:
    """Journal bytes written by Store.append, with the record boundaries and the state after
    each record."""

    def __init__(self, directory: Path, records: list[tuple[str, str, list[Any]]]) -> None:
        store = Store(directory / "state", "never")
        store.load()
        self.boundaries = [0]
        self.states: list[dict[str, dict[Any, Any]]] = [{}]
        tables: dict[str, dict[Any, Any]] = {}
        try:
            for name, op, args in records:
                store.append(name, op, args)
                store.flush()
                self.boundaries.append(store.journal_path.stat().st_size)
                apply_write(tables.setdefault(name, {}), op, args)
                self.states.append(copy.deepcopy(tables))
        finally:
            store.forget()
        self.data = store.journal_path.read_bytes()


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path, RECORDS)


def test_store_writes_the_documented_record_format(journal: Journal) -> None:
    expected = b"".join(record(encode([n, op, args])[4:]) for n, op, args in RECORDS)
    assert journal.data == expected


def test_replay_clean_journal(journal: Journal) -> None:
    tables: dict[str, dict[Any, Any]] = {}
    assert replay_journal(journal.data, tables, "j")[:2] == (len(journal.data), len(RECORDS))
    assert tables == journal.states[-1]
    assert tables == {"t": {"b": [1, 2, {"deep": None}], "big": 2**70}, "u": {"é": "ünïcode"}}


def test_replay_empty_journal() -> None:
    tables: dict[str, dict[Any, Any]] = {}
    assert replay_journal(b"", tables, "j")[:2] == (0, 0)
    assert tables == {}


def test_replay_applies_on_top_of_existing_tables(journal: Journal) -> None:
    tables: dict[str, dict[Any, Any]] = {"t": {"kept": 1}, "other": {"z": 0}}
    replay_journal(journal.data, tables, "j")
    assert tables["t"]["kept"] == 1
    assert tables["other"] == {"z": 0}


def test_replay_every_truncation_loads_the_complete_prefix(journal: Journal) -> None:
    data = journal.data
    for cut in range(len(data) + 1):
        complete = max(i for i, end in enumerate(journal.boundaries) if end <= cut)
        tables: dict[str, dict[Any, Any]] = {}
        assert replay_journal(data[:cut], tables, "j")[:2] == (
            journal.boundaries[complete],
            complete,
        )
        assert tables == journal.states[complete], cut


def test_replay_corrupt_checksum_or_payload_in_the_middle_names_the_offset(
    journal: Journal,
) -> None:
    data = journal.data
    for index in range(len(RECORDS) - 1):  # every record that has more records after it
        start, end = journal.boundaries[index], journal.boundaries[index + 1]
        for offset in range(start + 4, end):  # the checksum and the payload
            for flip in (0x01, 0x80, 0xFF):
                bad = bytearray(data)
                bad[offset] ^= flip
                with pytest.raises(StateFileError) as caught:
                    replay_journal(bytes(bad), {}, "/var/lib/mpnet/state.journal")
                message = str(caught.value)
                assert message.startswith("/var/lib/mpnet/state.journal: ")
                assert f"corrupt record at byte {start} " in message
                assert f"{len(data) - end} more byte(s)" in message
                assert "\n" not in message


def test_replay_corrupt_length_in_the_middle_is_an_error(journal: Journal) -> None:
    data = journal.data
    silent = []
    for index in range(len(RECORDS) - 1):
        start = journal.boundaries[index]
        for offset in range(start, start + 4):
            for flip in (0x01, 0x80, 0xFF):
                bad = bytearray(data)
                bad[offset] ^= flip
                try:
                    result = replay_journal(bytes(bad), {}, "j")
                except StateFileError as exc:
                    assert f"byte {start}" in str(exc)
                else:
                    silent.append((offset, flip, result))
    assert silent == []


def test_replay_corrupt_length_ending_exactly_at_the_end_is_an_error(journal: Journal) -> None:
    data = bytearray(journal.data)
    start = journal.boundaries[-3]  # two intact records follow
    swallowing = len(data) - start - 8
    assert swallowing < 256  # one damaged byte is enough to make it
    data[start : start + 4] = swallowing.to_bytes(4, "big")
    with pytest.raises(StateFileError, match=f"corrupt record at byte {start}"):
        replay_journal(bytes(data), {}, "j")


def test_replay_torn_last_record_is_dropped(journal: Journal) -> None:
    data = journal.data
    start = journal.boundaries[-2]
    for offset in range(start + 4, len(data)):
        bad = bytearray(data)
        bad[offset] ^= 0x55
        tables: dict[str, dict[Any, Any]] = {}
        assert replay_journal(bytes(bad), tables, "j")[:2] == (start, len(RECORDS) - 1)
        assert tables == journal.states[-2]


@pytest.mark.parametrize(
    "payload",
    [b"Z", b"N", encode(5)[4:], encode(["t", "explode", []])[4:], encode(["t", "set"])[4:]],
    ids=["bad tag", "none", "not a list", "unknown op", "two items"],
)
def test_replay_undecodable_record_with_a_good_checksum(payload: bytes) -> None:
    first = record(encode(["t", "set", ["a", 1]])[4:])
    with pytest.raises(StateFileError, match=f"^j: undecodable record at byte {len(first)}: "):
        replay_journal(first + record(payload), {}, "j")


def test_replay_record_with_short_args_is_a_state_file_error() -> None:
    with pytest.raises(StateFileError, match="undecodable record at byte 0"):
        replay_journal(record(encode(["t", "set", []])[4:]), {}, "j")


# -- Store ---------------------------------------------------------------------------------------


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """Stores on tmp_path/state; every one still open is closed (without compacting) after."""
    opened: list[Store] = []

    def make(fsync: str = "never", path: Path | None = None) -> Store:
        store = Store(path or tmp_path / "state", fsync)
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in opened:
            store.forget()


def write_all(store: Store, tables: dict[str, dict[Any, Any]], records: list[Any]) -> None:
    for name, op, args in records:
        store.append(name, op, args)
        apply_write(tables.setdefault(name, {}), op, args)


def test_store_starts_empty(stores: Callable[..., Store], tmp_path: Path) -> None:
    store = stores()
    assert store.load() == {}
    assert store.journal_path == tmp_path / "state.journal"
    assert store.journal_path.exists()


def test_store_creates_the_directory(stores: Callable[..., Store], tmp_path: Path) -> None:
    store = stores(path=tmp_path / "deep" / "er" / "state")
    assert store.load() == {}
    assert (tmp_path / "deep" / "er").is_dir()


@pytest.mark.parametrize("fsync", ["always", "everysec", "never"])
def test_store_journal_round_trip(stores: Callable[..., Store], fsync: str) -> None:
    first = stores(fsync)
    tables = first.load()
    write_all(first, tables, RECORDS)
    first.flush()
    assert stores().load() == tables
    # close(): compact into a snapshot, journal emptied
    first.close(tables)
    assert first.journal_path.stat().st_size == 0
    assert first.path.exists()
    assert stores().load() == tables


def test_store_always_fsync_commits_the_writes_of_a_pass_together(
    stores: Callable[..., Store],
) -> None:
    store = stores("always")
    tables = store.load()
    write_all(store, tables, RECORDS[:3])
    store.commit()  # the master calls this before it sends anything
    size = store.journal_path.stat().st_size
    assert size > 0
    assert stores().load() == tables  # durable without a flush or close
    store.commit()  # nothing new: no write
    assert store.journal_path.stat().st_size == size


@pytest.mark.parametrize("fsync", ["always", "everysec", "never"])
def test_store_commit_hands_the_writes_to_the_os_in_every_mode(
    stores: Callable[..., Store], fsync: str
) -> None:
    # commit() runs before the master sends anything: an acknowledged write must survive a
    # kill -9 of the master whatever state_fsync says (before, "everysec" kept it buffered in
    # the process for up to a second).
    store = stores(fsync)
    tables = store.load()
    write_all(store, tables, RECORDS[:2])
    store.commit()
    assert stores().load() == tables  # read back by another Store: on the OS's side


def test_store_tick_flushes_when_fsync_is_never(stores: Callable[..., Store]) -> None:
    store = stores("never")
    tables = store.load()
    write_all(store, tables, RECORDS[:2])
    store.tick(tables)
    assert store.journal_path.stat().st_size > 0
    assert stores().load() == tables


def test_store_compact_then_more_writes(stores: Callable[..., Store]) -> None:
    store = stores()
    tables = store.load()
    write_all(store, tables, RECORDS[:4])
    store.compact(tables)
    assert store.journal_path.stat().st_size == 0
    snapshot = store.path.read_bytes()
    write_all(store, tables, RECORDS[4:])
    store.flush()
    assert store.path.read_bytes() == snapshot  # the snapshot only changes at compaction
    assert store.journal_path.stat().st_size > 0
    assert stores().load() == tables  # snapshot + journal


def test_store_tick_compacts_a_big_journal(
    stores: Callable[..., Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mpnet.journal, "_COMPACT_BYTES", 100)
    store = stores()
    tables = store.load()
    write_all(store, tables, RECORDS[:1])
    store.tick(tables)
    assert not store.path.exists()  # below the threshold: no snapshot yet
    write_all(store, tables, RECORDS[1:] * 3)
    store.tick(tables)
    assert store.path.exists()
    assert store.journal_path.stat().st_size == 0
    write_all(store, tables, [("t", "set", ["after", "compaction"])])
    store.flush()
    assert stores().load() == tables


def test_store_load_drops_a_torn_tail_and_carries_on(
    stores: Callable[..., Store], journal: Journal
) -> None:
    path = stores().journal_path
    cut = journal.boundaries[3] + 5
    path.write_bytes(journal.data[:cut])
    store = stores()
    tables = store.load()
    assert tables == journal.states[3]
    assert path.stat().st_size == journal.boundaries[3]  # the torn bytes are gone
    write_all(store, tables, [("t", "set", ["new", 1])])
    store.flush()
    assert stores().load() == tables


def test_store_load_refuses_middle_corruption_and_keeps_the_file(
    stores: Callable[..., Store], journal: Journal
) -> None:
    path = stores().journal_path
    bad = bytearray(journal.data)
    bad[journal.boundaries[2] + 10] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(StateFileError, match=f"corrupt record at byte {journal.boundaries[2]}"):
        stores().load()
    assert path.read_bytes() == bytes(bad)  # refusing must not destroy the evidence


# -- journal tails: what crashes and power losses leave, told apart from corruption (issue 9.5)


@pytest.mark.parametrize("zeros", [1, 7, 8, 9, 4096, 65536])
def test_replay_a_zero_filled_tail_is_dropped_not_refused(journal: Journal, zeros: int) -> None:
    # ext4/XFS after a power loss: the file was extended, its last blocks never written.
    tables: dict[str, dict[Any, Any]] = {}
    replay = replay_journal(journal.data + bytes(zeros), tables, "j")
    assert replay == (len(journal.data), len(RECORDS), "zeros", zeros)
    assert tables == journal.states[-1]


def test_replay_a_torn_record_followed_by_zeros_is_torn(journal: Journal) -> None:
    start = journal.boundaries[-2]
    for cut in (start + 4, start + 8, start + 11, len(journal.data) - 1):
        data = journal.data[:cut] + bytes(4096)
        replay = replay_journal(data, {}, "j")
        assert replay[:3] == (start, len(RECORDS) - 1, "torn"), cut


def test_replay_zeros_in_the_middle_are_corruption(journal: Journal) -> None:
    data = (
        journal.data[: journal.boundaries[3]] + bytes(600) + journal.data[journal.boundaries[3] :]
    )
    with pytest.raises(StateFileError, match=f"corrupt record at byte {journal.boundaries[3]} "):
        replay_journal(data, {}, "j")


def test_replay_tells_a_corrupt_last_record_from_a_torn_one(journal: Journal) -> None:
    start = journal.boundaries[-2]
    flipped = bytearray(journal.data)
    flipped[len(flipped) - 2] ^= 0x01  # complete, synced, then damaged
    assert replay_journal(bytes(flipped), {}, "j")[2] == "corrupt"
    assert replay_journal(journal.data[:-2], {}, "j")[2] == "torn"  # cut short by a crash
    big = record(encode(["t", "set", ["k", b"v" * 2000]])[4:])
    holed = journal.data + big[:-600] + bytes(600)  # its last block never written
    assert replay_journal(holed, {}, "j")[:3] == (len(journal.data), len(RECORDS), "torn")
    assert start < len(journal.data)


def test_store_load_logs_torn_zeros_and_corrupt_tails_differently(
    stores: Callable[..., Store], journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    path = stores().journal_path
    flipped = bytearray(journal.data)
    flipped[-1] ^= 0x01
    cases = {
        "torn": (journal.data[:-3], logging.WARNING, "dropped a torn last record at byte"),
        "zeros": (journal.data + bytes(512), logging.WARNING, "dropped 512 zero bytes"),
        "corrupt": (bytes(flipped), logging.ERROR, "complete but its checksum does not match"),
    }
    for kind, (data, level, text) in cases.items():
        path.write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mpnet.shared"):
            tables = stores().load()
        assert tables == journal.states[-1 if kind == "zeros" else -2], kind
        dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert [(r.levelno, text in r.getMessage()) for r in dropped] == [(level, True)], kind


def test_replay_of_a_big_torn_record_checksums_each_byte_at_most_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: a torn record was searched offset by offset for an intact record after it,
    # checksumming candidate after candidate (a 30 MB one took 42 s). Now the work is linear:
    # bench/bench_journal.py measures the time.
    value = bytes(range(256)) * 4096  # 1 MiB; every 256th offset looks like a plausible length
    big = record(encode(["t", "set", ["k", value]])[4:])
    data = record(encode(["t", "set", ["a", 1]])[4:]) + big[: len(big) - 1000]
    checksummed = [0]

    class CountingZlib:
        @staticmethod
        def crc32(chunk: bytes) -> int:
            checksummed[0] += len(chunk)
            return zlib.crc32(chunk)

    monkeypatch.setattr(mpnet.journal, "zlib", CountingZlib)
    assert replay_journal(data, {}, "j")[:3] == (len(data) - len(big) + 1000, 1, "torn")
    assert checksummed[0] <= 2 * len(data)


def test_store_corrupt_snapshot(stores: Callable[..., Store]) -> None:
    store = stores()
    tables = store.load()
    write_all(store, tables, RECORDS)
    store.compact(tables)
    snapshot = bytearray(store.path.read_bytes())
    snapshot[-3] ^= 0x10
    store.path.write_bytes(bytes(snapshot))
    with pytest.raises(StateFileError, match="checksum mismatch"):
        stores().load()
    store.path.write_bytes(b"something else entirely")
    with pytest.raises(StateFileError, match="not an mpnet state snapshot"):
        stores().load()


# -- SharedTable replicas ------------------------------------------------------------------------


class Replica:
    """One worker's SharedState whose outgoing messages are collected, not sent."""

    def __init__(self, tables: dict[str, dict[Any, Any]] | None = None) -> None:
        self.sent: list[Any] = []
        self.state = SharedState(
            lambda m: self.sent.append(to_wire(m)), tables if tables is not None else {}
        )
        self.table = self.state.table("t")

    def echo(self, message: list[Any], own: bool) -> None:
        """Feed back one of the collected writes as the master would sequence it."""
        _, name, op, args = message
        origin = os.getpid() if own else OTHER_PID
        self.state.receive(from_wire(through_channel(["sa", origin, name, op, args])))


def through_channel(message: Any) -> Any:
    return decode_payload(encode(message)[4:])


def test_table_is_cached_and_starts_from_the_initial_copy() -> None:
    state = SharedState(lambda m: None, {"t": {"a": 1}, "u": {}})
    table = state.table("t")
    assert state.table("t") is table
    assert dict(table) == {"a": 1}
    assert state.table("new").snapshot() == {}
    with pytest.raises(TypeError):
        state.table("")


def test_table_mapping_interface() -> None:
    replica = Replica({"t": {"a": 1, "b": [2]}})
    table = replica.table
    assert isinstance(table, SharedTable)
    assert table["a"] == 1 and table.get("zz") is None and table.get("zz", 5) == 5
    assert "b" in table and "zz" not in table
    assert len(table) == 2 and sorted(table) == ["a", "b"]
    assert dict(table.items()) == {"a": 1, "b": [2]}
    snapshot = table.snapshot()
    snapshot["c"] = 3
    assert "c" not in table
    assert "shared table 't'" in repr(table)
    with pytest.raises(KeyError):
        table["zz"]


def test_writes_apply_locally_and_are_sent() -> None:
    replica = Replica()
    table = replica.table
    table["a"] = 1
    table.update({"b": 2}, c=[3])
    del table["a"]
    table.clear()
    table.update({})  # nothing to say
    table[b"k"] = None
    assert replica.sent == [
        ["sw", "t", "set", ["a", 1]],
        ["sw", "t", "update", [{"b": 2, "c": [3]}]],
        ["sw", "t", "del", ["a"]],
        ["sw", "t", "clear", []],
        ["sw", "t", "set", [b"k", None]],
    ]
    assert table.snapshot() == {b"k": None}


def test_invalid_writes_change_nothing_and_send_nothing() -> None:
    replica = Replica({"t": {"a": 1}})
    table = replica.table
    with pytest.raises(TypeError, match="set is not plain data"):
        table["k"] = {1, 2}
    with pytest.raises(TypeError, match="keys must be"):
        table[("tuple",)] = 1
    with pytest.raises(TypeError, match="object is not plain data"):
        table.update({"ok": 1, "bad": object()})
    with pytest.raises(KeyError):
        del table["missing"]
    assert replica.sent == []
    assert table.snapshot() == {"a": 1}


def test_foreign_write_applies_when_nothing_is_pending() -> None:
    replica = Replica({"t": {"a": 1}})
    replica.echo(["sw", "t", "set", ["b", 2]], own=False)
    replica.echo(["sw", "t", "del", ["a"]], own=False)
    replica.echo(["sw", "t", "update", [{"c": 3}]], own=False)
    assert replica.table.snapshot() == {"b": 2, "c": 3}
    replica.echo(["sw", "t", "clear", []], own=False)
    assert replica.table.snapshot() == {}
    assert replica.sent == []


def test_foreign_write_to_a_pending_key_is_superseded() -> None:
    replica = Replica()
    table = replica.table
    table["k"] = "mine"
    # Sequenced before our write (our echo has not come back yet): must not show.
    replica.echo(["sw", "t", "set", ["k", "theirs"]], own=False)
    replica.echo(["sw", "t", "del", ["k"]], own=False)
    replica.echo(["sw", "t", "update", [{"k": "theirs", "other": 1}]], own=False)
    assert table.snapshot() == {"k": "mine", "other": 1}
    replica.echo(["sw", "t", "clear", []], own=False)
    assert table.snapshot() == {"k": "mine"}
    replica.echo(replica.sent[0], own=True)
    assert table.snapshot() == {"k": "mine"}
    # Nothing pending any more: a later foreign write wins.
    replica.echo(["sw", "t", "set", ["k", "theirs"]], own=False)
    assert table["k"] == "theirs"


def test_read_your_writes_while_echoes_arrive() -> None:
    replica = Replica()
    table = replica.table
    table["k"] = 1
    table["k"] = 2
    replica.echo(replica.sent[0], own=True)
    assert table["k"] == 2


def test_own_write_then_clear_converges() -> None:
    replica = Replica()
    replica.table["a"] = 1
    replica.table.clear()
    for message in replica.sent:
        replica.echo(message, own=True)
    assert replica.table.snapshot() == {}


def test_foreign_write_before_own_clear_converges() -> None:
    replica = Replica()
    replica.table.clear()
    replica.echo(["sw", "t", "set", ["b", 5]], own=False)  # master: set b, then our clear
    replica.echo(replica.sent[0], own=True)
    assert replica.table.snapshot() == {}


KEYS: list[Any] = ["a", "b", "c", 1, 2.5, b"k"]


def random_value(rng: random.Random) -> Any:
    return rng.choice([rng.randrange(100), f"s{rng.randrange(10)}", [rng.randrange(3)], None])


class SimWorker:
    """A worker in the simulation: its replica, what it sent, and what is on its way to it."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.state = SharedState(lambda m: self.sent.append(to_wire(m)), {})
        self.table = self.state.table("t")
        self.next = 0  # index of the next message in `sent` the master has not read yet
        self.inbox: deque[list[Any]] = deque()
        self.base: dict[Any, Any] = {}  # the master's table as far as this worker has heard
        self.unechoed: deque[list[Any]] = deque()  # own writes sent, echo not yet received
        self.futures: list[asyncio.Future[Any]] = []

    def expected(self) -> dict[Any, Any]:
        """What the replica must show: what it heard from the master, plus its own writes not
        yet echoed, in order (read-your-writes; and once all is delivered, the master's state)."""
        view = dict(self.base)
        for op, args in self.unechoed:
            apply_write(view, op, args)
        return view


def simulate(
    seed: int, with_clear: bool, with_atomics: bool = False, replicas: int = 3, steps: int = 60
) -> None:
    """Workers write at random; the master reads their channels in a random interleaving,
    sequences each write and fans it out (origin: the writer, or 0 for an atomic's effect);
    each worker's deliveries are delayed at random. After every step each replica must show
    exactly what it heard from the master plus its own unechoed writes; at the end, with
    everything delivered, every replica must equal the master's table."""
    asyncio.run(_simulate(seed, with_clear, with_atomics, replicas, steps))


async def _simulate(
    seed: int, with_clear: bool, with_atomics: bool, replicas: int, steps: int
) -> None:
    rng = random.Random(seed)
    workers = [SimWorker() for _ in range(replicas)]
    master: dict[Any, Any] = {}

    def write(worker: SimWorker) -> None:
        table = worker.table
        before = len(worker.sent)
        roll = rng.random()
        if with_atomics and roll < 0.25:
            key = rng.choice(KEYS)
            op = rng.choice(["incr", "setdefault", "cas", "pop", "delete_if"])
            if op == "incr":
                future = table.incr(key, rng.randrange(-3, 4))
            elif op == "setdefault":
                future = table.setdefault(key, random_value(rng))
            elif op == "cas":
                future = table.cas(key, table.get(key), random_value(rng))
            elif op == "pop":
                future = table.pop(key, "default")
            else:
                future = table.delete_if(key, table.get(key))
            worker.futures.append(future)
        elif with_clear and roll < 0.35:
            table.clear()
        elif roll < 0.6:
            table[rng.choice(KEYS)] = random_value(rng)
        elif roll < 0.75 and len(table):
            del table[rng.choice(list(table))]
        else:
            table.update({rng.choice(KEYS): random_value(rng) for _ in range(rng.randint(1, 3))})
        for message in worker.sent[before:]:
            if message[0] == "sw":
                worker.unechoed.append([message[2], message[3]])

    def fan_out(origin_index: int | None, name: str, op: str, args: list[Any]) -> None:
        apply_write(master, op, args)
        for index, worker in enumerate(workers):
            if origin_index is None:
                origin = 0
            elif index == origin_index:
                origin = os.getpid()
            else:
                origin = OTHER_PID + origin_index
            worker.inbox.append(["sa", origin, name, op, args])

    def sequence(index: int) -> None:
        worker = workers[index]
        if worker.next >= len(worker.sent):
            return
        message = through_channel(worker.sent[worker.next])
        worker.next += 1
        if message[0] == "sw":
            _, name, op, args = message
            fan_out(index, name, op, args)
            return
        _, request, name, op, args = message
        assert message[0] == "sx"
        try:
            answer, effect = run_atomic(master, op, args)
        except (SharedError, TypeError) as exc:
            worker.inbox.append(["sr", request, False, str(exc)])
            return
        if effect is not None:
            fan_out(None, name, effect[0], effect[1])
        worker.inbox.append(["sr", request, True, answer])

    def deliver(index: int) -> None:
        worker = workers[index]
        if not worker.inbox:
            return
        message = through_channel(worker.inbox.popleft())
        if message[0] == "sa":
            _, origin, _, op, args = message
            apply_write(worker.base, op, args)
            if origin == os.getpid():
                assert worker.unechoed.popleft() == [op, args]
        worker.state.receive(from_wire(message))

    def check(step: object) -> None:
        for index, worker in enumerate(workers):
            assert worker.table.snapshot() == worker.expected(), (seed, step, index)

    for step in range(steps):
        index = rng.randrange(replicas)
        roll = rng.random()
        if roll < 0.4:
            write(workers[index])
        elif roll < 0.7:
            sequence(index)
        else:
            deliver(index)
        check(step)
    while any(w.next < len(w.sent) or w.inbox for w in workers):
        index = rng.randrange(replicas)
        if rng.random() < 0.5:
            sequence(index)
        else:
            deliver(index)
        check("drain")
    for index, worker in enumerate(workers):
        assert worker.table.snapshot() == master, (seed, index)
        assert not worker.unechoed
        for future in worker.futures:
            assert future.done()
            future.exception()  # retrieved: a refused incr is an expected outcome here


def test_replicas_converge_with_set_del_update() -> None:
    for seed in range(100):
        simulate(seed, with_clear=False)


def test_replicas_converge_with_one_writer() -> None:
    for seed in range(50):
        simulate(seed, with_clear=False, replicas=1)


def test_replicas_converge_with_clear() -> None:
    for seed in range(100):
        simulate(seed, with_clear=True)


def test_replicas_converge_with_atomics_and_clear() -> None:
    for seed in range(150):
        simulate(seed, with_clear=True, with_atomics=True)


# -- atomics and broadcasts on the worker side ---------------------------------------------------


def test_atomic_requests_and_answers() -> None:
    async def main() -> None:
        replica = Replica()

        def handlers_sr(raw: list[Any]) -> None:
            replica.state.receive(from_wire(raw))

        table = replica.table

        incr = asyncio.ensure_future(table.incr("n", 5))
        cas = asyncio.ensure_future(table.cas("k", 1, 2))
        pop = asyncio.ensure_future(table.pop("gone", "dflt"))
        setdefault = asyncio.ensure_future(table.setdefault("s", [1]))
        await asyncio.sleep(0)  # let each send its request
        assert replica.sent == [
            ["sx", 1, "t", "incr", ["n", 5]],
            ["sx", 2, "t", "cas", ["k", 1, 2]],
            ["sx", 3, "t", "pop", ["gone", "dflt"]],
            ["sx", 4, "t", "setdefault", ["s", [1]]],
        ]
        handlers_sr(["sr", 2, True, False])
        handlers_sr(["sr", 1, True, 5])
        handlers_sr(["sr", 3, True, "dflt"])
        handlers_sr(["sr", 4, False, "setdefault refused"])
        handlers_sr(["sr", 99, True, "unknown request: ignored"])
        assert await incr == 5
        assert await cas is False
        assert await pop == "dflt"
        with pytest.raises(SharedError, match="setdefault refused"):
            await setdefault
        with pytest.raises(TypeError):
            await table.incr(["unhashable"])
        with pytest.raises(TypeError):
            await table.incr("n", 1.5)
        with pytest.raises(TypeError):
            await table.cas("k", 1, {1})

    asyncio.run(main())


def test_broadcast_and_hooks(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        replica = Replica()
        state = replica.state
        got: list[Any] = []
        done: list[Any] = []

        def failing(payload: Any) -> None:
            raise RuntimeError("hook broke")

        async def later(payload: Any) -> None:
            done.append(payload)

        state.hook("room", got.append, "chat")
        state.hook("room", failing, "chat")
        state.hook("room", later, "chat")
        state.hook("other", lambda p: got.append(("other", p)))
        state.broadcast("room", {"text": "hi"})
        assert replica.sent == [["bc", "room", {"text": "hi"}]]
        with pytest.raises(TypeError):
            state.broadcast("room", {1, 2})
        with pytest.raises(TypeError):
            state.broadcast(b"room", None)  # type: ignore[arg-type]

        def on_broadcast(raw: list[Any]) -> None:
            state.receive(from_wire(raw))

        with caplog.at_level(logging.ERROR):
            on_broadcast(["be", "room", 1])
            on_broadcast(["be", "room", 2])
            on_broadcast(["be", "nobody-listens", 3])
        await asyncio.sleep(0)
        assert got == [1, 2]
        assert done == [1, 2]
        assert "hook for broadcast 'room' failed" in caplog.text
        assert any(r.name == "mpnet.module.chat" for r in caplog.records)

    asyncio.run(main())
