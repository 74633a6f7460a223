"""``GET /metrics`` served from the master's select loop (``metrics_listen``), never blocking it.

Every socket is non-blocking; the master calls :meth:`MetricsServer.accept`,
:meth:`~MetricsServer.on_readable` and :meth:`~MetricsServer.on_writable` when its selector says
so. A slow or hostile scraper costs little: the request head is bounded
(:data:`~mpnet.pure.httprequest.MAX_HEAD`), a client has :data:`CLIENT_TIMEOUT` seconds to send
it and read the answer, at most :data:`MAX_CLIENTS` are served at once (more get a 503), and one
request per connection is answered, then the connection is closed. Closing waits for the client's
end (discarding up to :data:`LINGER_BYTES` of what it still sends), so an answer sent before the
whole request was read (431) is not lost to a reset.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

from .control import send_pending
from .pure.httprequest import HttpError, RequestParser, route

CLIENT_TIMEOUT = 10.0
MAX_CLIENTS = 8
LINGER_BYTES = 65536
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

Render = Callable[[str], tuple[bytes, str]]  # Accept header -> (page, content type)


def response(status: int, body: bytes, content_type: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def error_response(error: HttpError) -> bytes:
    extra = "Allow: GET\r\n" if error.status == 405 else ""
    body = f"{error.status} {error.reason}\n".encode()
    return response(error.status, body, "text/plain; charset=utf-8", extra)


class MetricsClient:
    """One scraper's connection: its request so far, then the answer still to send."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.parser = RequestParser()
        self.outbox = bytearray()
        self.answered = False  # the answer is sent: waiting for the client's end
        self.discarded = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1


class MetricsServer:
    """Listens on *addresses*; ``render(accept)`` writes the page. Binding errors raise
    OSError naming the address."""

    def __init__(self, addresses: list[tuple[str, int]], render: Render, log: Any) -> None:
        self._render = render
        self._log = log
        self.clients: dict[int, MetricsClient] = {}
        self.listeners: list[socket.socket] = []
        try:
            for host, port in addresses:
                self.listeners.append(_listen(host, port))
        except OSError:
            self.close()
            raise

    def endpoints(self) -> list[str]:
        """Where it listens, ``host:port`` (``[host]:port`` for IPv6), ports as bound."""
        result = []
        for sock in self.listeners:
            host, port = sock.getsockname()[:2]
            result.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return result

    def accept(self, listener: socket.socket) -> list[MetricsClient]:
        """Accept waiting scrapers; beyond MAX_CLIENTS, answer 503 at once. The new clients."""
        accepted: list[MetricsClient] = []
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except OSError as exc:
                self._log.warning("metrics: accept failed: %s", exc)
                return accepted
            sock.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                busy = HttpError(503, f"more than {MAX_CLIENTS} scrapes at once")
                with contextlib.suppress(OSError):
                    sock.send(error_response(busy))
                    sock.shutdown(socket.SHUT_WR)
                    sock.recv(LINGER_BYTES)  # what already came: closing on it would reset
                sock.close()
                continue
            client = MetricsClient(sock, time.monotonic() + CLIENT_TIMEOUT)
            self.clients[sock.fileno()] = client
            accepted.append(client)

    def on_readable(self, client: MetricsClient) -> None:
        try:
            data = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        if client.outbox or client.answered:  # what follows the head is ignored
            client.discarded += len(data)
            if client.discarded > LINGER_BYTES:
                self.drop(client)
            return
        try:
            request = client.parser.feed(data)
        except HttpError as exc:
            self._answer(client, error_response(exc))
            return
        if request is None:
            return
        error = route(request)
        if error is not None:
            self._answer(client, error_response(error))
            return
        try:
            page, content_type = self._render(request.headers.get("accept", ""))
        except Exception as exc:  # a bug in the page must not take the master down
            self._log.exception("metrics: rendering the page failed")
            self._answer(client, error_response(HttpError(500, type(exc).__name__)))
            return
        self._answer(client, response(200, page, content_type))

    def _answer(self, client: MetricsClient, data: bytes) -> None:
        client.outbox += data
        self.on_writable(client)

    def on_writable(self, client: MetricsClient) -> None:
        done = send_pending(client.sock, client.outbox)
        if done is None:
            return
        if done:
            client.answered = True
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_WR)
                return  # closed once the client closes its end (or at its deadline)
        self.drop(client)

    def expired(self) -> list[MetricsClient]:
        """Clients past their deadline (the caller forgets them in its selector, then
        :meth:`drop` s them)."""
        now = time.monotonic()
        return [client for client in self.clients.values() if now > client.deadline]

    def drop(self, client: MetricsClient) -> None:
        if client.closed:
            return
        self.clients.pop(client.sock.fileno(), None)
        client.sock.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self.drop(client)
        for sock in self.listeners:
            sock.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(16)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        raise OSError(exc.errno, f"metrics_listen {where}: {exc.strerror}") from None
    return sock
