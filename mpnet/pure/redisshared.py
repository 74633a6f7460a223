"""Shared tables on Redis, free of I/O: key names, how keys and values are stored, the Lua
scripts that decide writes and atomics, and the change events they publish.

Layout under the deployment's prefix ``P`` (``redis_prefix``):

``P meta``          ``MARKER``: the prefix belongs to an mpnet deployment of this layout
``P seq``           a counter every change increments (the order of changes)
``P t:<table>``     one hash per table: field = the encoded key, value = the encoded value
``P events``        the pub/sub channel every change (and every broadcast) is published on

Every write and atomic runs as one Lua script that changes the hash, increments ``P seq`` and
publishes the change on ``P events`` (``seq origin table op field value ...`` as netstrings):
Redis runs scripts one at a time and delivers a channel's messages in order, so every worker on
every host sees every change in Redis's order. Events carry values (never just "key changed"),
so a replica never needs a round trip to catch up, and the worker's merge rules
(:class:`mpnet.pure.replica.Replica`) apply unchanged. Scripts return the ``seq`` of their change
(or the current one), which is what a worker waits for before an atomic's answer counts.

Values: an int in the signed 64-bit range is stored as its decimal digits (so ``HINCRBY`` is
``incr``), anything else as ``\\x00`` + msgpack (:mod:`mpnet.pure.frames`), so the two never
collide. Keys are msgpack-encoded: ``1`` and ``"1"`` are different keys, as in a dict.
Events are a sequence of netstrings (``<length>:<bytes>``): Lua builds them with string
operations, and they carry the stored forms as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .frames import decode_payload, encode
from .messages import ChannelError
from .replica import SharedError, check_key

MARKER = b"mpnet-shared/1"
"""The value of ``<prefix>meta``: which layout the keys under the prefix follow."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_PACKED = b"\x00"
BROADCAST = b"b"


def bulk(item: bytes | str | int) -> bytes:
    """One argument of a RESP command."""
    if isinstance(item, int):
        data = b"%d" % item
    elif isinstance(item, str):
        data = item.encode()
    else:
        data = item
    return b"$%d\r\n%s\r\n" % (len(data), data)


class ScriptCall:
    """A script's command with its fixed arguments encoded once (they are most of the bytes):
    ``EVALSHA sha 2 <table hash> <seq> <events> <origin> <table> <op>``; :meth:`command` adds
    the op-specific ones. redis-py's generic packing cost more than the rest of an ``incr``."""

    __slots__ = ("count", "fixed")

    def __init__(self, sha: bytes, keys: Keys, origin: bytes, table: str, op: str) -> None:
        fixed: list[bytes | str | int] = [
            *(b"EVALSHA", sha, 2, keys.table(table), keys.seq, keys.events, origin, table, op)
        ]
        self.count = len(fixed)
        self.fixed = b"".join(bulk(item) for item in fixed)

    def command(self, args: Sequence[bytes | int]) -> bytes:
        return (
            b"*%d\r\n" % (self.count + len(args))
            + self.fixed
            + b"".join([bulk(item) for item in args])
        )


def command(*args: bytes | str | int) -> bytes:
    """A RESP command (what redis-py's ``pack_command`` makes, without its generality)."""
    return b"*%d\r\n" % len(args) + b"".join([bulk(item) for item in args])


def netstrings(items: list[bytes]) -> bytes:
    return b"".join(b"%d:%s" % (len(item), item) for item in items)


def split_netstrings(raw: bytes) -> list[bytes]:
    """The items of a netstring sequence; ChannelError if it is not one."""
    items = []
    pos, end = 0, len(raw)
    try:
        while pos < end:
            colon = raw.index(b":", pos, pos + 21)
            size = int(raw[pos:colon])
            start = colon + 1
            if size < 0 or start + size > end:
                raise ValueError
            items.append(raw[start : start + size])
            pos = start + size
    except ValueError:
        raise ChannelError("malformed event (not a netstring sequence)") from None
    return items


@dataclass(frozen=True)
class Keys:
    """The Redis names of one deployment (one ``redis_prefix``)."""

    prefix: str

    @property
    def meta(self) -> str:
        return self.prefix + "meta"

    @property
    def seq(self) -> str:
        return self.prefix + "seq"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    def table(self, name: str) -> str:
        return self.prefix + "t:" + name

    def table_name(self, key: bytes) -> str | None:
        """The table a hash key belongs to, or None if it is not one of ours."""
        head = (self.prefix + "t:").encode()
        return key[len(head) :].decode() if key.startswith(head) else None

    @property
    def all_tables(self) -> str:
        """A SCAN MATCH pattern of every table hash (the prefix's glob characters escaped)."""
        return glob_escape(self.prefix + "t:") + "*"

    @property
    def everything(self) -> str:
        return glob_escape(self.prefix) + "*"


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def encode_key(key: Any) -> bytes:
    check_key(key)
    return encode(key)[4:]


def decode_key(raw: bytes) -> Any:
    return decode_payload(raw)


def encode_value(value: Any) -> bytes:
    """The stored form of a value (raises TypeError for one that is not plain data)."""
    if value.__class__ is int and _INT64_MIN <= value <= _INT64_MAX:
        return b"%d" % value
    return _PACKED + encode(value)[4:]


def decode_value(raw: bytes) -> Any:
    if raw[:1] == _PACKED:
        return decode_payload(raw[1:])
    try:
        return int(raw)
    except ValueError:
        raise ChannelError(f"stored value {raw[:40]!r} is not one mpnet wrote") from None


NONE_VALUE = encode_value(None)


@dataclass(frozen=True)
class Change:
    """One published change, as a worker's replica applies it (see :mod:`.replica`)."""

    seq: int
    origin: bytes
    table: str
    op: str  # set, del, clear, update
    args: list[Any]


@dataclass(frozen=True)
class BroadcastMessage:
    topic: str
    payload: Any


def decode_event(raw: bytes) -> Change | BroadcastMessage:
    """Decode one message of the events channel; ChannelError if it is not one of ours."""
    items = split_netstrings(raw)
    if len(items) < 4:
        raise ChannelError("malformed event (fewer than 4 items)")
    if items[0] == b"0" and items[3] == BROADCAST and len(items) == 6:
        try:
            topic = items[4].decode()
        except UnicodeDecodeError:
            raise ChannelError("malformed event (topic)") from None
        return BroadcastMessage(topic, decode_payload(items[5]))
    raw_seq, origin, table, op = items[:4]
    rest = items[4:]
    try:
        name, kind = table.decode(), op.decode()
    except (AttributeError, UnicodeDecodeError):
        raise ChannelError("malformed event (table or op)") from None
    if kind == "set" and len(rest) == 2:
        args = [decode_key(rest[0]), decode_value(rest[1])]
    elif kind == "del" and len(rest) == 1:
        args = [decode_key(rest[0])]
    elif kind == "clear" and not rest:
        args = []
    elif kind == "update" and rest and len(rest) % 2 == 0:
        args = [{decode_key(rest[i]): decode_value(rest[i + 1]) for i in range(0, len(rest), 2)}]
    else:
        raise ChannelError(f"malformed event (op {op!r} with {len(rest)} arguments)")
    if not raw_seq.isdigit():
        raise ChannelError("malformed event (seq)")
    return Change(int(raw_seq), origin, name, kind, args)


def encode_broadcast(topic: str, payload: Any) -> bytes:
    """A broadcast as published on the events channel (seq 0: broadcasts change no state)."""
    return netstrings([b"0", b"", b"", BROADCAST, topic.encode(), encode(payload)[4:]])


def write_args(op: str, args: list[Any]) -> list[bytes]:
    """The encoded fields/values of a plain write, as the WRITE script takes them."""
    if op == "set":
        return [encode_key(args[0]), encode_value(args[1])]
    if op == "del":
        return [encode_key(args[0])]
    if op == "clear":
        return []
    if op == "update":
        out: list[bytes] = []
        for key, value in args[0].items():
            out += (encode_key(key), encode_value(value))
        return out
    raise ValueError(f"unknown shared-table write {op!r}")


# KEYS[1] = table hash, KEYS[2] = seq; ARGV[1] = events channel, ARGV[2] = origin,
# ARGV[3] = table name, ARGV[4] = op; then op-specific arguments. Every script returns
# {seq, answer...}.
_PUBLISH = """
local function publish(...)
  local seq = redis.call('INCR', KEYS[2])
  local out = {}
  for _, item in ipairs({string.format('%d', seq), ARGV[2], ARGV[3], ...}) do
    out[#out + 1] = #item .. ':' .. item
  end
  redis.call('PUBLISH', ARGV[1], table.concat(out))
  return seq
end
local function current() return tonumber(redis.call('GET', KEYS[2]) or '0') end
"""

SCRIPTS: dict[str, str] = {
    "write": _PUBLISH
    + """
local op = ARGV[4]
if op == 'set' or op == 'update' then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
elseif op == 'del' then
  redis.call('HDEL', KEYS[1], ARGV[5])
elseif op == 'clear' then
  redis.call('DEL', KEYS[1])
end
return {publish(op, unpack(ARGV, 5))}
""",
    # ARGV[5] = field, ARGV[6] = amount
    "incr": _PUBLISH
    + """
redis.call('HINCRBY', KEYS[1], ARGV[5], ARGV[6])
local new = redis.call('HGET', KEYS[1], ARGV[5])  -- the exact digits (Lua numbers are doubles)
return {publish('set', ARGV[5], new), new}
""",
    # ARGV[5] = field, ARGV[6] = value
    "setdefault": _PUBLISH
    + """
if redis.call('HSETNX', KEYS[1], ARGV[5], ARGV[6]) == 1 then
  return {publish('set', ARGV[5], ARGV[6]), ARGV[6]}
end
return {current(), redis.call('HGET', KEYS[1], ARGV[5])}
""",
    # ARGV[5] = field, ARGV[6] = expected, ARGV[7] = new, ARGV[8] = encoded None
    "cas": _PUBLISH
    + """
local held = redis.call('HGET', KEYS[1], ARGV[5])
if held == false then held = ARGV[8] end
if held ~= ARGV[6] then return {current(), 0} end
redis.call('HSET', KEYS[1], ARGV[5], ARGV[7])
return {publish('set', ARGV[5], ARGV[7]), 1}
""",
    # ARGV[5] = field
    "pop": _PUBLISH
    + """
local held = redis.call('HGET', KEYS[1], ARGV[5])
if held == false then return {current()} end
redis.call('HDEL', KEYS[1], ARGV[5])
return {publish('del', ARGV[5]), held}
""",
    # ARGV[5] = field, ARGV[6] = expected
    "delete_if": _PUBLISH
    + """
local held = redis.call('HGET', KEYS[1], ARGV[5])
if held == false or held ~= ARGV[6] then return {current(), 0} end
redis.call('HDEL', KEYS[1], ARGV[5])
return {publish('del', ARGV[5]), 1}
""",
}


def atomic_args(op: str, args: list[Any]) -> list[bytes | int]:
    """The op-specific script arguments of an atomic (after the four common ones)."""
    field = encode_key(args[0])
    if op == "incr":
        return [field, args[1]]
    if op == "setdefault":
        return [field, encode_value(args[1])]
    if op == "cas":
        return [field, encode_value(args[1]), encode_value(args[2]), NONE_VALUE]
    if op == "pop":
        return [field]
    if op == "delete_if":
        return [field, encode_value(args[1])]
    raise SharedError(f"unknown atomic operation {op!r}")


def atomic_answer(op: str, args: list[Any], reply: list[Any]) -> tuple[int, Any]:
    """(seq to wait for, the answer the caller gets) from a script's reply."""
    seq = int(reply[0])
    if op == "incr":
        return seq, int(reply[1])
    if op == "setdefault":
        return seq, decode_value(reply[1])
    if op in ("cas", "delete_if"):
        return seq, bool(reply[1])
    if op == "pop":
        return seq, decode_value(reply[1]) if len(reply) > 1 else args[1]
    raise SharedError(f"unknown atomic operation {op!r}")


def error_message(op: str, key: Any, reply: str) -> str:
    """What a module sees when Redis refuses an operation (the Redis text kept for the log)."""
    if "not an integer" in reply:
        return f"incr: value of {key!r} is not an integer"
    if "overflow" in reply:
        return f"incr: value of {key!r} would overflow 64 bits"
    if "WRONGTYPE" in reply:
        return f"{op}: the Redis key of this table is not a hash (another program's key?)"
    return f"{op}: Redis refused it: {reply}"
