"""The master <-> worker channel: a pure frame codec and a small non-blocking transport.

Every worker is linked to the master by one ``AF_UNIX`` socketpair. Messages are plain data
(None, bool, int, float, str, bytes, list, dict) encoded with the tagged binary codec below and
sent as length-prefixed frames. The codec is deliberately not ``pickle``: the master must never run
code chosen by a worker (workers run user modules), and a frame is only ever turned back into plain
data. ``encode``/``FrameDecoder`` are pure (bytes in, messages out) and tested without sockets; the
transport classes are the thin glue around them.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

MAX_FRAME = 64 * 1024 * 1024
"""Largest frame either side accepts; a bigger length prefix is a protocol error."""

RECV_SIZE = 256 * 1024

MAX_DEPTH = 64
"""Deepest nesting of lists/dicts the codec accepts, so a hostile frame cannot exhaust the stack."""

_LEN = struct.Struct(">I")
_INT = struct.Struct(">q")
_FLOAT = struct.Struct(">d")
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


class ChannelError(Exception):
    """A frame or value that breaks the channel protocol; the peer that sent it is cut off."""


def check_plain(value: Any, depth: int = 0) -> None:
    """Raise ``TypeError`` unless *value* is plain data the channel (and shared tables) can carry.

    Called where a module writes, so the mistake surfaces at the write, in the writing module,
    rather than later in another process.
    """
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, float, str, bytes):
        return
    if kind in (list, tuple):
        for item in value:
            check_plain(item, depth + 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) not in (str, bytes, int, float, bool) and key is not None:
                raise TypeError(f"dict key of type {type(key).__name__} is not plain data")
            check_plain(item, depth + 1)
        return
    raise TypeError(
        f"{kind.__name__} is not plain data "
        "(allowed: None, bool, int, float, str, bytes, list, dict)"
    )


def _encode_into(out: bytearray, value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    kind = type(value)
    if value is None:
        out += b"N"
    elif kind is bool:
        out += b"T" if value else b"F"
    elif kind is int:
        if _INT_MIN <= value <= _INT_MAX:
            out += b"i"
            out += _INT.pack(value)
        else:  # big-endian two's complement: no decimal digit limit, no str() round trip
            raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
            out += b"I"
            out += _LEN.pack(len(raw))
            out += raw
    elif kind is float:
        out += b"d"
        out += _FLOAT.pack(value)
    elif kind is str:
        data = value.encode()
        out += b"s"
        out += _LEN.pack(len(data))
        out += data
    elif kind is bytes:
        out += b"b"
        out += _LEN.pack(len(value))
        out += value
    elif kind is list or kind is tuple:
        out += b"l"
        out += _LEN.pack(len(value))
        for item in value:
            _encode_into(out, item, depth + 1)
    elif kind is dict:
        out += b"m"
        out += _LEN.pack(len(value))
        for key, item in value.items():
            if type(key) not in (str, bytes, int, float, bool) and key is not None:
                raise TypeError(f"dict key of type {type(key).__name__} is not plain data")
            _encode_into(out, key, depth + 1)
            _encode_into(out, item, depth + 1)
    else:
        check_plain(value)  # raises with the friendly message


def encode(message: Any) -> bytes:
    """Encode one message as a complete frame (length prefix included)."""
    out = bytearray(4)
    _encode_into(out, message, 0)
    size = len(out) - 4
    if size > MAX_FRAME:
        raise ChannelError(f"message of {size} bytes exceeds the {MAX_FRAME}-byte frame limit")
    out[0:4] = _LEN.pack(size)
    return bytes(out)


def _decode_value(buf: bytes | memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise ChannelError("value nested too deeply")
    try:
        tag = buf[pos]
    except IndexError:
        raise ChannelError("truncated value") from None
    pos += 1
    if tag == 0x4E:  # N
        return None, pos
    if tag == 0x54:  # T
        return True, pos
    if tag == 0x46:  # F
        return False, pos
    if tag == 0x69:  # i
        end = pos + 8
        if end > len(buf):
            raise ChannelError("truncated int")
        return _INT.unpack_from(buf, pos)[0], end
    if tag == 0x64:  # d
        end = pos + 8
        if end > len(buf):
            raise ChannelError("truncated float")
        return _FLOAT.unpack_from(buf, pos)[0], end
    if pos + 4 > len(buf):
        raise ChannelError("truncated length")
    (length,) = _LEN.unpack_from(buf, pos)
    pos += 4
    if tag in (0x73, 0x62, 0x49):  # s, b, I
        end = pos + length
        if end > len(buf):
            raise ChannelError("truncated string")
        raw = bytes(buf[pos:end])
        if tag == 0x62:
            return raw, end
        if tag == 0x49:
            value = int.from_bytes(raw, "big", signed=True)
            if _INT_MIN <= value <= _INT_MAX:  # also rejects an empty one: one encoding per int
                raise ChannelError("invalid big integer (fits 64 bits)")
            return value, end
        try:
            return raw.decode(), end
        except UnicodeDecodeError as exc:
            raise ChannelError(f"invalid UTF-8 in string: {exc}") from None
    if tag == 0x6C:  # l
        if length > len(buf) - pos:
            raise ChannelError("list longer than its frame")
        items = []
        for _ in range(length):
            item, pos = _decode_value(buf, pos, depth + 1)
            items.append(item)
        return items, pos
    if tag == 0x6D:  # m
        if length > len(buf) - pos:
            raise ChannelError("dict longer than its frame")
        result = {}
        for _ in range(length):
            key, pos = _decode_value(buf, pos, depth + 1)
            if isinstance(key, (list, dict)):
                raise ChannelError("dict key is not a scalar")
            result[key], pos = _decode_value(buf, pos, depth + 1)
        return result, pos
    raise ChannelError(f"unknown type tag 0x{tag:02x}")


def decode_payload(payload: bytes) -> Any:
    """Decode the payload of one frame (without its length prefix)."""
    value, pos = _decode_value(payload, 0, 0)
    if pos != len(payload):
        raise ChannelError(f"{len(payload) - pos} stray bytes after the value")
    return value


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get back every complete message.

    The decoder keeps at most one partial frame. A length prefix above ``max_frame`` or a payload
    that does not decode raises :class:`ChannelError`; after that the stream is unusable (there
    is no way to resynchronise a length-prefixed stream) and the peer must be disconnected.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[Any]:
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
            messages.append(decode_payload(bytes(buffer[start : start + size])))
            pos = start + size
        if pos:
            del buffer[:pos]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self._buffer)


class MasterChannel:
    """The master's end of one worker's channel: non-blocking, buffered, used from a select loop.

    The master never blocks on a worker: ``send`` queues and writes what the socket takes now;
    the rest goes out when the selector reports the socket writable (``flush``). If a worker
    stops reading and its queue passes ``max_backlog`` bytes, ``send`` drops the queue and sets
    ``failed`` to the reason; the master checks it once per loop and cuts that worker off rather
    than grow without bound.
    """

    def __init__(self, sock: socket.socket, max_backlog: int = 256 * 1024 * 1024) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()  # stays valid as a selector key after close
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._max_backlog = max_backlog
        self.closed = False
        self.failed: str | None = None

    def fileno(self) -> int:
        return self._fd

    def send(self, message: Any) -> None:
        self.send_frame(encode(message))

    def send_frame(self, frame: bytes) -> None:
        """Queue an already encoded frame (a broadcast is encoded once for every worker)."""
        if self.closed or self.failed:
            return
        self._out += frame
        if len(self._out) > self._max_backlog:
            self.failed = f"it is not reading its channel ({len(self._out)} bytes queued)"
            self._out.clear()
            return
        self.flush()

    def flush(self) -> None:
        """Write as much of the queue as the socket takes without blocking."""
        while self._out and not self.closed:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            del self._out[:sent]

    @property
    def wants_write(self) -> bool:
        return bool(self._out) and not self.closed

    def receive(self) -> list[Any] | None:
        """Read what is available; return the complete messages, or None once the peer is gone.

        Raises ChannelError for a malformed stream.
        """
        messages: list[Any] = []
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return messages
            except OSError:
                data = b""
            if not data:
                return messages or None
            messages.extend(self._decoder.feed(data))
            if len(data) < RECV_SIZE:
                return messages  # drained: no need for a recv that fails with EAGAIN

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class WorkerChannel(asyncio.Protocol):
    """The worker's end of the channel, as an asyncio protocol on the worker's event loop.

    Incoming messages are handed to ``on_message``; a broken stream or the master going away
    calls ``on_lost`` (the worker then exits: without its master it must not keep serving).
    """

    def __init__(self, on_message: Callable[[Any], None], on_lost: Callable[[str], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ChannelError as exc:
            self._on_lost(f"malformed message from master: {exc}")
            return
        for message in messages:
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_lost(f"channel to master closed ({exc or 'EOF'})")

    def send(self, message: Any) -> None:
        if self.transport is not None:
            self.transport.write(encode(message))
