"""The control socket: ``mpnet status | reload | stop | workers N`` talk to a running master.

A Unix stream socket, created with mode 0600 (the umask is narrowed around ``bind`` so there is no
moment when anyone else could connect), and every peer is checked with ``SO_PEERCRED``: only root
and the service's own users may use it. One request per connection: a JSON line in, a JSON line
out. The master serves it from its select loop without ever blocking on a client.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .pure.controlproto import (
    MAX_REQUEST,
    ControlProtocolError,
    ControlReply,
    ControlRequest,
    parse_request,
)

CLIENT_TIMEOUT = 5.0


def default_socket_path() -> Path:
    """``/run/mpnet/control.sock`` for root, else under ``$XDG_RUNTIME_DIR`` (or /tmp)."""
    if os.geteuid() == 0:
        return Path("/run/mpnet/control.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/mpnet-{os.geteuid()}"
    return Path(runtime) / "mpnet" / "control.sock"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def send_pending(sock: socket.socket, outbox: bytearray) -> bool | None:
    """Send what the socket takes now from *outbox* (what is sent is removed from it): True once
    all of it is sent, None if the socket would block (call again when writable), False if the
    peer is gone. The master never blocks on a client (control socket, metrics scrapes)."""
    while outbox:
        try:
            sent = sock.send(outbox)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return False
        del outbox[:sent]
    return True


class _Client:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.inbox = bytearray()
        self.outbox = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()


class Deferred:
    """An answer given later: ``handle_request`` returns one when the work outlives the
    request (a reload answers once its modules are checked), then calls :meth:`resolve`.

    The client may wait up to *timeout* seconds (the usual per-client deadline is short).
    ``on_resolve(client)`` is set by the master: it keeps its selector in step with the client.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.on_resolve: Callable[[_Client], None] | None = None
        self._client: _Client | None = None
        self._server: ControlServer | None = None
        self._early: ControlReply | None = None  # resolved before the request returned

    def _bind(self, server: ControlServer, client: _Client) -> ControlReply | None:
        """Attach the waiting client; return the answer if it is already known."""
        if self._early is None:
            self._client, self._server = client, server
        return self._early

    def resolve(self, response: ControlReply) -> None:
        client, server = self._client, self._server
        if client is None or server is None:
            self._early = response
            return
        self._client = self._server = None
        if client.sock.fileno() == -1:
            return  # the peer gave up (or timed out) meanwhile
        server._answer(client, response)
        if self.on_resolve is not None:
            self.on_resolve(client)


class ControlServer:
    """The master's side. ``handle_request(request) -> ControlReply | Deferred`` does the work;
    this class only moves bytes, checks peers and enforces size and time limits."""

    def __init__(
        self,
        path: Path,
        handle_request: Callable[[ControlRequest], ControlReply | Deferred],
        allowed_uids: set[int],
        log: Any,
    ) -> None:
        self.path = path
        self._handle_request = handle_request
        self.allowed_uids = {0, os.geteuid(), *allowed_uids}
        self._log = log
        self.clients: dict[int, _Client] = {}
        self.sock = self._listen(path)

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1)
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale: nobody answers there
            else:
                raise OSError(f"control socket {path} is in use by another running mpnet")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        return sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> list[_Client]:
        """Accept waiting peers; refuse strangers at once. Returns the new clients."""
        accepted: list[_Client] = []
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except OSError as exc:
                self._log.warning("control socket accept failed: %s", exc)
                return accepted
            conn.setblocking(False)
            pid, uid, _gid = peer_credentials(conn)
            if uid not in self.allowed_uids:
                self._log.warning("control socket: refused pid %d (uid %d): not allowed", pid, uid)
                with contextlib.suppress(OSError):
                    conn.send(ControlReply.failure("permission denied").to_json())
                conn.close()
                continue
            client = _Client(conn, time.monotonic() + CLIENT_TIMEOUT)
            self.clients[conn.fileno()] = client
            accepted.append(client)

    def on_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        client.inbox += data
        if b"\n" not in client.inbox:
            if len(client.inbox) > MAX_REQUEST:
                self._answer(client, ControlReply.failure("request too large"))
            return
        line = bytes(client.inbox.split(b"\n", 1)[0])
        try:
            request = parse_request(line)
        except ControlProtocolError as exc:
            self._answer(client, ControlReply.failure(str(exc)))
            return
        try:
            response = self._handle_request(request)
        except Exception as exc:  # a control request must never take the master down
            self._log.exception("control request %r failed", request)
            response = ControlReply.failure(f"{type(exc).__name__}: {exc}")
        if isinstance(response, Deferred):
            early = response._bind(self, client)
            if early is None:  # answered later: the client may wait that long
                client.deadline = time.monotonic() + response.timeout
                client.inbox.clear()
                return
            response = early
        self._answer(client, response)

    def _answer(self, client: _Client, response: ControlReply) -> None:
        client.outbox += response.to_json()
        client.inbox.clear()
        self.on_writable(client)

    def on_writable(self, client: _Client) -> None:
        if send_pending(client.sock, client.outbox) is not None:
            self.drop(client)  # answered, or the peer is gone

    def expire(self) -> list[_Client]:
        """Drop clients that have not finished within the deadline."""
        now = time.monotonic()
        late = [c for c in self.clients.values() if now > c.deadline]
        for client in late:
            self.drop(client)
        return late

    def drop(self, client: _Client) -> None:
        self.clients.pop(client.sock.fileno(), None)
        client.sock.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self.drop(client)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def service_uids(user: str | None) -> set[int]:
    if not user:
        return set()
    try:
        return {pwd.getpwnam(user).pw_uid}
    except KeyError:
        return set()
