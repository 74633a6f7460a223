"""A subset of Redis, spoken over RESP (``mpnet/resp.py``), stored in shared tables.

Every worker serves every key: the data lives in a shared table, so a client may land on any
worker. Commands: PING ECHO GET SET (EX PX EXAT PXAT NX XX KEEPTTL GET) DEL EXISTS INCR INCRBY
DECR DECRBY MGET MSET KEYS DBSIZE FLUSHDB FLUSHALL EXPIRE PEXPIRE TTL PTTL PERSIST TYPE, plus what
clients send on connect: HELLO (RESP2 and RESP3, as redis-py 8 opens with ``HELLO 3``), CLIENT
SETNAME/SETINFO/GETNAME/ID, SELECT 0, CONFIG GET (redis-benchmark asks for ``save`` and
``appendonly``), COMMAND / COMMAND DOCS / COUNT / INFO (redis-cli asks for docs), INFO, QUIT.

Storage (table ``kv``, or the ``table`` option; keys are the raw key bytes):

* a value without TTL is stored as itself; with a TTL as ``[value, deadline]``, the deadline in
  wall-clock milliseconds. Keeping the deadline *in the entry* makes every conditional change
  (SET NX/XX, EXPIRE, INCR of a key with a TTL, expiring an entry) a single compare-and-swap or
  compare-and-delete on one key, so an expiry can never delete a value another worker has just
  written. The table ``<table>:expires`` (key -> deadline) indexes the keys that have a TTL for
  the periodic sweep; it may hold stale entries, which the sweep drops.
* a value is an ``int`` when its bytes are a canonical decimal integer in the signed 64-bit range
  (what Redis's ``string2ll`` accepts and prints back the same: ``10``, ``-3``, ``0``; not
  ``010``, ``+1``, ``-0``), and ``bytes`` otherwise. The two are in one-to-one correspondence,
  so GET returns exactly the bytes SET stored, and INCR/INCRBY/DECR of a key without TTL is the
  master's atomic ``incr``: exact across workers, one round trip, however many clients on however
  many workers. INCR of a non-canonical numeral fails like Redis (``value is not an integer``).
  INCR of a key with a TTL (rarer) is a compare-and-swap loop, also exact.

Expiry is lazy (a read of an expired entry answers as if missing and deletes it conditionally)
plus a sweep in every worker, ``expire_interval`` seconds apart (default 0.1), that looks at up to
``expire_batch`` (default 200) indexed keys per run, in a random order per worker.

Acknowledgements and reads. A write (SET, MSET, FLUSHDB...) is answered once the master has
ordered it and journaled it as ``state_fsync`` says (``await data.flush()``; the writes of one pass
of the worker's loop share one round trip), and commands built on atomics (DEL, INCR, SET NX...)
are answered after the master's answer, which comes on the same terms; so ``+OK`` means the write
survives a crash of the master (and with ``state_fsync = "always"`` a power loss). A command that
reads (GET, MGET, EXISTS, TTL, KEYS...) first waits for a read barrier (``await data.sync()``)
requested after its request arrived, one per pass of the loop for every connection: a write
acknowledged to any client, on any worker, is seen by every read that client or another one sends
after the acknowledgement. When the channel to the master is lost every such command is answered
with an error (``-ERR shared state unavailable: ...``), never ``+OK``.

Pipelining: commands are answered in order. Reads of the local replica, plain SETs and replies
that need no round trip are answered at once; round trips that depend on nothing local
(INCR of a key without TTL, DEL) are sent back to back and awaited together; a command that
reads the replica waits until the earlier round trips have come back (so it sees their
effects). A protocol error is answered ``-ERR Protocol error: ...`` and closes the connection.

Options (``[kv]`` table): ``table``, ``max_value_size`` (bytes, default 32 MiB: one value must fit
in a channel frame), ``max_request_size`` (bytes, default 128 MiB: the bulks of one request
together, checked as their lengths are announced; beyond it the client gets an error and is
closed, as Redis's ``client-query-buffer-limit`` does), ``expire_interval``, ``expire_batch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the loader injects ``module``, as Prosody does; this is for type checkers
    from mpnet import Module

    module: Module

import asyncio
import os
import random
import re
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from mpnet.pure.replica import SharedError, SharedValueTooLarge
from mpnet.pure.resp import (
    RespParser,
    RespProtocolError,
    RespRequestTooLarge,
    encode_bulk,
    encode_error,
    encode_integer,
)
from mpnet.pure.scan import CursorError, Scanner

TABLE: str = module.get_option_string("table", "kv") or "kv"
MAX_VALUE_SIZE = module.get_option_number("max_value_size", 32 * 1024 * 1024, min=1)
# Twice a channel frame: no larger request could be applied anyway (a write must fit one frame).
MAX_REQUEST_SIZE = module.get_option_number("max_request_size", 128 * 1024 * 1024, min=1)
REFUSAL_LOG_EVERY = 10.0  # seconds between log lines about oversized requests
# Replies are written out once this many bytes are ready, and no more are produced while more
# than this waits unsent (the connection's high-water mark): a pipeline of "GET big" costs one
# reply's worth of memory, not one per command.
REPLY_HIGH_WATER = 64 * 1024
EXPIRE_INTERVAL = module.get_option_number("expire_interval", 0.1, min=0.001)
EXPIRE_BATCH = module.get_option_number("expire_batch", 200, min=1)

data = module.shared(TABLE)
expires = module.shared(f"{TABLE}:expires")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SAFE = 2**62  # |value| + |increment| below this cannot overflow, even racing other workers

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
E_SYNTAX = encode_error("ERR syntax error")
E_NOT_INT = encode_error("ERR value is not an integer or out of range")
E_OVERFLOW = encode_error("ERR increment or decrement would overflow")
E_WRONGTYPE = encode_error("WRONGTYPE Operation against a key holding the wrong kind of value")
E_TOO_BIG = encode_error("ERR value too large to share between workers")
E_INTERNAL = encode_error("ERR internal error (see the server log)")

Reply = bytes | Awaitable[bytes]


class Acked:
    """The reply to a write, sent once *barrier* (``data.flush()`` or ``data.sync()``) has
    resolved. Unlike other awaited replies it holds nothing back: the write is in the local
    replica already, so later commands may run (and later writes share the barrier)."""

    __slots__ = ("barrier", "reply")

    def __init__(self, barrier: asyncio.Future[None], reply: bytes = b"+OK\r\n") -> None:
        self.barrier = barrier
        self.reply = reply

    def __await__(self) -> Any:
        yield from self.barrier
        return self.reply


READS = {b"GET", b"MGET", b"EXISTS", b"TYPE", b"KEYS", b"SCAN", b"DBSIZE", b"TTL", b"PTTL", b"INFO"}
READS |= {b"EXPIRE", b"PEXPIRE", b"PERSIST"}  # decide from the replica before their round trip


def reads_replica(name: bytes, command: list[bytes]) -> bool:
    """Whether *command* answers from the local replica, so it must see every write
    acknowledged before it arrived (a plain SET reads nothing; SET NX/XX/GET does)."""
    return name in READS or (name == b"SET" and len(command) > 3)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_int(raw: bytes) -> int | None:
    """Redis's ``string2ll``: a canonical decimal in the signed 64-bit range, else None."""
    if raw.isdigit():
        if raw[0] == 0x30 and len(raw) > 1:
            return None
    elif not (len(raw) > 1 and raw[0] == 0x2D and raw[1:].isdigit() and raw[1] != 0x30):
        return None
    if len(raw) > 20:
        return None
    value = int(raw)
    return value if INT64_MIN <= value <= INT64_MAX else None


def stored(raw: bytes) -> int | bytes:
    """How a string value is stored: an int when its bytes are canonical, else the bytes."""
    if len(raw) <= 20 and raw and (raw[0] == 0x2D or 0x30 <= raw[0] <= 0x39):
        value = parse_int(raw)
        if value is not None:
            return value
    return raw


def render(value: Any) -> bytes | None:
    """The string bytes of a stored value; None for something that is not a string."""
    if value.__class__ is bytes:
        return value
    if value.__class__ is int:
        return b"%d" % value
    return None


def glob_regex(pattern: bytes) -> re.Pattern[bytes]:
    """Translate a Redis glob (``stringmatchlen``) to a regex: ``*``, ``?``, ``[abc]``,
    ``[^a]``, ``[a-z]`` (reversed ranges too), and ``\\`` escaping, case-sensitive."""
    out = [b"(?s)"]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i : i + 1]
        if c == b"*":
            while i + 1 < n and pattern[i + 1 : i + 2] == b"*":
                i += 1
            out.append(b".*")
        elif c == b"?":
            out.append(b".")
        elif c == b"\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i : i + 1]))
        elif c == b"[":
            j = i + 1
            negate = j < n and pattern[j : j + 1] == b"^"
            if negate:
                j += 1
            items: list[bytes] = []
            while j < n and pattern[j : j + 1] != b"]":
                if pattern[j : j + 1] == b"\\" and j + 1 < n:
                    j += 1
                    items.append(re.escape(pattern[j : j + 1]))
                elif (
                    j + 2 < n and pattern[j + 1 : j + 2] == b"-" and pattern[j + 2 : j + 3] != b"]"
                ):
                    low, high = sorted((pattern[j], pattern[j + 2]))
                    items.append(re.escape(bytes([low])) + b"-" + re.escape(bytes([high])))
                    j += 2
                else:
                    items.append(re.escape(pattern[j : j + 1]))
                j += 1
            if items:
                out.append(b"[" + (b"^" if negate else b"") + b"".join(items) + b"]")
            else:  # "[]" matches nothing; "[^]" anything
                out.append(b"." if negate else b"(?!)")
            i = j  # at the closing "]" (or the end of an unterminated class)
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile(b"".join(out))


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a failed background cleanup is not worth a warning


def expire_entry(key: bytes, entry: list[Any]) -> None:
    """Delete an expired entry, unless it changed meanwhile; drop its index entry likewise."""
    data.delete_if(key, entry).add_done_callback(_consume)
    expires.delete_if(key, entry[1]).add_done_callback(_consume)


def live(key: bytes, now: int | None = None) -> Any:
    """The entry of *key* if it exists and has not expired (an expired one is deleted)."""
    entry = data.get(key)
    if entry.__class__ is list and entry[1] <= (now_ms() if now is None else now):
        expire_entry(key, entry)
        return None
    return entry


def value_of(entry: Any) -> Any:
    return entry[0] if entry.__class__ is list else entry


# -- sessions ---------------------------------------------------------------------------------


class Command:
    """A command's handler and how it may be pipelined.

    ``batch``: it reads nothing of the replica (INCR reads only whether the value is an int,
    which earlier round trips cannot change) and sends whatever it sends at once, so it may
    run while earlier round trips are in flight. Other commands wait for those; one of them that
    answers with an awaitable is a barrier: the next command waits for it too.
    """

    __slots__ = ("arity", "batch", "handler", "name")

    def __init__(self, name: str, handler: Callable[..., Reply], arity: int, batch: bool) -> None:
        self.name = name
        self.handler = handler
        self.arity = arity
        self.batch = batch


class Session:
    """One client: its parser, its protocol version and its replies in order."""

    __slots__ = (
        "busy",
        "closing",
        "conn",
        "error",
        "held",
        "name",
        "null",
        "parser",
        "proto",
        "replies",
        "stalled",
        "unsynced",
    )

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.parser = RespParser(max_bulk_length=MAX_VALUE_SIZE, max_request_size=MAX_REQUEST_SIZE)
        self.replies: list[Reply] = []
        self.held: list[bytes] | None = None  # a command waiting for round trips to finish
        self.error: bytes | None = None  # a protocol error to send once replies are out
        self.closing = False
        self.stalled = False  # the peer is not reading: commands wait for ondrain
        self.proto = 2
        self.null = b"$-1\r\n"
        self.name: bytes | None = None
        self.unsynced = False  # requests arrived since this session's last read barrier
        self.busy = False  # resuming itself (see wait): onincoming only feeds the parser

    # -- the pump ------------------------------------------------------------------------------

    def pump(self) -> bool:
        """Run every complete command that may run now; True if round trips must be awaited
        first (the caller then runs :meth:`drain`). Stops early, with ``stalled`` set, while
        the peer leaves more than ``REPLY_HIGH_WATER`` bytes unread: reading is paused then
        (backpressure) and ``ondrain`` resumes the pump."""
        replies = self.replies
        waiting = any(reply.__class__ not in (bytes, Acked) for reply in replies)
        pending = waiting or any(reply.__class__ is Acked for reply in replies)
        ready = 0  # bytes of replies produced and not yet written
        while not self.closing:
            command = self.held
            if command is None:
                try:
                    command = self.parser.next_command()
                except RespProtocolError as exc:
                    if isinstance(exc, RespRequestTooLarge):
                        oversized(self.conn, exc)
                    self.error = encode_error(f"ERR {exc}")
                    self.closing = True
                    break
                if command is None:
                    break
            else:
                self.held = None
            name = command[0].upper()
            spec = COMMANDS.get(name)
            if waiting and (spec is None or not spec.batch):
                self.held = command
                return True
            if self.unsynced and spec is not None and reads_replica(name, command):
                self.unsynced = False
                try:
                    barrier = data.sync()
                except SharedError as exc:
                    replies.append(encode_error(f"ERR {exc}"))
                    continue
                self.held = command
                replies.append(Acked(barrier, b""))
                return True  # it runs once the barrier has passed
            if spec is None:
                reply: Reply = unknown_command(command)
            elif (spec.arity > 0 and len(command) != spec.arity) or len(command) < -spec.arity:
                reply = encode_error(f"ERR wrong number of arguments for '{spec.name}' command")
            else:
                try:
                    reply = spec.handler(self, command)
                except SharedValueTooLarge:
                    reply = E_TOO_BIG
                except SharedError as exc:  # the master or Redis is gone
                    reply = encode_error(f"ERR {exc}")
                except Exception:  # a bug here must not leave the client waiting
                    module.log("error", "%s failed:\n%s", spec.name, traceback.format_exc())
                    reply = E_INTERNAL
            if reply.__class__ is bytes:
                replies.append(reply)  # type: ignore[arg-type]
                if not pending:  # replies can be written in order only when none is awaited
                    ready += len(reply)  # type: ignore[arg-type]
                    if ready > REPLY_HIGH_WATER:
                        ready = 0
                        self.write_replies()
                        if self.conn.buffered() > REPLY_HIGH_WATER:
                            self.stalled = True  # ondrain carries on
                            return False
                continue
            replies.append(reply)
            pending = True
            if reply.__class__ is Acked:
                continue
            waiting = True
            if not spec.batch:  # type: ignore[union-attr]
                return True  # a barrier: what follows waits for it
        if waiting or any(reply.__class__ is Acked for reply in replies):
            return True
        self.flush()
        return False

    def write_replies(self) -> None:
        replies = self.replies
        if replies:
            self.conn.write(replies[0] if len(replies) == 1 else b"".join(replies))  # type: ignore[arg-type]
            replies.clear()

    def flush(self) -> None:
        self.write_replies()
        if self.closing:
            if self.error is not None:
                self.conn.write(self.error)
                self.error = None
            self.conn.close()

    async def drain(self) -> None:
        """Await the round trips in order, answer, and carry on with what was held back."""
        while True:
            replies = self.replies
            for index, reply in enumerate(replies):
                if reply.__class__ is not bytes:
                    try:
                        replies[index] = await reply  # type: ignore[misc]
                    except SharedError as exc:  # e.g. the channel to the master is gone
                        replies[index] = encode_error(f"ERR {exc}")
                    except Exception:
                        module.log("error", "command failed:\n%s", traceback.format_exc())
                        replies[index] = E_INTERNAL
            if not self.pump():
                return

    def wait(self) -> Awaitable[None] | None:
        """What ``onincoming`` returns while replies are pending. When they are all
        acknowledgements (:class:`Acked`: plain writes and read barriers, the common case), the
        session resumes itself by callbacks when the barrier passes and returns None: no task,
        no coroutine, and reading is not paused and resumed per request (together half of an
        acknowledged SET's cost). Commands arriving meanwhile wait in the parser (``busy``).
        Otherwise the :meth:`drain` coroutine, which the connection awaits."""
        if any(r.__class__ not in (bytes, Acked) for r in self.replies):
            return self.drain()
        self.busy = True
        self._chain()
        return None

    def _chain(self) -> None:
        pending = [r.barrier for r in self.replies if r.__class__ is Acked]  # type: ignore[union-attr]
        remaining = [len(pending)]

        def passed(_: asyncio.Future[None]) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                self._resume()

        for barrier in pending:
            barrier.add_done_callback(passed)

    def _resume(self) -> None:
        replies = self.replies
        for index, reply in enumerate(replies):
            if reply.__class__ is Acked:
                barrier = reply.barrier  # type: ignore[union-attr]
                if barrier.cancelled() or barrier.exception() is not None:
                    error = "cancelled" if barrier.cancelled() else barrier.exception()
                    replies[index] = encode_error(f"ERR {error}")
                else:
                    replies[index] = reply.reply  # type: ignore[union-attr]
        if not self.pump():
            self.busy = False
        elif any(r.__class__ not in (bytes, Acked) for r in replies):
            asyncio.ensure_future(self.drain()).add_done_callback(self._drained)
        else:
            self._chain()

    def _drained(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            module.log("error", "kv session failed: %r", task.exception())
        self.busy = False
        if self.pump():  # commands that arrived after drain's last look
            result = self.wait()
            if result is not None:
                asyncio.ensure_future(result).add_done_callback(self._drained)
                self.busy = True

    # -- replies that depend on the protocol ---------------------------------------------------

    def array(self, items: list[bytes | None]) -> bytes:
        null = self.null
        parts = [b"*%d\r\n" % len(items)]
        parts += [null if item is None else b"$%d\r\n%s\r\n" % (len(item), item) for item in items]
        return b"".join(parts)

    def map(self, pairs: list[tuple[bytes, bytes | int | list[Any]]]) -> bytes:
        parts = [b"%%%d\r\n" % len(pairs) if self.proto == 3 else b"*%d\r\n" % (2 * len(pairs))]
        for key, value in pairs:
            parts.append(encode_bulk(key))
            if value.__class__ is int:
                parts.append(encode_integer(value))  # type: ignore[arg-type]
            elif value.__class__ is list:
                parts.append(b"*0\r\n")  # only empty lists occur (HELLO's modules)
            else:
                parts.append(encode_bulk(value))  # type: ignore[arg-type]
        return b"".join(parts)


_oversized = {"count": 0, "next_log": 0.0}


def oversized(conn: Any, exc: RespRequestTooLarge) -> None:
    """Log requests refused for their size: the first at once, then one line per
    ``REFUSAL_LOG_EVERY`` seconds with the count (announcing a huge length costs a few bytes)."""
    _oversized["count"] += 1
    now = time.monotonic()
    if now >= _oversized["next_log"]:
        module.log(
            "warn",
            "closing connection %s from %s: %s (%d such request(s) since the last report)",
            conn.id,
            conn.ip(),
            exc,
            _oversized["count"],
        )
        _oversized["count"] = 0
        _oversized["next_log"] = now + REFUSAL_LOG_EVERY


def unknown_command(command: list[bytes]) -> bytes:
    name = command[0][:128].decode("utf-8", "replace")
    args = "".join(f"'{arg[:128].decode('utf-8', 'replace')}' " for arg in command[1:])
    return encode_error(f"ERR unknown command '{name}', with args beginning with: {args}")


# -- commands -----------------------------------------------------------------------------------


def cmd_ping(session: Session, args: list[bytes]) -> Reply:
    if len(args) == 1:
        return PONG
    if len(args) == 2:
        return encode_bulk(args[1])
    return encode_error("ERR wrong number of arguments for 'ping' command")


def cmd_echo(session: Session, args: list[bytes]) -> Reply:
    return encode_bulk(args[1])


def cmd_get(session: Session, args: list[bytes]) -> Reply:
    entry = live(args[1])
    if entry is None:
        return session.null
    value = render(value_of(entry))
    if value is None:
        return E_WRONGTYPE
    return b"$%d\r\n%s\r\n" % (len(value), value)


def cmd_mget(session: Session, args: list[bytes]) -> Reply:
    now = now_ms()
    values = []
    for key in args[1:]:
        entry = live(key, now)
        values.append(None if entry is None else render(value_of(entry)))
    return session.array(values)


def cmd_exists(session: Session, args: list[bytes]) -> Reply:
    now = now_ms()
    return encode_integer(sum(live(key, now) is not None for key in args[1:]))


def cmd_type(session: Session, args: list[bytes]) -> Reply:
    entry = live(args[1])
    if entry is None:
        return b"+none\r\n"
    return b"+string\r\n" if render(value_of(entry)) is not None else b"+unknown\r\n"


def cmd_set(session: Session, args: list[bytes]) -> Reply:
    key = args[1]
    value = stored(args[2])
    deadline: int | None = None
    condition: bytes | None = None
    keepttl = get = False
    i = 3
    now = now_ms()
    while i < len(args):
        option = args[i].upper()
        if option in (b"NX", b"XX") and condition in (None, option):
            condition = option
        elif option == b"KEEPTTL" and deadline is None:
            keepttl = True
        elif option == b"GET":
            get = True
        elif option in (b"EX", b"PX", b"EXAT", b"PXAT") and deadline is None and not keepttl:
            if i + 1 >= len(args):
                return E_SYNTAX
            amount = parse_int(args[i + 1])
            if amount is None:
                return E_NOT_INT
            if amount <= 0 or amount > (2**62 // 1000 if option in (b"EX", b"EXAT") else 2**62):
                return encode_error("ERR invalid expire time in 'set' command")
            scale = 1000 if option in (b"EX", b"EXAT") else 1
            deadline = amount * scale + (now if option in (b"EX", b"PX") else 0)
            i += 1
        else:
            return E_SYNTAX
        i += 1
    if condition is None and not keepttl and not get:
        data[key] = value if deadline is None else [value, deadline]
        if deadline is not None:
            expires[key] = deadline
        return Acked(data.flush())
    return set_slow(session, key, value, deadline, condition, keepttl, get)


async def set_slow(
    session: Session,
    key: bytes,
    value: Any,
    deadline: int | None,
    condition: bytes | None,
    keepttl: bool,
    get: bool,
) -> bytes:
    """SET with NX/XX/KEEPTTL/GET: a compare-and-swap against the entry read locally, retried
    when another worker changed it first."""
    while True:
        entry = data.get(key)
        current = entry
        if entry.__class__ is list and entry[1] <= now_ms():
            current = None  # expired: as good as missing; the swap replaces it
        old = None if current is None else render(value_of(current))
        if get and current is not None and old is None:
            return E_WRONGTYPE
        if (condition == b"NX" and current is not None) or (condition == b"XX" and current is None):
            return encode_bulk(old) if get and old is not None else session.null
        new_deadline = deadline
        if keepttl and current.__class__ is list:
            new_deadline = current[1]
        new = value if new_deadline is None else [value, new_deadline]
        if await data.cas(key, entry, new):
            if new_deadline is not None:
                expires[key] = new_deadline
            if get:
                return session.null if old is None else encode_bulk(old)
            return OK


def cmd_mset(session: Session, args: list[bytes]) -> Reply:
    if len(args) % 2 == 0:
        return encode_error("ERR wrong number of arguments for 'mset' command")
    data.update({args[i]: stored(args[i + 1]) for i in range(1, len(args), 2)})
    return Acked(data.flush())


def cmd_del(session: Session, args: list[bytes]) -> Reply:
    pops = [data.pop(key) for key in args[1:]]
    return count_deleted(pops)


async def count_deleted(pops: list[asyncio.Future[Any]]) -> bytes:
    now = now_ms()
    deleted = 0
    for pop in pops:
        entry = await pop
        if entry is not None and not (entry.__class__ is list and entry[1] <= now):
            deleted += 1
    return encode_integer(deleted)


def cmd_incrby(session: Session, args: list[bytes]) -> Reply:
    amount = parse_int(args[2])
    if amount is None:
        return E_NOT_INT
    return incr(args[1], amount)


def cmd_decrby(session: Session, args: list[bytes]) -> Reply:
    amount = parse_int(args[2])
    if amount is None or amount == INT64_MIN:
        return E_NOT_INT
    return incr(args[1], -amount)


def cmd_incr(session: Session, args: list[bytes]) -> Reply:
    return incr(args[1], 1)


def cmd_decr(session: Session, args: list[bytes]) -> Reply:
    return incr(args[1], -1)


def incr(key: bytes, amount: int) -> Reply:
    entry = data.get(key)
    cls = entry.__class__
    if entry is None or (cls is int and abs(entry) + abs(amount) < SAFE):
        return incr_fast(key, amount, data.incr(key, amount))
    if cls is bytes:
        return E_NOT_INT
    return incr_cas(key, amount)


async def incr_fast(key: bytes, amount: int, answer: asyncio.Future[int]) -> bytes:
    """The master's atomic incr, already sent; check what came back."""
    try:
        value = await answer
    except SharedError:  # the entry changed kind meanwhile (a TTL was set, or a string)
        return await incr_cas(key, amount)
    if not INT64_MIN <= value <= INT64_MAX:  # only when others raced it past 2**62
        await data.incr(key, -amount)
        return E_OVERFLOW
    return b":%d\r\n" % value


async def incr_cas(key: bytes, amount: int) -> bytes:
    """INCR of a key with a TTL (keeping the TTL), or near the 64-bit limits."""
    while True:
        entry = data.get(key)
        current = entry
        if entry.__class__ is list and entry[1] <= now_ms():
            current = None
        value = 0 if current is None else value_of(current)
        if value.__class__ is not int:
            return E_NOT_INT if render(value) is not None else E_WRONGTYPE
        new_value = value + amount
        if not INT64_MIN <= new_value <= INT64_MAX:
            return E_OVERFLOW
        new = [new_value, current[1]] if current.__class__ is list else new_value
        if await data.cas(key, entry, new):
            return b":%d\r\n" % new_value


def cmd_keys(session: Session, args: list[bytes]) -> Reply:
    now = now_ms()
    match = None if args[1] == b"*" else glob_regex(args[1]).fullmatch
    found = [
        key
        for key, entry in data.items()
        if key.__class__ is bytes
        and (match is None or match(key))
        and not (entry.__class__ is list and entry[1] <= now)
    ]
    return session.array(found)  # type: ignore[arg-type]  # list is invariant; bytes only


scanner = Scanner()


def cmd_scan(session: Session, args: list[bytes]) -> Reply:
    """``SCAN cursor [MATCH pattern] [COUNT n] [TYPE t]`` over this worker's replica: a full
    iteration returns every key present for its whole duration at least once
    (:mod:`mpnet.pure.scan`); COUNT is how many keys are looked at, as in Redis."""
    match, count, kind = None, 10, None
    i = 2
    while i < len(args):
        option = args[i].upper()
        if i + 1 >= len(args):
            return E_SYNTAX
        value = args[i + 1]
        if option == b"MATCH":
            match = None if value == b"*" else glob_regex(value).fullmatch
        elif option == b"COUNT":
            count = parse_int(value)  # type: ignore[assignment]
            if count is None:
                return E_NOT_INT
            if count < 1:
                return E_SYNTAX
        elif option == b"TYPE":
            kind = value.lower()
        else:
            return E_SYNTAX
        i += 2
    now = now_ms()
    try:
        cursor, keys = scanner.scan(args[1], count, data.keys, now)
    except CursorError:
        return encode_error("ERR invalid cursor")
    found: list[bytes | None] = []
    if kind in (None, b"string"):
        for key in keys:
            entry = data.get(key)
            if entry is None or (entry.__class__ is list and entry[1] <= now):
                continue
            if match is None or match(key):
                found.append(key)
    return b"*2\r\n" + encode_bulk(b"%d" % cursor) + session.array(found)


def cmd_dbsize(session: Session, args: list[bytes]) -> Reply:
    now = now_ms()
    expired = sum(1 for entry in data.values() if entry.__class__ is list and entry[1] <= now)
    return encode_integer(len(data) - expired)


def cmd_flushdb(session: Session, args: list[bytes]) -> Reply:
    if len(args) > 2 or (len(args) == 2 and args[1].upper() not in (b"ASYNC", b"SYNC")):
        return E_SYNTAX
    data.clear()
    expires.clear()
    return Acked(data.flush())


def cmd_expire(session: Session, args: list[bytes]) -> Reply:
    return expire_generic(session, args, 1000, "expire")


def cmd_pexpire(session: Session, args: list[bytes]) -> Reply:
    return expire_generic(session, args, 1, "pexpire")


def expire_generic(session: Session, args: list[bytes], scale: int, name: str) -> Reply:
    amount = parse_int(args[2])
    if amount is None:
        return E_NOT_INT
    if abs(amount) > 2**62 // scale:
        return encode_error(f"ERR invalid expire time in '{name}' command")
    flags = {arg.upper() for arg in args[3:]}
    if not flags <= {b"NX", b"XX", b"GT", b"LT"} or len(flags) != len(args) - 3:
        return encode_error(f"ERR Unsupported option {args[3].decode('utf-8', 'replace')}")
    if b"NX" in flags and flags & {b"XX", b"GT", b"LT"}:
        return encode_error("ERR NX and XX, GT or LT options at the same time are not compatible")
    if {b"GT", b"LT"} <= flags:
        return encode_error("ERR GT and LT options at the same time are not compatible")
    return expire_slow(args[1], now_ms() + amount * scale, flags)


async def expire_slow(key: bytes, deadline: int, flags: set[bytes]) -> bytes:
    while True:
        entry = data.get(key)
        now = now_ms()
        if entry is None or (entry.__class__ is list and entry[1] <= now):
            return b":0\r\n"
        current = entry[1] if entry.__class__ is list else None
        if (
            (b"NX" in flags and current is not None)
            or (b"XX" in flags and current is None)
            or (b"GT" in flags and (current is None or deadline <= current))
            or (b"LT" in flags and current is not None and deadline >= current)
        ):
            return b":0\r\n"
        if deadline <= now:  # a deadline in the past deletes the key, as in Redis
            if await data.delete_if(key, entry):
                return b":1\r\n"
            continue
        if await data.cas(key, entry, [value_of(entry), deadline]):
            expires[key] = deadline
            return b":1\r\n"


def cmd_persist(session: Session, args: list[bytes]) -> Reply:
    return persist(args[1])


async def persist(key: bytes) -> bytes:
    while True:
        entry = live(key)
        if entry.__class__ is not list:
            return b":0\r\n"
        if await data.cas(key, entry, entry[0]):
            return b":1\r\n"


def cmd_ttl(session: Session, args: list[bytes]) -> Reply:
    return ttl(args[1], 1000)


def cmd_pttl(session: Session, args: list[bytes]) -> Reply:
    return ttl(args[1], 1)


def ttl(key: bytes, scale: int) -> bytes:
    now = now_ms()
    entry = live(key, now)
    if entry is None:
        return b":-2\r\n"
    if entry.__class__ is not list:
        return b":-1\r\n"
    remaining = max(0, entry[1] - now)
    return encode_integer((remaining + 500) // 1000 if scale == 1000 else remaining)


# -- connection-level commands --------------------------------------------------------------


def cmd_hello(session: Session, args: list[bytes]) -> Reply:
    proto = session.proto
    if len(args) > 1:
        requested = parse_int(args[1])
        if requested is None:
            return encode_error("ERR Protocol version is not an integer or out of range")
        if requested not in (2, 3):
            return encode_error("NOPROTO unsupported protocol version")
        i = 2
        while i < len(args):
            option = args[i].upper()
            if option == b"SETNAME" and i + 1 < len(args):
                refused = bad_client_name(args[i + 1])
                if refused is not None:
                    return refused
                session.name = args[i + 1]
                i += 2
            elif option == b"AUTH":
                return encode_error("WRONGPASS invalid username-password pair or user is disabled.")
            else:
                return encode_error(f"ERR Syntax error in HELLO option '{option.decode()}'")
        proto = requested
    session.proto = proto
    session.null = b"_\r\n" if proto == 3 else b"$-1\r\n"
    return session.map(
        [
            (b"server", b"redis"),
            (b"version", b"7.0.0"),
            (b"proto", proto),
            (b"id", os.getpid()),
            (b"mode", b"standalone"),
            (b"role", b"master"),
            (b"modules", []),
        ]
    )


MAX_CLIENT_NAME = 512
E_CLIENT_NAME = encode_error(
    "ERR Client names cannot contain spaces, newlines or special characters."
)
E_CLIENT_NAME_LONG = encode_error(f"ERR Client names are limited to {MAX_CLIENT_NAME} bytes.")


def bad_client_name(name: bytes) -> bytes | None:
    """Redis's rule (printable ASCII without spaces, ``!`` to ``~``) plus a length cap; the
    error to answer, or None for a valid name."""
    if len(name) > MAX_CLIENT_NAME:
        return E_CLIENT_NAME_LONG
    if any(byte < 0x21 or byte > 0x7E for byte in name):
        return E_CLIENT_NAME
    return None


def cmd_client(session: Session, args: list[bytes]) -> Reply:
    sub = args[1].upper()
    if sub == b"SETNAME" and len(args) == 3:
        refused = bad_client_name(args[2])
        if refused is not None:
            return refused
        session.name = args[2] or None
        return OK
    if sub == b"GETNAME" and len(args) == 2:
        return session.null if session.name is None else encode_bulk(session.name)
    if sub == b"SETINFO" and len(args) == 4:
        return OK
    if sub == b"ID" and len(args) == 2:
        return encode_integer(id(session) & INT64_MAX)
    return encode_error(
        f"ERR unknown subcommand or wrong number of arguments for "
        f"'{args[1].decode('utf-8', 'replace')}'. Try CLIENT HELP."
    )


def cmd_select(session: Session, args: list[bytes]) -> Reply:
    index = parse_int(args[1])
    if index is None:
        return E_NOT_INT
    return OK if index == 0 else encode_error("ERR DB index is out of range")


CONFIG_PARAMETERS = {b"save": b"", b"appendonly": b"no", b"databases": b"1", b"maxmemory": b"0"}


def cmd_config(session: Session, args: list[bytes]) -> Reply:
    sub = args[1].upper()
    if sub == b"GET" and len(args) >= 3:
        found: dict[bytes, bytes] = {}
        for pattern in args[2:]:
            match = glob_regex(pattern.lower()).fullmatch
            found.update((k, v) for k, v in CONFIG_PARAMETERS.items() if match(k))
        return session.map(list(found.items()))
    if sub == b"RESETSTAT" and len(args) == 2:
        return OK
    if sub == b"SET":
        return encode_error("ERR CONFIG SET is not supported by mpnet kv")
    return encode_error(
        f"ERR unknown subcommand or wrong number of arguments for "
        f"'{args[1].decode('utf-8', 'replace')}'. Try CONFIG HELP."
    )


def cmd_command(session: Session, args: list[bytes]) -> Reply:
    """Minimal introspection: no command docs (redis-cli then shows no hints)."""
    if len(args) == 1:
        return b"*0\r\n"
    sub = args[1].upper()
    if sub == b"COUNT":
        return encode_integer(len(COMMANDS))
    if sub == b"DOCS":
        return session.map([])
    if sub == b"INFO":
        return session.array([None] * (len(args) - 2))
    return encode_error(
        f"ERR unknown subcommand '{args[1].decode('utf-8', 'replace')}'. Try COMMAND HELP."
    )


def cmd_info(session: Session, args: list[bytes]) -> Reply:
    now = now_ms()
    with_ttl = sum(1 for entry in data.values() if entry.__class__ is list and entry[1] > now)
    keys = len(data)
    text = (
        "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\n"
        f"server:mpnet kv\r\nprocess_id:{os.getpid()}\r\n"
        f"\r\n# Keyspace\r\ndb0:keys={keys},expires={with_ttl},avg_ttl=0\r\n"
    )
    return encode_bulk(text)


def cmd_quit(session: Session, args: list[bytes]) -> Reply:
    session.closing = True
    return OK


def _table() -> dict[bytes, Command]:
    specs: list[tuple[str, Callable[..., Reply], int, bool]] = [
        # name, handler, arity (Redis style: negative = at least), batch
        ("ping", cmd_ping, -1, True),
        ("echo", cmd_echo, 2, True),
        ("get", cmd_get, 2, False),
        ("mget", cmd_mget, -2, False),
        ("exists", cmd_exists, -2, False),
        ("type", cmd_type, 2, False),
        ("set", cmd_set, -3, False),
        ("mset", cmd_mset, -3, True),
        ("del", cmd_del, -2, True),
        ("incr", cmd_incr, 2, True),
        ("decr", cmd_decr, 2, True),
        ("incrby", cmd_incrby, 3, True),
        ("decrby", cmd_decrby, 3, True),
        ("keys", cmd_keys, 2, False),
        ("scan", cmd_scan, -2, False),
        ("dbsize", cmd_dbsize, 1, False),
        ("flushdb", cmd_flushdb, -1, True),
        ("flushall", cmd_flushdb, -1, True),
        ("expire", cmd_expire, -3, False),
        ("pexpire", cmd_pexpire, -3, False),
        ("persist", cmd_persist, 2, False),
        ("ttl", cmd_ttl, 2, False),
        ("pttl", cmd_pttl, 2, False),
        ("hello", cmd_hello, -1, False),
        ("client", cmd_client, -2, True),
        ("select", cmd_select, 2, True),
        ("config", cmd_config, -2, True),
        ("command", cmd_command, -1, True),
        ("info", cmd_info, -1, False),
        ("quit", cmd_quit, -1, False),
    ]
    return {name.upper().encode(): Command(name, *rest) for name, *rest in specs}  # type: ignore[arg-type]


COMMANDS = _table()


# -- the listener -------------------------------------------------------------------------------

sessions: dict[Any, Session] = {}


class listener:
    def onconnect(conn):
        sessions[conn] = Session(conn)

    def onincoming(conn, chunk):
        session = sessions[conn]
        if session.closing:
            return None
        session.parser.feed(chunk)
        session.unsynced = True
        if session.busy or session.stalled:
            return None  # the pending continuation, or ondrain, runs these commands
        if session.pump():
            return session.wait()
        return None

    def ondrain(conn):
        session = sessions.get(conn)
        if session is None or not session.stalled:
            return None
        session.stalled = False
        if session.busy:
            return None
        if session.pump():
            return session.wait()
        return None

    def ondisconnect(conn, err):
        sessions.pop(conn, None)


module.provides("net", name="kv", listener=listener, default_port=6380)


# -- active expiry ------------------------------------------------------------------------------


_expiry_backlog: list[Any] = []


def sweep_expired() -> float:
    """Every ``expire_interval`` seconds (a module timer), look at up to ``expire_batch`` indexed
    keys (in a random order of this worker's own) and delete the expired ones; drop stale index
    entries."""
    global _expiry_backlog
    try:
        if not _expiry_backlog:
            if not expires:
                return EXPIRE_INTERVAL
            _expiry_backlog = list(expires)
            random.shuffle(_expiry_backlog)
        now = now_ms()
        batch = _expiry_backlog[:EXPIRE_BATCH]
        _expiry_backlog = _expiry_backlog[EXPIRE_BATCH:]
        for key in batch:
            deadline = expires.get(key)
            if deadline is None or deadline > now:
                continue
            entry = data.get(key)
            if entry.__class__ is list and entry[1] <= now:
                expire_entry(key, entry)
            elif not (entry.__class__ is list and entry[1] == deadline):
                expires.delete_if(key, deadline).add_done_callback(_consume)
    except Exception:
        module.log("error", "expiry sweep failed:\n%s", traceback.format_exc())
    return EXPIRE_INTERVAL


module.add_timer(EXPIRE_INTERVAL, sweep_expired)
