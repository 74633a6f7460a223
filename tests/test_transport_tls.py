"""TLS: direct-TLS providers, ``conn.starttls()``, certificates per service or global, reloads.

Peers are Python's ssl module and the real ``openssl s_client``; certificates are made with the
``openssl`` CLI (EC keys, fast) in the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop
from harness import (
    BioClient,
    Client,
    config,
    make_cert,
    ssl_table,
    tls_client,
    wait_for,
    worker_status,
)

from mpnet.workers.tls import ServerHandshake

pytestmark = pytest.mark.server

TLS_ECHO = """
class listener:
    def onconnect(conn):
        info = conn.ssl_info() or {}
        module.log("info", "onconnect %s ssl=%s %s", conn.id, conn.ssl(), info.get("version"))
        conn.write(f"hello ssl={conn.ssl()} {info.get('version')}\\n")
    def onincoming(conn, data):
        conn.write(data)
    def ondrain(conn):
        module.log("info", "ondrain %s buffered=%d", conn.id, conn.buffered())
    def ondisconnect(conn, err):
        module.log("info", "ondisconnect %s %s", conn.id, err)
module.provides("net", listener=listener, default_port=0, encryption="ssl")
"""

# A tiny SMTP-like dialogue, enough for `openssl s_client -starttls smtp` and for Python.
STARTTLS_MODULE = """
buffers = {}
class listener:
    def onconnect(conn):
        buffers[conn] = b""
        conn.write(f"220 mpnet ESMTP ssl={conn.ssl()}\\r\\n")
    def onincoming(conn, data):
        buffers[conn] += data
        while b"\\n" in buffers[conn]:
            line, _, buffers[conn] = buffers[conn].partition(b"\\n")
            line = line.rstrip(b"\\r")
            command = line.strip().upper()
            if command.startswith(b"EHLO"):
                conn.write("250-mpnet\\r\\n250 STARTTLS\\r\\n")
            elif command == b"STARTTLS":
                conn.write("220 2.0.0 Ready to start TLS\\r\\n")
                conn.starttls()
            elif command.startswith(b"FLOOD "):
                for _ in range(int(command.split()[1])):
                    conn.write(b"z" * 1048576)
                conn.write("\\r\\n")
                module.log("info", "flooded %s buffered=%d", conn.id, conn.buffered())
            else:
                info = conn.ssl_info() or {}
                conn.write(f"250 ssl={conn.ssl()} {info.get('version')} {line.decode()}\\r\\n")
    def ondrain(conn):
        module.log("info", "ondrain %s buffered=%d", conn.id, conn.buffered())
    def onstarttls(conn):
        # (the write-buffer limits are internal; logged to show ondrain means "empty" here too)
        limits = conn._transport.get_write_buffer_limits()
        module.log("info", "onstarttls %s ssl=%s limits=%s", conn.id, conn.ssl(), limits)
    def ondisconnect(conn, err):
        buffers.pop(conn, None)
        module.log("info", "ondisconnect %s %s", conn.id, err)
module.provides("net", listener=listener, default_port=0)
"""


def small_window_client(port: int) -> Client:
    """A Client whose receive buffer is small from the SYN on, so a server's writes to it
    queue up in mpnet rather than in the kernel."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    client = Client.__new__(Client)
    client.sock, client.buffer, client.timeout = sock, b"", 10.0
    return client


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


class SClient:
    """``openssl s_client`` as a child process, read with deadlines, stopped by PID."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["openssl", "s_client", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.output = b""

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"s_client never printed {marker!r}: {self.output!r}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"s_client exited before {marker!r}: {self.output!r}")
                self.output += chunk
        return self.output

    def wait(self, timeout: float = 10.0) -> int:
        assert self.proc.stdout is not None
        self.output += self.proc.stdout.read()
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path / "certs"
    directory.mkdir()
    return {"a": make_cert(directory, "a", "cert-a"), "b": make_cert(directory, "b", "cert-b")}


def _onconnects(server, module: str) -> int:
    return server.log.count(f"[{module}] info: onconnect ")


def test_direct_tls_with_python_client(mpnet, write_module, certs):
    cert, key = certs["a"]
    path = write_module("tlsecho", TLS_ECHO)
    text = config([str(path)], workers=1, tlsecho_ports=[0]) + f"ssl = {ssl_table(cert, key)}\n"
    server = mpnet(text)
    port = server.port("tlsecho")
    with tls_client(port, cert) as client:
        # onconnect ran after the handshake: it already saw the negotiated version.
        assert client.read_until(b"\n") == b"hello ssl=True TLSv1.3\n"
        assert client.sock.getpeercert(binary_form=True) == der(cert)
        client.send(b"x" * 100_000)
        assert client.read_exactly(100_000) == b"x" * 100_000
    server.wait_log(r"\[tlsecho\] info: ondisconnect w0\.c\d+ None")
    # TLS 1.2 is accepted as well.
    context = ssl.create_default_context(cafile=str(cert))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with tls_client(port, cert, context) as client:
        assert client.read_until(b"\n") == b"hello ssl=True TLSv1.2\n"


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_direct_tls_with_openssl_s_client(mpnet, write_module, certs, version):
    cert, key = certs["a"]
    path = write_module("tlsecho", TLS_ECHO)
    text = config([str(path)], workers=1, tlsecho_ports=[0])
    server = mpnet(text + f"tlsecho_ssl = {ssl_table(cert, key)}\n")
    port = server.port("tlsecho")
    client = SClient(
        "-connect", f"127.0.0.1:{port}", "-CAfile", str(cert), "-verify_return_error",
        "-servername", "localhost", "-quiet", version,
    )  # fmt: skip
    try:
        expected = {"-tls1_2": b"TLSv1.2", "-tls1_3": b"TLSv1.3"}[version]
        client.read_until(b"hello ssl=True " + expected + b"\n")
        client.send(b"ping from s_client\n")
        client.read_until(b"ping from s_client\n")
    finally:
        client.stop()
    server.wait_log(r"\[tlsecho\] info: ondisconnect w0\.c\d+")


def test_failed_handshakes_never_reach_the_module(mpnet, write_module, certs):
    cert, key = certs["a"]
    other_cert, _ = certs["b"]
    path = write_module("tlsecho", TLS_ECHO)
    text = config(
        [str(path)], workers=1, tlsecho_ports=[0], ssl_handshake_timeout=30,
        tlsecho_ssl_handshake_timeout=1,
    ) + f"ssl = {ssl_table(cert, key)}\n"  # fmt: skip
    server = mpnet(text)
    port = server.port("tlsecho")
    with tls_client(port, cert) as bystander:
        bystander.read_until(b"\n")
        # 1. plain text on a TLS port
        with Client(port) as plain:
            plain.send(b"GET / HTTP/1.0\r\n\r\n")
            assert b"HTTP" not in plain.read_to_eof()
        # 2. TLS 1.1 and 1.0 (refused: 1.2 is the minimum), from Python and from openssl
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        with pytest.warns(DeprecationWarning):
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_client(port, cert, old).read_until(b"\n")
        s_client = SClient(
            "-connect", f"127.0.0.1:{port}", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0",
        )  # fmt: skip
        try:
            s_client.proc.stdin.close()  # type: ignore[union-attr]
            assert s_client.wait() != 0
            assert b"hello" not in s_client.output
        finally:
            s_client.stop()
        # 3. a client that does not trust the certificate aborts the handshake
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_client(port, other_cert)
        # 4. a client that never finishes its ClientHello (ssl_handshake_timeout = 1)
        started = time.monotonic()
        with Client(port) as idle, Client(port) as partial:
            partial.send(b"\x16\x03\x01\x02\x00\x01\x00")  # the start of a ClientHello
            assert idle.read_to_eof(timeout=10) == b""
            assert partial.read_to_eof(timeout=10) == b""
        assert time.monotonic() - started < 5
        # The bystander never noticed; the module saw only the good connection.
        bystander.send(b"still fine\n")
        assert bystander.read_until(b"\n") == b"still fine\n"
    server.wait_log(r"\[tlsecho\] info: ondisconnect")
    assert _onconnects(server, "tlsecho") == 1
    assert server.log.count("[tlsecho] info: ondisconnect") == 1
    assert "Traceback" not in server.log


def test_failed_handshake_is_logged_at_debug_level(mpnet, write_module, certs):
    cert, key = certs["a"]
    path = write_module("tlsecho", TLS_ECHO)
    text = config([str(path)], workers=1, tlsecho_ports=[0], log_level="debug")
    server = mpnet(text + f"ssl = {ssl_table(cert, key)}\n")
    port = server.port("tlsecho")
    with Client(port) as plain:
        local_port = plain.sock.getsockname()[1]
        plain.send(b"GET / HTTP/1.0\r\n\r\n")
        plain.read_to_eof()
    server.wait_log(rf"worker 0 \[mpnet\] debug: .*handshake.*:{local_port}\b", timeout=2)
    wait_for(lambda: worker_status(server)[0]["tls_failures"] == 1, what="one TLS failure")


def test_handshake_timeouts_are_logged_and_cost_the_others_nothing(mpnet, write_module, certs):
    cert, key = certs["a"]
    path = write_module("tlsecho", TLS_ECHO)
    text = config(
        [str(path)], workers=1, tlsecho_ports=[0], log_level="debug",
        tlsecho_ssl_handshake_timeout=1,
    ) + f"ssl = {ssl_table(cert, key)}\n"  # fmt: skip
    server = mpnet(text)
    port = server.port("tlsecho")
    with tls_client(port, cert) as bystander:
        bystander.read_until(b"\n")
        with Client(port) as idle, Client(port) as partial:
            partial.send(b"\x16\x03\x01\x02\x00\x01\x00")  # the start of a ClientHello
            ports = [idle.sock.getsockname()[1], partial.sock.getsockname()[1]]
            assert idle.read_to_eof(timeout=10) == b""
            assert partial.read_to_eof(timeout=10) == b""
        for local_port in ports:
            server.wait_log(
                rf"worker 0 \[mpnet\] debug: service tlsecho: TLS handshake failed for "
                rf"connection from 127\.0\.0\.1:{local_port}: SSL handshake is taking longer"
            )
        bystander.send(b"still fine\n")
        assert bystander.read_until(b"\n") == b"still fine\n"
    assert _onconnects(server, "tlsecho") == 1


ORDERED = TLS_ECHO.replace(
    "        conn.write(data)\n",
    "        module.log('info', 'onincoming %s %r', conn.id, data)\n        conn.write(data)\n",
    1,
)


def test_data_and_close_right_after_the_handshake_keep_their_order(mpnet, write_module, certs):
    """Application data (and the close) may come from the TLS layer before mpnet has learnt
    that the handshake is done: they wait, so the module sees onconnect, then onincoming, then
    ondisconnect, once; and the connection is released (max_connections = 1)."""
    cert, key = certs["a"]
    path = write_module("tlsecho", ORDERED)
    text = config([str(path)], workers=1, tlsecho_ports=[0], max_connections=1)
    server = mpnet(text + f"ssl = {ssl_table(cert, key)}\n")
    port = server.port("tlsecho")
    for i in range(5):
        client = tls_client(port, cert)
        client.send(f"burst {i}\n".encode())
        client.close()
        server.wait_log(rf"\[tlsecho\] info: ondisconnect w0\.c{i + 1} ")
    lines = [line for line in server.log.splitlines() if "[tlsecho] info:" in line]
    for i in range(5):
        mine = [line.split(" info: ")[1].split()[0] for line in lines if f"w0.c{i + 1} " in line]
        assert mine[0] == "onconnect" and mine[-1] == "ondisconnect", mine
        assert mine.count("ondisconnect") == 1
        assert set(mine[1:-1]) <= {"onincoming"}
    # The client's Finished, data and close_notify in one segment, then FIN: the TLS layer
    # has the data before mpnet has learnt that the handshake is done.
    with Client(port) as raw:
        client = BioClient(raw.sock, cert)
        raw.send(client.client_hello())
        client.handshake(flush=False)
        client.tls.write(b"in the last flight\n")
        with contextlib.suppress(ssl.SSLWantReadError):
            client.tls.unwrap()
        raw.send(client.outgoing.read())
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.read_to_eof().startswith(b"\x17")  # (encrypted: the greeting and the echo)
    server.wait_log(r"\[tlsecho\] info: ondisconnect w0\.c6 ")
    mine = [line.split(" info: ")[1] for line in server.log.splitlines() if "w0.c6 " in line]
    assert [line.split()[0] for line in mine] == ["onconnect", "onincoming", "ondisconnect"]
    assert "b'in the last flight\\n'" in mine[1]
    with tls_client(port, cert) as last:
        assert last.read_until(b"\n") == b"hello ssl=True TLSv1.3\n"


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_server_handshake_takes_the_bytes_read_before_it(certs, loop_kind):
    """mpnet.workers.tls.ServerHandshake on its own, on both event loops: a protocol reads a prefix,
    then hands the bytes after it (the start of the ClientHello, same segment) to TLS."""
    cert, key = certs["a"]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()

    class Prefixed(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer, self.handshake, self.tls = transport, b"", None, None

        def data_received(self, data):
            if self.handshake is not None and self.handshake.early(data):
                return
            if self.tls is not None:
                self.tls.write(data.upper())
                return
            self.buffer += data
            if self.handshake is None and len(self.buffer) >= 6:
                self.handshake = ServerHandshake(self.transport, self, context, 10, self.buffer[6:])
                self.handshake.task.add_done_callback(self.ready)

        def ready(self, task):
            self.tls = task.result()
            self.tls.write(b"ready\n")

    started = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(loop.create_server(Prefixed, "127.0.0.1", 0))
        holder["server"] = server
        holder["port"] = server.sockets[0].getsockname()[1]
        started.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        with Client(holder["port"]) as raw:
            client = BioClient(raw.sock, cert)
            raw.send(b"HELLO\n" + client.client_hello())
            client.handshake()
            assert client.read_until(b"\n") == b"ready\n"
            client.send(b"ping\n")
            assert client.read_until(b"\n") == b"PING\n"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_starttls_with_python_client(mpnet, write_module, certs):
    cert, key = certs["a"]
    path = write_module("smtp", STARTTLS_MODULE)
    text = config([str(path)], workers=1, smtp_ports=[0])
    server = mpnet(text + f"smtp_ssl = {ssl_table(cert, key)}\n")
    with Client(server.port("smtp")) as client:
        assert client.read_until(b"\r\n") == b"220 mpnet ESMTP ssl=False\r\n"
        client.send(b"NOOP\r\n")
        assert client.read_until(b"\r\n") == b"250 ssl=False None NOOP\r\n"
        client.send(b"STARTTLS\r\n")
        assert client.read_until(b"\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
        assert client.buffer == b""
        context = ssl.create_default_context(cafile=str(cert))
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        assert client.sock.getpeercert(binary_form=True) == der(cert)
        client.send(b"after\r\n")
        assert client.read_until(b"\r\n") == b"250 ssl=True TLSv1.3 after\r\n"
        client.send(b"y" * 50_000 + b"\r\n")
        assert client.read_until(b"\r\n").endswith(b"y" * 50_000 + b"\r\n")
    server.wait_log(r"\[smtp\] info: onstarttls w0\.c\d+ ssl=True")
    server.wait_log(r"\[smtp\] info: ondisconnect w0\.c\d+ None")


def test_starttls_with_openssl_s_client(mpnet, write_module, certs):
    cert, key = certs["a"]
    path = write_module("smtp", STARTTLS_MODULE)
    text = config([str(path)], workers=1, smtp_ports=[0]) + f"ssl = {ssl_table(cert, key)}\n"
    server = mpnet(text)
    client = SClient(
        "-connect", f"127.0.0.1:{server.port('smtp')}", "-starttls", "smtp",
        "-CAfile", str(cert), "-verify_return_error", "-quiet", "-tls1_2",
    )  # fmt: skip
    try:
        client.send(b"PING\r\n")
        client.read_until(b"250 ssl=True TLSv1.2 PING")
    finally:
        client.stop()
    server.wait_log(r"\[smtp\] info: onstarttls w0\.c\d+ ssl=True")
    server.wait_log(r"\[smtp\] info: ondisconnect w0\.c\d+")


@pytest.mark.parametrize("peer", ["garbage", "silent", "hangup", "reset"])
def test_failed_starttls_handshake_closes_with_a_reason(mpnet, write_module, certs, peer):
    cert, key = certs["a"]
    path = write_module("smtp", STARTTLS_MODULE)
    text = config(
        [str(path)], workers=1, smtp_ports=[0], ssl_handshake_timeout=1, max_connections=1
    )
    server = mpnet(text + f"ssl = {ssl_table(cert, key)}\n")
    port = server.port("smtp")
    with Client(port) as client:
        client.read_until(b"\r\n")
        client.send(b"STARTTLS\r\n")
        client.read_until(b"\r\n")
        if peer == "garbage":
            client.send(b"this is not a ClientHello\r\n" * 10)
        elif peer in ("hangup", "reset"):
            client.send(b"\x16\x03\x01\x02\x00\x01\x00")  # the start of a ClientHello
            if peer == "reset":
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        if peer in ("garbage", "silent"):
            assert client.read_to_eof(timeout=10) == b""
    # The module hears of it once, with the reason (uvloop words a timeout its own way).
    reason = r"(TLS|SSL) handshake" if peer in ("garbage", "silent") else r"\S"
    server.wait_log(rf"\[smtp\] info: ondisconnect w0\.c1 {reason}")
    # The connection was released: max_connections = 1 lets the next one in.
    with Client(port) as client:
        assert client.read_until(b"\r\n") == b"220 mpnet ESMTP ssl=False\r\n"
    wait_for(lambda: server.log.count("[smtp] info: ondisconnect") == 2, what="2 disconnects")
    assert server.log.count("[smtp] info: ondisconnect w0.c1 ") == 1


def test_starttls_without_a_certificate_is_a_clear_callback_error(mpnet, write_module):
    path = write_module("smtp", STARTTLS_MODULE)
    server = mpnet(config([str(path)], workers=1, smtp_ports=[0]))
    with Client(server.port("smtp")) as client:
        client.read_until(b"\r\n")
        client.send(b"STARTTLS\r\n")
        client.read_until(b"\r\n")
        server.wait_log(r"starttls\(\) needs a certificate: set smtp_ssl or \[ssl\] in the config")
        client.send(b"NOOP\r\n")  # the connection lives on, still in plain text
        assert client.read_until(b"\r\n") == b"250 ssl=False None NOOP\r\n"


def test_certificate_per_service_overrides_the_global_one(mpnet, write_module, certs):
    (cert_a, key_a), (cert_b, key_b) = certs["a"], certs["b"]
    first = write_module("first", TLS_ECHO)
    second = write_module("second", TLS_ECHO)
    text = config([str(first), str(second)], workers=1, first_ports=[0], second_ports=[0])
    text += f"second_ssl = {ssl_table(cert_b, key_b)}\nssl = {ssl_table(cert_a, key_a)}\n"
    server = mpnet(text)
    with tls_client(server.port("first"), cert_a) as client:
        assert client.sock.getpeercert(binary_form=True) == der(cert_a)
        client.read_until(b"\n")
    with tls_client(server.port("second"), cert_b) as client:
        assert client.sock.getpeercert(binary_form=True) == der(cert_b)
        client.read_until(b"\n")


def test_direct_tls_without_a_certificate_fails_the_start(mpnet, write_module):
    path = write_module("tlsecho", TLS_ECHO)
    server = mpnet(config([str(path)], workers=1, tlsecho_ports=[0]), start=False)
    server.start(wait_ready=False)
    assert server.wait_exit() != 0
    assert "tlsecho_ssl" in server.log
    assert "Traceback" not in server.log


def test_reload_picks_up_a_renewed_certificate(mpnet, write_module, certs, tmp_path):
    (cert_a, key_a), (cert_b, key_b) = certs["a"], certs["b"]
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(cert_a.read_bytes())
    live_key.write_bytes(key_a.read_bytes())
    path = write_module("tlsecho", TLS_ECHO)
    text = config([str(path)], workers=1, tlsecho_ports=[0], graceful_timeout=10)
    server = mpnet(text + f"ssl = {ssl_table(live_cert, live_key)}\n")
    port = server.port("tlsecho")
    trust_both = ssl.create_default_context(cafile=str(cert_a))
    trust_both.load_verify_locations(cafile=str(cert_b))
    old = tls_client(port, cert_a, trust_both)
    try:
        old.read_until(b"\n")
        assert old.sock.getpeercert(binary_form=True) == der(cert_a)
        # The certificate is renewed on disk, then mpnet is told to reload.
        live_cert.write_bytes(cert_b.read_bytes())
        live_key.write_bytes(key_b.read_bytes())
        server.signal(signal.SIGHUP)
        server.wait_log(r"reload complete: generation 2")
        # "reload complete" is logged once the old worker was *told* to drain; wait until it
        # has closed its listening sockets (it logs this right after), see the report.
        server.wait_log(r"worker 0 \[mpnet\] info: stopping: waiting up to")
        with tls_client(port, cert_b, trust_both) as new:
            assert new.sock.getpeercert(binary_form=True) == der(cert_b)
            assert new.read_until(b"\n") == b"hello ssl=True TLSv1.3\n"
        # The connection made before the reload keeps its session (its worker drains).
        old.send(b"still here\n")
        assert old.read_until(b"\n") == b"still here\n"
    finally:
        old.close()


def test_plain_connection_reports_no_tls(mpnet, write_module):
    path = write_module("smtp", STARTTLS_MODULE)
    server = mpnet(config([str(path)], workers=1, smtp_ports=[0]))
    with Client(server.port("smtp")) as client:
        assert client.read_until(b"\r\n") == b"220 mpnet ESMTP ssl=False\r\n"
        client.send(b"x\r\n")
        assert client.read_until(b"\r\n") == b"250 ssl=False None x\r\n"


def test_backpressure_and_ondrain_after_starttls(mpnet, write_module, certs):
    """After the upgrade the same rules hold: past the high-water mark the module's writes
    wait in a bounded queue and ondrain fires when it is empty."""
    cert, key = certs["a"]
    path = write_module("smtp", STARTTLS_MODULE)
    text = config([str(path)], workers=1, smtp_ports=[0])
    server = mpnet(text + f"smtp_ssl = {ssl_table(cert, key)}\n")
    with small_window_client(server.port("smtp")) as client:
        client.read_until(b"\r\n")
        client.send(b"STARTTLS\r\n")
        client.read_until(b"\r\n")
        context = ssl.create_default_context(cafile=str(cert))
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        client.send(b"FLOOD 4\r\n")
        assert int(server.wait_log(r"flooded w0\.c1 buffered=(\d+)").group(1)) > 0
        data = client.read_until(b"\r\n", timeout=20)
        assert len(data) == 4 * 1048576 + 2
    server.wait_log(r"\[smtp\] info: ondrain w0\.c1 buffered=0")
    server.wait_log(r"onstarttls w0\.c1 ssl=True limits=\(0, 65536\)")
    assert not [line for line in server.log.splitlines() if "ondrain" in line and "=0" not in line]


def test_backpressure_and_ondrain_on_direct_tls(mpnet, write_module, certs):
    cert, key = certs["a"]
    source = TLS_ECHO.replace(
        "        conn.write(data)\n",
        "        for _ in range(4):\n"
        "            conn.write(b'z' * 1048576)\n"
        "        module.log('info', 'flooded %s buffered=%d', conn.id, conn.buffered())\n",
        1,
    )
    path = write_module("tlsecho", source)
    text = config([str(path)], workers=1, tlsecho_ports=[0]) + f"ssl = {ssl_table(cert, key)}\n"
    server = mpnet(text)
    context = ssl.create_default_context(cafile=str(cert))
    with small_window_client(server.port("tlsecho")) as client:
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        client.read_until(b"\n")
        client.send(b"go")
        assert int(server.wait_log(r"flooded w0\.c1 buffered=(\d+)").group(1)) > 0
        assert client.read_exactly(4 * 1048576, timeout=20) == b"z" * 4 * 1048576
    server.wait_log(r"\[tlsecho\] info: ondrain w0\.c1 buffered=0")
    assert not [line for line in server.log.splitlines() if "ondrain" in line and "=0" not in line]
