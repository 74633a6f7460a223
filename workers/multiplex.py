"""Several services on one port, chosen by the first bytes or by TLS ALPN (Prosody's
mod_net_multiplex).

A provider joins by declaring ``multiplex={"pattern": rb"^GET "}`` (a regex matched against the
start of the stream) and/or ``multiplex={"protocol": "xmpp-client"}`` (an ALPN protocol ID). The
framework then offers two services of its own: ``multiplex`` (plain) and ``multiplex_ssl`` (direct
TLS); they listen only where the config gives them ports (``multiplex_ports``,
``multiplex_ssl_ports``). On ``multiplex_ssl`` mpnet runs the TLS handshake first and the
ALPN protocol it agreed on chooses the service. Otherwise the first bytes are held until one
pattern matches; then the connection is handed, with those bytes, to the chosen service as if it
had connected there. Nothing matching within ``MAX_SNIFF`` bytes (or within the handshake
timeout) closes it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .tls import ServerHandshake, handshake_failed

if TYPE_CHECKING:
    from .connection import Service

MULTIPLEX_SERVICES = ("multiplex", "multiplex_ssl")
MAX_SNIFF = 4096

log = logging.getLogger("mpnet.multiplex")


def compile_rule(
    options: dict[str, Any], where: str
) -> tuple[re.Pattern[bytes] | None, str | None]:
    """Validate a provider's ``multiplex`` table: (pattern, ALPN protocol)."""
    if not isinstance(options, dict) or not set(options) <= {"pattern", "protocol"} or not options:
        raise ValueError(f"{where}: multiplex must be a dict with 'pattern' and/or 'protocol'")
    pattern = options.get("pattern")
    protocol = options.get("protocol")
    compiled = None
    if pattern is not None:
        if isinstance(pattern, str):
            pattern = pattern.encode()
        if not isinstance(pattern, bytes):
            raise ValueError(f"{where}: multiplex pattern must be bytes or str")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{where}: multiplex pattern {pattern!r}: {exc}") from None
    if protocol is not None and not isinstance(protocol, str):
        raise ValueError(f"{where}: multiplex protocol must be a string (an ALPN protocol ID)")
    return compiled, protocol


@dataclass
class Rules:
    """Which service a multiplexed connection goes to (pure: bytes and names in, service out)."""

    patterns: list[tuple[re.Pattern[bytes], Any]] = field(default_factory=list)
    protocols: dict[str, Any] = field(default_factory=dict)

    def by_protocol(self, protocol: str | None) -> Any:
        return self.protocols.get(protocol) if protocol else None

    def by_data(self, data: bytes) -> Any:
        """The service whose pattern matches the start of *data*, else None (wait for more)."""
        for pattern, service in self.patterns:
            if pattern.match(data):
                return service
        return None


class Sniffer(asyncio.Protocol):
    """The protocol of a connection on a multiplex port until a service is chosen."""

    def __init__(self, owner: MultiplexService) -> None:
        self.owner = owner
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.accepted_at = time.monotonic()
        self.handshake: ServerHandshake | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.waiting.add(self)
        context = self.owner.ssl_context
        if context is not None:
            self.handshake = ServerHandshake(
                self.transport,  # type: ignore[arg-type]
                self,
                context,
                self.owner.handshake_timeout or None,
            )
            self.handshake.task.add_done_callback(self._tls_done)

    def _tls_done(self, task: asyncio.Task[asyncio.Transport | None]) -> None:
        self.handshake = None
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        transport = None if exc is not None else task.result()
        if transport is None:  # start_tls gives None for a transport closed meanwhile
            self.owner.waiting.discard(self)
            peer = self.transport.get_extra_info("peername") if self.transport else None
            handshake_failed(
                self.owner, peer, exc or ConnectionError("closed during the handshake")
            )
            if self.transport is not None and not self.transport.is_closing():
                self.transport.abort()
            return
        self.transport = transport
        if self.lost:  # closed right after the handshake, before anything was chosen
            self.owner.waiting.discard(self)
            return
        ssl_object = self.transport.get_extra_info("ssl_object")
        service = self.owner.rules.by_protocol(ssl_object.selected_alpn_protocol())
        if service is not None:
            self._hand_over(service)
        elif self.buffer:
            self._sniff()

    def data_received(self, data: bytes) -> None:
        handshake = self.handshake
        if handshake is not None and handshake.early(data):
            return
        self.buffer += data
        if handshake is None:  # (else ALPN chooses first, once the handshake is done)
            self._sniff()

    def _sniff(self) -> None:
        service = self.owner.rules.by_data(self.buffer)
        if service is not None:
            self._hand_over(service)
        elif len(self.buffer) > MAX_SNIFF:
            self.fail(f"no multiplexed service matches the first {len(self.buffer)} bytes")

    def _hand_over(self, service: Service) -> None:
        self.owner.waiting.discard(self)
        conn = service.handover_class(service)
        transport = self.transport
        assert transport is not None
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if self.buffer and not conn.closed:
            conn.data_received(self.buffer)
        self.buffer = b""

    def fail(self, reason: str) -> None:
        self.owner.waiting.discard(self)
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.info("service %s: closing connection from %s: %s", self.owner.name, peer, reason)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.handshake is None:
            self.owner.waiting.discard(self)
        # (during the handshake the sniffer stays referenced in waiting: _tls_done decides)


class MultiplexService:
    """``multiplex`` or ``multiplex_ssl`` (with *ssl_context*: direct TLS) in one worker."""

    def __init__(
        self,
        name: str,
        rules: Rules,
        handshake_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.rules = rules
        self.waiting: set[Sniffer] = set()
        self.handshake_timeout = handshake_timeout
        self.ssl_context = ssl_context
        self.handshake_failures = 0
        self.connections: set[Any] = set()  # the chosen services own their connections
        self.served = 0

    def protocol_factory(self) -> Sniffer:
        self.served += 1
        return Sniffer(self)

    def sweep(self, now: float) -> None:
        for sniffer in list(self.waiting):  # (a TLS handshake has its own timer)
            if sniffer.handshake is None and now - sniffer.accepted_at >= self.handshake_timeout:
                sniffer.fail("no data matching a multiplexed service in time")
