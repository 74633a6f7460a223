"""The ``conn`` object a listener sees, which is also the asyncio protocol of the connection.

One object per connection keeps the hot path short: ``data_received`` calls the module's
``onincoming(conn, data)`` directly and ``conn.write`` goes straight to the transport. Everything
that is not per-message (callback errors, async callbacks, pausing for several reasons, limits,
timeouts) lives off that path; timeouts are found by a once-a-second sweep of the worker
(:meth:`Service.sweep`) instead of a timer per connection.

Callback order per connection is ``onconnect [-> onincoming | ondrain | onreadtimeout |
onstarttls]* -> ondisconnect``, with ``ondisconnect`` exactly once, and only for connections
whose ``onconnect`` ran. When a callback returns an awaitable, the connection stops reading until
it finishes and later events wait their turn, so async callbacks still run in order.

A service picks its connection class once: :class:`Connection` (plain), :class:`TLSConnection`
(direct TLS, the handshake run by mpnet after the accept), :class:`ProxiedConnection` (a PROXY
header first) or :class:`ProxiedTLSConnection` (a header, then the handshake), so the plain path
carries no check for the others. ``max_connections_per_ip`` is counted across the workers of the
service in a region they share (:mod:`mpnet.iplimit`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpnet import iplimit
from mpnet.pure.metrics import DurationHistogram
from mpnet.pure.proxyproto import ProxyHeaderParser, ProxyProtocolError
from mpnet.pure.trusted import TrustedNetworks

from .open_connections import OpenConnections
from .tls import ServerHandshake, handshake_failed

if TYPE_CHECKING:
    from .provider import Provider

log = logging.getLogger("mpnet.connection")

# Connection._flags: why reading is paused (any of three reasons), and whether it is closed.
PAUSED_BY_MODULE = 1
PAUSED_BY_CALLBACK = 2
PAUSED_BY_BACKPRESSURE = 4
PAUSED = PAUSED_BY_MODULE | PAUSED_BY_CALLBACK | PAUSED_BY_BACKPRESSURE
CLOSED = 8

WRITE_BUFFER_HIGH = 64 * 1024
LIMIT_LOG_EVERY = 10.0  # seconds between log lines about refused connections, per service

_ids = itertools.count(1)


@dataclass
class ServiceSettings:
    """Per-service transport settings, resolved from the config (``<service>_<key>`` or
    the global key). Zero or None disables a limit or a timeout."""

    read_timeout: float = 0
    send_timeout: float = 0
    ssl_handshake_timeout: float = 60.0
    max_send_buffer_size: int = 32 * 1024 * 1024
    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    limit_message: bytes | None = None
    proxy_protocol: bool = False
    proxy_trusted: TrustedNetworks | None = None  # peers allowed to send a PROXY header
    ssl_context: ssl.SSLContext | None = None
    direct_tls: bool = False  # the handshake starts on accept (after the PROXY header, if any)
    time_callbacks: bool = False  # metrics_callback_durations: a histogram per callback


class WorkerCounters:
    """What every service of one worker shares: the open-connection count for
    ``max_connections`` (a per-worker limit), and the connections not yet admitted (still
    sending a PROXY header or a TLS handshake), oldest first, capped by
    ``max_unadmitted_connections`` (default: half of ``max_connections``, which is derived from
    the descriptor limit when not set): they hold a descriptor each but count toward no other
    limit, so silent ones could otherwise lock every client out until their deadline."""

    __slots__ = ("max_connections", "max_unadmitted", "open", "unadmitted")

    def __init__(
        self, max_connections: int | None = None, max_unadmitted: int | None = None
    ) -> None:
        self.open = 0
        self.max_connections = max_connections
        self.unadmitted: dict[Connection, None] = {}
        if max_unadmitted is None:
            max_unadmitted = max(16, max_connections // 2) if max_connections else 1024
        self.max_unadmitted = max_unadmitted


def as_bytes(data: Any) -> bytes | bytearray | memoryview:
    """What ``conn.write`` sends for *data* that is not ``bytes`` (the slow path): a str as
    UTF-8, a bytearray or memoryview as is; anything else is the module's mistake, a TypeError
    raised at its call (the transport would take None silently and name memoryview for 5)."""
    if data.__class__ is str:
        return data.encode()  # type: ignore[no-any-return]
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data
    raise TypeError(
        f"conn.write() takes bytes or str, not {type(data).__name__} ({data!r:.60}); "
        "encode it first, e.g. conn.write(str(value))"
    )


class Service:
    """A provider at run time in one worker: callbacks, settings, open connections, counters.

    Slotted: every message reads its ``onincoming`` and adds to its byte counters, and slot
    access is cheaper than a dict that has outgrown key sharing (over 30 attributes)."""

    __slots__ = (
        "_next_limit_log",
        "_next_untrusted_log",
        "_refusal_reason",
        "_refused_logged",
        "_untrusted_logged",
        "_untrusted_peer",
        "connection_class",
        "connections",
        "counters",
        "durations",
        "errors",
        "handover_class",
        "handshake_failures",
        "handshaking",
        "logger",
        "name",
        "onconnect",
        "ondisconnect",
        "ondrain",
        "onincoming",
        "onreadtimeout",
        "onstarttls",
        "per_ip",
        "protocol_factory",
        "provider",
        "received_bytes",
        "refused",
        "refused_by",
        "sent_bytes",
        "served",
        "settings",
        "untrusted",
        "waiting",
        "worker_label",
    )

    def __init__(
        self,
        provider: Provider,
        worker_label: str,
        settings: ServiceSettings | None = None,
        counters: WorkerCounters | None = None,
    ) -> None:
        self.name = provider.name
        self.provider = provider
        self.logger = provider.module.logger
        self.settings = settings or ServiceSettings()
        self.counters = counters or WorkerCounters()
        # Plain counters for the metrics (mpnet.pure.metrics), reported with each heartbeat.
        self.received_bytes = 0
        self.sent_bytes = 0
        self.refused_by: dict[str, int] = {}  # by the config key of the limit
        self.errors: dict[str, int] = {}  # by callback
        self.durations: dict[str, DurationHistogram] = {}  # by callback, if time_callbacks
        callbacks = provider.callbacks
        if self.settings.time_callbacks:
            callbacks = {name: self._timed(name, fn) for name, fn in callbacks.items()}
        self.onconnect = callbacks.get("onconnect")
        self.onincoming = callbacks.get("onincoming")
        self.ondisconnect = callbacks.get("ondisconnect")
        self.ondrain = callbacks.get("ondrain")
        self.onreadtimeout = callbacks.get("onreadtimeout")
        self.onstarttls = callbacks.get("onstarttls")
        # The module's open connections, in accept order.
        self.connections: OpenConnections[Connection] = OpenConnections()
        # Connections still waiting for their PROXY header (not yet visible to the module).
        self.waiting: set[ProxiedConnection] = set()
        # Direct-TLS connections during their handshake (not yet visible to the module either).
        self.handshaking: set[Connection] = set()
        self.handshake_failures = 0
        # Counted across every worker of the service (mpnet/iplimit.py).
        self.per_ip = (
            iplimit.counter() if self.settings.max_connections_per_ip is not None else None
        )
        self.served = 0
        self.refused = 0
        self._refused_logged = 0
        self._refusal_reason = ""
        self._next_limit_log = 0.0
        self.untrusted = 0  # connections refused: not from <service>_proxy_trusted
        self._untrusted_logged = 0
        self._next_untrusted_log = 0.0
        self._untrusted_peer: Any = None
        self.worker_label = worker_label
        proxied, tls = self.settings.proxy_protocol, self.settings.direct_tls
        # The plain class keeps the plain path free of TLS and PROXY checks.
        self.connection_class: type[Connection] = (
            (ProxiedTLSConnection if tls else ProxiedConnection)
            if proxied
            else (TLSConnection if tls else Connection)
        )
        # For a connection another service accepted (multiplexing): any TLS is done already.
        self.handover_class: type[Connection] = ProxiedConnection if proxied else Connection
        # What the event loop calls per accept: a partial, so no Python frame of its own.
        self.protocol_factory: Callable[[], Connection] = functools.partial(
            self.connection_class, self
        )

    def _timed(self, name: str, callback: Callable[..., Any]) -> Callable[..., Any]:
        """*callback*, timing each call into ``durations[name]`` (an async one until it ends)."""
        histogram = self.durations.setdefault(name, DurationHistogram())
        observe, clock = histogram.observe, time.perf_counter

        async def finish(awaitable: Any, start: float) -> Any:
            try:
                return await awaitable
            finally:
                observe(clock() - start)

        def timed(*args: Any) -> Any:
            start = clock()
            try:
                result = callback(*args)
            except BaseException:
                observe(clock() - start)
                raise
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                return finish(result, start)
            observe(clock() - start)
            return result

        return timed

    def callback_failed(self, callback: str, conn: Connection, exc: BaseException) -> None:
        """Prosody's default: log with module, callback and traceback; the connection lives on."""
        self.errors[callback] = self.errors.get(callback, 0) + 1
        self.logger.error(
            "%s failed for connection %s (%s) in service %s",
            callback,
            conn.id,
            conn.describe_peer(),
            self.name,
            exc_info=exc,
        )

    def handshake_failed(self, conn: Connection, exc: BaseException) -> None:
        """A direct-TLS handshake failed or timed out: the module never hears of it."""
        handshake_failed(self, conn.describe_peer(), exc)

    # -- limits ---------------------------------------------------------------------------------

    def admit(self, conn: Connection) -> str | None:
        """Why *conn* must be refused (a limit is reached), or None to admit it, in which case
        ``conn._start`` must follow (its address is counted already)."""
        counters = self.counters
        if counters.max_connections is not None and counters.open >= counters.max_connections:
            return f"max_connections ({counters.max_connections}) reached in this worker"
        limit = self.settings.max_connections  # <service>_max_connections, if set
        if limit is not None and len(self.connections) >= limit:
            return f"{self.name}_max_connections ({limit}) reached in this worker"
        per_ip, limit = self.per_ip, self.settings.max_connections_per_ip
        if per_ip is not None and not per_ip.admit((self.name, conn.ip()), limit):  # type: ignore[arg-type]
            return f"max_connections_per_ip ({limit}) reached for {conn.ip()}"
        return None

    def refuse(self, conn: Connection, transport: asyncio.BaseTransport, why: str) -> None:
        self.refused += 1
        key = why.split(" ", 1)[0]  # the config key of the limit that refused it
        self.refused_by[key] = self.refused_by.get(key, 0) + 1
        self._refusal_reason = why
        message = self.settings.limit_message
        if message:
            transport.write(message)  # type: ignore[attr-defined]
            transport.close()
        else:
            transport.abort()  # type: ignore[attr-defined]
        now = time.monotonic()
        if now >= self._next_limit_log:
            self._report_refusals(now)

    def _report_refusals(self, now: float) -> None:
        """One log line for the refusals since the last one (at most one per LIMIT_LOG_EVERY;
        :meth:`sweep` reports those left over when no new refusal comes to do it)."""
        self.logger.warning(
            "service %s refused %d connection(s) since the last report: %s",
            self.name,
            self.refused - self._refused_logged,
            self._refusal_reason,
        )
        self._refused_logged = self.refused
        self._next_limit_log = now + LIMIT_LOG_EVERY

    def refuse_untrusted(self, peer: Any) -> None:
        """A connection to a PROXY service from outside ``<service>_proxy_trusted`` (closed by
        the caller): counted, and logged at most once per LIMIT_LOG_EVERY."""
        self.untrusted += 1
        self._untrusted_peer = peer
        now = time.monotonic()
        if now >= self._next_untrusted_log:
            self._report_untrusted(now)

    def _report_untrusted(self, now: float) -> None:
        self.logger.warning(
            "service %s refused %d connection(s) since the last report from addresses outside "
            "%s_proxy_trusted (latest: %s)",
            self.name,
            self.untrusted - self._untrusted_logged,
            self.name,
            self._untrusted_peer,
        )
        self._untrusted_logged = self.untrusted
        self._next_untrusted_log = now + LIMIT_LOG_EVERY

    def closed(self, conn: Connection) -> None:
        if self.connections.discard(conn):  # it was open
            self.counters.open -= 1
            if self.per_ip is not None:
                self.per_ip.remove((self.name, conn.ip()))

    # -- timeouts -------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Once a second: idle connections (read_timeout), stalled sends (send_timeout),
        unfinished PROXY headers."""
        settings = self.settings
        read_timeout, send_timeout = settings.read_timeout, settings.send_timeout
        header_timeout = settings.ssl_handshake_timeout
        # Without read or send timeouts there is nothing to watch per connection.
        for conn in self.connections if read_timeout or send_timeout else ():  # a snapshot
            if conn._flags & CLOSED:
                continue
            if not conn._idle_since:  # first sight, or data came since: idle from now
                conn._idle_since = now
            elif read_timeout and now - conn._idle_since >= read_timeout and not conn._pending:
                conn._read_timed_out()
            if send_timeout and conn._transport is not None:
                size = conn._transport.get_write_buffer_size()
                mark = conn._send_mark
                if not size:
                    if mark is not None:
                        conn._send_mark = None
                elif mark is None or mark[0] != size:  # the queue moved: stalled from now
                    conn._send_mark = (size, now)
                elif now - mark[1] >= send_timeout:
                    conn._drop("send timeout", f"{size} bytes unsent for {send_timeout:g}s")
        for conn in list(self.waiting):
            if now - conn._accepted_at >= header_timeout:
                conn._proxy_failed("no PROXY header in time")
        if self.refused != self._refused_logged and now >= self._next_limit_log:
            self._report_refusals(now)
        if self.untrusted != self._untrusted_logged and now >= self._next_untrusted_log:
            self._report_untrusted(now)


class Connection(asyncio.Protocol):
    """A client connection as a listener sees it (``conn``). Hashable, usable as a dict key.

    One is created per accepted connection and most live long and idle, so it holds only what
    every connection needs (slots, no per-instance dict). What few connections need lives in
    the instance ``__dict__``, created on first write, and reads as the class default below
    until then: the reason a connection was closed for, the events queued behind an async
    callback, a send queue that ``send_timeout`` watches, and whatever a module or a subclass
    stores on ``conn``. Each slot is 8 bytes on every idle connection (bench/bench_idle.py).
    """

    __slots__ = (
        "__dict__",
        "__weakref__",
        "_flags",
        "_idle_since",
        "_newer",
        "_number",
        "_older",
        "_peer",
        "_pending",
        "_service",
        "_transport",
    )

    # Class defaults for state that few connections ever have (see the class docstring).
    _close_reason: str | None = None
    _backlog: deque[tuple[str, Callable[..., Any], tuple[Any, ...]]] | None = None
    _send_mark: tuple[int, float] | None = None  # (bytes queued, since): send_timeout, if set

    def __init__(self, service: Service) -> None:
        self._service = service
        self._transport: asyncio.Transport | None = None
        self._flags = 0
        self._pending: asyncio.Future[Any] | None = None
        self._peer: tuple[Any, ...] | None = None
        self._number = 0  # numbered when the id is first asked for (see id)
        self._older: Connection | None = None  # neighbours in Service.connections
        self._newer: Connection | None = None
        # 0: idle since the next sweep. Data sets it back to 0, so the sweep measures idle
        # time without a clock read (or a counter) per message.
        self._idle_since = 0.0

    # -- asyncio protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._admit(self._service, transport)

    def _admit(self, service: Service, transport: asyncio.BaseTransport) -> bool:
        """Start the connection for the module, or refuse it (a limit is reached): a refused
        one is never seen by the module (no onconnect, no ondisconnect)."""
        why = service.admit(self)
        if why is not None:
            self._flags |= CLOSED
            if self._backlog is not None:
                self._backlog = None
            service.refuse(self, transport, why)  # type: ignore[arg-type]
            return False
        self._start(service)
        return True

    def _start(self, service: Service) -> None:
        service.connections.add(self)  # the counterpart of Service.closed
        service.counters.open += 1
        service.served += 1
        if service.ondrain is not None:  # so that ondrain means "queue empty", as documented
            self._transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, 0)  # type: ignore[union-attr]
        if service.onconnect is not None:
            self._event("onconnect", service.onconnect, ())

    def data_received(self, data: bytes) -> None:
        self._idle_since = 0.0
        self._service.received_bytes += len(data)
        onincoming = self._service.onincoming
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
        if ondrain is not None and not self._flags & CLOSED:
            self._event("ondrain", ondrain, ())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._flags & CLOSED and self not in self._service.connections:
            return  # refused by a limit, never admitted
        self._flags |= CLOSED
        service = self._service
        service.closed(self)
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

    def _await_result(
        self, name: str, result: Any, then: Callable[[Any], None] | None = None
    ) -> None:
        if not asyncio.iscoroutine(result) and not isinstance(result, asyncio.Future):
            if then is not None:
                then(result)
            return
        self._pending = asyncio.ensure_future(result)
        self._pause(PAUSED_BY_CALLBACK)
        self._pending.add_done_callback(lambda future: self._pending_done(name, future, then))

    def _pending_done(
        self, name: str, future: asyncio.Future[Any], then: Callable[[Any], None] | None
    ) -> None:
        self._pending = None
        if future.cancelled():
            pass
        elif future.exception() is not None:
            self._service.callback_failed(name, self, future.exception())  # type: ignore[arg-type]
        elif then is not None:
            then(future.result())
        backlog = self._backlog
        while backlog and self._pending is None:
            self._event(*backlog.popleft())
        if self._pending is None:
            self._unpause(PAUSED_BY_CALLBACK)

    def _pause(self, reason: int) -> None:
        was = self._flags
        self._flags = was | reason
        if not was & PAUSED and self._transport is not None and not was & CLOSED:
            self._transport.pause_reading()

    def _unpause(self, reason: int) -> None:
        was = self._flags
        now = self._flags = was & ~reason
        if was & PAUSED and not now & PAUSED and self._transport is not None and not now & CLOSED:
            self._transport.resume_reading()

    def _read_timed_out(self) -> None:
        """``onreadtimeout(conn)``: a true answer keeps the connection, else it is closed.

        Idle time restarts at the next sweep (``_idle_since = 0``): counted on the sweep's
        clock alone, which is the test kit's virtual one under :mod:`mpnet.testing`."""
        self._idle_since = 0.0
        callback = self._service.onreadtimeout
        if callback is None:
            self.close("read timeout")
            return
        try:
            result = callback(self)
        except Exception as exc:
            self._service.callback_failed("onreadtimeout", self, exc)
            self.close("read timeout")
            return
        self._await_result("onreadtimeout", result, self._after_read_timeout)

    def _after_read_timeout(self, keep: Any) -> None:
        if keep:
            self._idle_since = 0.0
        else:
            self.close("read timeout")

    # -- not yet admitted (PROXY header, TLS handshake) -------------------------------------------

    def _await_admission(self) -> None:
        """Count this connection among the worker's unadmitted ones; past the cap, drop the
        oldest (a refusal of its service: counted and logged at a limited rate)."""
        counters = self._service.counters
        pending = counters.unadmitted
        pending[self] = None
        if len(pending) > counters.max_unadmitted:
            oldest = next(iter(pending))
            del pending[oldest]
            oldest._drop_unadmitted(counters.max_unadmitted)

    def _admission_settled(self) -> None:
        self._service.counters.unadmitted.pop(self, None)

    def _drop_unadmitted(self, limit: int) -> None:
        service = self._service
        service.refused += 1
        service._refusal_reason = (
            f"max_unadmitted_connections ({limit}) reached in this worker: dropped the oldest "
            "connection still sending its PROXY header or TLS handshake"
        )
        now = time.monotonic()
        if now >= service._next_limit_log:
            service._report_refusals(now)
        if self._handshake is not None:
            self._handshake.task.cancel()  # _tls_done aborts it
            return
        service.waiting.discard(self)  # type: ignore[arg-type]
        self._flags |= CLOSED
        if self._transport is not None:
            self._transport.abort()

    # -- direct TLS (used by TLSConnection and ProxiedTLSConnection) ----------------------------

    _handshake: ServerHandshake | None = None

    def _begin_tls(self, data: bytes, timeout: float | None) -> None:
        """Start the server handshake on the plain transport; *data*: bytes already read that
        belong to it. The module hears of the connection only once the handshake succeeded;
        application data that comes before that waits in the backlog, as during an async
        callback."""
        service = self._service
        service.handshaking.add(self)  # keeps the connection referenced until it is decided
        context = service.settings.ssl_context
        assert context is not None and self._transport is not None
        self._handshake = handshake = ServerHandshake(self._transport, self, context, timeout, data)
        self._pending = handshake.task
        handshake.task.add_done_callback(self._tls_done)

    def _tls_done(self, task: asyncio.Task[asyncio.Transport | None]) -> None:
        service = self._service
        service.handshaking.discard(self)
        self._admission_settled()
        self._pending = self._handshake = None
        lost = self.__dict__.pop("_lost_in_handshake", None)
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        transport = None if exc is not None else task.result()
        if transport is None:  # start_tls gives None for a transport closed meanwhile
            self._flags |= CLOSED
            if self._backlog is not None:
                self._backlog = None
            service.handshake_failed(self, exc or ConnectionError("closed during the handshake"))
            if self._transport is not None and not self._transport.is_closing():
                self._transport.abort()
            return
        self._transport = transport
        if not self._admit(service, transport):
            return
        backlog = self._backlog
        while backlog and self._pending is None:
            self._event(*backlog.popleft())
        if lost is not None:  # the peer closed right after the handshake
            Connection.connection_lost(self, lost[0])

    def _lost_in_handshake(self, exc: Exception | None) -> bool:
        """Whether the connection is still in its handshake; then its loss is remembered for
        :meth:`_tls_done` (a failed handshake ignores it, a finished one replays it)."""
        if self in self._service.handshaking:
            self.__dict__["_lost_in_handshake"] = (exc,)
            return True
        return False

    # -- the API a module uses --------------------------------------------------------------------

    def write(self, data: bytes | str) -> bool:
        """Queue *data* (bytes, or str sent as UTF-8). Returns False if the connection is closed.

        When the peer does not read, mpnet stops reading from it past a high-water mark (64 KiB
        queued) until the queue drains (``ondrain``); past ``max_send_buffer_size`` the
        connection is closed with "no space left in buffer".
        """
        # `flags and flags & X`: on the usual path (open, reading) a truth test of 0, which
        # costs less than the `&` (unspecialised in CPython 3.11) it saves.
        if self._flags and self._flags & CLOSED:
            return False
        if data.__class__ is not bytes:  # bytes: one check; str: two; the rest: a call
            data = data.encode() if data.__class__ is str else as_bytes(data)  # type: ignore[union-attr, assignment]
        self._service.sent_bytes += len(data)
        transport = self._transport
        transport.write(data)  # type: ignore[union-attr, arg-type]
        if (
            self._flags
            and self._flags & PAUSED_BY_BACKPRESSURE
            and (
                transport.get_write_buffer_size()  # type: ignore[union-attr]
                > self._service.settings.max_send_buffer_size
            )
        ):
            self._drop(
                "no space left in buffer",
                f"more than max_send_buffer_size ({self._service.settings.max_send_buffer_size})"
                " bytes queued",
            )
            return False
        return True

    def close(self, reason: str | None = None) -> None:
        """Close after what was written has been sent; ``ondisconnect`` gets *reason*."""
        if self._flags & CLOSED or self._transport is None:
            return
        if reason is not None and self._close_reason is None:
            self._close_reason = reason
        self._transport.close()

    def abort(self, reason: str | None = None) -> None:
        """Close at once, dropping unsent data."""
        if self._flags & CLOSED or self._transport is None:
            return
        if reason is not None and self._close_reason is None:
            self._close_reason = reason
        # Closed from now on (write() answers False, buffered() 0), not when the loop gets
        # round to connection_lost; connection_lost still runs ondisconnect, once.
        self._flags |= CLOSED
        self._transport.abort()

    def _drop(self, reason: str, detail: str) -> None:
        """Abort a connection whose peer broke a limit: one log line, then ``ondisconnect``
        with *reason*."""
        service = self._service
        service.logger.info(
            "service %s: closing connection %s from %s: %s (%s)",
            service.name,
            self.id,
            self.describe_peer(),
            reason,
            detail,
        )
        self.abort(reason)

    def pause(self) -> None:
        """Stop reading from this connection until :meth:`resume`."""
        self._pause(PAUSED_BY_MODULE)

    def resume(self) -> None:
        self._unpause(PAUSED_BY_MODULE)

    def buffered(self) -> int:
        """Bytes written but not yet sent."""
        if self._transport is None or self._flags & CLOSED:
            return 0
        return self._transport.get_write_buffer_size()

    def starttls(self, context: ssl.SSLContext | None = None) -> None:
        """Upgrade this plain connection to TLS (server side), with the service's certificate.

        Call it after writing the protocol's "go ahead" line: that line is sent first. Events
        wait until the handshake is done; then ``onstarttls(conn)`` runs. A failed handshake
        closes the connection (``ondisconnect`` with the reason).
        """
        context = context or self._service.settings.ssl_context
        if context is None:
            raise RuntimeError(
                f"service {self._service.name}: starttls() needs a certificate: set "
                f"{self._service.name}_ssl or [ssl] in the config"
            )
        if self.ssl():
            raise RuntimeError("connection is already encrypted")
        self._await_result("starttls", self._upgrade(context))

    async def _upgrade(self, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self._transport,  # type: ignore[arg-type]
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._service.settings.ssl_handshake_timeout or None,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.debug("starttls handshake failed for %s: %s", self.describe_peer(), exc)
            self.abort(f"TLS handshake failed: {exc}")
            # When the peer resets during the handshake, the TLS layer never passes
            # connection_lost on: end the connection here (a later call is ignored), or it
            # stays counted and ondisconnect never runs.
            self.connection_lost(None)
            return
        # The TLS transport has its own write-buffer limits (uvloop: 128 KiB low, 512 KiB
        # high): apply mpnet's, so backpressure and ondrain ("queue empty") work as before.
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, 0)  # type: ignore[union-attr]
        self._transport = transport  # type: ignore[assignment]
        callback = self._service.onstarttls
        if callback is not None:
            try:  # reported as the module's onstarttls failing, not as a failed handshake
                result = callback(self)
                if asyncio.iscoroutine(result):
                    await result
            except Exception as exc:
                self._service.callback_failed("onstarttls", self, exc)

    def _peername(self) -> tuple[Any, ...]:
        if self._peer is None:
            peer = self._transport.get_extra_info("peername") if self._transport else None
            self._peer = tuple(peer) if isinstance(peer, (tuple, list)) else ("", 0)
        return self._peer

    def ip(self) -> str:
        """The client's address (with the PROXY protocol: the original client's)."""
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
        return bool(self._transport and self._transport.get_extra_info("ssl_object"))

    def ssl_info(self) -> dict[str, Any] | None:
        """TLS details (version, cipher, ALPN protocol, server name) or None."""
        obj = self._transport.get_extra_info("ssl_object") if self._transport else None
        if obj is None:
            return None
        return {
            "version": obj.version(),
            "cipher": obj.cipher()[0] if obj.cipher() else None,
            "alpn": obj.selected_alpn_protocol(),
            "server_name": getattr(obj, "server_hostname", None),
        }

    def proxy(self) -> tuple[str, int] | None:
        """The address of the proxy that sent a PROXY header, or None."""
        return None

    @property
    def id(self) -> str:
        """A short identifier, unique within the worker's lifetime.

        Connections are numbered in the order their id is first asked for (by a log line, the
        module, ``repr``), not in accept order: a number above 256 is an int object of its own,
        which most idle connections would carry without anyone ever reading it."""
        number = self._number
        if not number:
            number = self._number = next(_ids)
        return f"{self._service.worker_label}c{number}"

    @property
    def service(self) -> str:
        return self._service.name

    @property
    def closed(self) -> bool:
        return bool(self._flags & CLOSED)

    def describe_peer(self) -> str:
        ip, port = self._peername()[:2]
        return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"

    def __repr__(self) -> str:
        return f"<mpnet connection {self.id} {self.describe_peer()} service={self._service.name}>"


class _HandshakeFirst(Connection):
    """Bytes and a loss during mpnet's server handshake belong to it, not to the module; the
    class after this one in the MRO (plain or PROXY) handles them otherwise."""

    def data_received(self, data: bytes) -> None:
        handshake = self._handshake
        if handshake is None or not handshake.early(data):
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost_in_handshake(exc):
            super().connection_lost(exc)


class TLSConnection(_HandshakeFirst):
    """A direct-TLS connection (``encryption = "ssl"``): accepted in the clear, then mpnet runs
    the server handshake (:class:`~mpnet.workers.tls.ServerHandshake`). ``onconnect`` runs once
    it has succeeded; a handshake that fails or times out (``ssl_handshake_timeout``) is logged at
    debug level with the peer and the reason, counted, and never reaches the module."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._begin_tls(b"", self._service.settings.ssl_handshake_timeout or None)
        self._await_admission()


class ProxiedConnection(Connection):
    """A connection that must begin with a PROXY protocol header (``<service>_proxy_protocol``).

    The module sees it only once the header is parsed: ``onconnect`` then runs with ``ip()``
    and ``port()`` already those of the original client; ``proxy()`` gives the proxy's address.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._parser: ProxyHeaderParser | None = ProxyHeaderParser()
        self._proxy_peer: tuple[str, int] | None = None
        self._accepted_at = time.monotonic()
        trusted = self._service.settings.proxy_trusted
        if trusted is not None:
            peer = transport.get_extra_info("peername")
            if not peer or peer[0] not in trusted:
                self._flags |= CLOSED
                transport.abort()  # type: ignore[attr-defined]
                self._service.refuse_untrusted(peer)
                return
        self._service.waiting.add(self)
        self._await_admission()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            Connection.data_received(self, data)
            return
        try:
            result = parser.feed(data)
        except ProxyProtocolError as exc:
            self._proxy_failed(f"malformed PROXY header: {exc}")
            return
        if result is None:
            return
        if result.transport == "DGRAM":
            self._proxy_failed(
                f"PROXY header for a datagram connection ({result.family}) on a TCP listener"
            )
            return
        self._parser = None
        self._service.waiting.discard(self)
        real = tuple(self._transport.get_extra_info("peername") or ("", 0))[:2]  # type: ignore[union-attr]
        self._proxy_peer = real  # type: ignore[assignment]
        if result.source is not None:
            self._peer = (result.source[0], result.source[1])
        self._header_done(result.remaining)

    def _header_done(self, remaining: bytes) -> None:
        """The header is parsed: the module sees the connection now (*remaining*: the bytes
        that followed the header in the same read)."""
        self._admission_settled()
        transport = self._transport
        assert transport is not None  # set in connection_made, before any header byte
        if self._admit(self._service, transport) and remaining and not self._flags & CLOSED:
            self.data_received(remaining)

    def _proxy_failed(self, reason: str) -> None:
        self._service.waiting.discard(self)
        self._admission_settled()
        peer = self._transport.get_extra_info("peername") if self._transport else None
        self._service.logger.info(
            "service %s: closing connection from %s: %s", self._service.name, peer, reason
        )
        self._flags |= CLOSED
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._service.waiting.discard(self)
        if self._parser is not None:
            self._admission_settled()
            self._flags |= CLOSED
            return  # never reached the module
        Connection.connection_lost(self, exc)

    def proxy(self) -> tuple[str, int] | None:
        return self._proxy_peer


class ProxiedTLSConnection(_HandshakeFirst, ProxiedConnection):
    """A PROXY header, then a direct-TLS handshake (a TLS service behind a load balancer).

    What followed the header in the same read is the start of the ClientHello: it goes to the
    TLS layer. The header and the handshake share one ``ssl_handshake_timeout`` deadline."""

    def _header_done(self, remaining: bytes) -> None:
        timeout = self._service.settings.ssl_handshake_timeout
        if timeout:
            timeout = round(max(timeout - (time.monotonic() - self._accepted_at), 0.001), 3)
        self._begin_tls(remaining, timeout or None)


class OutgoingConnection(Connection):
    """A connection mpnet opens (``module.connect``, Prosody's ``addclient``).

    It is returned at once; writes made before the connection is up are queued and sent when it
    is. ``onconnect`` runs once connected; if connecting fails or times out, ``ondisconnect``
    runs with the reason (as Prosody does), without an ``onconnect`` before it.
    """

    def __init__(self, service: Service) -> None:
        super().__init__(service)
        self._early: list[bytes] = []
        self.connecting = True

    def write(self, data: bytes | str) -> bool:
        if self.connecting and not self._flags & CLOSED:
            self._early.append(bytes(as_bytes(data)))
            return True
        return Connection.write(self, data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connecting = False
        self._transport = transport  # type: ignore[assignment]
        if self._flags & CLOSED:  # closed by the module while connecting
            transport.close()
            return
        self._start(self._service)
        early, self._early = self._early, []
        for chunk in early:
            Connection.write(self, chunk)

    def buffered(self) -> int:
        if self.connecting:
            return sum(map(len, self._early))  # queued until the connection is up
        return Connection.buffered(self)

    def close(self, reason: str | None = None) -> None:
        if self.connecting:
            # Tell the module now: a connect task cancelled before its first step never runs
            # its except clause, so waiting for it would lose this ondisconnect.
            task = self.__dict__.get("_connect_task")
            if task is not None:
                task.cancel()
            self.failed(reason or "closed before connecting")
            return
        Connection.close(self, reason)

    def abort(self, reason: str | None = None) -> None:
        if self.connecting:
            self.close(reason)  # nothing was sent yet: the same as close()
            return
        Connection.abort(self, reason)

    def failed(self, reason: str) -> None:
        """Connecting did not work (or was given up): tell the module through
        ``ondisconnect``, once."""
        if not self.connecting:
            return
        self.connecting = False
        self._flags |= CLOSED
        self._close_reason = reason
        self._early = []
        ondisconnect = self._service.ondisconnect
        if ondisconnect is not None:
            self._event("ondisconnect", ondisconnect, (reason,))


def open_connection(
    service: Service,
    host: str,
    port: int,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> OutgoingConnection:
    """Start connecting; return the connection object at once (see :class:`OutgoingConnection`)."""
    conn = OutgoingConnection(service)
    loop = asyncio.get_running_loop()

    async def connect() -> None:
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn,
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=server_hostname if ssl_context else None,
                ),
                timeout,
            )
        except asyncio.CancelledError:
            conn.failed("closed before connecting")  # a no-op when close() said so already
        except TimeoutError:
            conn.failed(f"connect to {host}:{port} timed out after {timeout:g}s")
        except (OSError, ssl.SSLError) as exc:
            conn.failed(f"connect to {host}:{port} failed: {exc.strerror or exc}")

    conn.__dict__["_connect_task"] = asyncio.ensure_future(connect())
    return conn
