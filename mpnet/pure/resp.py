"""RESP2, the Redis serialization protocol, as a sans-IO parser and a set of reply encoders.

A Redis-compatible module feeds the bytes it receives into a :class:`RespParser` and takes out
complete commands; it writes replies built with the ``encode_*`` functions. Nothing here touches
a socket or an event loop, so the same code serves asyncio, threads or a test that feeds bytes by
hand, and the parser can be tested against every way TCP may split a stream.

Requests come in the two forms Redis accepts:

* multibulk, what every client library sends: ``*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n``;
* inline, what a person types through telnet/nc and what some tools send: ``SET a b\\r\\n``,
  split on ASCII whitespace. The line may end in ``\\n`` alone. Unlike Redis, quotes are not
  interpreted (``SET a "b c"`` gives four arguments): every client library sends multibulk, so
  inline requests come from people typing short commands, and Redis's quoting rules (escapes
  such as ``\\x41``, unbalanced quotes) would add parsing surface for hostile input while
  serving nobody who cannot use multibulk for a value with spaces or binary bytes.

A request whose first byte is ``*`` is multibulk, anything else is inline, exactly as in Redis.
Empty requests (blank inline lines, ``*0``, ``*-1``) are skipped silently, as Redis does.

Limits and error texts follow Redis (``networking.c``) so that clients and tests written against
Redis see the same replies. After a :class:`RespProtocolError` the stream cannot be resynchronised
(we no longer know where the next command starts), so the parser refuses further use; the server
is expected to reply ``encode_error("ERR " + str(exc))`` and close the connection, as Redis does.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "DEFAULT_MAX_BULK_LENGTH",
    "DEFAULT_MAX_INLINE_LENGTH",
    "DEFAULT_MAX_MULTIBULK_LENGTH",
    "NULL_ARRAY",
    "NULL_BULK",
    "RespParser",
    "RespProtocolError",
    "RespRequestTooLarge",
    "RespValue",
    "encode_array",
    "encode_bulk",
    "encode_error",
    "encode_integer",
    "encode_simple",
]

DEFAULT_MAX_INLINE_LENGTH = 64 * 1024
"""Redis's ``PROTO_INLINE_MAX_SIZE``: longest inline request, and longest ``*``/``$`` line."""

DEFAULT_MAX_BULK_LENGTH = 512 * 1024 * 1024
"""Redis's default ``proto-max-bulk-len``."""

DEFAULT_MAX_MULTIBULK_LENGTH = 1024 * 1024
"""Most arguments in one multibulk request (the limit Redis enforced before 7.0)."""

NULL_BULK = b"$-1\r\n"
NULL_ARRAY = b"*-1\r\n"

_CR = 0x0D
_LF = 0x0A
_STAR = 0x2A
_DOLLAR = 0x24
_MINUS = 0x2D
_ZERO = 0x30


_TOO_BIG_INLINE = "Protocol error: too big inline request"
_TOO_BIG_MBULK = "Protocol error: too big mbulk count string"
_TOO_BIG_BULK_COUNT = "Protocol error: too big bulk count string"
_BAD_MBULK = "Protocol error: invalid multibulk length"
_BAD_BULK = "Protocol error: invalid bulk length"
_BAD_BULK_END = "Protocol error: bulk data not terminated by CRLF"  # Redis does not check
_TOO_BIG_REQUEST = "Protocol error: request larger than max_request_size ({} bytes)"


class RespProtocolError(Exception):
    """The client broke the protocol; ``str(exc)`` is the Redis text, e.g.
    ``"Protocol error: invalid bulk length"``.

    Reply with ``encode_error("ERR " + str(exc))`` and close the connection.
    """

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class RespRequestTooLarge(RespProtocolError):
    """The bulks of one request add up to more than ``max_request_size``: a distinct kind so a
    server can log it (a client, or an attacker, trying to make the server buffer gigabytes)."""


def _parse_length(digits: bytes | bytearray) -> int | None:
    """Parse a ``*``/``$`` length the way Redis's ``string2ll`` does, or return None.

    Strict on purpose: ``int()`` would also take ``+1``, `` 1``, ``1_0`` or ``01``, which Redis
    rejects; the 20-character cap keeps ``int()`` away from huge digit strings (and its own
    4300-digit guard).
    """
    n = len(digits)
    if n == 0 or n > 20:
        return None
    if digits[0] == _MINUS:
        body = digits[1:]
        if not body.isdigit() or body[0] == _ZERO:
            return None
        return -int(body)
    if not digits.isdigit() or (digits[0] == _ZERO and n > 1):
        return None
    return int(digits)


def _show_byte(b: int) -> str:
    """The byte as Redis's ``%c`` would show it, but never a control character: the text ends
    up in an error reply, where a raw CR or LF would break the reply framing."""
    return chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}"


class RespParser:
    """Incremental RESP2 request parser: ``feed()`` bytes, then take commands out.

    Contract:

    * ``feed(data)`` only buffers; parsing happens in :meth:`next_command` (or while iterating
      the parser), which returns one complete command as a list of ``bytes`` arguments, or None
      when more bytes are needed. A command is never returned empty.
    * The sequence of commands, and the error if any, depend only on the concatenated input,
      never on how it was split into ``feed()`` calls.
    * Commands are returned in order; those that precede a protocol error are returned first,
      and the error is raised when parsing reaches the bad bytes.
    * Call :meth:`next_command` until it returns None after each ``feed()``: the limits below
      bound what one pending command may hold, while unread complete commands stay buffered.
    * After :class:`RespProtocolError` every later ``feed()`` / ``next_command()`` raises it
      again.

    Limits (constructor arguments), with the Redis error raised past them:

    * ``max_inline_length`` (64 KiB): an inline line longer than this, "too big inline
      request"; a ``*``/``$`` line longer than this, "too big mbulk count string" / "too big
      bulk count string".
    * ``max_bulk_length`` (512 MiB): a larger ``$`` length, "invalid bulk length".
    * ``max_multibulk_length`` (1024*1024): a larger ``*`` count, "invalid multibulk length".
    * ``max_request_size`` (None: no limit): the bulks of one multibulk request may add up to
      this many bytes; the check runs as each ``$`` length is read, before its bytes are
      buffered, so a request announcing more raises :class:`RespRequestTooLarge` at once and
      the parser never holds much more than this (the arguments read plus the bulk in
      progress). Redis's ``client-query-buffer-limit`` is the same guard.
    """

    __slots__ = (
        "_args",
        "_buf",
        "_bulk_len",
        "_error",
        "_max_bulk",
        "_max_inline",
        "_max_multibulk",
        "_max_request",
        "_missing",
        "_request_size",
        "_scanned",
    )

    def __init__(
        self,
        *,
        max_inline_length: int = DEFAULT_MAX_INLINE_LENGTH,
        max_bulk_length: int = DEFAULT_MAX_BULK_LENGTH,
        max_multibulk_length: int = DEFAULT_MAX_MULTIBULK_LENGTH,
        max_request_size: int | None = None,
    ) -> None:
        if max_inline_length < 1 or max_bulk_length < 0 or max_multibulk_length < 1:
            raise ValueError("RESP limits must be positive")
        if max_request_size is not None and max_request_size < 1:
            raise ValueError("max_request_size must be positive")
        self._max_request = max_request_size
        self._max_inline = max_inline_length
        self._max_bulk = max_bulk_length
        self._max_multibulk = max_multibulk_length
        self._buf = bytearray()
        # State of a multibulk request whose arguments are still arriving; kept between calls
        # so a large bulk arriving in many chunks is not re-parsed from the start each time.
        self._missing = 0  # arguments still to read; 0 when between requests
        self._args: list[bytes] = []
        self._bulk_len = -1  # length of the bulk being read; -1 while its "$" line is due
        self._request_size = 0  # bulk bytes announced so far by the request being read
        # Where the search for the current line's terminator may resume: bytes before it were
        # already searched, so a line trickling in byte by byte costs linear, not quadratic time.
        self._scanned = 0
        # The error's kind and text, not the exception: its traceback would keep the buffer.
        self._error: tuple[type[RespProtocolError], str] | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as commands (for a query-buffer limit)."""
        return len(self._buf) + sum(len(a) for a in self._args)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes. Raises the stored error if the parser has failed."""
        if self._error is not None:
            raise self._error[0](self._error[1])
        self._buf += data

    def __iter__(self) -> Iterator[list[bytes]]:
        """Yield every command that is complete now; stop when more bytes are needed."""
        while (command := self.next_command()) is not None:
            yield command

    def next_command(self) -> list[bytes] | None:
        """Return the next complete command, or None if more bytes are needed.

        Raises :class:`RespProtocolError` when the input breaks the protocol.
        """
        if self._error is not None:
            raise self._error[0](self._error[1])
        try:
            return self._parse()
        except RespProtocolError as exc:
            self._error = (type(exc), str(exc))
            self._buf = bytearray()
            self._args = []
            self._request_size = 0
            raise

    def _read_length(self, pos: int, too_big: str, invalid: str) -> tuple[int, int] | None:
        """Parse the ``*<n>\\r\\n`` or ``$<n>\\r\\n`` line at ``pos`` (its first byte already
        checked): return (n, position after the line), or None if the line is incomplete."""
        buf = self._buf
        # Redis looks for the CR, then takes the byte after it as the LF; we check that byte.
        end = buf.find(b"\r", self._scanned if self._scanned > pos else pos)
        if end < 0:
            self._scanned = len(buf)
            if len(buf) - pos > self._max_inline:
                raise RespProtocolError(too_big)
            return None
        if end - pos > self._max_inline:
            raise RespProtocolError(too_big)
        if end + 1 >= len(buf):
            return None
        value = _parse_length(buf[pos + 1 : end])
        if value is None or buf[end + 1] != _LF:
            raise RespProtocolError(invalid)
        return value, end + 2

    def _parse(self) -> list[bytes] | None:
        # The hot loop works on locals and writes the state back once, in the finally clause;
        # "$<n>" lines take a fast path when complete, short and well formed, and anything else
        # goes through _read_length, which owns the exact Redis semantics and error texts.
        buf = self._buf
        pos = 0
        missing = self._missing
        args = self._args
        size = self._bulk_len
        # Longest "*"/"$" line (from the marker to the CR) the fast path may accept: within the
        # line limit, and within _parse_length's 20 characters.
        fast = min(self._max_inline, 21) + 2
        try:
            while True:
                if not missing:
                    # Between requests: the first byte picks multibulk or inline.
                    if pos >= len(buf):
                        return None
                    if buf[pos] == _STAR:
                        line = self._read_length(pos, _TOO_BIG_MBULK, _BAD_MBULK)
                        if line is None:
                            return None
                        count, pos = line
                        if count > self._max_multibulk:
                            raise RespProtocolError(_BAD_MBULK)
                        if count > 0:  # "*0" and "*-1" are ignored, as in Redis
                            missing = count
                            args = []
                            size = -1
                            self._request_size = 0
                        continue
                    end = buf.find(b"\n", self._scanned if self._scanned > pos else pos)
                    if end < 0:
                        self._scanned = len(buf)
                        if len(buf) - pos > self._max_inline:
                            raise RespProtocolError(_TOO_BIG_INLINE)
                        return None
                    # Checked on complete lines too, so the outcome does not depend on whether
                    # the line arrived in one piece.
                    if end - pos > self._max_inline:
                        raise RespProtocolError(_TOO_BIG_INLINE)
                    words = buf[pos:end].split()
                    pos = end + 1
                    if words:
                        return [bytes(w) for w in words]
                    continue  # blank line: ignored, as in Redis

                # Inside a multibulk request: "$<len>\r\n<data>\r\n" per argument.
                while missing:
                    if size < 0:
                        if pos >= len(buf):
                            return None
                        if buf[pos] != _DOLLAR:
                            raise RespProtocolError(
                                f"Protocol error: expected '$', got '{_show_byte(buf[pos])}'"
                            )
                        end = buf.find(b"\r\n", pos + 1, pos + fast)
                        digits = buf[pos + 1 : end] if end > 0 else b""
                        if digits.isdigit() and (digits[0] != _ZERO or end == pos + 2):
                            size = int(digits)
                            if size > self._max_bulk:
                                raise RespProtocolError(_BAD_BULK)
                            pos = end + 2
                        else:
                            line = self._read_length(pos, _TOO_BIG_BULK_COUNT, _BAD_BULK)
                            if line is None:
                                return None
                            size, pos = line
                            if size < 0 or size > self._max_bulk:
                                raise RespProtocolError(_BAD_BULK)
                        if self._max_request is not None:
                            self._request_size += size
                            if self._request_size > self._max_request:
                                raise RespRequestTooLarge(
                                    _TOO_BIG_REQUEST.format(self._max_request)
                                )
                    stop = pos + size
                    if len(buf) < stop + 2:
                        return None
                    if buf[stop] != _CR or buf[stop + 1] != _LF:
                        raise RespProtocolError(_BAD_BULK_END)
                    args.append(bytes(buf[pos:stop]))
                    pos = stop + 2
                    size = -1
                    missing -= 1
                command = args
                args = []
                return command
        finally:
            self._missing = missing
            self._args = args
            self._bulk_len = size
            if pos:
                # Cheap in CPython: deleting a bytearray's head just moves its start pointer.
                del buf[:pos]
                self._scanned = max(0, self._scanned - pos)


# --------------------------------------------------------------------------------------------
# Encoders. A server calls one per reply, so these avoid per-call overhead: %-formatting of
# bytes, no intermediate objects for scalars, one join for arrays.

RespValue = bytes | bytearray | memoryview | str | int | list | tuple | None
"""What :func:`encode_array` accepts as an element (lists and tuples nest)."""


def encode_simple(text: str) -> bytes:
    """``+text\\r\\n``, for status replies such as ``OK`` or ``PONG``.

    Raises ValueError if ``text`` contains CR or LF, which would end the reply early: simple
    strings are for fixed status words; anything carrying user data belongs in a bulk string.
    """
    if "\r" in text or "\n" in text:
        raise ValueError("a RESP simple string cannot contain CR or LF")
    return b"+%s\r\n" % text.encode()


def encode_error(message: str) -> bytes:
    """``-message\\r\\n``. ``message`` starts with the error code: ``"ERR unknown command"``,
    ``"WRONGTYPE ..."``.

    CR and LF are replaced by spaces rather than rejected (as Redis does): error texts often
    quote client input, and failing while reporting an error would be worse.
    """
    if "\r" in message or "\n" in message:
        message = message.replace("\r", " ").replace("\n", " ")
    return b"-%s\r\n" % message.encode()


def encode_integer(value: int) -> bytes:
    """``:value\\r\\n``."""
    return b":%d\r\n" % value


def encode_bulk(value: bytes | bytearray | memoryview | str | None) -> bytes:
    """``$len\\r\\ndata\\r\\n``, binary-safe; None gives the null bulk ``$-1\\r\\n``.

    ``str`` is encoded as UTF-8 for convenience.
    """
    if value is None:
        return NULL_BULK
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, memoryview):
        value = value.tobytes()
    return b"$%d\r\n%s\r\n" % (len(value), value)


def encode_array(items: list[RespValue] | tuple[RespValue, ...] | None) -> bytes:
    """``*n\\r\\n`` followed by each element; None gives the null array ``*-1\\r\\n``.

    Elements map as: bytes/bytearray/memoryview/str -> bulk string, int -> integer (bool too,
    as 1/0), None -> null bulk, list/tuple -> nested array. Anything else raises TypeError
    (format floats and other values yourself, as Redis replies them as bulk strings).
    """
    if items is None:
        return NULL_ARRAY
    parts: list[bytes] = []
    _encode_into(items, parts)
    return b"".join(parts)


def _encode_into(items: list[RespValue] | tuple[RespValue, ...], parts: list[bytes]) -> None:
    append = parts.append
    append(b"*%d\r\n" % len(items))
    for item in items:
        # bytes first: it is by far the most common element in replies.
        if isinstance(item, (bytes, bytearray)):
            append(b"$%d\r\n%s\r\n" % (len(item), item))
        elif isinstance(item, str):
            data = item.encode()
            append(b"$%d\r\n%s\r\n" % (len(data), data))
        elif isinstance(item, int):
            append(b":%d\r\n" % item)
        elif item is None:
            append(NULL_BULK)
        elif isinstance(item, (list, tuple)):
            _encode_into(item, parts)
        elif isinstance(item, memoryview):
            data = item.tobytes()
            append(b"$%d\r\n%s\r\n" % (len(data), data))
        else:
            raise TypeError(f"cannot encode {type(item).__name__} as a RESP value")
