"""Shared tables' rules, free of I/O: the atomic operations the master decides, and how a
worker's replica merges the writes the master sequenced with its own writes still in flight.

Read-your-writes with convergence. A worker applies its own write at once and counts it as
pending for that key (a ``clear`` counts as pending for every key). The master answers each
channel in order, so while a worker has pending writes on a key, every write from elsewhere that
reaches it for that key was sequenced *before* its own and is superseded: it is skipped. The
worker's own echo is applied only when it is the last pending write on the key (an earlier echo
would briefly show an older value than the worker's last write), and nothing is applied while an
own ``clear`` is still pending (that clear, sequenced later, wipes it). Every replica therefore
ends in the master's state, and a worker always reads its own latest write.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .values import KEY_TYPES, check_plain

_MISSING = object()
WRITE_ARITY = {"set": 2, "del": 1, "clear": 0, "update": 1}


class SharedError(Exception):
    """A shared operation that cannot be done: an atomic operation the master refused (e.g.
    ``incr`` of a value that is not an int), or any operation once shared state is unavailable."""


class SharedValueTooLarge(SharedError):
    """A write, request or broadcast too large to cross the channel (its frame limit): raised at
    the call, and nothing was sent or applied."""


class SharedUnavailable(SharedError):
    """The shared state cannot be reached (``shared_backend = "redis"`` and Redis is down or
    not answering within ``redis_timeout``): the write, atomic or barrier was not done. Reads
    still answer from the local replica; the worker reconnects on its own."""


RESYNC = "mpnet.resync"
"""The hook topic run in a worker once its replicas were reloaded after Redis was unreachable
(``module.hook(mpnet.RESYNC, rebuild)``): the tables may have changed in ways no event told it
of, and broadcasts sent meanwhile were not delivered to it. Payload: ``{"unavailable": seconds,
"tables": count}``. Modules cannot broadcast it; the local backend never runs it."""


def check_key(key: Any) -> None:
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
    check_key(key)
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


class Replica:
    """One table as a worker holds it: the data, plus its own writes the master has not echoed.

    The worker's :class:`~mpnet.workers.shared.SharedTable` sends each write, then records it
    here with :meth:`wrote` (or :meth:`cleared`); :meth:`apply` merges what the master sequenced.
    """

    __slots__ = ("clears", "data", "pending")

    def __init__(self, data: dict[Any, Any]) -> None:
        self.data = data
        self.pending: dict[Any, int] = {}  # key -> own writes not yet echoed by the master
        self.clears = 0  # own clear() calls not yet echoed by the master

    def wrote(self, keys: Iterable[Any]) -> None:
        pending = self.pending
        for key in keys:
            pending[key] = pending.get(key, 0) + 1

    def cleared(self) -> None:
        self.clears += 1
        self.data.clear()

    def apply(self, own: bool, op: str, args: list[Any]) -> None:
        """Apply a write the master sequenced (see the module docstring for the rules)."""
        pending = self.pending
        if own:
            if op == "clear":
                self.clears -= 1
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
            if self.clears or not settled:
                return
            if op == "update":
                changes = args[0]
                apply_write(self.data, op, [{key: changes[key] for key in settled}])
            else:
                apply_write(self.data, op, args)
            return
        if self.clears:
            return  # sequenced before our own clear, which wipes it
        if not pending:
            apply_write(self.data, op, args)
        elif op in ("set", "del"):
            if args[0] not in pending:
                apply_write(self.data, op, args)
        elif op == "update":
            apply_write(self.data, op, [{k: v for k, v in args[0].items() if k not in pending}])
        elif op == "clear":
            for key in [k for k in self.data if k not in pending]:
                del self.data[key]
        else:
            raise ValueError(f"unknown shared-table write {op!r}")
