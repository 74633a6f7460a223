"""The master <-> worker channel: a pure frame codec and a small non-blocking transport.

Every worker is linked to the master by one ``AF_UNIX`` socketpair. Messages are plain data
(None, bool, int, float, str, bytes, list, dict) encoded with msgpack (ints beyond 64 bits as
one extension type) and sent as length-prefixed frames. The codec is deliberately not ``pickle``:
the master must never run code chosen by a worker (workers run user modules), and a frame is
only ever turned back into plain data. msgpack's C codec earned its place by measurement: it is
6-10x cheaper per message than the pure-Python tagged codec it replaced, which was half of the
master's CPU under shared-table load (bench/bench_shared.py). ``encode``/``FrameDecoder`` are
pure (bytes in, messages out) and tested without sockets; the transport classes are the thin
glue around them.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

import msgpack

MAX_FRAME = 64 * 1024 * 1024
"""Largest frame either side accepts; a bigger length prefix is a protocol error."""

RECV_SIZE = 256 * 1024

MAX_DEPTH = 64
"""Deepest nesting of lists/dicts a module may write (``check_plain``); the master checks what
workers send against it, since msgpack alone decodes deeper values."""

_LEN = struct.Struct(">I")
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1  # what msgpack's int formats hold


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
            if type(key) not in (str, bytes, int, float, bool) and key is not None:
                raise TypeError(f"dict key of type {type(key).__name__} is not plain data")
            result[_normalized(key, depth + 1)] = _normalized(item, depth + 1)
        return result
    check_plain(value)  # raises with the friendly message
    raise TypeError(f"{kind.__name__} is not plain data")  # pragma: no cover


def encode(message: Any) -> bytes:
    """Encode one message as a complete frame (length prefix included).

    Raises ``TypeError`` for a value that is not plain data (or nested deeper than MAX_DEPTH
    where msgpack alone cannot take it), ChannelError for one above the frame limit.
    """
    try:
        payload = _packer.pack(message)
    except (TypeError, ValueError, OverflowError):
        payload = _packer.pack(_normalized(message, 0))
    size = len(payload)
    if size > MAX_FRAME:
        raise ChannelError(f"message of {size} bytes exceeds the {MAX_FRAME}-byte frame limit")
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
        # recv_into one buffer: a fresh RECV_SIZE bytes object per recv costs an mmap, an
        # mremap and a munmap, more than the recv itself for a small message.
        self._view = memoryview(bytearray(RECV_SIZE))
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
        view = self._view
        while True:
            try:
                size = self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return messages
            except OSError:
                size = 0
            if not size:
                return messages or None
            messages.extend(self._decoder.feed(view[:size]))
            if size < RECV_SIZE:
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
        self._pending = bytearray()  # frames sent in this pass of the loop, written at its end
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

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
        self._pending.clear()
        self._on_lost(f"channel to master closed ({exc or 'EOF'})")

    def send(self, message: Any) -> None:
        """Queue *message*; every message sent in one pass of the event loop leaves in one
        write at the end of that pass (one wake-up of the master instead of one each)."""
        if self.transport is None:
            return
        frame = encode(message)
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending += frame

    def flush(self) -> None:
        """Write what is queued now (also called by the loop at the end of a pass)."""
        data, self._pending = self._pending, bytearray()
        if data and self.transport is not None:
            self.transport.write(data)
