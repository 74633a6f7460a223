"""TLS server contexts from the config's ``[ssl]`` / ``<service>_ssl`` tables, and the server
side of a handshake on an accepted plain connection.

Contexts are built in the checker (so a missing or broken certificate stops a start or a reload
with a clear message) and again in every new worker (so a reload picks up renewed certificate
files for new connections). TLS 1.2 is the minimum; the rest are Python's server defaults.

Listening sockets are always plain: a direct-TLS connection is upgraded by mpnet after it is
accepted (:class:`ServerHandshake`), so that a PROXY header can come first and a failed
handshake is mpnet's to log and count rather than the event loop's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from mpnet.pure.config import Config, ConfigError

if TYPE_CHECKING:
    from .module import LoadedModules

log = logging.getLogger("mpnet.tls")

SSL_KEYS = {"certificate", "key", "password", "ciphers", "alpn"}


def server_context(
    config: Config, service: str, alpn: list[str] | None = None
) -> ssl.SSLContext | None:
    """The TLS context for *service*, or None when no ``ssl`` table applies to it."""
    table = config.service_option(service, "ssl")
    if not table:
        return None
    key_name = f"{service}_ssl" if config.service_key_is_set(service, "ssl") else "ssl"
    where = f"{config.path}: key {key_name!r}"
    unknown = set(table) - SSL_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: "
            f"{', '.join(sorted(SSL_KEYS))}"
        )
    certificate = _path(config, table, "certificate", where, required=True)
    assert certificate is not None  # required=True raised otherwise
    key = _path(config, table, "key", where, required=False)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(certificate, key, _string(table, "password", where))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load certificate {certificate}: {exc}") from None
    ciphers = _string(table, "ciphers", where)
    if ciphers:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError as exc:
            raise ConfigError(f"{where}: ciphers: {exc}") from None
    protocols = list(table.get("alpn", [])) + list(alpn or [])
    if protocols:
        context.set_alpn_protocols(protocols)
    return context


def _string(table: dict[str, Any], name: str, where: str) -> str | None:
    value = table.get(name)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: {name} must be a string")
    return value


def _path(
    config: Config, table: dict[str, Any], name: str, where: str, required: bool
) -> str | None:
    value = _string(table, name, where)
    if value is None:
        if required:
            raise ConfigError(f"{where}: {name} is required")
        return None
    path = config.resolve_path(value)
    if not path.is_file():
        raise ConfigError(f"{where}: {name} file {str(path)!r} not found")
    return str(path)


def handshake_failed(owner: Any, peer: object, exc: BaseException) -> None:
    """Count and log a server handshake that failed or timed out on *owner*'s port (a service,
    or the multiplexer): the peer's business, so debug level; no module hears of it."""
    owner.handshake_failures += 1
    log.debug(
        "service %s: TLS handshake failed for connection from %s: %s",
        owner.name,
        peer,
        str(exc) or type(exc).__name__,
    )


class ServerHandshake:
    """The server side of a TLS handshake on an accepted plain *transport*.

    :attr:`task`'s result is the TLS transport that *protocol* is to use from then on; its
    exception says why the handshake failed or timed out (after *timeout* seconds; None: the
    loop's default).

    Bytes read in the clear belong to the handshake and must reach the TLS layer in order, but
    ``loop.start_tls`` passes on only what is read after it has taken over, one loop pass
    later; and uvloop starts reading right after ``connection_made``, whatever the protocol
    asked. So *data* (bytes read already, such as the start of a ClientHello that came in one
    segment with a PROXY header) and what *protocol* receives before the takeover
    (:meth:`early`) are handed to the TLS layer directly: after ``start_tls`` has installed it
    (its first step, which the task runs before the callback scheduled here) and before the
    transport reads again. Until the TLS layer's ``connection_made`` they wait in its buffer.
    """

    __slots__ = ("_early", "_loop", "_protocol", "_scheduled", "_transport", "task")

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: asyncio.BaseProtocol,
        context: ssl.SSLContext,
        timeout: float | None,
        data: bytes = b"",
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        self._protocol = protocol
        self._early = bytearray()
        self._scheduled = False
        transport.pause_reading()
        self.task: asyncio.Task[asyncio.Transport | None] = self._loop.create_task(
            self._loop.start_tls(
                transport, protocol, context, server_side=True, ssl_handshake_timeout=timeout
            )
        )
        if data:
            self.early(data)

    def early(self, data: bytes) -> bool:
        """Called with what *protocol* receives during the handshake: True when *data* came
        in the clear before the TLS layer took over (it is passed on to it), False when it is
        already decrypted application data."""
        if self._transport.get_protocol() is not self._protocol:
            return False
        self._early += data
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._feed)
        return True

    def _feed(self) -> None:
        tls = self._transport.get_protocol()
        if tls is self._protocol:
            if not self.task.done():  # start_tls has not taken over yet (it reads nothing)
                self._loop.call_soon(self._feed)
            return  # (done: start_tls failed before taking over, and its task says why)
        data, self._early = bytes(self._early), bytearray()
        self._scheduled = False
        if not hasattr(tls, "buffer_updated"):
            tls.data_received(data)  # type: ignore[attr-defined]
            return
        view = memoryview(data)
        while view:
            buffer = tls.get_buffer(len(view))  # type: ignore[attr-defined]
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            tls.buffer_updated(size)  # type: ignore[attr-defined]
            view = view[size:]


def tls_contexts(config: Config, loaded: LoadedModules) -> dict[str, ssl.SSLContext]:
    """A TLS context for every service that has an ``ssl`` table (direct TLS needs one;
    others use it for ``conn.starttls()``). Raises ConfigError for a bad or missing one."""
    contexts: dict[str, ssl.SSLContext] = {}
    services = loaded.describe()
    alpn = [
        p.options["multiplex_rule"][1]
        for p in loaded.providers
        if "multiplex_rule" in p.options and p.options["multiplex_rule"][1]
    ]
    for info in services:
        name = info["name"]
        if info.get("optional") and not config.service_key_is_set(name, "ports"):
            continue
        context = server_context(config, name, alpn if name == "multiplex_ssl" else None)
        if context is not None:
            contexts[name] = context
        elif info.get("encryption") == "ssl":
            raise ConfigError(
                f"{config.path}: service {name!r} uses direct TLS: set {name}_ssl = "
                f'{{ certificate = "...", key = "..." }} or an [ssl] table'
            )
    return contexts
