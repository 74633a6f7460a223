"""The ``conn`` object a listener sees, which is also the asyncio protocol of the connection.

One object per connection keeps the hot path short: ``data_received`` calls the module's
``onincoming(conn, data)`` directly and ``conn.write`` goes straight to the transport. Everything
that is not per-message (callback errors, async callbacks, pausing for several reasons, counters)
lives off that path.

Callback order per connection is ``onconnect [-> onincoming | ondrain | onreadtimeout]* ->
ondisconnect``, with ``ondisconnect`` exactly once. When a callback returns an awaitable the
connection stops reading until it finishes, and later events wait their turn, so async callbacks
still run in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .module import Provider

log = logging.getLogger("mpnet.connection")

PAUSED_BY_MODULE = 1
PAUSED_BY_CALLBACK = 2
PAUSED_BY_BACKPRESSURE = 4

_ids = itertools.count(1)


class Service:
    """A provider at run time in one worker: its callbacks, its open connections, counters."""

    def __init__(self, provider: Provider, worker_label: str) -> None:
        self.name = provider.name
        self.provider = provider
        self.logger = provider.module.logger
        callbacks = provider.callbacks
        self.onconnect = callbacks.get("onconnect")
        self.onincoming = callbacks.get("onincoming")
        self.ondisconnect = callbacks.get("ondisconnect")
        self.ondrain = callbacks.get("ondrain")
        self.onreadtimeout = callbacks.get("onreadtimeout")
        self.connections: set[Connection] = set()
        self.served = 0
        self.worker_label = worker_label
        self.write_buffer_high = 64 * 1024

    def protocol_factory(self) -> Connection:
        return Connection(self)

    def callback_failed(self, callback: str, conn: Connection, exc: BaseException) -> None:
        """Prosody's default: log with module, callback and traceback; the connection lives on."""
        self.logger.error(
            "%s failed for connection %s (%s) in service %s",
            callback,
            conn.id,
            conn.describe_peer(),
            self.name,
            exc_info=exc,
        )


class Connection(asyncio.Protocol):
    """A client connection as a listener sees it (``conn``). Hashable, usable as a dict key."""

    __slots__ = (
        "__dict__",
        "__weakref__",
        "_backlog",
        "_close_reason",
        "_closed",
        "_number",
        "_onincoming",
        "_paused",
        "_peer",
        "_pending",
        "_service",
        "_transport",
    )

    def __init__(self, service: Service) -> None:
        self._service = service
        self._onincoming = service.onincoming
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self._close_reason: str | None = None
        self._paused = 0
        self._pending: asyncio.Future[Any] | None = None
        self._backlog: deque[tuple[str, Callable[..., Any], tuple[Any, ...]]] | None = None
        self._peer: tuple[Any, ...] | None = None
        self._number = next(_ids)

    # -- asyncio protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        service = self._service
        service.connections.add(self)
        service.served += 1
        transport.set_write_buffer_limits(service.write_buffer_high, 0)  # type: ignore[attr-defined]
        if service.onconnect is not None:
            self._event("onconnect", service.onconnect, ())

    def data_received(self, data: bytes) -> None:
        onincoming = self._onincoming
        if onincoming is None:
            return
        if self._pending is not None:
            self._queue("onincoming", onincoming, (data,))
            return
        try:
            result = onincoming(self, data)
        except Exception as exc:
            self._service.callback_failed("onincoming", self, exc)
            return
        if result is not None:
            self._await_result("onincoming", result)

    def eof_received(self) -> bool:
        return False  # the peer is done: close, as Prosody does

    def pause_writing(self) -> None:
        self._pause(PAUSED_BY_BACKPRESSURE)

    def resume_writing(self) -> None:
        self._unpause(PAUSED_BY_BACKPRESSURE)
        ondrain = self._service.ondrain
        if ondrain is not None and not self._closed:
            self._event("ondrain", ondrain, ())

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        service = self._service
        service.connections.discard(self)
        err = self._close_reason
        if err is None and exc is not None:
            err = str(exc) or type(exc).__name__
        if service.ondisconnect is not None:
            self._event("ondisconnect", service.ondisconnect, (err,))

    # -- callback plumbing ----------------------------------------------------------------------

    def _event(self, name: str, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._pending is not None:
            self._queue(name, callback, args)
            return
        try:
            result = callback(self, *args)
        except Exception as exc:
            self._service.callback_failed(name, self, exc)
            return
        if result is not None:
            self._await_result(name, result)

    def _queue(self, name: str, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._backlog is None:
            self._backlog = deque()
        self._backlog.append((name, callback, args))

    def _await_result(self, name: str, result: Any) -> None:
        if not asyncio.iscoroutine(result) and not isinstance(result, asyncio.Future):
            return
        self._pending = asyncio.ensure_future(result)
        self._pause(PAUSED_BY_CALLBACK)
        self._pending.add_done_callback(lambda future: self._pending_done(name, future))

    def _pending_done(self, name: str, future: asyncio.Future[Any]) -> None:
        self._pending = None
        if not future.cancelled() and future.exception() is not None:
            self._service.callback_failed(name, self, future.exception())  # type: ignore[arg-type]
        backlog = self._backlog
        while backlog and self._pending is None:
            self._event(*backlog.popleft())
        if self._pending is None:
            self._unpause(PAUSED_BY_CALLBACK)

    def _pause(self, reason: int) -> None:
        was = self._paused
        self._paused = was | reason
        if not was and self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def _unpause(self, reason: int) -> None:
        was = self._paused
        self._paused = was & ~reason
        if was and not self._paused and self._transport is not None and not self._closed:
            self._transport.resume_reading()

    # -- the API a module uses --------------------------------------------------------------------

    def write(self, data: bytes | str) -> bool:
        """Queue *data* (bytes, or str sent as UTF-8). Returns False if the connection is closed."""
        if self._closed:
            return False
        if data.__class__ is str:
            data = data.encode()  # type: ignore[union-attr]
        self._transport.write(data)  # type: ignore[union-attr, arg-type]
        return True

    def close(self, reason: str | None = None) -> None:
        """Close after what was written has been sent; ``ondisconnect`` gets *reason*."""
        if self._closed or self._transport is None:
            return
        if self._close_reason is None:
            self._close_reason = reason
        self._transport.close()

    def abort(self, reason: str | None = None) -> None:
        """Close at once, dropping unsent data."""
        if self._closed or self._transport is None:
            return
        if self._close_reason is None:
            self._close_reason = reason
        self._transport.abort()

    def pause(self) -> None:
        """Stop reading from this connection until :meth:`resume`."""
        self._pause(PAUSED_BY_MODULE)

    def resume(self) -> None:
        self._unpause(PAUSED_BY_MODULE)

    def buffered(self) -> int:
        """Bytes written but not yet sent."""
        if self._transport is None or self._closed:
            return 0
        return self._transport.get_write_buffer_size()

    def _peername(self) -> tuple[Any, ...]:
        if self._peer is None:
            peer = self._transport.get_extra_info("peername") if self._transport else None
            self._peer = tuple(peer) if isinstance(peer, (tuple, list)) else ("", 0)
        return self._peer

    def ip(self) -> str:
        """The client's address."""
        return self._peername()[0]

    def port(self) -> int:
        """The client's port (Prosody's ``conn:port()``)."""
        return self._peername()[1]

    clientport = port

    def serverport(self) -> int:
        """The local port the client connected to."""
        sockname = self._transport.get_extra_info("sockname") if self._transport else None
        return sockname[1] if sockname else 0

    def ssl(self) -> bool:
        """Whether the connection is encrypted."""
        return bool(self._transport and self._transport.get_extra_info("sslcontext"))

    @property
    def id(self) -> str:
        """A short identifier, unique within the worker's lifetime."""
        return f"{self._service.worker_label}c{self._number}"

    @property
    def service(self) -> str:
        return self._service.name

    @property
    def closed(self) -> bool:
        return self._closed

    def describe_peer(self) -> str:
        ip, port = self._peername()[:2]
        return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"

    def __repr__(self) -> str:
        return f"<mpnet connection {self.id} {self.describe_peer()} service={self._service.name}>"
