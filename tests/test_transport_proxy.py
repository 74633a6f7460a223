"""PROXY protocol (``<service>_proxy_protocol = true``): hand-made headers and a real HAProxy.

The parser itself is tested byte by byte in test_proxyproto.py; here the headers travel over
real sockets into a worker, and HAProxy (Debian's ``haproxy``) sits in front with
``send-proxy-v2`` / ``send-proxy``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from harness import BioClient, Client, config, free_port, wait_for

from mpnet.pure.proxyproto import build_v1, build_v2

pytestmark = pytest.mark.server

WHOIS = """
class listener:
    def onconnect(conn):
        module.log("info", "onconnect %s %s:%s via %s", conn.id, conn.ip(), conn.port(),
                   conn.proxy())
        conn.write(f"{conn.ip()} {conn.port()} {conn.proxy()}\\n")
    def onincoming(conn, data):
        conn.write(data)
    def ondisconnect(conn, err):
        module.log("info", "ondisconnect %s %s", conn.id, err)
module.provides("net", listener=listener, default_port=0)
"""


@pytest.fixture
def whois(mpnet, write_module):
    """A server whose ``whois`` service requires PROXY headers; ``plain`` does not."""
    proxied = write_module("whois", WHOIS)
    plain = write_module("plain", WHOIS)

    def start(extra: str = "", **keys):
        keys = {
            "workers": 1,
            "whois_ports": [0],
            "plain_ports": [0],
            "whois_proxy_protocol": True,
            **keys,
        }
        return mpnet(config([str(proxied), str(plain)], **keys) + extra)

    return start


def _answer(client: Client) -> tuple[str, int, str]:
    ip, port, proxy = client.read_until(b"\n").decode().rstrip("\n").split(" ", 2)
    return ip, int(port), proxy


def test_v1_header_gives_the_original_client(whois):
    server = whois()
    with Client(server.port("whois")) as client:
        local = client.sock.getsockname()
        # The header and the first application bytes in one packet.
        client.send(build_v1(("203.0.113.7", 4444), ("127.0.0.1", 80)) + b"first bytes\n")
        assert _answer(client) == ("203.0.113.7", 4444, repr(local))
        assert client.read_until(b"\n") == b"first bytes\n"
    server.wait_log(r"\[whois\] info: onconnect w0\.c\d+ 203\.0\.113\.7:4444 via \('127\.0\.0\.1'")


def test_v2_header_fed_byte_by_byte(whois):
    server = whois()
    header = build_v2(("2001:db8::1", 40000), ("2001:db8::2", 443), tlvs=[(0x05, b"id-1")])
    with Client(server.port("whois")) as client:
        for byte in header:
            client.send(bytes([byte]))
        assert _answer(client) == ("2001:db8::1", 40000, repr(client.sock.getsockname()))
        client.send(b"after\n")
        assert client.read_until(b"\n") == b"after\n"


def test_v2_local_header_keeps_the_real_peer(whois):
    server = whois()
    with Client(server.port("whois")) as client:
        client.send(build_v2(command="LOCAL"))
        local = client.sock.getsockname()
        assert _answer(client) == (local[0], local[1], repr(local))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "malformed PROXY header"),
        (b"PROXY TCP4 999.0.0.1 127.0.0.1 1 2\r\n", "malformed PROXY header"),
        (b"PROXY TCP4 " + b"1" * 200, "malformed PROXY header"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + b"\x00" * 12, "malformed PROXY header"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", "malformed PROXY header"),
    ],
    ids=["http", "bad-ip", "v1-too-long", "v2-bad-version", "v2-too-long"],
)
def test_missing_or_malformed_header_closes_with_a_logged_reason(whois, data, reason):
    server = whois()
    port = server.port("whois")
    with Client(port) as bystander:
        bystander.send(build_v1(("198.51.100.1", 1000), ("127.0.0.1", 80)))
        _answer(bystander)
        with Client(port) as bad:
            peer = bad.sock.getsockname()
            bad.send(data)
            assert bad.read_to_eof() == b""
        server.wait_log(rf"\[whois\] info: service whois: closing connection from "
                        rf"\('127\.0\.0\.1', {peer[1]}\): {reason}")  # fmt: skip
        bystander.send(b"unharmed\n")
        assert bystander.read_until(b"\n") == b"unharmed\n"
    # The module never saw the bad connection.
    wait_for(lambda: "ondisconnect" in server.log)
    assert server.log.count("[whois] info: onconnect") == 1
    assert "Traceback" not in server.log


def test_header_that_never_completes_is_closed_in_time(whois):
    server = whois(ssl_handshake_timeout=1)
    port = server.port("whois")
    started = time.monotonic()
    with Client(port) as silent, Client(port) as partial:
        partial.send(b"PROXY TCP4 192.0.2.1 ")
        assert silent.read_to_eof(timeout=10) == b""
        assert partial.read_to_eof(timeout=10) == b""
    assert time.monotonic() - started < 5
    server.wait_log(r"closing connection from .*: no PROXY header in time", count=2)
    assert "[whois] info: onconnect" not in server.log


def test_services_without_proxy_protocol_are_unaffected(whois):
    server = whois()
    with Client(server.port("plain")) as client:
        local = client.sock.getsockname()
        assert _answer(client) == (local[0], local[1], "None")
        client.send(build_v1(("203.0.113.7", 1), ("127.0.0.1", 2)))  # just data here
        assert client.read_until(b"\r\n").startswith(b"PROXY TCP4")


def test_per_ip_limit_counts_the_original_client(whois):
    server = whois('limit_message = "too many from you\\n"\n', whois_max_connections_per_ip=1)
    port = server.port("whois")
    first_header = build_v1(("203.0.113.7", 1), ("127.0.0.1", 80))
    with Client(port) as first, Client(port) as second, Client(port) as other:
        first.send(first_header)
        assert _answer(first)[0] == "203.0.113.7"
        second.send(build_v1(("203.0.113.7", 2), ("127.0.0.1", 80)))
        assert second.read_to_eof() == b"too many from you\n"
        other.send(build_v1(("203.0.113.8", 3), ("127.0.0.1", 80)))
        assert _answer(other)[0] == "203.0.113.8"
    server.wait_log(r"refused 1 connection\(s\).*max_connections_per_ip \(1\) .* 203\.0\.113\.7")


HAPROXY_CFG = """\
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{front}
    default_backend back
backend back
    server mpnet 127.0.0.1:{back} {option}
"""


@contextlib.contextmanager
def haproxy(directory: Path, back: int, option: str):
    """A real HAProxy in the foreground (-db) in front of port *back*; stopped by PID."""
    front = free_port()
    cfg = directory / f"haproxy-{front}.cfg"
    cfg.write_text(HAPROXY_CFG.format(front=front, back=back, option=option))
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(cfg)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def listening() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            try:
                conns = psutil.Process(proc.pid).net_connections("tcp")
            except psutil.NoSuchProcess:
                return False
            return any(c.status == psutil.CONN_LISTEN and c.laddr.port == front for c in conns)

        wait_for(listening, what="haproxy to listen")
        yield front
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("option", ["send-proxy-v2", "send-proxy"])
def test_behind_a_real_haproxy(whois, tmp_path, option):
    server = whois()
    with haproxy(tmp_path, server.port("whois"), option) as front:
        clients = [Client(front) for _ in range(3)]
        try:
            for client in clients:
                ip, port, proxy = _answer(client)
                # The module sees the original client (this very socket), not HAProxy.
                assert (ip, port) == client.sock.getsockname()
                haproxy_ip, haproxy_port = eval(proxy)  # a repr'd tuple from our module
                assert haproxy_ip == "127.0.0.1"
                assert haproxy_port != port
            payload = os.urandom(300_000)
            clients[0].send(payload)
            assert clients[0].read_exactly(len(payload)) == payload
        finally:
            for client in clients:
                client.close()
        # A client that bypasses HAProxy sends no header and is turned away.
        with Client(server.port("whois")) as direct:
            direct.send(b"hello\n")
            assert direct.read_to_eof() == b""
        server.wait_log(r"closing connection from .*: malformed PROXY header")
    server.wait_log(r"\[whois\] info: ondisconnect", count=3)


TLS_WHOIS = WHOIS.replace("default_port=0)", 'default_port=0, encryption="ssl")')


@pytest.fixture
def tls_whois(mpnet, write_module, tmp_path):
    """``start(**keys)`` -> (server, certificate): a direct-TLS ``whois`` that requires PROXY
    headers (the certificate is self-signed for localhost)."""
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-nodes"),
            *("-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=x"),
            *("-addext", "subjectAltName=DNS:localhost"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    path = write_module("whois", TLS_WHOIS)

    def start(**keys):
        keys = {"workers": 1, "whois_ports": [0], "whois_proxy_protocol": True, **keys}
        text = config([str(path)], **keys)
        return mpnet(text + f'ssl = {{ certificate = "{cert}", key = "{key}" }}\n'), cert

    return start


def test_proxy_protocol_in_front_of_direct_tls(tls_whois):
    server, cert = tls_whois()
    with Client(server.port("whois")) as client:
        client.send(build_v2(("203.0.113.9", 5555), ("127.0.0.1", 443)))
        context = ssl.create_default_context(cafile=str(cert))
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        assert _answer(client)[:2] == ("203.0.113.9", 5555)
        client.send(b"over tls\n")
        assert client.read_until(b"\n") == b"over tls\n"
    server.wait_log(r"\[whois\] info: onconnect w0\.c\d+ 203\.0\.113\.9:5555 via \('127\.0\.0\.1'")


@pytest.mark.parametrize("build", [build_v1, build_v2], ids=["v1", "v2"])
def test_proxy_header_and_client_hello_in_one_segment(tls_whois, build):
    """The bytes after the header in the same read are the start of the TLS handshake: they
    must reach the TLS layer (else the handshake waits for a ClientHello already consumed)."""
    server, cert = tls_whois()
    with Client(server.port("whois")) as raw:
        client = BioClient(raw.sock, cert)
        raw.send(build(("198.51.100.20", 6000), ("127.0.0.1", 443)) + client.client_hello())
        client.handshake()
        assert client.tls.version() in ("TLSv1.2", "TLSv1.3")
        ip, port, proxy = client.read_until(b"\n").decode().rstrip("\n").split(" ", 2)
        assert (ip, int(port)) == ("198.51.100.20", 6000)
        assert proxy == repr(raw.sock.getsockname())
        client.send(b"after the handshake\n")
        assert client.read_until(b"\n") == b"after the handshake\n"


def test_tls_behind_a_real_haproxy(tls_whois, tmp_path):
    """HAProxy in TCP mode writes the header, then forwards the client's ClientHello as soon
    as it has it: often in the same segment."""
    server, cert = tls_whois()
    with haproxy(tmp_path, server.port("whois"), "send-proxy-v2") as front:
        context = ssl.create_default_context(cafile=str(cert))
        for _ in range(3):
            with Client(front) as client:
                client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
                ip, port, _proxy = _answer(client)
                assert (ip, port) == client.sock.getsockname()
                payload = os.urandom(100_000)
                client.send(payload)
                assert client.read_exactly(len(payload)) == payload
    server.wait_log(r"\[whois\] info: ondisconnect", count=3)


def test_failed_handshake_after_the_header_is_logged_with_the_client(tls_whois):
    server, cert = tls_whois(log_level="debug", ssl_handshake_timeout=2)
    port = server.port("whois")
    started = time.monotonic()
    with Client(port) as plain, Client(port) as silent:
        plain.send(build_v1(("192.0.2.70", 7070), ("127.0.0.1", 443)) + b"GET / HTTP/1.0\r\n\r\n")
        assert plain.read_to_eof() == b""
        silent.send(build_v1(("192.0.2.71", 7171), ("127.0.0.1", 443)))  # then no ClientHello
        assert silent.read_to_eof(timeout=10) == b""
    # The header and the handshake share one deadline.
    assert time.monotonic() - started < 6
    server.wait_log(r"debug: service whois: TLS handshake failed for connection from "
                    r"192\.0\.2\.70:7070: .*")  # fmt: skip
    server.wait_log(r"debug: service whois: TLS handshake failed for connection from "
                    r"192\.0\.2\.71:7171: .*taking longer than")  # fmt: skip
    with Client(port) as good:
        good.send(build_v2(("192.0.2.72", 7272), ("127.0.0.1", 443)))
        context = ssl.create_default_context(cafile=str(cert))
        good.sock = context.wrap_socket(good.sock, server_hostname="localhost")
        assert _answer(good)[:2] == ("192.0.2.72", 7272)
    server.wait_log(r"\[whois\] info: onconnect w0\.c\d+ 192\.0\.2\.72:7272")
    assert server.log.count("[whois] info: onconnect") == 1
    assert "Traceback" not in server.log


class ClientFrom(Client):
    """A Client whose connection leaves from *source* (any 127.x address is loopback)."""

    def __init__(self, port: int, source: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.buffer = b""
        self.timeout = timeout


def test_only_trusted_proxies_may_send_a_header(whois, tmp_path):
    server = whois(whois_proxy_trusted=["127.0.0.1/32"])
    port = server.port("whois")
    with haproxy(tmp_path, port, "send-proxy-v2") as front:
        with Client(front) as via_haproxy:  # HAProxy connects from 127.0.0.1: trusted
            assert _answer(via_haproxy)[:2] == via_haproxy.sock.getsockname()
        for _ in range(3):  # from 127.0.0.2, with a header claiming any client: refused
            with ClientFrom(port, "127.0.0.2") as spoofer:
                spoofer.send(build_v1(("203.0.113.7", 1), ("127.0.0.1", 80)) + b"hi\n")
                assert spoofer.read_to_eof() == b""
        server.wait_log(
            r"service whois refused 1 connection\(s\) since the last report from addresses "
            r"outside whois_proxy_trusted \(latest: \('127\.0\.0\.2', \d+\)\)"
        )
        with Client(front) as after:  # the trusted path is unharmed
            assert _answer(after)[:2] == after.sock.getsockname()
    server.wait_log(r"\[whois\] info: onconnect", count=2)  # the log comes a moment later
    assert server.log.count("refused") == 1  # rate-limited: one line for the burst
    assert server.log.count("[whois] info: onconnect") == 2  # the module saw only HAProxy's


def test_datagram_header_is_refused_on_a_tcp_listener(whois):
    server = whois()
    with Client(server.port("whois")) as client:
        client.send(build_v2(("203.0.113.7", 53), ("127.0.0.1", 53), transport="DGRAM"))
        assert client.read_to_eof() == b""
    server.wait_log(r"closing connection from .*: PROXY header for a datagram connection \(UDP4\)")
    assert "[whois] info: onconnect" not in server.log


@pytest.mark.parametrize("build", [build_v1, build_v2])
def test_ipv4_mapped_client_is_shown_as_ipv4(whois, build):
    server = whois()
    with Client(server.port("whois")) as client:
        client.send(build(("::ffff:203.0.113.7", 4444), ("::1", 80)))
        assert _answer(client)[:2] == ("203.0.113.7", 4444)
