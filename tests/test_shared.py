"""Shared tables and broadcasts: the replica protocol on its own, then through real processes.

The first half drives :class:`SharedMaster` and several :class:`SharedState` replicas in one
process, delivering their messages in random (per-channel FIFO) interleavings, so the convergence
rules are checked exhaustively and deterministically. The second half runs ``mpnet serve`` with a
probe module that answers JSON commands over TCP and reports its worker's pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from harness import Client, config, run_mpnet, wait_for

from mpnet.journal import StateFileError, Store, replay_journal
from mpnet.pure.frames import (
    MAX_FRAME,
    MAX_RELAYED_FRAME,
    ChannelError,
    FrameDecoder,
    decode_payload,
    encode,
)
from mpnet.pure.messages import SharedWrite, from_wire, to_wire
from mpnet.pure.replica import SharedError, SharedValueTooLarge, run_atomic
from mpnet.shared import SharedMaster
from mpnet.workers.shared import SharedState

# -- the protocol without processes ----------------------------------------------------------------


class _Config(dict):
    def resolve_path(self, path: str) -> Path:
        return Path(path)


class _MasterEnd:
    """The master's end of one worker's channel: frames queue up until delivered."""

    def __init__(self) -> None:
        self.inbox: list[Any] = []
        self.closed = False
        self._decoder = FrameDecoder()

    def send_frame(self, frame: bytes) -> None:
        self.inbox.extend(self._decoder.feed(frame))

    def send(self, message: Any) -> None:
        self.send_frame(encode(message))


class Cluster:
    """A master and *n* replicas joined by in-memory FIFO queues, stepped by hand."""

    def __init__(self, workers: int, state_file: str | None = None) -> None:
        self.master = SharedMaster(_Config(state_file=state_file, state_fsync="always"))
        self.master.open()
        self.workers = []
        for index in range(workers):
            outbox: list[Any] = []
            state = SharedState(
                lambda m, out=outbox: out.append(decode_payload(encode(to_wire(m))[4:])), {}
            )
            state._pid = 1000 + index
            end = _MasterEnd()
            handle = SimpleNamespace(pid=state._pid, slot=index, channel=end)
            self.workers.append(SimpleNamespace(state=state, outbox=outbox, end=end, handle=handle))
        self.channels = [(w.handle, w.end) for w in self.workers]

    def table(self, worker: int, name: str = "t"):
        return self.workers[worker].state.table(name)

    def to_master(self, worker: int, count: int | None = None, tick: bool = True) -> None:
        """The master reads *count* messages of a worker; with *tick*, its loop pass ends."""
        w = self.workers[worker]
        take = len(w.outbox) if count is None else min(count, len(w.outbox))
        for message in w.outbox[:take]:
            assert self.master.handle(w.handle, from_wire(message), self.channels)
        del w.outbox[:take]
        if tick:
            self.master.tick()

    def to_worker(self, worker: int, count: int | None = None) -> None:
        w = self.workers[worker]
        take = len(w.end.inbox) if count is None else min(count, len(w.end.inbox))
        for message in w.end.inbox[:take]:
            w.state.receive(from_wire(message))
        del w.end.inbox[:take]

    def settle(self) -> None:
        self.master.tick()
        while any(w.outbox or w.end.inbox for w in self.workers):
            for index in range(len(self.workers)):
                self.to_master(index)
                self.to_worker(index)


def test_concurrent_clear_converges():
    # Regression: a write sequenced before another worker's clear was applied by the clearing
    # worker (its own clear echo is not re-applied), which then kept a key the master had not.
    cluster = Cluster(2)
    a, b = cluster.table(0), cluster.table(1)
    b["k"] = 1
    cluster.to_master(1)
    a.clear()
    cluster.to_master(0)
    cluster.settle()
    assert cluster.master.tables["t"] == {} == a.snapshot() == b.snapshot()


def test_own_stale_echo_does_not_hide_a_later_own_write():
    # Regression: with two writes of one key in flight, the first echo showed the older value.
    cluster = Cluster(1)
    a = cluster.table(0)
    a["x"] = 1
    a["x"] = 2
    cluster.to_master(0)
    cluster.to_worker(0, 1)
    assert a["x"] == 2
    cluster.settle()
    assert a["x"] == 2 == cluster.master.tables["t"]["x"]


def test_atomic_effect_is_not_taken_for_a_pending_own_write():
    # Regression: the effect of an atomic was echoed with the requester's pid, so it cancelled
    # one of the requester's pending plain writes, and a foreign write then overwrote a value
    # the requester had just written.
    async def scenario() -> None:
        cluster = Cluster(2)
        a, b = cluster.table(0), cluster.table(1)
        answer = a.incr("k")  # sequenced first
        a["k"] = "mine"  # sequenced third
        b["k"] = "theirs"  # sequenced second
        cluster.to_master(0, 1)
        cluster.to_master(1)
        cluster.to_master(0)
        cluster.to_worker(0, 2)  # the incr's effect and answer
        assert await answer == 1
        cluster.to_worker(0, 1)  # b's write, sequenced before a's pending "mine"
        assert a["k"] == "mine"
        cluster.settle()
        assert a["k"] == b["k"] == cluster.master.tables["t"]["k"] == "mine"

    asyncio.run(scenario())


def test_an_answer_comes_after_every_write_sequenced_before_it():
    # The master queues frames for workers until the end of its loop pass, answers included;
    # the answer to an atomic must not overtake writes sequenced before it: awaiting it means the
    # replica has caught up.
    async def scenario() -> None:
        cluster = Cluster(2)
        a, b = cluster.table(0), cluster.table(1)
        b["x"] = "from b"
        b.update({"y": 1, "z": 2})
        cluster.to_master(1, tick=False)  # queued for both workers, not sent yet
        assert cluster.workers[0].end.inbox == []
        answer = a.cas("x", "from b", "swapped")
        cluster.to_master(0, tick=False)
        assert cluster.workers[0].end.inbox == []  # the answer waits for the end of the pass
        cluster.master.tick()
        assert [m[0] for m in cluster.workers[0].end.inbox] == ["sa", "sa", "sa", "sr"]
        cluster.to_worker(0)
        assert await answer is True
        assert a.snapshot() == {"x": "swapped", "y": 1, "z": 2}
        cluster.settle()
        assert b.snapshot() == a.snapshot() == cluster.master.tables["t"]

    asyncio.run(scenario())


def test_write_that_cannot_be_sent_leaves_the_replica_unchanged():
    def refuse(message: Any) -> None:
        raise RuntimeError("channel full")

    state = SharedState(refuse, {"t": {"k": 1}})
    table = state.table("t")
    with pytest.raises(RuntimeError):
        table["k"] = 2
    with pytest.raises(RuntimeError):
        table.clear()
    assert table.snapshot() == {"k": 1}
    assert table._replica.pending == {} and table._replica.clears == 0


def test_a_value_too_large_for_the_channel_raises_the_documented_error():
    sent: list[Any] = []

    def send(message: Any) -> None:  # what the worker's channel does: encode, or refuse
        sent.append(encode(to_wire(message)))

    state = SharedState(send, {"t": {"k": 1}})
    table = state.table("t")
    huge = b"x" * (64 * 1024 * 1024)
    for write in (
        lambda: table.__setitem__("k", huge),
        lambda: table.update({"k": huge}),
        lambda: state.broadcast("topic", huge),
    ):
        with pytest.raises(SharedValueTooLarge, match="exceeds the 67108864-byte frame limit"):
            write()
    with pytest.raises(SharedError):  # the documented base class catches it too
        table["k"] = huge
    assert table.snapshot() == {"k": 1} and sent == []


def test_acknowledged_writes_resolve_once_journaled_with_one_barrier_per_pass(tmp_path):
    path = tmp_path / "state.db"
    cluster = Cluster(2, state_file=str(path))

    async def scenario() -> None:
        a = cluster.table(0)
        acks = [a.set("x", 1), a.delete("gone"), a.flush()]
        a["y"] = 2
        acks.append(cluster.table(0, "u").flush())  # any table: one barrier for the worker
        await asyncio.sleep(0)  # the pass ends: its barrier is sent after its writes
        kinds = [type(from_wire(m)).__name__ for m in cluster.workers[0].outbox]
        assert kinds == ["SharedWrite", "SharedWrite", "SharedWrite", "Barrier"]
        cluster.to_master(0, count=3)  # the writes, not yet the barrier
        cluster.to_worker(0)
        assert not any(ack.done() for ack in acks)
        cluster.to_master(0)
        assert load_state(path) == {"t": {"x": 1, "y": 2}}  # durable before...
        cluster.to_worker(0)
        await asyncio.sleep(0)
        assert all(ack.done() and ack.result() is None for ack in acks)  # ...acknowledged

    try:
        asyncio.run(scenario())
    finally:
        cluster.master.store.forget()  # type: ignore[union-attr]


def test_sync_makes_every_write_acknowledged_elsewhere_visible():
    cluster = Cluster(2)

    async def scenario() -> None:
        a, b = cluster.table(0), cluster.table(1)
        ack = a.set("k", "v")
        await asyncio.sleep(0)
        cluster.to_master(0)  # the master ordered it and answered worker 0...
        cluster.to_worker(0)
        await ack
        assert "k" not in b  # ...worker 1 has not read its channel yet: a stale read
        barrier = b.sync()
        await asyncio.sleep(0)
        cluster.to_master(1)
        cluster.to_worker(1)
        await barrier
        assert b["k"] == "v"

    asyncio.run(scenario())


def test_barriers_fail_when_the_channel_is_lost():
    async def scenario() -> None:
        sent: list[Any] = []
        state = SharedState(sent.append, {})
        table = state.table("t")
        before = table.flush()  # not sent yet when the channel goes
        table["k"] = 1
        await asyncio.sleep(0)
        sent_barrier = table.set("k", 2)
        await asyncio.sleep(0)
        unsent = table.sync()
        state.fail_pending("channel lost")
        for future in (before, sent_barrier, unsent):
            with pytest.raises(SharedError, match="channel lost"):
                await future
        with pytest.raises(SharedError, match="channel lost"):
            table.flush()

    asyncio.run(scenario())


def test_master_refuses_a_write_whose_fan_out_exceeds_the_frame_limit_before_applying(tmp_path):
    path = tmp_path / "state.db"
    cluster = Cluster(2, state_file=str(path))
    handle = cluster.workers[0].handle
    handle.pid = 2**40  # the fan-out carries the origin pid: 9 bytes where the write had none

    def write_of(size: int) -> SharedWrite:
        return SharedWrite("t", "set", ["k", b"x" * size])

    def payload(write: SharedWrite) -> int:
        return len(encode(to_wire(write), MAX_FRAME + 64)) - 4

    write = write_of(MAX_FRAME - 2 - payload(write_of(MAX_FRAME - 100)) + MAX_FRAME - 100)
    assert payload(write) == MAX_FRAME - 2  # the write itself fits a frame
    with pytest.raises(ChannelError, match="frame limit"):
        cluster.master.handle(handle, write, cluster.channels)
    cluster.master.tick()
    assert cluster.master.tables.get("t", {}) == {}
    cluster.master.store.forget()  # type: ignore[union-attr]
    assert load_state(path) == {}  # not journaled either
    assert all(w.end.inbox == [] for w in cluster.workers)
    assert payload(write) > MAX_RELAYED_FRAME  # a real worker refuses it at the call


_MISSING = object()


@pytest.mark.parametrize("seed", range(150))
def test_random_interleavings_converge_and_read_own_writes(seed):
    """Random writes, atomics and deliveries; every replica ends equal to the master, a worker
    always reads its own latest write while it is in flight, and counters are exact."""
    rng = random.Random(seed)
    workers = rng.choice([2, 3])

    async def scenario() -> None:
        cluster = Cluster(workers)
        tables = [cluster.table(i) for i in range(workers)]
        # own[i][key]: worker i's last plain write of key (valid while that write is in flight)
        own: list[dict[Any, Any]] = [{} for _ in range(workers)]
        keys = ["a", "b", "c", 1, b"d"]
        incr_answers: list[Any] = []
        increments = 0
        for _ in range(rng.randrange(20, 120)):
            i = rng.randrange(workers)
            table = tables[i]
            action = rng.random()
            if action < 0.45:
                op = rng.random()
                key = rng.choice(keys)
                if op < 0.55:
                    value = rng.choice([rng.randrange(5), "s", [1, 2], {"x": 1}, None, b"v"])
                    table[key] = value
                    own[i][key] = value
                elif op < 0.75:
                    if key in table:
                        del table[key]
                        own[i][key] = _MISSING
                elif op < 0.9:
                    changes = {k: rng.randrange(9) for k in rng.sample(keys, 2)}
                    table.update(changes)
                    own[i].update(changes)
                else:
                    table.clear()
                    own[i] = dict.fromkeys(keys, _MISSING)
            elif action < 0.55:
                increments += 1
                incr_answers.append(cluster.table(i, "counters").incr("n"))
            elif action < 0.62:
                key = rng.choice(keys)
                rng.choice(
                    [
                        lambda t, k: t.cas(k, t.get(k), rng.randrange(5)),
                        lambda t, k: t.setdefault(k, "d"),
                        lambda t, k: t.pop(k),
                        lambda t, k: t.delete_if(k, t.get(k)),
                    ]
                )(table, key)
            elif action < 0.82:
                cluster.to_master(i, rng.randrange(1, 4), tick=rng.random() < 0.5)
            elif action < 0.85:
                cluster.master.tick()
            else:
                cluster.to_worker(i, rng.randrange(1, 4))
            for j, t in enumerate(tables):  # read-your-writes while own writes are in flight
                for key, value in own[j].items():
                    if key in t._replica.pending or t._replica.clears:
                        assert t.get(key, _MISSING) == value, (j, key)
            await asyncio.sleep(0)
        cluster.settle()
        await asyncio.sleep(0)
        for name, data in cluster.master.tables.items():
            for t in (cluster.table(i, name) for i in range(workers)):
                assert t.snapshot() == data
                assert t._replica.pending == {} and t._replica.clears == 0
        answers = [await answer for answer in incr_answers]
        assert sorted(answers) == list(range(1, increments + 1))

    asyncio.run(scenario())


def test_run_atomic_decisions():
    data: dict[Any, Any] = {"n": 1, "s": "x", "l": [1, 2]}
    assert run_atomic(data, "incr", ["n", 2]) == (3, ["set", ["n", 3]])
    with pytest.raises(SharedError):
        run_atomic(data, "incr", ["s", 1])
    assert run_atomic(data, "setdefault", ["s", "y"]) == ("x", None)
    assert run_atomic(data, "cas", ["new", None, 5]) == (True, ["set", ["new", 5]])
    assert run_atomic(data, "cas", ["n", 2, 5]) == (False, None)
    assert run_atomic(data, "cas", ["n", True, 5]) == (False, None)  # same value, other type
    assert run_atomic(data, "delete_if", ["l", [1, 2]]) == (True, ["del", ["l"]])
    assert run_atomic(data, "delete_if", ["l", [1, 3]]) == (False, None)
    assert run_atomic(data, "delete_if", ["missing", None]) == (False, None)
    assert run_atomic(data, "pop", ["missing", 7]) == (7, None)
    with pytest.raises(TypeError):
        run_atomic(data, "incr", [["unhashable"], 1])


def test_local_type_errors_are_raised_at_the_write():
    state = SharedState(lambda message: None, {})
    table = state.table("t")
    with pytest.raises(TypeError, match="not plain data"):
        table["k"] = object()
    with pytest.raises(TypeError, match="not plain data"):
        table.update({"k": {1, 2}})
    with pytest.raises(TypeError, match="keys must be"):
        table[("a", "b")] = 1
    with pytest.raises(TypeError, match="not plain data"):
        state.broadcast("topic", object())
    assert table.snapshot() == {}


# -- the journal, pure and on disk -----------------------------------------------------------------


def _record(name: str, op: str, args: list[Any]) -> bytes:
    payload = encode([name, op, args])[4:]
    return len(payload).to_bytes(4, "big") + zlib.crc32(payload).to_bytes(4, "big") + payload


def _journal(count: int) -> bytes:
    return b"".join(_record("t", "set", [f"k{i}", i]) for i in range(count))


def test_journal_clean_cut_short_and_torn():
    data = _journal(10)
    tables: dict[str, dict[Any, Any]] = {}
    assert replay_journal(data, tables, "j")[:2] == (len(data), 10)
    assert tables["t"] == {f"k{i}": i for i in range(10)}
    last = len(_record("t", "set", ["k9", 9]))
    for cut in (1, 5, 8, last - 3):
        tables = {}
        end, count, *_ = replay_journal(data[:-cut], tables, "j")
        assert (end, count) == (len(data) - last, 9)
        assert "k9" not in tables["t"] and tables["t"]["k8"] == 8
    torn = data[:-1] + bytes([data[-1] ^ 0xFF])  # complete length, bad checksum, at the end
    assert replay_journal(torn, {}, "j")[:2] == (len(data) - last, 9)


def test_journal_corruption_in_the_middle_is_refused_with_its_offset():
    data = bytearray(_journal(10))
    second = len(_record("t", "set", ["k0", 0]))
    bad_body = bytearray(data)
    bad_body[second + 12] ^= 0xFF
    with pytest.raises(StateFileError, match=rf"^journal: corrupt record at byte {second} "):
        replay_journal(bytes(bad_body), {}, "journal")
    bad_length = bytearray(data)
    bad_length[second] = 0x7F  # the length now runs past the end of the file
    with pytest.raises(StateFileError, match=rf"corrupt record at byte {second} \(length"):
        replay_journal(bytes(bad_length), {}, "journal")
    bad_length[second] = 0x00
    bad_length[second + 3] = 0xF0  # plausible length, past the end, intact records follow
    with pytest.raises(StateFileError, match=rf"corrupt record at byte {second}"):
        replay_journal(bytes(bad_length), {}, "journal")


def load_state(path: Path) -> dict[str, dict[Any, Any]]:
    """What a master started now would load from *path*. ``forget`` closes the journal that
    ``load`` opens for appending, without the compaction ``close`` would do (that would change
    the files under the test)."""
    store = Store(path, "always")
    try:
        return store.load()
    finally:
        store.forget()


def test_store_snapshot_and_journal_round_trip(tmp_path):
    path = tmp_path / "state.db"
    cluster = Cluster(1, state_file=str(path))
    table = cluster.table(0)
    table.update({"a": 1, "b": b"\x00\xff", "c": [1, {"x": None}]})
    del table["a"]
    cluster.settle()
    expected = {"t": {"b": b"\x00\xff", "c": [1, {"x": None}]}}
    assert load_state(path) == expected  # from the journal alone
    cluster.master.close()  # compacts: snapshot written, journal emptied
    assert path.exists() and (tmp_path / "state.db.journal").stat().st_size == 0
    store = Store(path, "always")
    assert store.load() == expected
    store.close(expected)


def test_master_refuses_a_write_nested_deeper_than_a_module_may_write():
    # msgpack decodes nesting far deeper than check_plain allows; the master checks, so such a
    # write (only a broken worker can send one) never reaches the tables (the worker is cut off).
    cluster = Cluster(1)
    deep: Any = None
    for _ in range(100):
        deep = [deep]
    handle = cluster.workers[0].handle
    for message in (
        ["sw", "t", "set", ["k", deep]],
        ["sx", 1, "t", "setdefault", ["k", deep]],
        ["bc", "topic", deep],
    ):
        with pytest.raises(TypeError, match="nested too deeply"):
            cluster.master.handle(handle, from_wire(message), cluster.channels)
    cluster.master.tick()
    assert cluster.master.tables.get("t", {}) == {}
    assert cluster.workers[0].end.inbox == []


def test_with_fsync_always_nothing_is_sent_before_the_journal_holds_it(tmp_path):
    path = tmp_path / "state.db"
    cluster = Cluster(2, state_file=str(path))
    durable_when_sent = []
    for worker in cluster.workers:
        deliver = worker.end.send_frame

        def send_frame(frame, deliver=deliver):
            durable_when_sent.append(load_state(path))
            deliver(frame)

        worker.end.send_frame = send_frame

    async def scenario() -> None:
        a, b = cluster.table(0), cluster.table(1)
        b["x"] = 1
        answer = a.incr("n", 5)
        cluster.to_master(1, tick=False)
        cluster.to_master(0)  # one pass: both writes, then one commit, then the sends
        cluster.to_worker(0)
        assert await answer == 5
        assert durable_when_sent == [{"t": {"x": 1, "n": 5}}] * 2

    asyncio.run(scenario())
    cluster.master.close()


# -- through real processes ------------------------------------------------------------------------

PROBE = r'''
"""Test probe: one JSON command per line, one JSON answer per line."""
import asyncio, gc, json, os, random

received = []
module.hook("order", received.append)


def table(name):
    return module.shared(name)


async def chaos(name, seed, count, keys):
    """Random plain writes (set/del/update/clear), yielding to the loop now and then."""
    rng = random.Random(seed)
    t = table(name)
    for i in range(count):
        op = rng.random()
        key = rng.choice(keys)
        if op < 0.6:
            t[key] = [os.getpid(), i]
        elif op < 0.8:
            if key in t:
                del t[key]
        elif op < 0.97:
            t.update({k: i for k in rng.sample(keys, 2)})
        else:
            t.clear()
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    return True


async def run(cmd):
    op, args = cmd[0], cmd[1:]
    if op == "pid":
        return os.getpid()
    if op == "get":
        return table(args[0]).get(args[1])
    if op == "dump":
        return sorted([k, v] for k, v in table(args[0]).items())
    if op == "set":
        table(args[0])[args[1]] = args[2]
        return True
    if op == "chaos":
        return await chaos(*args)
    if op == "incr":
        return await table(args[0]).incr(args[1], args[2])
    if op == "incr_burst":
        t = table(args[0])
        return [await t.incr(args[1]) for _ in range(args[2])]
    if op == "claim":  # an acknowledged create: True once the master has sequenced it
        return await table(args[0]).cas(args[1], None, args[2])
    if op == "sync":  # once answered, every earlier write of this worker is sequenced
        return await table("_sync").incr("n")
    if op == "broadcast_burst":
        for i in range(args[0]):
            module.broadcast("order", [os.getpid(), i])
            if i % 7 == 0:
                await asyncio.sleep(0)
        return True
    if op == "received":
        return received
    if op == "bad_value":
        try:
            table("t")["bad"] = object()
        except TypeError as exc:
            return f"TypeError: {exc}"
        return "no error"
    if op == "garbage":  # an oversized length prefix straight onto this worker's channel
        from mpnet.workers.channel import WorkerChannel
        gc.unfreeze()  # the worker froze what existed at boot, the channel too: make it visible
        channel = next(o for o in gc.get_objects() if isinstance(o, WorkerChannel))
        channel.transport.write(b"\xff\xff\xff\xff garbage")
        return True
    raise ValueError(f"unknown probe command {op!r}")


class listener:
    def onconnect(conn):
        conn.buffer = b""

    async def onincoming(conn, data):
        conn.buffer += data
        while b"\n" in conn.buffer:
            line, conn.buffer = conn.buffer.split(b"\n", 1)
            try:
                answer = {"ok": await run(json.loads(line))}
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            conn.write(json.dumps(answer) + "\n")


module.provides("net", name="probe", listener=listener, default_port=0)
'''


class Probe(Client):
    def call(self, *command: Any, timeout: float = 20) -> Any:
        self.send(json.dumps(command) + "\n")
        answer = json.loads(self.read_until(b"\n", timeout=timeout))
        if "error" in answer:
            raise AssertionError(answer["error"])
        return answer["ok"]


def _probes_on_distinct_workers(port: int, count: int) -> dict[int, Probe]:
    """Connect until there is one probe on each of *count* different workers (keyed by pid)."""
    found: dict[int, Probe] = {}

    def attempt() -> bool:
        probe = Probe(port)
        pid = probe.call("pid")
        if pid in found:
            probe.close()
        else:
            found[pid] = probe
        return len(found) >= count

    try:
        wait_for(attempt, what=f"connections on {count} distinct workers")
    except BaseException:
        for probe in found.values():
            probe.close()
        raise
    return found


def _probe_on(port: int, pid: int) -> Probe:
    return next(iter(_probes_on_pids(port, {pid}).values()))


def _probes_on_pids(port: int, pids: set[int]) -> dict[int, Probe]:
    found: dict[int, Probe] = {}

    def attempt() -> bool:
        probe = Probe(port)
        pid = probe.call("pid")
        if pid in pids and pid not in found:
            found[pid] = probe
        else:
            probe.close()
        return set(found) == pids

    wait_for(attempt, what=f"connections on workers {sorted(pids)}")
    return found


@pytest.fixture
def probe_server(mpnet, write_module, tmp_path):
    """``probe_server(workers=2, **config_keys)`` → (server, port)."""
    path = write_module("probe", PROBE)

    def start(workers: int = 2, **keys: Any):
        server = mpnet(config([str(path)], workers=workers, **keys))
        return server, server.port("probe")

    return start


def _in_threads(jobs: list[Any]) -> list[Any]:
    """Run callables concurrently; re-raise the first failure."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index: int, job: Any) -> None:
        try:
            results[index] = job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    return results


def _wait_converged(probes: list[Probe], table: str) -> list[Any]:
    """Wait until every probe's replica of *table* is the same; return it."""
    dumps: list[Any] = []

    def equal() -> bool:
        dumps[:] = [probe.call("dump", table) for probe in probes]
        return all(dump == dumps[0] for dump in dumps)

    wait_for(equal, timeout=10, what=f"replicas of {table!r} to converge: {dumps}")
    return dumps[0]


@pytest.mark.server
def test_concurrent_writers_converge_and_a_later_worker_sees_the_same(probe_server):
    server, port = probe_server(workers=2)
    probes = _probes_on_distinct_workers(port, 2)
    keys = [f"k{i}" for i in range(8)]
    try:
        for round_ in range(3):
            _in_threads(
                [
                    lambda p=p, s=seed + 10 * round_: p.call("chaos", "t", s, 400, keys)
                    for seed, p in enumerate(probes.values())
                ]
            )
            for probe in probes.values():
                probe.call("sync")
            state = _wait_converged(list(probes.values()), "t")
        assert state, "the random writes should leave something behind"
        # A worker forked after all this starts from the master's copy: the same state.
        victim, survivor = sorted(probes)
        os.kill(victim, signal.SIGKILL)
        replacement = wait_for(
            lambda: (server.worker_pids() - {victim, survivor}) or None,
            what="a replacement worker",
        ).pop()
        with _probe_on(port, replacement) as fresh:
            assert fresh.call("dump", "t") == state
    finally:
        for probe in probes.values():
            probe.close()


@pytest.mark.server
def test_incr_is_exact_from_every_worker(probe_server):
    _, port = probe_server(workers=2)
    probes = _probes_on_distinct_workers(port, 2)
    extra = [Probe(port) for _ in range(2)]  # more connections, wherever they land
    clients = [*probes.values(), *extra]
    try:
        results = _in_threads([lambda p=p: p.call("incr_burst", "c", "n", 500) for p in clients])
        answers = sorted(value for result in results for value in result)
        assert answers == list(range(1, 500 * len(clients) + 1))
        for probe in probes.values():
            wait_for(lambda p=probe: p.call("get", "c", "n") == 500 * len(clients))
    finally:
        for client in clients:
            client.close()


@pytest.mark.server
def test_broadcasts_arrive_in_the_same_order_in_every_worker(probe_server):
    _, port = probe_server(workers=3)
    probes = _probes_on_distinct_workers(port, 3)
    try:
        _in_threads([lambda p=p: p.call("broadcast_burst", 300) for p in probes.values()])
        total = 300 * len(probes)
        logs = {}
        for pid, probe in probes.items():
            wait_for(lambda p=probe: len(p.call("received")) == total, what="every broadcast")
            logs[pid] = [tuple(item) for item in probe.call("received")]
        orders = list(logs.values())
        assert all(order == orders[0] for order in orders)
        for pid in probes:  # each sender's own broadcasts keep its order
            assert [i for sender, i in orders[0] if sender == pid] == list(range(300))
    finally:
        for probe in probes.values():
            probe.close()


def _claimer(
    probe: Probe, prefix: str, acked: list[str], stop: threading.Event, errors: list[str]
) -> None:
    """Claim keys one by one until stopped or the connection dies; record what was acked (the
    claim and the incr that follows it both answered). A dead connection ends the loop; any
    other failure is recorded in *errors*."""
    i = 0
    while not stop.is_set():
        key = f"{prefix}-{i}"
        try:
            if probe.call("claim", "acks", key, i, timeout=5) is not True:
                errors.append(f"claim of fresh key {key} refused")
                return
            probe.call("incr", "acks", "count", 1, timeout=5)
        except (OSError, AssertionError, ValueError) as exc:
            if not stop.is_set() and "connection closed" not in str(exc):
                errors.append(f"{prefix}: {exc!r}")
            return
        acked.append(key)
        i += 1


@pytest.mark.server
def test_kill_9_of_a_worker_mid_burst_loses_no_acknowledged_write(probe_server):
    server, port = probe_server(workers=2)
    probes = _probes_on_distinct_workers(port, 2)
    victim, survivor = sorted(probes)
    acked: dict[str, list[str]] = {"victim": [], "survivor": []}
    stop = threading.Event()
    errors: list[str] = []
    threads = [
        threading.Thread(target=_claimer, args=(probes[pid], name, acked[name], stop, errors))
        for name, pid in (("victim", victim), ("survivor", survivor))
    ]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(acked["victim"]) > 100 and len(acked["survivor"]) > 100)
        os.kill(victim, signal.SIGKILL)
        mark = len(acked["survivor"])
        wait_for(lambda: len(acked["survivor"]) > mark + 100, what="the survivor to carry on")
        replacement = wait_for(
            lambda: (server.worker_pids() - {victim, survivor}) or None,
            what="a replacement worker",
        ).pop()
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    assert all("victim" in error for error in errors), errors  # the victim's link may break
    with _probe_on(port, replacement) as fresh:
        readers = [fresh, probes[survivor]]
        state = dict(map(tuple, _wait_converged(readers, "acks")))
    for key in acked["victim"] + acked["survivor"]:
        assert key in state, f"acknowledged {key} lost"
    # every completed incr was acknowledged; at most one per client was in flight at the kill
    assert len(acked["victim"]) + len(acked["survivor"]) <= state["count"]
    assert state["count"] <= len(acked["victim"]) + len(acked["survivor"]) + 2
    for probe in probes.values():
        probe.close()


def _state_config(tmp_path: Path, **keys: Any) -> dict[str, Any]:
    return {"state_file": str(tmp_path / "state" / "tables.db"), **keys}


@pytest.mark.server
def test_state_survives_a_graceful_restart(probe_server, tmp_path):
    keys = _state_config(tmp_path)
    server, port = probe_server(workers=2, **keys)
    with Probe(port) as probe:
        probe.call("set", "t", "plain", {"nested": [1, "two", None]})
        assert probe.call("incr", "t", "counter", 41) == 41
        probe.call("sync")
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    server, port = probe_server(workers=2, **keys)
    with Probe(port) as probe:
        assert probe.call("get", "t", "plain") == {"nested": [1, "two", None]}
        assert probe.call("incr", "t", "counter", 1) == 42


def _kill_everything(server) -> None:
    """kill -9 the master and every worker, by PID."""
    workers = server.worker_pids()
    os.kill(server.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.wait_exit()
    wait_for(lambda: not any(_alive(pid) for pid in workers), what="the workers to be gone")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _acked_run_then_kill_9(probe_server, tmp_path: Path, keys: dict[str, Any]) -> list[str]:
    server, port = probe_server(workers=2, **keys)
    probes = _probes_on_distinct_workers(port, 2)
    acked: list[list[str]] = [[], []]
    stop = threading.Event()
    errors: list[str] = []
    threads = [
        threading.Thread(target=_claimer, args=(probe, f"victim{i}", acked[i], stop, errors))
        for i, probe in enumerate(probes.values())
    ]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: min(map(len, acked)) > 30, what="acknowledged writes")
        _kill_everything(server)
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
        for probe in probes.values():
            probe.close()
    return acked[0] + acked[1]


@pytest.mark.server
def test_kill_9_of_master_with_fsync_always_loses_nothing_acknowledged(probe_server, tmp_path):
    keys = _state_config(tmp_path, state_fsync="always")
    acked = _acked_run_then_kill_9(probe_server, tmp_path, keys)
    _, port = probe_server(workers=2, **keys)
    with Probe(port) as probe:
        state = dict(map(tuple, probe.call("dump", "acks")))
    missing = [key for key in acked if key not in state]
    assert missing == []
    assert len(acked) <= state["count"] <= len(acked) + 2


@pytest.mark.server
def test_journal_cut_short_at_the_end_still_loads(probe_server, tmp_path):
    keys = _state_config(tmp_path, state_fsync="always")
    acked = _acked_run_then_kill_9(probe_server, tmp_path, keys)
    journal = Path(keys["state_file"] + ".journal")
    size = journal.stat().st_size
    os.truncate(journal, size - 3)
    server, port = probe_server(workers=2, **keys)
    server.wait_log(r"dropped a torn last record at byte \d+ \(\d+ bytes\) left by a crash")
    with Probe(port) as probe:
        state = dict(map(tuple, probe.call("dump", "acks")))
    # the cut record is the very last write; everything acknowledged before it survived
    assert sum(key not in state for key in acked) <= 1
    assert len(state) >= len(acked) - 1


def _corrupt_the_middle(tmp_path: Path, probe_server) -> tuple[Path, int]:
    keys = _state_config(tmp_path, state_fsync="always")
    _acked_run_then_kill_9(probe_server, tmp_path, keys)
    journal = Path(keys["state_file"] + ".journal")
    data = bytearray(journal.read_bytes())
    offsets = []
    pos = 0
    while pos + 8 <= len(data):
        offsets.append(pos)
        pos += 8 + int.from_bytes(data[pos : pos + 4], "big")
    target = offsets[len(offsets) // 2]
    data[target + 10] ^= 0x55  # a payload byte of a record in the middle
    journal.write_bytes(bytes(data))
    (tmp_path / "mpnet.toml").write_text(config([str(tmp_path / "modules" / "probe.py")], **keys))
    return journal, target


@pytest.mark.server
def test_journal_corrupt_in_the_middle_refuses_to_start(probe_server, tmp_path):
    journal, offset = _corrupt_the_middle(tmp_path, probe_server)
    result = run_mpnet(tmp_path, "serve", "-c", str(tmp_path / "mpnet.toml"))
    assert result.returncode != 0
    assert f"{journal}: corrupt record at byte {offset}" in result.stderr


@pytest.mark.server
def test_journal_corruption_is_reported_as_one_clear_line(probe_server, tmp_path):
    journal, offset = _corrupt_the_middle(tmp_path, probe_server)
    result = run_mpnet(tmp_path, "serve", "-c", str(tmp_path / "mpnet.toml"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot start: {journal}: corrupt record at byte {offset}" in result.stderr


@pytest.mark.server
def test_non_plain_value_raises_type_error_in_the_writing_module(probe_server):
    _, port = probe_server(workers=1)
    with Probe(port) as probe:
        answer = probe.call("bad_value")
        assert answer.startswith("TypeError: object is not plain data")
        assert probe.call("get", "t", "bad") is None
        assert probe.call("incr", "t", "still", 1) == 1  # the worker carries on


@pytest.mark.server
def test_malformed_frame_from_a_worker_kills_only_that_worker(probe_server):
    server, port = probe_server(workers=2)
    probes = _probes_on_distinct_workers(port, 2)
    victim, survivor = sorted(probes)
    try:
        probes[survivor].call("incr", "t", "n", 1)
        probes[victim].send(json.dumps(["garbage"]) + "\n")  # it may die before it answers
        server.wait_log(
            rf"worker \d \(pid {victim}\) sent a malformed message \(frame of 4294967295 bytes "
            r"exceeds the \d+-byte limit\); killing it"
        )
        server.wait_log(rf"\(pid {victim}\) killed by signal SIGKILL; replacing it")
        assert probes[survivor].call("incr", "t", "n", 1) == 2  # master and survivor carry on
        replacement = wait_for(
            lambda: (server.worker_pids() - {victim, survivor}) or None,
            what="a replacement worker",
        ).pop()
        with _probe_on(port, replacement) as fresh:
            assert fresh.call("incr", "t", "n", 1) == 3
        assert server.proc.poll() is None
        assert survivor in server.worker_pids()
    finally:
        for probe in probes.values():
            probe.close()


def test_atomics_are_sent_at_the_call_and_fail_when_the_channel_is_lost():
    async def scenario() -> None:
        sent: list[Any] = []
        state = SharedState(sent.append, {})
        table = state.table("t")
        future = table.incr("k")
        table["k"] = 5
        assert [type(m).__name__ for m in sent] == ["AtomicRequest", "SharedWrite"]
        state.fail_pending("channel lost")
        with pytest.raises(SharedError, match="channel lost"):
            await future
        sent.clear()
        with pytest.raises(SharedError, match="channel lost"):
            table.incr("k")  # started after the loss: fails at the call, never hangs
        with pytest.raises(SharedError, match="channel lost"):
            table["k"] = 6  # nobody would order it: not applied, not silently dropped
        with pytest.raises(SharedError, match="channel lost"):
            state.broadcast("topic", 1)
        assert table["k"] == 5 and sent == []

    asyncio.run(scenario())


@pytest.mark.server
def test_atomics_in_flight_fail_at_once_when_the_master_dies(probe_server):
    server, port = probe_server(workers=1, graceful_timeout=20)
    with Probe(port) as probe:
        assert probe.call("incr", "t", "n", 1) == 1
        server.worker_pids()  # remembered, so the fixture stops the orphan by PID
        os.kill(server.pid, signal.SIGSTOP)  # the request below gets no answer...
        probe.send(json.dumps(["incr", "t", "n", 1]) + "\n")
        os.kill(server.pid, signal.SIGKILL)  # ...and then the channel is gone
        answer = json.loads(probe.read_until(b"\n", timeout=3))
    assert "SharedError" in answer.get("error", "")


@pytest.mark.server
def test_shared_operations_after_the_master_died_fail_at_once(probe_server):
    server, port = probe_server(workers=1, graceful_timeout=20)
    with Probe(port) as probe:
        assert probe.call("incr", "t", "n", 1) == 1
        server.worker_pids()  # remembered, so the fixture stops the orphan by PID
        os.kill(server.pid, signal.SIGKILL)
        server.wait_log(r"worker 0 \[mpnet\] error: channel to master closed .*; stopping")
        started = time.monotonic()
        with pytest.raises(AssertionError, match="SharedError: shared state unavailable"):
            probe.call("incr", "t", "n", 1, timeout=5)
        with pytest.raises(AssertionError, match="SharedError: shared state unavailable"):
            probe.call("set", "t", "k", 1, timeout=5)
        assert time.monotonic() - started < 5
        # The orphan no longer accepts: a new client is refused or closed unserved.
        wait_for(lambda: not _serves_a_new_client(port), what="the orphan to stop accepting")


def _serves_a_new_client(port: int) -> bool:
    try:
        with Probe(port) as probe:
            probe.call("pid", timeout=2)
        return True
    except (OSError, AssertionError, ValueError, TimeoutError):
        return False
