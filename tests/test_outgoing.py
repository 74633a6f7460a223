"""Outgoing connections (``module.connect``, Prosody's ``addclient``) and the bundled TCP proxy
module (``mpnet/services/proxy.py``) end to end, against small threaded backends in the test."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable

import psutil
import pytest
from harness import Client, config, free_port, wait_for

pytestmark = pytest.mark.server

# -- backends -------------------------------------------------------------------------------------


class Backend:
    """A threaded TCP server on 127.0.0.1 (port 0); *handler(sock)* runs per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], backlog: int = 64) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            sock.settimeout(30)
            self.accepted.append(sock)
            thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket) -> None:
        try:
            self.handler(sock)
        except OSError:
            pass  # the peer went away: the test decides whether that was expected
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        # The accept thread first: a socket it accepts while stopping must be shut down too,
        # or its handler thread would keep that connection open for its 30 s timeout.
        self._threads[0].join(5)
        for sock in self.accepted:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads[1:]:
            thread.join(5)
        self.listener.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo(sock: socket.socket) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


BLOCK = bytes(range(256)) * 4096  # 1 MiB of a known pattern


def pattern_digest(megabytes: int) -> str:
    digest = hashlib.sha256()
    for _ in range(megabytes):
        digest.update(BLOCK)
    return digest.hexdigest()


class Progress:
    """Bytes moved so far by a thread; ``stalled()`` once they stop moving for a while."""

    def __init__(self) -> None:
        self.count = 0
        self._last = (-1, time.monotonic())

    def stalled(self, quiet: float = 0.5) -> bool:
        if self.count != self._last[0]:
            self._last = (self.count, time.monotonic())
            return False
        return time.monotonic() - self._last[1] > quiet


def send_blocks(sock: socket.socket, megabytes: int, progress: Progress) -> None:
    for _ in range(megabytes):
        view = memoryview(BLOCK)
        while view:
            count = sock.send(view[:65536])
            progress.count += count
            view = view[count:]


def receive_digest(sock: socket.socket, size: int, timeout: float = 30) -> str:
    digest, received = hashlib.sha256(), 0
    deadline = time.monotonic() + timeout
    while received < size:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(1 << 20)
        assert chunk, f"closed after {received} of {size} bytes"
        digest.update(chunk)
        received += len(chunk)
    return digest.hexdigest()


def _rss(process: psutil.Process) -> int:
    return process.memory_info().rss


# -- module.connect -------------------------------------------------------------------------------

DIALER = """
controls = {}  # outgoing connection -> the control connection that asked for it

def report(out, text):
    control = controls.get(out)
    if control is not None:
        control.write(text + "\\n")

class outgoing:
    def onconnect(out):
        module.log("info", "out onconnect %s", out.id)
        report(out, "connected")
    def onincoming(out, data):
        report(out, "got " + data.decode().strip())
    def ondisconnect(out, err):
        module.log("info", "out ondisconnect %s %s", out.id, err)
        report(out, f"closed {err}")
        controls.pop(out, None)

class listener:
    def onincoming(conn, data):
        words = data.decode().split()
        out = module.connect("127.0.0.1", int(words[0]), outgoing, timeout=float(words[1]))
        controls[out] = conn
        out.write("early bird\\n")  # before the connection is up: queued, sent once it is
        module.log("info", "buffered while connecting: %d", out.buffered())
        if "close" in words:
            out.close("changed my mind")
        if "abort" in words:
            out.abort("changed my mind")
module.provides("net", listener=listener, default_port=0)
"""


def _dialer(mpnet, write_module):
    path = write_module("dialer", DIALER)
    server = mpnet(config([str(path)], workers=1, dialer_ports=[0]))
    return server, Client(server.port("dialer"))


def test_connect_runs_the_listener_callbacks(mpnet, write_module):
    server, control = _dialer(mpnet, write_module)
    with Backend(echo) as backend, control:
        control.send(f"{backend.port} 5\n")
        assert control.read_until(b"\n") == b"connected\n"
        assert control.read_until(b"\n") == b"got early bird\n"
        wait_for(lambda: backend.accepted, what="the backend to accept")
        backend.accepted[0].shutdown(socket.SHUT_RDWR)
        assert control.read_until(b"\n") == b"closed None\n"
    server.wait_log(r"buffered while connecting: 11")


def test_connect_refused_reports_the_reason(mpnet, write_module):
    server, control = _dialer(mpnet, write_module)
    port = free_port()  # nothing listens there
    with control:
        control.send(f"{port} 5\n")
        line = control.read_until(b"\n").decode()
    assert line == f"closed connect to 127.0.0.1:{port} failed: Connection refused\n"
    server.wait_log(r"out ondisconnect")  # the log is read in a thread: it may lag the reply
    assert "out onconnect" not in server.log
    assert server.log.count("out ondisconnect") == 1


def test_connect_timeout(mpnet, write_module):
    server, control = _dialer(mpnet, write_module)
    # A listener that never accepts, with its queue full: SYNs to it go unanswered.
    full = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = []
    try:
        port = full.getsockname()[1]
        fillers.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        with control:
            started = time.monotonic()
            control.send(f"{port} 1\n")
            line = control.read_until(b"\n", timeout=10).decode()
            elapsed = time.monotonic() - started
        assert line == f"closed connect to 127.0.0.1:{port} timed out after 1s\n"
        assert 0.9 <= elapsed < 5
    finally:
        for sock in fillers:
            sock.close()
        full.close()
    assert "out onconnect" not in server.log


def test_close_or_abort_while_connecting(mpnet, write_module):
    server, control = _dialer(mpnet, write_module)
    with Backend(echo) as backend, control:
        for how in ("close", "abort"):
            control.send(f"{backend.port} 5 {how}\n")
            assert control.read_until(b"\n") == b"closed changed my mind\n"
        # Nothing else arrives: no onconnect, ondisconnect only once each.
        control.send(f"{backend.port} 5\n")
        assert control.read_until(b"\n") == b"connected\n"
    wait_for(lambda: server.log.count("out ondisconnect") == 3, what="three ondisconnects")
    assert server.log.count("out onconnect") == 1


# -- the proxy module -----------------------------------------------------------------------------


def _proxy(mpnet, target_port: int, **keys):
    text = config(["proxy"], workers=1, proxy_ports=[0], **keys)
    text += f'[proxy]\ntarget = "127.0.0.1:{target_port}"\nconnect_timeout = 2\n'
    server = mpnet(text)
    worker = wait_for(server.workers, what="the worker")[0]
    return server, server.port("proxy"), worker


def test_proxy_forwards_megabytes_both_ways_intact(mpnet):
    with Backend(echo) as backend:
        server, port, _ = _proxy(mpnet, backend.port)
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        try:
            payloads = [os.urandom(3 * 2**20) for _ in socks]
            senders = [
                threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
                for sock, payload in zip(socks, payloads, strict=True)
            ]
            for thread in senders:
                thread.start()
            for sock, payload in zip(socks, payloads, strict=True):
                expected = hashlib.sha256(payload).hexdigest()
                assert receive_digest(sock, len(payload)) == expected
            for thread in senders:
                thread.join(10)
        finally:
            for sock in socks:
                sock.close()
        wait_for(lambda: len(backend.accepted) == 3)
    assert backend.errors == []
    assert "Traceback" not in server.log


def test_proxy_download_then_backend_close_reaches_the_client(mpnet):
    def download(sock: socket.socket) -> None:
        for _ in range(8):
            sock.sendall(BLOCK)

    with Backend(download) as backend:
        _, port, _ = _proxy(mpnet, backend.port)
        with Client(port) as client:
            assert receive_digest(client.sock, 8 * len(BLOCK)) == pattern_digest(8)
            assert client.read_to_eof() == b""  # everything flushed, then closed


def test_proxy_upload(mpnet):
    def upload(sock: socket.socket) -> None:
        digest = receive_digest(sock, 8 * len(BLOCK))
        sock.sendall(digest.encode() + b"\n")

    with Backend(upload) as backend:
        _, port, _ = _proxy(mpnet, backend.port)
        with Client(port) as client:
            send_blocks(client.sock, 8, Progress())
            assert client.read_until(b"\n") == pattern_digest(8).encode() + b"\n"


def test_proxy_slow_client_keeps_memory_bounded(mpnet):
    """The backend sends 64 MB; the client does not read: the proxy pauses the backend side,
    the worker's memory stays flat, and everything arrives once the client reads."""
    progress = Progress()

    def download(sock: socket.socket) -> None:
        send_blocks(sock, 64, progress)

    with Backend(download) as backend:
        _, port, worker = _proxy(mpnet, backend.port)
        baseline = _rss(worker)
        with Client(port) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            wait_for(progress.stalled, what="the backend to stall")
            growth = _rss(worker) - baseline
            print(f"slow client: backend stalled after {progress.count / 2**20:.1f} MiB; "
                  f"worker RSS +{growth / 2**20:.1f} MiB")  # fmt: skip
            assert progress.count < 24 * 2**20
            assert growth < 16 * 2**20
            assert receive_digest(client.sock, 64 * len(BLOCK)) == pattern_digest(64)


def test_proxy_slow_backend_keeps_memory_bounded(mpnet):
    """The client sends 64 MB; the backend does not read for a while: the proxy pauses the
    client side; then the backend reads everything, intact."""
    reading = threading.Event()
    digests: list[str] = []

    def sink(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        reading.wait(30)
        digests.append(receive_digest(sock, 64 * len(BLOCK)))

    with Backend(sink) as backend:
        _, port, worker = _proxy(mpnet, backend.port)
        baseline = _rss(worker)
        progress = Progress()
        with Client(port) as client:
            sender = threading.Thread(
                target=send_blocks, args=(client.sock, 64, progress), daemon=True
            )
            sender.start()
            wait_for(progress.stalled, what="the client to stall")
            growth = _rss(worker) - baseline
            print(f"slow backend: client stalled after {progress.count / 2**20:.1f} MiB; "
                  f"worker RSS +{growth / 2**20:.1f} MiB")  # fmt: skip
            assert progress.count < 24 * 2**20
            assert growth < 16 * 2**20
            reading.set()
            sender.join(30)
            wait_for(lambda: digests, what="the backend to read everything", timeout=30)
    assert digests == [pattern_digest(64)]


def test_proxy_backend_down_closes_the_client_with_a_logged_reason(mpnet):
    target = free_port()  # nothing listens there
    server, port, _ = _proxy(mpnet, target)
    with Client(port) as client:
        client.send(b"anyone there?\n")
        assert client.read_to_eof() == b""
    server.wait_log(
        rf"\[proxy\] info: upstream 127\.0\.0\.1:{target} closed: connect to "
        rf"127\.0\.0\.1:{target} failed: Connection refused"
    )
    with Backend(echo) as backend:  # other connections are not affected
        _, port2, _ = _proxy(mpnet, backend.port)
        with Client(port2) as client:
            client.send(b"hello\n")
            assert client.read_until(b"\n") == b"hello\n"


def test_proxy_either_side_closing_closes_the_other(mpnet):
    closed = threading.Event()

    def until_eof(sock: socket.socket) -> None:
        while sock.recv(65536):
            pass
        closed.set()

    with Backend(until_eof) as backend:
        _, port, _ = _proxy(mpnet, backend.port)
        with Client(port) as client:
            client.send(b"bye\n")
            wait_for(lambda: backend.accepted, what="the upstream connection")
        assert closed.wait(10), "the backend never saw the client's close"

    def hang_up(sock: socket.socket) -> None:
        sock.recv(100)

    with Backend(hang_up) as backend:
        _, port, _ = _proxy(mpnet, backend.port)
        with Client(port) as client:
            client.send(b"hello\n")
            assert client.read_to_eof() == b""
