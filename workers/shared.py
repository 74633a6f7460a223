"""A worker's side of the shared tables: replicas read locally, writes sent to the master,
atomic operations awaited, broadcasts delivered to hooks.

Protocol (records of :mod:`mpnet.pure.messages` on the channel):

worker -> master
    ``SharedWrite``     a write already applied locally (set, del, clear, update)
    ``AtomicRequest``   an atomic operation decided by the master (incr, setdefault, cas, pop,
                        delete_if); answered with ``AtomicResult``
    ``Broadcast``       a broadcast
    ``Barrier``         answer once everything before this is ordered (``flush`` and ``sync``);
                        answered with ``BarrierPassed``
master -> every worker
    ``SequencedWrite``  a write in the master's order (its *effect*: atomics arrive as set/del
                        with the master's result, with origin 0)
    ``BroadcastEvent``  a broadcast, in the master's order
master -> one worker
    ``AtomicResult``    the answer to an atomic operation
    ``BarrierPassed``   the answer to a barrier

How a replica merges sequenced writes with its own is in :mod:`mpnet.pure.replica`.

Atomic operations are sent when they are *called* (they return an awaitable future), so they keep
program order with plain writes made after them. Their effect is broadcast with origin 0: it is
never one of the requesting worker's pending writes. The answer (``AtomicResult``) follows the
effect on the same channel, so once ``await table.incr(k)`` returns, the local replica shows that
value (or a later local write).

Values are plain data (None, bool, int, float, str, bytes, list, dict); anything else raises
``TypeError`` in the writing module, at the write. Treat values read from a table as immutable:
mutating one in place changes only the local replica (write a modified copy back instead).

What each form promises. A plain write (``t[k] = v``, ``del t[k]``, ``update``, ``clear``) is
visible in this worker at once and is *fire-and-forget*: the master orders it later, and a crash
of the master before then loses it. ``await t.set(k, v)``, ``await t.delete(k)`` and
``await t.flush()`` (after plain writes) resolve once every write this worker made before the call
is ordered by the master and written to the journal as ``state_fsync`` says: with ``"always"``
fsynced, with ``"everysec"`` or ``"never"`` handed to the OS (it survives a crash of the master,
not necessarily a power loss); without a ``state_file`` it lives in the master's memory. Atomic
operations resolve on the same terms. ``await t.sync()`` is the read barrier: every write
acknowledged (to anyone, in any worker, by any of these awaits) before the call is visible in
this replica once it resolves. ``flush`` and ``sync`` are one ``Barrier`` round trip, shared by
every caller of one pass of the worker's loop.

Every message a worker writes is sent at the call (so an error, e.g. a value too large for the
channel, is raised at the write). Once the channel to the master is lost, every shared operation
raises :class:`SharedError` at the call.

A new worker needs no snapshot message: it is forked from the master, so it starts with a copy of
the master's tables, and every write sequenced after the fork reaches its channel.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

from mpnet.pure.messages import (
    AtomicRequest,
    AtomicResult,
    Barrier,
    BarrierPassed,
    Broadcast,
    BroadcastEvent,
    ChannelError,
    Message,
    SequencedWrite,
    SharedWrite,
)
from mpnet.pure.replica import Replica, SharedError, SharedValueTooLarge, check_key
from mpnet.pure.values import check_plain


class SharedTable(MutableMapping[Any, Any]):
    """A table every worker sees. Reads are local; writes reach every worker (see module doc).

    Plain writes (``t[k] = v``, ``del t[k]``, ``update``, ``clear``) apply locally at once and
    are sequenced by the master later; atomic operations (``incr``, ``setdefault``, ``cas``,
    ``pop``, ``delete_if``) are decided by the master and return a future to await.
    """

    def __init__(self, state: SharedState, name: str, data: dict[Any, Any]) -> None:
        self.name = name
        self._state = state
        self._replica = Replica(data)
        self._data = data

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
        self._state._send(SharedWrite(self.name, op, args))
        self._replica.wrote(keys)

    def __setitem__(self, key: Any, value: Any) -> None:
        check_key(key)
        check_plain(value)
        self._write("set", [key, value], (key,))
        self._data[key] = value

    def __delitem__(self, key: Any) -> None:
        if key not in self._data:
            raise KeyError(key)
        self._write("del", [key], (key,))
        del self._data[key]

    def clear(self) -> None:
        self._state._send(SharedWrite(self.name, "clear", []))
        self._replica.cleared()

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        changes = dict(*args, **kwargs)
        for key, value in changes.items():
            check_key(key)
            check_plain(value)
        if not changes:
            return
        self._write("update", [changes], changes)
        self._data.update(changes)

    # acknowledged writes and the read barrier

    def set(self, key: Any, value: Any) -> asyncio.Future[None]:
        """``t[key] = value``, returning a future that resolves once the master has ordered it
        and journaled it as ``state_fsync`` says (see the module doc). Errors are raised here."""
        self[key] = value
        return self._state.barrier()

    def delete(self, key: Any) -> asyncio.Future[None]:
        """Delete *key* (missing is fine: the master's copy decides), acknowledged like
        :meth:`set`."""
        check_key(key)
        self._write("del", [key], (key,))
        self._data.pop(key, None)
        return self._state.barrier()

    def flush(self) -> asyncio.Future[None]:
        """Resolves once every write this worker made before the call, to any table, is
        ordered by the master and journaled as ``state_fsync`` says."""
        return self._state.barrier()

    def sync(self) -> asyncio.Future[None]:
        """Read barrier: resolves once every write acknowledged to anyone before the call
        (an awaited ``set``, ``delete``, ``flush`` or atomic, in any worker) is visible here."""
        return self._state.barrier()

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


class SharedState:
    """A worker's replicas of the shared tables, plus broadcasts and pending atomic requests."""

    def __init__(
        self,
        send: Callable[[Message], None],
        tables: dict[str, dict[Any, Any]],
        origin: int | None = None,
        flush: Callable[[], None] | None = None,
    ) -> None:
        """*origin*: how the master names this worker in sequenced writes (its pid; the
        in-process test kit, :mod:`mpnet.testing`, gives each of its workers its own).
        *flush*: sends what is queued on the channel now (barriers leave at the end of a pass)."""
        self._channel_send = send
        self._channel_flush = flush
        self._lost: str | None = None  # why the channel to the master is gone, once it is
        self._pid = os.getpid() if origin is None else origin
        self._initial = tables
        self._tables: dict[str, SharedTable] = {}
        self._requests: dict[int, asyncio.Future[Any]] = {}
        self._request_ids = itertools.count(1)
        self._barrier_waiters: list[asyncio.Future[None]] | None = None  # this pass's callers
        self._barriers: dict[int, list[asyncio.Future[None]]] = {}  # sent, not yet answered
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
        self._send(Broadcast(topic, payload))

    def hook(self, topic: str, handler: Callable[[Any], Any], owner: str = "") -> None:
        self._hooks.setdefault(topic, []).append((handler, owner))

    def report(self) -> dict[str, Any]:
        """The backend's state for the master's status: nothing to say for the local one."""
        return {}

    def _send(self, message: Message) -> None:
        """Send to the master, or raise :class:`SharedError` once the channel is gone: a write
        or request nobody will ever order or answer must fail at the call, not hang or vanish."""
        if self._lost is not None:
            raise SharedError(self._lost)
        try:
            self._channel_send(message)
        except ChannelError as exc:  # the frame limit: nothing left this worker
            raise SharedValueTooLarge(str(exc)) from None

    def _atomic(self, table: str, op: str, args: list[Any]) -> asyncio.Future[Any]:
        """Send an atomic request now; return the future its answer resolves."""
        check_key(args[0])
        future = asyncio.get_running_loop().create_future()
        request = next(self._request_ids)
        self._send(AtomicRequest(request, table, op, args))
        self._requests[request] = future
        return future

    def barrier(self) -> asyncio.Future[None]:
        """A future resolved by the next :class:`Barrier` round trip. The barrier is sent once
        per pass of the loop (after the callers' writes of that pass), so every caller of a pass
        shares one round trip; each gets a future of its own, so cancelling one is harmless."""
        if self._lost is not None:
            raise SharedError(self._lost)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._barrier_waiters
        if waiters is None:
            waiters = self._barrier_waiters = []
            asyncio.get_running_loop().call_soon(self._send_barrier)
        waiters.append(future)
        return future

    def _send_barrier(self) -> None:
        waiters, self._barrier_waiters = self._barrier_waiters or [], None
        if self._lost is not None:
            _fail(waiters, self._lost)
            return
        request = next(self._request_ids)
        self._barriers[request] = waiters
        self._channel_send(Barrier(request))
        if self._channel_flush is not None:
            self._channel_flush()  # this pass's writes and the barrier leave in one write

    def fail_pending(self, reason: str) -> None:
        """Fail every unanswered atomic request (the channel to the master is gone, so no answer
        will come), and every shared operation after it at its call; the worker calls this when
        it loses its channel."""
        self._lost = f"shared state unavailable: {reason}"
        requests, self._requests = self._requests, {}
        _fail(requests.values(), self._lost)
        barriers, self._barriers = self._barriers, {}
        for waiters in barriers.values():
            _fail(waiters, self._lost)

    def receive(self, message: Message) -> None:
        """Take in a message from the master (every kind it sends is about shared state)."""
        if isinstance(message, SequencedWrite):
            self._on_write(message)
        elif isinstance(message, AtomicResult):
            self._on_result(message)
        elif isinstance(message, BarrierPassed):
            for future in self._barriers.pop(message.request, ()):
                if not future.done():
                    future.set_result(None)
        elif isinstance(message, BroadcastEvent):
            self._on_broadcast(message)
        else:
            raise ChannelError(f"{type(message).__name__} is not a message the master sends")

    def _on_write(self, message: SequencedWrite) -> None:
        origin, name, op, args = message
        self.table(name)._replica.apply(origin == self._pid, op, args)

    def _on_result(self, message: AtomicResult) -> None:
        request, ok, value = message
        future = self._requests.pop(request, None)
        if future is None or future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(SharedError(value))

    def _on_broadcast(self, message: BroadcastEvent) -> None:
        run_hooks(self._hooks.get(message.topic, ()), message.topic, message.payload, self._tasks)


def _fail(futures: Iterable[asyncio.Future[Any]], reason: str) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(SharedError(reason))


def run_hooks(
    hooks: Iterable[tuple[Callable[[Any], Any], str]],
    topic: str,
    payload: Any,
    tasks: set[asyncio.Task[Any]],
) -> None:
    """Run the ``module.hook`` handlers of a broadcast (either backend): a coroutine goes on
    as a task kept in *tasks*; a handler that raises is logged under its module's name."""
    for handler, owner in hooks:
        try:
            result = handler(payload)
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except Exception:
            logging.getLogger(f"mpnet.module.{owner or 'mpnet'}").exception(
                "hook for broadcast %r failed", topic
            )
