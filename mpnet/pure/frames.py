"""The channel's wire format: msgpack payloads in length-prefixed frames. Pure: bytes in,
messages out, no sockets.

Every worker is linked to the master by one ``AF_UNIX`` socketpair (see ``mpnet.channel`` and
``mpnet.workers.channel``). Messages are plain data encoded with msgpack (ints beyond 64 bits as
one extension type). The codec is deliberately not ``pickle``: the master must never run code
chosen by a worker (workers run user modules), and a frame is only ever turned back into plain
data. msgpack's C codec earned its place by measurement: it is 6-10x cheaper per message than the
pure-Python tagged codec it replaced, which was half of the master's CPU under shared-table load
(bench/bench_shared.py).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .messages import ChannelError
from .values import KEY_TYPES, MAX_DEPTH, check_plain

__all__ = [
    "MAX_FRAME",
    "MAX_RELAYED_FRAME",
    "ChannelError",
    "FrameDecoder",
    "decode_payload",
    "encode",
    "payload_stream",
]

MAX_FRAME = 64 * 1024 * 1024
"""Largest frame either side accepts; a bigger length prefix is a protocol error."""

MAX_RELAYED_FRAME = MAX_FRAME - 16
"""Largest frame a worker may send for a message the master relays to every worker (a write, a
broadcast, an atomic request). The relayed form is a few bytes longer (a ``SequencedWrite``
carries the writer's pid, up to 9 bytes, where the ``SharedWrite`` had none), so a message that
fits here always fits the fan-out frame: a write is refused at the call, never accepted by the
master and then undeliverable."""

_LEN = struct.Struct(">I")
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1  # what msgpack's int formats hold


_BIG_INT = 1
"""msgpack extension type of an int beyond 64 bits (big-endian two's complement)."""

_packer = msgpack.Packer(use_bin_type=True, datetime=False, strict_types=True)
# strict_types: a tuple, a subclass (IntEnum, a str subclass) or anything else msgpack would
# quietly convert fails the fast path and goes through _normalized, which converts tuples and
# refuses the rest with check_plain's message. The packer never calls back into Python, so the
# GIL makes one shared packer safe.


def _big_int(value: int) -> msgpack.ExtType:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
    return msgpack.ExtType(_BIG_INT, raw)


def _normalized(value: Any, depth: int) -> Any:
    """The slow path of :func:`encode`: a copy msgpack packs as the value we mean (tuples as
    lists, ints beyond 64 bits as an extension), or the friendly ``TypeError``."""
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    kind = type(value)
    if kind is int:
        return value if _INT_MIN <= value <= _UINT_MAX else _big_int(value)
    if value is None or kind in (bool, float, str, bytes):
        return value
    if kind is list or kind is tuple:
        return [_normalized(item, depth + 1) for item in value]
    if kind is dict:
        result = {}
        for key, item in value.items():
            if type(key) not in KEY_TYPES and key is not None:
                raise TypeError(f"dict key of type {type(key).__name__} is not plain data")
            result[_normalized(key, depth + 1)] = _normalized(item, depth + 1)
        return result
    check_plain(value)  # raises with the friendly message
    raise TypeError(f"{kind.__name__} is not plain data")  # pragma: no cover


def encode(message: Any, limit: int = MAX_FRAME) -> bytes:
    """Encode one message as a complete frame (length prefix included).

    Raises ``TypeError`` for a value that is not plain data (or nested deeper than MAX_DEPTH
    where msgpack alone cannot take it), ChannelError for one above *limit* (the frame limit).
    """
    try:
        payload = _packer.pack(message)
    except (TypeError, ValueError, OverflowError):
        payload = _packer.pack(_normalized(message, 0))
    size = len(payload)
    if size > limit:
        raise ChannelError(f"message of {size} bytes exceeds the {limit}-byte frame limit")
    return _LEN.pack(size) + payload


def _ext_hook(code: int, data: bytes) -> int:
    if code != _BIG_INT:
        raise ChannelError(f"unknown extension type {code}")
    value = int.from_bytes(data, "big", signed=True)
    if _INT_MIN <= value <= _UINT_MAX:  # also rejects an empty one: one encoding per int
        raise ChannelError("invalid big integer (fits 64 bits)")
    return value


def decode_payload(payload: bytes | bytearray) -> Any:
    """Decode the payload of one frame (without its length prefix): exactly one plain value.

    Anything malformed raises ChannelError (and nothing else). msgpack's own limits bound the
    work: counts longer than the payload and nesting deeper than its stack are refused.
    """
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=False,
            ext_hook=_ext_hook,
            timestamp=2,  # a (hand-made) timestamp decodes as an int, never an object
        )
    except ChannelError:
        raise
    except Exception as exc:  # ValueError (ExtraData, StackError...), TypeError, UnicodeError
        detail = str(exc) or _SILENT_ERRORS.get(type(exc).__name__, "")
        raise ChannelError(f"malformed payload ({type(exc).__name__}: {detail})") from None


def payload_stream(max_size: int) -> msgpack.Unpacker:
    """An unpacker with :func:`decode_payload`'s rules, for many payloads fed back to back (the
    journal's replay decodes them in one C loop). Its errors are msgpack's own: a caller that
    needs :class:`ChannelError` and an offset decodes the offending payload again with
    :func:`decode_payload`."""
    return msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        ext_hook=_ext_hook,
        timestamp=2,
        max_buffer_size=max(max_size, 1),
    )


_SILENT_ERRORS = {"FormatError": "invalid type byte", "StackError": "nested too deeply"}


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get back every complete message.

    The decoder keeps at most one partial frame. A length prefix above ``max_frame`` or a payload
    that does not decode raises :class:`ChannelError`; after that the stream is unusable (there
    is no way to resynchronise a length-prefixed stream) and the peer must be disconnected.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes | memoryview) -> list[Any]:
        buffer = self._buffer
        buffer += data
        messages = []
        pos = 0
        end = len(buffer)
        while end - pos >= 4:
            (size,) = _LEN.unpack_from(buffer, pos)
            if size > self._max_frame:
                raise ChannelError(
                    f"frame of {size} bytes exceeds the {self._max_frame}-byte limit"
                )
            if end - pos - 4 < size:
                break
            start = pos + 4
            messages.append(decode_payload(buffer[start : start + size]))
            pos = start + size
        if pos:
            del buffer[:pos]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self._buffer)
