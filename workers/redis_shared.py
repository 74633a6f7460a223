"""A worker's shared tables on Redis (``shared_backend = "redis"``): the same API as
:mod:`mpnet.workers.shared`, with Redis in the master's place, so the same module runs on one
host or on several.

Each worker holds two connections (redis-py's asyncio ``Connection``, hiredis parser): one for
commands, pipelined (every command of a loop pass leaves in one write, replies come back in
order), one subscribed to the deployment's events channel. Layout, scripts and events are in
:mod:`mpnet.pure.redisshared`; how a replica merges changes with its own writes in flight is
:class:`mpnet.pure.replica.Replica`, unchanged: Redis orders the changes as the master does.

What a module gets:

* reads are local dict reads of the replica; a worker reads its own writes at once; a change made
  anywhere reaches every replica within one Redis round trip (plus the subscriber's queue);
* plain writes are sent at the call, in program order, fire-and-forget; ``await t.set(k, v)``,
  ``await t.delete(k)`` and ``await t.flush()`` resolve once Redis has applied them (durable as
  Redis's own persistence settings make it);
* atomics are decided by Redis (one Lua script each) and resolve once the local replica shows
  their effect; ``await t.sync()`` resolves once every change Redis had applied when it was
  called (acknowledged to anyone, on any host) is in the local replica;
* broadcasts go through the same channel, so every worker on every host gets them in one order.

Redis unreachable (refused, reset, or no reply within ``redis_timeout``): every pending
operation fails with :class:`SharedUnavailable`; writes and broadcasts made meanwhile raise it
at the call (refused, never queued); atomics and barriers return a future that fails with it;
reads keep answering from the replica as it was. The worker reconnects with back-off, reloads
every table from Redis, then runs the hooks of :data:`~mpnet.pure.replica.RESYNC` (broadcasts
published meanwhile are gone: pub/sub keeps nothing for an absent subscriber); the log says when
it is lost and when it is back, and each heartbeat's report (:meth:`RedisSharedState.report`)
tells the master, for ``mpnet status``.

A worker that boots while Redis is unreachable (a replacement after a crash, ``TTIN``, a reload
during an outage) serves anyway, with empty replicas, as if the connection had just been lost.
Only the checker of the very first start (and ``mpnet check``) insists on reaching Redis, so a
wrong address is still a one-line error.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from mpnet.pure.config import Config, ConfigError
from mpnet.pure.messages import ChannelError, Message
from mpnet.pure.redisshared import (
    MARKER,
    SCRIPTS,
    BroadcastMessage,
    Keys,
    ScriptCall,
    atomic_answer,
    atomic_args,
    command,
    decode_event,
    decode_key,
    decode_value,
    encode_broadcast,
    error_message,
    write_args,
)
from mpnet.pure.redisurl import redacted
from mpnet.pure.replica import (
    RESYNC,
    Replica,
    SharedError,
    SharedUnavailable,
    apply_write,
    check_key,
)
from mpnet.pure.values import check_plain

from .shared import SharedTable, run_hooks

log = logging.getLogger("mpnet.redis")

BACKOFF_START, BACKOFF_MAX = 0.1, 5.0
UPDATE_CHUNK = 1000  # fields per script call (Lua's unpack() has a stack limit)

Reply = Any  # bytes, int, list, None, or the exception Redis answered


class RedisUnreachable(ConfigError):
    """Redis refused, reset or did not answer at a start that requires it (first start,
    ``mpnet check``): a config-style one-line error, told apart from bad input."""


class RedisSharedTable(SharedTable):
    """A :class:`~mpnet.workers.shared.SharedTable` whose writes and atomics go to Redis."""

    _state: RedisSharedState  # type: ignore[assignment]

    def _send_write(self, op: str, args: list[Any]) -> asyncio.Future[None]:
        return self._state._write(self.name, op, args)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def set(self, key: Any, value: Any) -> asyncio.Future[None]:
        """``t[key] = value`` that can be awaited: resolves once Redis has applied it."""
        check_key(key)
        check_plain(value)
        future = self._send_write("set", [key, value])
        self._replica.wrote((key,))
        self._data[key] = value
        return future

    def __delitem__(self, key: Any) -> None:
        if key not in self._data:
            raise KeyError(key)
        self.delete(key)

    def delete(self, key: Any) -> asyncio.Future[None]:
        """``del t[key]`` (no error if missing) that can be awaited: resolves once applied."""
        check_key(key)
        future = self._send_write("del", [key])
        self._replica.wrote((key,))
        self._data.pop(key, None)
        return future

    def clear(self) -> None:
        self._send_write("clear", [])
        self._replica.cleared()

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        changes = dict(*args, **kwargs)
        for key, value in changes.items():
            check_key(key)
            check_plain(value)
        items = list(changes.items())
        for start in range(0, len(items), UPDATE_CHUNK):
            chunk = dict(items[start : start + UPDATE_CHUNK])
            self._send_write("update", [chunk])
            self._replica.wrote(chunk)
            self._data.update(chunk)

    def flush(self) -> asyncio.Future[None]:
        """Resolves once every write this worker made before the call is applied in Redis."""
        return self._state.flush()

    def sync(self) -> asyncio.Future[None]:
        """Resolves once every change applied in Redis before the call is in this replica."""
        return self._state.sync()

    def incr(self, key: Any, amount: int = 1) -> asyncio.Future[int]:
        if type(amount) is not int:
            raise TypeError(f"incr amount must be an int, not {type(amount).__name__}")
        return self._state._atomic(self.name, "incr", [key, amount])


class RedisSharedState:
    """A worker's replicas of the shared tables, kept by Redis (see the module docstring)."""

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self.timeout = timeout
        self.origin = os.urandom(8) + str(os.getpid()).encode()
        self._tables: dict[str, RedisSharedTable] = {}
        self._initial: dict[str, dict[Any, Any]] = {}
        self._hooks: dict[str, list[tuple[Callable[[Any], Any], str]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pool: Any = None
        self._cmd: Any = None  # redis-py asyncio Connection, pipelined
        self._sub: Any = None  # redis-py asyncio Connection, subscribed to the events channel
        self._shas: dict[str, bytes] = {}
        self._calls: dict[tuple[str, str], ScriptCall] = {}  # (table, op) -> encoded prefix
        self._outbox: list[bytes] = []
        self._waiting: deque[list[Any]] = deque()  # [on_reply, sent at, followers]
        self._flush_scheduled = False
        self._sync_pending: asyncio.Future[None] | None = None
        self._seen = 0  # seq of the last change in the replicas
        self._seq_waiters: list[tuple[int, int, asyncio.Future[Any], Any]] = []
        self._order = itertools.count()
        self._unavailable: str | None = "not connected yet"
        self._changed_at = time.time()  # _set_unavailable's last call (wall clock: for status)
        self._last_error = ""
        self._losses = 0
        self._sub_heard = 0.0
        self._live: list[asyncio.Task[Any]] = []  # the connections' reader tasks
        self._background: asyncio.Task[Any] | None = None
        self._loading: list[bytes] | None = None  # events heard while a snapshot loads

    # -- the module API ---------------------------------------------------------------------

    def table(self, name: str) -> RedisSharedTable:
        table = self._tables.get(name)
        if table is None:
            if not isinstance(name, str) or not name:
                raise TypeError("shared table names are non-empty strings")
            table = RedisSharedTable(self, name, self._initial.pop(name, {}))  # type: ignore[arg-type]
            self._tables[name] = table
        return table

    def tables(self) -> Iterator[str]:
        return iter(self._tables)

    def broadcast(self, topic: str, payload: Any) -> None:
        if not isinstance(topic, str):
            raise TypeError("broadcast topics are strings")
        check_plain(payload)
        self._command(
            command("PUBLISH", self.keys.events, encode_broadcast(topic, payload)),
            self._on_write_reply,
        )

    def hook(self, topic: str, handler: Callable[[Any], Any], owner: str = "") -> None:
        self._hooks.setdefault(topic, []).append((handler, owner))

    def flush(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._unavailable is not None:
            future.set_exception(SharedUnavailable(self._unavailable))
        elif not self._waiting:
            future.set_result(None)
        else:
            entry = self._waiting[-1]
            if entry[2] is None:
                entry[2] = []
            entry[2].append(future)
        return future

    def sync(self) -> asyncio.Future[None]:
        if self._sync_pending is not None:
            return self._sync_pending  # one round trip for every caller of this loop pass
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._unavailable is not None:
            future.set_exception(SharedUnavailable(self._unavailable))
            return future

        def on_reply(reply: Reply) -> None:
            if isinstance(reply, BaseException):
                _fail(future, reply)
            else:
                self._when_seen(int(reply or 0), future, None)

        self._command(command("GET", self.keys.seq), on_reply)
        self._sync_pending = future
        return future

    # -- what the worker calls --------------------------------------------------------------

    def receive(self, message: Message) -> None:
        raise ChannelError(f"{type(message).__name__}: shared tables are on Redis, not the master")

    def fail_pending(self, reason: str) -> None:
        """The channel to the master is gone: nothing to do, the state is in Redis."""

    async def start(self, required: bool = True) -> None:
        """Connect and load every table, before the modules load; ConfigError (one line) if
        Redis cannot be used: bad URL, refused auth, not Redis, a prefix someone else uses.

        Unreachable (refused, reset, silent) is a ConfigError too when *required*; otherwise
        (a worker) the state starts unavailable and the reconnecting loop takes over."""
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:
            raise ConfigError(
                "shared_backend = 'redis' needs redis-py: pip install 'mpnet[redis]'"
            ) from None
        try:
            await self._connect()
        except ConfigError as exc:
            raise ConfigError(f"redis_url {redacted(self.url)}: {exc}") from None
        except SharedUnavailable as exc:
            if required:
                raise RedisUnreachable(f"redis_url {redacted(self.url)}: {exc}") from None
            self._set_unavailable(str(exc))
            log.warning(
                "redis: %s unreachable at start (%s); serving anyway, shared writes and "
                "atomics fail until it is back",
                redacted(self.url),
                exc,
            )
        failed_at_start = 0 if self._unavailable is None else 1
        self._background = asyncio.ensure_future(self._watch(failures=failed_at_start))

    def report(self) -> dict[str, Any]:
        """This worker's view of Redis for the master (``mpnet status``, the metrics): state,
        since when (wall clock), the last error seen, how many times the connection was lost."""
        return {
            "state": "unavailable" if self._unavailable else "connected",
            "since": self._changed_at,
            "error": self._last_error,
            "lost": self._losses,
        }

    async def close(self) -> None:
        """Let the writes already made leave (up to ``redis_timeout``), then disconnect."""
        if self._unavailable is None and self._waiting:
            try:
                await asyncio.wait_for(asyncio.shield(self.flush()), self.timeout)
            except (TimeoutError, SharedError):
                log.warning("redis: stopping with writes not confirmed by Redis")
        if self._background is not None:
            self._background.cancel()
        self._unavailable = "the worker is stopping"
        self._drop_connections()

    # -- connecting ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import AuthenticationError, RedisError, ResponseError

        if self._pool is None:
            try:
                self._pool = aioredis.ConnectionPool.from_url(
                    self.url,
                    socket_connect_timeout=self.timeout,
                    socket_timeout=None,  # idle is normal; _watch decides when Redis is gone
                    socket_keepalive=True,
                    protocol=2,  # subscribed messages as plain replies, no HELLO needed
                )
            except ValueError as exc:
                raise ConfigError(f"not a usable URL ({exc})") from None
        try:
            cmd = self._pool.make_connection()
            sub = self._pool.make_connection()
            try:
                await asyncio.wait_for(self._handshake(cmd, sub), self.timeout * 2)
            except BaseException:
                for conn in (cmd, sub):
                    await conn.disconnect(nowait=True)
                raise
        except AuthenticationError as exc:
            raise ConfigError(f"authentication refused ({exc})") from None
        except ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise ConfigError(f"authentication refused ({exc})") from None
            raise ConfigError(f"Redis refused: {exc}") from None
        except TimeoutError:
            raise SharedUnavailable(
                f"no answer within {self.timeout * 2:g}s (is it a Redis server?)"
            ) from None
        except (RedisError, OSError) as exc:
            raise SharedUnavailable(f"cannot use it: {exc}") from None
        except ChannelError as exc:
            raise ConfigError(
                f"a table under the prefix holds data mpnet did not write: {exc}"
            ) from None

    async def _handshake(self, cmd: Any, sub: Any) -> None:
        keys = self.keys
        await cmd.connect()

        async def call(*args: Any) -> Any:
            await cmd.send_command(*args, check_health=False)
            return await cmd.read_response(disable_decoding=True)

        if await call("PING") not in (b"PONG", "PONG"):
            raise ConfigError("the server answered PING oddly: not Redis?")
        marker = await call("GET", keys.meta)
        if marker is None:
            cursor, found = await call("SCAN", 0, "MATCH", keys.everything, "COUNT", 1000)
            while not found and int(cursor):
                cursor, found = await call("SCAN", cursor, "MATCH", keys.everything, "COUNT", 1000)
            if found:  # ours, if another worker just marked the prefix (it marks first)
                marker = await call("GET", keys.meta)
                if marker is None:
                    raise ConfigError(
                        f"prefix {keys.prefix!r} holds keys mpnet did not write (e.g. "
                        f"{found[0]!r}); choose another redis_prefix"
                    )
            else:
                await call("SET", keys.meta, MARKER, "NX")
                marker = await call("GET", keys.meta)
        if marker != MARKER:
            raise ConfigError(
                f"prefix {keys.prefix!r} belongs to something else ({keys.meta} = {marker!r}, "
                f"expected {MARKER!r}); choose another redis_prefix"
            )
        for name, body in SCRIPTS.items():
            self._shas[name] = await call("SCRIPT", "LOAD", body)
        await sub.connect()
        await sub.send_command("SUBSCRIBE", keys.events, check_health=False)
        confirm = await sub.read_response(disable_decoding=True)
        if not (isinstance(confirm, list) and confirm[0] == b"subscribe"):
            raise ConfigError(f"SUBSCRIBE answered {confirm!r}: not Redis?")
        # Subscribed first, then read: a change between the two is in the buffer, and changes
        # carry values, so replaying the buffer over the snapshot converges (module docstring).
        self._loading = []
        reader = asyncio.ensure_future(self._read_events(sub))
        try:
            start_seq = int(await call("GET", keys.seq) or 0)
            snapshot: dict[str, dict[Any, Any]] = {}
            cursor = b"0"
            while True:
                cursor, found = await call("SCAN", cursor, "MATCH", keys.all_tables, "COUNT", 500)
                for hash_key in found:
                    table_name = keys.table_name(hash_key)
                    flat = await call("HGETALL", hash_key)
                    if table_name is not None and isinstance(flat, list):
                        snapshot[table_name] = _decoded(flat)
                if not int(cursor):
                    break
        except BaseException:
            reader.cancel()
            raise
        self._cmd, self._sub = cmd, sub
        self._install(snapshot, start_seq)
        self._live = [reader, asyncio.ensure_future(self._read_replies(cmd))]
        self._sub_heard = time.monotonic()
        self._set_unavailable(None)

    def _install(self, snapshot: dict[str, dict[Any, Any]], seq: int) -> None:
        """Replace every replica with *snapshot*, then replay the changes heard since."""
        for name, table in self._tables.items():
            table._data.clear()
            table._data.update(snapshot.pop(name, {}))
            table._replica = Replica(table._data)
        self._initial = snapshot
        self._seen = seq
        events, self._loading = self._loading or [], None
        for raw in events:
            self._on_event(raw, replay=True)

    # -- sending ------------------------------------------------------------------------------

    def _script(self, table: str, op: str, origin: bytes) -> ScriptCall:
        call = self._calls.get((table, op))
        if call is None:
            sha = self._shas.get("write" if origin else op)
            if sha is None:  # never connected yet (a worker that booted during an outage)
                raise SharedUnavailable(self._unavailable or "Redis unavailable")
            call = ScriptCall(sha, self.keys, origin, table, op)
            self._calls[table, op] = call
        return call

    def _command(self, packed: bytes, on_reply: Callable[[Reply], None]) -> None:
        """Queue a command for this loop pass's write (raises SharedUnavailable if Redis is
        unreachable: the caller learns at the call)."""
        if self._unavailable is not None:
            raise SharedUnavailable(self._unavailable)
        self._outbox.append(packed)
        self._waiting.append([on_reply, time.monotonic(), None])
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_outbox)

    def _flush_outbox(self) -> None:
        self._flush_scheduled = False
        self._sync_pending = None
        data, self._outbox = self._outbox, []
        if data and self._unavailable is None:
            task = asyncio.ensure_future(_send(self._cmd, data))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._lost(f"sending failed: {task.exception()}")

    def _write(self, table: str, op: str, args: list[Any]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        encoded = write_args(op, args)  # TypeError/ChannelError at the call, nothing sent

        def on_reply(reply: Reply) -> None:
            if isinstance(reply, BaseException):
                if not isinstance(reply, SharedError):
                    log.error("redis: %s on table %r refused: %s", op, table, reply)
                    reply = SharedError(error_message(op, args[0] if args else None, str(reply)))
                    self._unpend(table, op, args)
                _fail(future, reply)
            else:
                future.set_result(None)

        self._command(self._script(table, op, self.origin).command(encoded), on_reply)
        return future

    def _unpend(self, table: str, op: str, args: list[Any]) -> None:
        """A write Redis refused will never be echoed: stop waiting for its echo, so changes
        from elsewhere reach the replica again."""
        replica = self.table(table)._replica
        if op == "clear":
            replica.clears = max(0, replica.clears - 1)
            return
        for key in list(args[0]) if op == "update" else [args[0]]:
            count = replica.pending.get(key, 0) - 1
            if count > 0:
                replica.pending[key] = count
            else:
                replica.pending.pop(key, None)

    def _on_write_reply(self, reply: Reply) -> None:
        if isinstance(reply, BaseException) and not isinstance(reply, SharedError):
            log.error("redis: a broadcast was refused: %s", reply)

    def _atomic(self, table: str, op: str, args: list[Any]) -> asyncio.Future[Any]:
        """Run an atomic script; the future resolves to its answer once the replica shows its
        effect. A failed future (never an exception at the call) if Redis is unreachable."""
        check_key(args[0])
        encoded = atomic_args(op, args)
        future = asyncio.get_running_loop().create_future()

        def on_reply(reply: Reply) -> None:
            if isinstance(reply, BaseException):
                if not isinstance(reply, SharedError):
                    reply = SharedError(error_message(op, args[0], str(reply)))
                _fail(future, reply)
                return
            try:
                seq, answer = atomic_answer(op, args, reply)
            except (ChannelError, ValueError, IndexError, TypeError) as exc:
                _fail(future, SharedError(f"{op}: unexpected answer from Redis ({exc})"))
                return
            self._when_seen(seq, future, answer)

        try:
            self._command(self._script(table, op, b"").command(encoded), on_reply)
        except SharedUnavailable as exc:
            future.set_exception(exc)
        return future

    def _when_seen(self, seq: int, future: asyncio.Future[Any], answer: Any) -> None:
        if seq <= self._seen:
            if not future.done():
                future.set_result(answer)
        else:
            heapq.heappush(self._seq_waiters, (seq, next(self._order), future, answer))

    # -- receiving ----------------------------------------------------------------------------

    async def _read_replies(self, conn: Any) -> None:
        from redis.exceptions import ResponseError

        waiting = self._waiting
        try:
            while True:
                try:
                    reply = await conn.read_response(disable_decoding=True)
                except ResponseError as exc:
                    reply = exc
                    if "NOSCRIPT" in str(exc):
                        self._lost("Redis lost mpnet's scripts (SCRIPT FLUSH or a restart?)")
                if not waiting:
                    self._lost(f"an answer nobody asked for: {reply!r:.80}")
                    return
                on_reply, _, followers = waiting.popleft()
                on_reply(reply)
                if followers:
                    for future in followers:
                        if not future.done():
                            future.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost(str(exc) or type(exc).__name__)

    async def _read_events(self, conn: Any) -> None:
        events = self.keys.events.encode()
        try:
            while True:
                message = await conn.read_response(disable_decoding=True)
                self._sub_heard = time.monotonic()
                if not isinstance(message, list) or not message:
                    continue
                if message[0] == b"message" and message[1] == events:
                    if self._loading is not None:
                        self._loading.append(message[2])  # applied once the snapshot is in
                    else:
                        self._on_event(message[2])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost(str(exc) or type(exc).__name__)

    def _on_event(self, raw: bytes, replay: bool = False) -> None:
        try:
            event = decode_event(raw)
        except ChannelError as exc:
            log.error(
                "redis: ignoring a message on %s that mpnet did not write: %s",
                self.keys.events,
                exc,
            )
            return
        if isinstance(event, BroadcastMessage):
            self._deliver(event.topic, event.payload)
            return
        if replay:
            table = self._tables.get(event.table)
            apply_write(
                table._data if table else self._initial.setdefault(event.table, {}),
                event.op,
                event.args,
            )
        else:
            self.table(event.table)._replica.apply(
                event.origin == self.origin, event.op, event.args
            )
        if event.seq > self._seen:
            self._seen = event.seq
        waiters = self._seq_waiters
        while waiters and waiters[0][0] <= self._seen:
            _, _, future, answer = heapq.heappop(waiters)
            if not future.done():
                future.set_result(answer)

    def _deliver(self, topic: str, payload: Any) -> None:
        run_hooks(self._hooks.get(topic, ()), topic, payload, self._tasks)

    def _set_unavailable(self, error: str | None) -> None:
        """Unavailable because of *error*, or (None) available again; since now, for status."""
        self._unavailable = None if error is None else f"Redis unavailable: {error}"
        self._changed_at = time.time()
        if error is not None:
            self._last_error = error

    def _lost(self, reason: str) -> None:
        if self._unavailable is not None:
            return
        self._set_unavailable(reason)
        self._losses += 1
        log.warning(
            "redis: connection to %s lost (%s); shared writes and atomics fail until it is back",
            redacted(self.url),
            reason,
        )
        error = SharedUnavailable(self._unavailable)
        waiting, self._waiting = self._waiting, deque()
        self._outbox = []
        self._sync_pending = None
        for on_reply, _, followers in waiting:
            on_reply(error)
            for future in followers or ():
                _fail(future, error)
        waiters, self._seq_waiters = self._seq_waiters, []
        for _, _, future, _ in waiters:
            _fail(future, error)
        self._drop_connections()

    def _drop_connections(self) -> None:
        for task in self._live:
            task.cancel()
        self._live = []
        for conn in (self._cmd, self._sub):
            if conn is not None:
                task = asyncio.ensure_future(conn.disconnect(nowait=True))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._cmd = self._sub = None

    async def _watch(self, failures: int = 0) -> None:
        """Declare Redis lost when it stops answering; reconnect with back-off when it is, then
        run the RESYNC hooks (*failures*: attempts already made and logged)."""
        interval = max(0.05, self.timeout / 4)
        backoff = BACKOFF_START
        while True:
            await asyncio.sleep(interval if self._unavailable is None else backoff)
            now = time.monotonic()
            if self._unavailable is None:
                backoff, failures = BACKOFF_START, 0
                if self._waiting and now - self._waiting[0][1] > self.timeout:
                    self._lost(f"no answer within {self.timeout:g}s")
                elif now - self._sub_heard > self.timeout:
                    self._lost(f"the events subscription was silent for {self.timeout:g}s")
                elif now - self._sub_heard > interval and self._sub is not None:
                    task = asyncio.ensure_future(_send(self._sub, [command("PING")]))
                    self._tasks.add(task)
                    task.add_done_callback(self._sent)
                continue
            down_since = self._changed_at
            try:
                await self._connect()
            except Exception as exc:
                failures += 1
                self._last_error = str(exc)
                if failures == 1 or isinstance(exc, ConfigError):
                    log.warning("redis: reconnecting to %s failed: %s", redacted(self.url), exc)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            tables = len(self._tables) + len(self._initial)
            log.warning(
                "redis: reconnected to %s; %d table(s) reloaded", redacted(self.url), tables
            )
            self._deliver(
                RESYNC, {"unavailable": round(time.time() - down_since, 3), "tables": tables}
            )


async def _send(conn: Any, data: list[bytes]) -> None:
    """Write on *conn* unless it was closed meanwhile: redis-py would silently reconnect it, and
    nobody would read that new connection's answers."""
    if conn.is_connected:
        await conn.send_packed_command(data, check_health=False)


def _decoded(flat: list[bytes]) -> dict[Any, Any]:
    return {decode_key(flat[i]): decode_value(flat[i + 1]) for i in range(0, len(flat), 2)}


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # a write nobody awaits must not warn "never retrieved"


def from_config(config: Config) -> RedisSharedState:
    return RedisSharedState(
        config["redis_url"], config["redis_prefix"], float(config["redis_timeout"])
    )


def probe(config: Config) -> str:
    """Connect as a worker would, then disconnect (``mpnet check`` and every start, in the
    checker process); ConfigError if Redis cannot be used (:class:`RedisUnreachable` if it did
    not answer), else a line saying what was found."""

    async def run() -> int:
        state = from_config(config)
        await state.start()
        tables = len(state._initial)
        await state.close()
        return tables

    tables = asyncio.run(run())
    return (
        f"reachable at {redacted(config['redis_url'])}, prefix {config['redis_prefix']!r}, "
        f"{tables} table(s)"
    )
