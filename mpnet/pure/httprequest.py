"""The request head of a metrics scrape: an incremental HTTP/1.x parser, bounded, without I/O.

A scraper sends ``GET /metrics HTTP/1.1`` and a few headers; that is all the master's metrics
endpoint reads. :class:`RequestParser` is fed bytes as they arrive and answers, the same way
however the bytes were split, with a :class:`Request` once the head is complete or an
:class:`HttpError` carrying the status to answer (400 malformed, 431 too large, 505 not HTTP/1).
A body is never read: the endpoint answers and closes. :func:`route` decides what a complete
request gets (404 for any path but ``/metrics``, 405 for any method but ``GET``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_HEAD = 8192  # bytes of request line and headers; a scraper sends a few hundred
METRICS_PATH = "/metrics"

_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (\S{1,4096}) (HTTP/\d\.\d)")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class HttpError(Exception):
    """The request cannot be served; *status* is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Request:
    """A complete request head. Header names are lower case; repeated headers are joined
    with ``", "``."""

    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class RequestParser:
    """Feed it bytes (:meth:`feed`) until it returns a :class:`Request` or raises
    :class:`HttpError`. The outcome depends only on the bytes, never on how they were split."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._line_checked = False

    def feed(self, data: bytes) -> Request | None:
        """Add *data*; the request once its head is complete, else None (send more)."""
        self._buffer += data
        buffer = self._buffer
        if not self._line_checked:
            newline = buffer.find(b"\n", 0, MAX_HEAD)
            if newline >= 0:
                _request_line(bytes(buffer[:newline]))
                self._line_checked = True
        end = _head_end(buffer)
        if end < 0 or end > MAX_HEAD:
            if end > MAX_HEAD or len(buffer) > MAX_HEAD + 2:
                raise HttpError(431, f"request head larger than {MAX_HEAD} bytes")
            return None
        return parse_head(bytes(buffer[:end]))


def _head_end(buffer: bytearray) -> int:
    """Where the head ends (its last line's newline), or -1: a line feed followed by an empty
    line, with or without carriage returns."""
    ends = [i for i in (buffer.find(b"\n\n"), buffer.find(b"\n\r\n")) if i >= 0]
    return min(ends) if ends else -1


def _request_line(line: bytes) -> tuple[str, str, str]:
    line = line.removesuffix(b"\r")
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise HttpError(400, "malformed request line")
    method, target, version = (part.decode("ascii") for part in match.groups())
    if not version.startswith("HTTP/1."):
        raise HttpError(505, f"{version} is not supported")
    return method, target, version


def parse_head(head: bytes) -> Request:
    """The request in a complete head (request line and header lines, no empty line)."""
    lines = [line.removesuffix(b"\r") for line in head.split(b"\n")]
    method, target, version = _request_line(lines[0])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(method, target, version, headers)


def route(request: Request) -> HttpError | None:
    """None if *request* asks for the metrics; else the error to answer with."""
    if request.path != METRICS_PATH:
        return HttpError(404, f"not found: only {METRICS_PATH} is served here")
    if request.method != "GET":
        return HttpError(405, f"method {request.method} not allowed: use GET")
    return None
