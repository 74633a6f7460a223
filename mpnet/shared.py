"""Shared tables and broadcasts across workers.

The master holds the authoritative copy of every table and puts all writes in one order; each
worker keeps a replica, so reads are plain dict reads. The channel protocol (plain-data lists):

worker -> master
    ``["sw", table, op, args]``          a write already applied locally (set, del, clear, update)
    ``["sx", request, table, op, args]`` an atomic operation decided by the master (incr,
                                         setdefault, cas, pop, delete_if); answered with ``sr``
    ``["bc", topic, payload]``           a broadcast
master -> every worker
    ``["sa", origin_pid, table, op, args]`` a sequenced write (its *effect*: atomics arrive as
                                         set/del with the master's result, with origin 0)
    ``["be", topic, payload]``           a broadcast, in the master's order
master -> one worker
    ``["sr", request, ok, value]``       the answer to an atomic operation

Read-your-writes with convergence. A worker applies its own write at once and counts it as
pending for that key (a ``clear`` counts as pending for every key). The master answers each
channel in order, so while a worker has pending writes on a key, every write from elsewhere that
reaches it for that key was sequenced *before* its own and is superseded: it is skipped. The
worker's own echo is applied only when it is the last pending write on the key (an earlier echo
would briefly show an older value than the worker's last write), and nothing is applied while an
own ``clear`` is still pending (that clear, sequenced later, wipes it). Every replica therefore
ends in the master's state, and a worker always reads its own latest write.

Atomic operations are sent when they are *called* (they return an awaitable future), so they keep
program order with plain writes made after them. Their effect is broadcast with origin 0: it is
never one of the requesting worker's pending writes. The answer (``sr``) follows the effect on the
same channel, so once ``await table.incr(k)`` returns, the local replica shows that value (or a
later local write).

Values are plain data (None, bool, int, float, str, bytes, list, dict); anything else raises
``TypeError`` in the writing module, at the write. Treat values read from a table as immutable:
mutating one in place changes only the local replica (write a modified copy back instead).

Every message a worker writes is sent at the call (so an error, e.g. a value too large for the
channel, is raised at the write). The master queues frames for workers that are not waiting on
an answer until the end of its loop pass (see :class:`SharedMaster`).

A new worker needs no snapshot message: it is forked from the master, so it starts with a copy of
the master's tables, and every write sequenced after the fork reaches its channel.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

from .channel import MAX_FRAME, ChannelError, check_plain, decode_payload, encode
from .config import Config

log = logging.getLogger("mpnet.shared")

KEY_TYPES = (str, bytes, int, float, bool)
_MISSING = object()
_WRITE_ARITY = {"set": 2, "del": 1, "clear": 0, "update": 1}


class SharedError(Exception):
    """An atomic operation the master refused (e.g. ``incr`` of a value that is not an int)."""


def _check_key(key: Any) -> None:
    if type(key) not in KEY_TYPES:
        raise TypeError(
            f"shared table keys must be str, bytes, int, float or bool, not {type(key).__name__}"
        )


def apply_write(data: dict[Any, Any], op: str, args: list[Any]) -> None:
    """Apply one write to a plain dict (master copy, replicas and journal replay share this)."""
    if op == "set":
        data[args[0]] = args[1]
    elif op == "del":
        data.pop(args[0], None)
    elif op == "clear":
        data.clear()
    elif op == "update":
        data.update(args[0])
    else:
        raise ValueError(f"unknown shared-table write {op!r}")


def run_atomic(data: dict[Any, Any], op: str, args: list[Any]) -> tuple[Any, list[Any] | None]:
    """Decide an atomic operation on the master's copy: (answer, effect write or None)."""
    key = args[0]
    _check_key(key)
    if op == "incr":
        amount = args[1]
        current = data.get(key, 0)
        if type(current) is not int or type(amount) is not int:
            raise SharedError(f"incr: value of {key!r} is not an integer")
        new = current + amount
        return new, ["set", [key, new]]
    if op == "setdefault":
        if key in data:
            return data[key], None
        check_plain(args[1])
        return args[1], ["set", [key, args[1]]]
    if op == "cas":
        expected, new = args[1], args[2]
        current = data.get(key)
        if current != expected or type(current) is not type(expected):
            return False, None
        check_plain(new)
        return True, ["set", [key, new]]
    if op == "pop":
        if key in data:
            return data[key], ["del", [key]]
        return args[1], None
    if op == "delete_if":
        expected = args[1]
        current = data.get(key, _MISSING)
        if current is _MISSING or current != expected or type(current) is not type(expected):
            return False, None
        return True, ["del", [key]]
    raise SharedError(f"unknown atomic operation {op!r}")


# -- worker side ----------------------------------------------------------------------------------


class SharedTable(MutableMapping[Any, Any]):
    """A table every worker sees. Reads are local; writes reach every worker (see module doc).

    Plain writes (``t[k] = v``, ``del t[k]``, ``update``, ``clear``) apply locally at once and
    are sequenced by the master later; atomic operations (``incr``, ``setdefault``, ``cas``,
    ``pop``, ``delete_if``) are decided by the master and return a future to await.
    """

    def __init__(self, state: SharedState, name: str, data: dict[Any, Any]) -> None:
        self.name = name
        self._state = state
        self._data = data
        self._pending: dict[Any, int] = {}  # key -> own writes not yet echoed by the master
        self._clears = 0  # own clear() calls not yet echoed by the master

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def get(self, key: Any, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<shared table {self.name!r} {self._data!r}>"

    def _write(self, op: str, args: list[Any], keys: Iterable[Any]) -> None:
        # Sent before the local change: if the message cannot be sent (e.g. it exceeds the
        # channel's frame limit) the replica must stay as it was. The echo cannot overtake us:
        # it arrives through the event loop, after this call returns.
        self._state._send(["sw", self.name, op, args])
        pending = self._pending
        for key in keys:
            pending[key] = pending.get(key, 0) + 1

    def __setitem__(self, key: Any, value: Any) -> None:
        _check_key(key)
        check_plain(value)
        self._write("set", [key, value], (key,))
        self._data[key] = value

    def __delitem__(self, key: Any) -> None:
        if key not in self._data:
            raise KeyError(key)
        self._write("del", [key], (key,))
        del self._data[key]

    def clear(self) -> None:
        self._state._send(["sw", self.name, "clear", []])
        self._clears += 1
        self._data.clear()

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        changes = dict(*args, **kwargs)
        for key, value in changes.items():
            _check_key(key)
            check_plain(value)
        if not changes:
            return
        self._write("update", [changes], changes)
        self._data.update(changes)

    def snapshot(self) -> dict[Any, Any]:
        """A shallow copy of the local replica."""
        return dict(self._data)

    # atomic operations: decided by the master; sent at the call, awaited by the caller

    def incr(self, key: Any, amount: int = 1) -> asyncio.Future[int]:
        """Add *amount* to the integer at *key* (missing counts as 0); resolves to the new value.

        Raises :class:`SharedError` (when awaited) if the value is not an int."""
        if type(amount) is not int:
            raise TypeError(f"incr amount must be an int, not {type(amount).__name__}")
        return self._state._atomic(self.name, "incr", [key, amount])

    def setdefault(self, key: Any, value: Any = None) -> asyncio.Future[Any]:  # type: ignore[override]
        """Set *key* to *value* unless it exists; resolves to the value *key* then holds."""
        check_plain(value)
        return self._state._atomic(self.name, "setdefault", [key, value])

    def cas(self, key: Any, expected: Any, new: Any) -> asyncio.Future[bool]:
        """Set *key* to *new* if it holds *expected* (equal and of the same type; a missing key
        holds None, so ``cas(k, None, v)`` creates *k*); resolves to whether it did."""
        check_plain(expected)
        check_plain(new)
        return self._state._atomic(self.name, "cas", [key, expected, new])

    def pop(self, key: Any, default: Any = None) -> asyncio.Future[Any]:  # type: ignore[override]
        """Delete *key*; resolves to the value it held, or *default* if it was missing."""
        return self._state._atomic(self.name, "pop", [key, default])

    def delete_if(self, key: Any, expected: Any) -> asyncio.Future[bool]:
        """Delete *key* if it holds *expected* (equal and of the same type); resolves to whether
        it did. The conditional delete that ``pop`` cannot express: expiring or releasing an
        entry without clobbering a value another worker has put there since."""
        check_plain(expected)
        return self._state._atomic(self.name, "delete_if", [key, expected])

    # replication

    def _apply(self, own: bool, op: str, args: list[Any]) -> None:
        """Apply a write the master sequenced (see the module docstring for the rules)."""
        pending = self._pending
        if own:
            if op == "clear":
                self._clears -= 1
                return  # applied locally already; later local writes must not be lost
            if op == "update":
                keys = list(args[0])
            elif op in ("set", "del"):
                keys = [args[0]]
            else:
                raise ValueError(f"unknown shared-table write {op!r}")
            settled = []
            for key in keys:
                count = pending.get(key, 0) - 1
                if count > 0:
                    pending[key] = count  # a later own write is still on its way
                else:
                    pending.pop(key, None)
                    settled.append(key)
            if self._clears or not settled:
                return
            if op == "update":
                changes = args[0]
                apply_write(self._data, op, [{key: changes[key] for key in settled}])
            else:
                apply_write(self._data, op, args)
            return
        if self._clears:
            return  # sequenced before our own clear, which wipes it
        if not pending:
            apply_write(self._data, op, args)
        elif op in ("set", "del"):
            if args[0] not in pending:
                apply_write(self._data, op, args)
        elif op == "update":
            apply_write(self._data, op, [{k: v for k, v in args[0].items() if k not in pending}])
        elif op == "clear":
            for key in [k for k in self._data if k not in pending]:
                del self._data[key]
        else:
            raise ValueError(f"unknown shared-table write {op!r}")


class SharedState:
    """A worker's replicas of the shared tables, plus broadcasts and pending atomic requests."""

    def __init__(self, send: Callable[[Any], None], tables: dict[str, dict[Any, Any]]) -> None:
        self._channel_send = send
        self._lost: str | None = None  # why the channel to the master is gone, once it is
        self._pid = os.getpid()
        self._initial = tables
        self._tables: dict[str, SharedTable] = {}
        self._requests: dict[int, asyncio.Future[Any]] = {}
        self._request_ids = itertools.count(1)
        self._hooks: dict[str, list[tuple[Callable[[Any], Any], str]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def table(self, name: str) -> SharedTable:
        table = self._tables.get(name)
        if table is None:
            if not isinstance(name, str) or not name:
                raise TypeError("shared table names are non-empty strings")
            table = SharedTable(self, name, self._initial.pop(name, {}))
            self._tables[name] = table
        return table

    def broadcast(self, topic: str, payload: Any) -> None:
        if not isinstance(topic, str):
            raise TypeError("broadcast topics are strings")
        check_plain(payload)
        self._send(["bc", topic, payload])

    def hook(self, topic: str, handler: Callable[[Any], Any], owner: str = "") -> None:
        self._hooks.setdefault(topic, []).append((handler, owner))

    def _send(self, message: list[Any]) -> None:
        """Send to the master, or raise :class:`SharedError` once the channel is gone: a write
        or request nobody will ever order or answer must fail at the call, not hang or vanish."""
        if self._lost is not None:
            raise SharedError(self._lost)
        self._channel_send(message)

    def _atomic(self, table: str, op: str, args: list[Any]) -> asyncio.Future[Any]:
        """Send an atomic request now; return the future its answer resolves."""
        _check_key(args[0])
        future = asyncio.get_running_loop().create_future()
        request = next(self._request_ids)
        self._send(["sx", request, table, op, args])
        self._requests[request] = future
        return future

    def fail_pending(self, reason: str) -> None:
        """Fail every unanswered atomic request (the channel to the master is gone, so no answer
        will come), and every shared operation after it at its call; the worker calls this when
        it loses its channel."""
        self._lost = f"shared state unavailable: {reason}"
        requests, self._requests = self._requests, {}
        for future in requests.values():
            if not future.done():
                future.set_exception(SharedError(self._lost))

    def message_handlers(self) -> dict[str, Callable[[list[Any]], None]]:
        return {"sa": self._on_write, "sr": self._on_result, "be": self._on_broadcast}

    def _on_write(self, message: list[Any]) -> None:
        _, origin, name, op, args = message
        self.table(name)._apply(origin == self._pid, op, args)

    def _on_result(self, message: list[Any]) -> None:
        _, request, ok, value = message
        future = self._requests.pop(request, None)
        if future is None or future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(SharedError(value))

    def _on_broadcast(self, message: list[Any]) -> None:
        _, topic, payload = message
        for handler, owner in self._hooks.get(topic, ()):
            try:
                result = handler(payload)
                if asyncio.iscoroutine(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except Exception:
                logging.getLogger(f"mpnet.module.{owner or 'mpnet'}").exception(
                    "hook for broadcast %r failed", topic
                )


# -- master side ----------------------------------------------------------------------------------


class SharedMaster:
    """The authoritative tables in the master: sequencing, atomics, broadcasts, persistence.

    Sending: every sequenced write, broadcast and atomic answer is queued per worker, in
    sequence order, and sent once per pass of the master's loop (:meth:`tick`, called right after
    the loop has read what its workers sent): under load many messages then cost one send (one
    wake-up of the worker) instead of one each. An atomic's answer is queued after every write
    sequenced before it, so when the answer arrives the worker has all of them (the guarantee
    ``await table.incr(...)`` relies on).
    """

    def __init__(self, config: Config) -> None:
        self.tables: dict[str, dict[Any, Any]] = {}
        self.sequence = 0
        self._queued: dict[Any, list[bytes]] = {}  # channel -> frames to send at the next tick
        state_file = config["state_file"]
        self.store = (
            Store(config.resolve_path(state_file), config["state_fsync"]) if (state_file) else None
        )

    def open(self) -> None:
        if self.store is not None:
            self.tables = self.store.load()

    def close(self) -> None:
        if self.store is not None:
            self.store.close(self.tables)

    def before_fork(self) -> None:
        """Flush buffered journal bytes so the child cannot write them a second time."""
        if self.store is not None:
            self.store.flush()

    def forget_in_child(self) -> None:
        """In a forked worker: the master's journal file is not the worker's to touch."""
        if self.store is not None:
            self.store.forget()

    def tick(self) -> None:
        """Once per pass of the master's loop: send the queued frames; journal upkeep."""
        self.flush()
        if self.store is not None:
            self.store.tick(self.tables)

    def flush(self) -> None:
        """Send every queued frame (a worker that stops reading is cut off by the master)."""
        if self.store is not None:
            self.store.commit()
        queued, self._queued = self._queued, {}
        for channel, frames in queued.items():
            channel.send_frame(frames[0] if len(frames) == 1 else b"".join(frames))

    def _queue(self, channel: Any, frame: bytes) -> None:
        frames = self._queued.get(channel)
        if frames is None:
            self._queued[channel] = [frame]
        else:
            frames.append(frame)

    def handle(self, handle: Any, message: list[Any], channels: list[tuple[Any, Any]]) -> bool:
        """Process one shared-state message from a worker; False if it is not one."""
        kind = message[0]
        if kind == "sw":
            _, name, op, args = message
            if not isinstance(name, str) or op not in _WRITE_ARITY or not isinstance(args, list):
                raise ChannelError(f"bad shared write {op!r}")
            if len(args) != _WRITE_ARITY[op] or (op == "update" and type(args[0]) is not dict):
                raise ChannelError(f"bad arguments for shared write {op!r}")
            check_plain(args)  # the codec decodes deeper nesting than a module may write
            self._write(handle.pid, name, op, args, channels)
        elif kind == "sx":
            _, request, name, op, args = message
            if not isinstance(name, str) or not isinstance(args, list) or not args:
                raise ChannelError("bad atomic request")
            check_plain(args)
            table = self.tables.setdefault(name, {})
            try:
                answer, effect = run_atomic(table, op, args)
            except (SharedError, TypeError, IndexError) as exc:
                self._queue(handle.channel, encode(["sr", request, False, str(exc)]))
                return True
            reply = encode(["sr", request, True, answer])
            if effect is None:
                self._queue(handle.channel, reply)
            else:
                # Origin 0: the effect is not one of the requester's pending plain writes.
                self._write(0, name, effect[0], effect[1], channels, handle, reply)
        elif kind == "bc":
            _, topic, payload = message
            if not isinstance(topic, str):
                raise ChannelError("broadcast topic is not a string")
            check_plain(payload)
            frame = encode(["be", topic, payload])
            self._fan_out(frame, channels)
        else:
            return False
        return True

    def _write(
        self,
        origin: int,
        name: str,
        op: str,
        args: list[Any],
        channels: list[Any],
        requester: Any = None,
        reply: bytes = b"",
    ) -> None:
        """Sequence one write: apply, journal, then queue it for every worker. *reply* (an
        atomic's answer) is queued for *requester* right after the effect."""
        table = self.tables.setdefault(name, {})
        apply_write(table, op, args)
        self.sequence += 1
        if self.store is not None:
            self.store.append(name, op, args)  # committed before anything is sent (flush)
        frame = encode(["sa", origin, name, op, args])
        for handle, channel in channels:
            if handle is requester:
                self._queue(channel, frame + reply)  # the answer follows its effect
                reply = b""
            else:
                self._queue(channel, frame)
        if reply and requester is not None:
            self._queue(requester.channel, reply)

    def _fan_out(self, frame: bytes, channels: list[tuple[Any, Any]]) -> None:
        for _handle, channel in channels:
            self._queue(channel, frame)


# -- persistence ----------------------------------------------------------------------------------

_MAGIC = b"MPNETSNAP2\n"  # 2: msgpack bodies
_COMPACT_BYTES = 64 * 1024 * 1024


class StateFileError(Exception):
    """The state file or journal cannot be trusted; the message says where."""


class Store:
    """Snapshot plus append-only checksummed journal for the master's tables.

    Journal record: 4-byte length, 4-byte CRC32 of the payload, payload (``encode`` of
    ``[table, op, args]`` without its frame header). A record cut short at the very end (the master
    died mid-write) is dropped on load; a bad record followed by more data is corruption, and the
    service refuses to start rather than serve half a state.
    """

    def __init__(self, path: Path, fsync: str) -> None:
        self.path = path
        self.journal_path = path.with_name(path.name + ".journal")
        self.fsync = fsync
        self._journal: Any = None
        self._dirty = False
        self._last_sync = time.monotonic()
        self._journal_bytes = 0

    def load(self) -> dict[str, dict[Any, Any]]:
        tables: dict[str, dict[Any, Any]] = {}
        if self.path.exists():
            raw = self.path.read_bytes()
            if not raw.startswith(_MAGIC) or len(raw) < len(_MAGIC) + 4:
                raise StateFileError(f"{self.path}: not an mpnet state snapshot")
            body = raw[len(_MAGIC) + 4 :]
            if zlib.crc32(body) != int.from_bytes(raw[len(_MAGIC) : len(_MAGIC) + 4], "big"):
                raise StateFileError(f"{self.path}: snapshot checksum mismatch (file corrupt)")
            tables = decode_payload(body)
        good_end = 0
        if self.journal_path.exists():
            data = self.journal_path.read_bytes()
            good_end, count = replay_journal(data, tables, str(self.journal_path))
            if good_end < len(data):
                log.warning(
                    "%s: dropped an incomplete last record (%d bytes) left by a crash",
                    self.journal_path,
                    len(data) - good_end,
                )
            log.info("state loaded: %d table(s), %d journal record(s)", len(tables), count)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._journal = open(self.journal_path, "ab")  # noqa: SIM115 - held for the service's life
        self._journal.truncate(good_end)
        self._journal_bytes = good_end
        return tables

    def append(self, name: str, op: str, args: list[Any]) -> None:
        payload = encode([name, op, args])[4:]
        record = len(payload).to_bytes(4, "big") + zlib.crc32(payload).to_bytes(4, "big") + payload
        self._journal.write(record)
        self._journal_bytes += len(record)
        self._dirty = True

    def commit(self) -> None:
        """With ``fsync = "always"``: make every appended write durable now. Called before the
        master sends anything, so no worker sees a write (or an answer) that a crash could lose;
        the writes read in one pass of the master's loop share one fsync."""
        if self._dirty and self.fsync == "always":
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self._dirty = False

    def tick(self, tables: dict[str, dict[Any, Any]]) -> None:
        if self._dirty and self.fsync == "everysec" and time.monotonic() - self._last_sync >= 1:
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self._dirty = False
            self._last_sync = time.monotonic()
        elif self._dirty and self.fsync == "never":
            self._journal.flush()
            self._dirty = False
        if self._journal_bytes > _COMPACT_BYTES:
            self.compact(tables)

    def compact(self, tables: dict[str, dict[Any, Any]]) -> None:
        """Write a fresh snapshot atomically, then empty the journal."""
        body = encode(tables)[4:]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(_MAGIC + zlib.crc32(body).to_bytes(4, "big") + body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self._journal.truncate(0)
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self._journal_bytes = 0
        self._dirty = False

    def close(self, tables: dict[str, dict[Any, Any]]) -> None:
        if self._journal is not None:
            self.compact(tables)
            self._journal.close()
            self._journal = None

    def flush(self) -> None:
        if self._journal is not None:
            self._journal.flush()

    def forget(self) -> None:
        """In a forked child: close our copy of the descriptor (the buffer is empty, see
        :meth:`SharedMaster.before_fork`)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None


def replay_journal(data: bytes, tables: dict[str, dict[Any, Any]], where: str) -> tuple[int, int]:
    """Apply journal *data* to *tables*; return (end of the last good record, records applied).

    Pure, so the three cases (clean, cut short at the end, corrupt in the middle) are tested with
    bytes alone.
    """
    pos = count = 0
    while pos < len(data):
        if len(data) - pos < 8:
            return pos, count  # header cut short: the tail of a crashed write
        length = int.from_bytes(data[pos : pos + 4], "big")
        checksum = int.from_bytes(data[pos + 4 : pos + 8], "big")
        end = pos + 8 + length
        if end > len(data):
            # Either the body of the last record was cut short by a crash, or the length field
            # of a record in the middle is damaged. Only the latter leaves whole records after.
            if length > MAX_FRAME or _next_record(data, pos + 1) is not None:
                raise StateFileError(
                    f"{where}: corrupt record at byte {pos} (length {length} runs past the end "
                    f"of the file, but intact records follow); refusing to load a partial "
                    f"state (move the file away to start empty)"
                )
            return pos, count  # body cut short at the end
        payload = data[pos + 8 : end]
        if zlib.crc32(payload) != checksum:
            if end == len(data) and _next_record(data, pos + 1) is None:
                return pos, count  # a torn last write: the tail of a crash, like a short one
            raise StateFileError(
                f"{where}: corrupt record at byte {pos} (checksum mismatch) with "
                f"{len(data) - end} more byte(s) after it; refusing to load a partial state "
                f"(move the file away to start empty)"
            )
        try:
            name, op, args = decode_payload(payload)
            apply_write(tables.setdefault(name, {}), op, args)
        except (ChannelError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise StateFileError(f"{where}: undecodable record at byte {pos}: {exc}") from None
        pos = end
        count += 1
    return pos, count


def _next_record(data: bytes, start: int) -> int | None:
    """The offset of the first intact, decodable journal record at or after *start*, or None.

    Used only when a record's length runs past the end of the file, to tell a crash's torn tail
    (nothing intact after it) from a damaged length field in the middle. A torn tail is shorter
    than one record, so a longer remainder is corruption without a scan.
    """
    if len(data) - start > MAX_FRAME + 8:
        return start  # too long to be a torn tail: treat as corruption
    crc32 = zlib.crc32
    for pos in range(start, len(data) - 8):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if end > len(data) or crc32(data[pos + 8 : end]) != int.from_bytes(
            data[pos + 4 : pos + 8], "big"
        ):
            continue
        try:
            name, op, args = decode_payload(data[pos + 8 : end])
        except (ChannelError, ValueError, TypeError):
            continue
        if isinstance(name, str) and op in _WRITE_ARITY and isinstance(args, list):
            return pos
    return None
