"""Several services on one port (Prosody's mod_net_multiplex): by the first bytes on the
``multiplex`` service's ports, by TLS ALPN on the ``multiplex_ssl`` service's ports."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from harness import Client, config

pytestmark = pytest.mark.server

SERVICE = """
class listener:
    def onconnect(conn):
        info = conn.ssl_info() or {{}}
        module.log("info", "onconnect %s ssl=%s alpn=%s", conn.id, conn.ssl(), info.get("alpn"))
    def onincoming(conn, data):
        info = conn.ssl_info() or {{}}
        conn.write(b"{name}[ssl=%s alpn=%s]:" % (str(conn.ssl()).encode(),
                                                  str(info.get("alpn")).encode()) + data)
    def ondisconnect(conn, err):
        module.log("info", "ondisconnect %s %s", conn.id, err)
module.provides("net", listener=listener, default_port=0,
                multiplex={{"pattern": rb"^{word} ", "protocol": "{name}/1"}})
"""


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "mux.pem", directory / "mux.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-nodes"),
            *("-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=mux"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_cert(tmp_path)


@pytest.fixture
def muxed(mpnet, write_module, cert):
    """alpha (``ALPHA ...``, ALPN alpha/1) and beta (``BETA ...``, ALPN beta/1), each on its
    own port and both on the multiplex and multiplex_ssl ports."""
    alpha = write_module("alpha", SERVICE.format(name="alpha", word="ALPHA"))
    beta = write_module("beta", SERVICE.format(name="beta", word="BETA"))

    def start(**keys):
        keys = {
            "workers": 1,
            "alpha_ports": [0],
            "beta_ports": [0],
            "multiplex_ports": [0],
            "multiplex_ssl_ports": [0],
            **keys,
        }
        text = config([str(alpha), str(beta)], **keys)
        return mpnet(text + f'ssl = {{ certificate = "{cert[0]}", key = "{cert[1]}" }}\n')

    return start


def _tls(port: int, cafile: Path, alpn: list[str] | None = None) -> Client:
    context = ssl.create_default_context(cafile=str(cafile))
    if alpn:
        context.set_alpn_protocols(alpn)
    client = Client(port)
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    return client


def test_first_bytes_choose_the_service(muxed):
    server = muxed()
    port = server.port("multiplex")
    with Client(port) as a, Client(port) as b, Client(server.port("alpha")) as direct:
        a.send(b"ALPHA hello\n")
        assert a.read_until(b"\n") == b"alpha[ssl=False alpn=None]:ALPHA hello\n"
        for byte in b"BET":  # not enough to choose: the bytes wait...
            b.send(bytes([byte]))
        b.send(b"A split\n")  # ...and reach beta with the rest, in order
        assert b.read_until(b"\n") == b"beta[ssl=False alpn=None]:BETA split\n"
        a.send(b"more\n")
        assert a.read_until(b"\n") == b"alpha[ssl=False alpn=None]:more\n"
        direct.send(b"anything\n")  # the service's own port still works
        assert direct.read_until(b"\n") == b"alpha[ssl=False alpn=None]:anything\n"
    server.wait_log(r"\[alpha\] info: ondisconnect", count=2)
    server.wait_log(r"\[beta\] info: ondisconnect")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"X" * 5000, r"no multiplexed service matches the first 5000 bytes"),
        (b"", r"no data matching a multiplexed service in time"),
        (b"ALPH", r"no data matching a multiplexed service in time"),
    ],
    ids=["junk", "silent", "almost"],
)
def test_unmatched_connections_are_closed_with_a_reason(muxed, data, reason):
    server = muxed(multiplex_ssl_handshake_timeout=1)
    port = server.port("multiplex")
    with Client(port) as bystander:
        bystander.send(b"BETA hi\n")
        bystander.read_until(b"\n")
        started = time.monotonic()
        with Client(port) as stranger:
            stranger.send(data)
            assert stranger.read_to_eof(timeout=10) == b""
        assert time.monotonic() - started < 5
        server.wait_log(rf"\[mpnet\] info: service multiplex: closing connection from .*: {reason}")
        bystander.send(b"unharmed\n")
        assert bystander.read_until(b"\n") == b"beta[ssl=False alpn=None]:unharmed\n"
    assert server.log.count("info: onconnect") == 1


def test_alpn_chooses_the_service_on_the_tls_port(muxed, cert):
    server = muxed()
    port = server.port("multiplex_ssl")
    with _tls(port, cert[0], ["beta/1"]) as b, _tls(port, cert[0], ["alpha/1", "h2"]) as a:
        assert b.sock.selected_alpn_protocol() == "beta/1"
        b.send(b"no prefix needed\n")
        assert b.read_until(b"\n") == b"beta[ssl=True alpn=beta/1]:no prefix needed\n"
        a.send(b"x\n")
        assert a.read_until(b"\n") == b"alpha[ssl=True alpn=alpha/1]:x\n"
    server.wait_log(r"\[beta\] info: onconnect w0\.c\d+ ssl=True alpn=beta/1")


def test_tls_without_alpn_falls_back_to_the_first_bytes(muxed, cert):
    server = muxed()
    port = server.port("multiplex_ssl")
    with _tls(port, cert[0]) as none, _tls(port, cert[0], ["gamma/1"]) as unknown:
        none.send(b"ALPHA via pattern\n")
        assert none.read_until(b"\n") == b"alpha[ssl=True alpn=None]:ALPHA via pattern\n"
        unknown.send(b"BETA via pattern\n")
        assert unknown.read_until(b"\n") == b"beta[ssl=True alpn=None]:BETA via pattern\n"


def test_alpn_with_openssl_s_client(muxed, cert):
    server = muxed()
    proc = subprocess.Popen(
        [
            *("openssl", "s_client", "-connect", f"127.0.0.1:{server.port('multiplex_ssl')}"),
            *("-CAfile", str(cert[0]), "-verify_return_error", "-alpn", "alpha/1", "-quiet"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"from openssl\n")
        proc.stdin.flush()
        output, deadline = b"", time.monotonic() + 10
        while b"from openssl\n" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
            if ready and not chunk:
                break
            output += chunk
        assert output == b"alpha[ssl=True alpn=alpha/1]:from openssl\n"
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]


def test_limits_of_the_chosen_service_apply(muxed):
    server = muxed(alpha_max_connections_per_ip=1)
    port = server.port("multiplex")
    with Client(port) as first, Client(port) as second, Client(port) as other:
        first.send(b"ALPHA 1\n")
        assert first.read_until(b"\n") == b"alpha[ssl=False alpn=None]:ALPHA 1\n"
        second.send(b"ALPHA 2\n")
        assert second.read_to_eof() == b""
        other.send(b"BETA 3\n")
        assert other.read_until(b"\n") == b"beta[ssl=False alpn=None]:BETA 3\n"
    server.wait_log(r"service alpha refused 1 connection\(s\).*max_connections_per_ip")


def test_read_timeout_of_the_chosen_service_applies(muxed):
    server = muxed(alpha_read_timeout=1)
    with Client(server.port("multiplex")) as client:
        client.send(b"ALPHA hi\n")
        client.read_until(b"\n")
        assert client.read_to_eof(timeout=5) == b""
    server.wait_log(r"\[alpha\] info: ondisconnect w0\.c\d+ read timeout")


def test_failed_handshake_on_the_tls_port_is_logged_and_harmless(muxed, cert):
    server = muxed(log_level="debug", multiplex_ssl_ssl_handshake_timeout=1)
    port = server.port("multiplex_ssl")
    with _tls(port, cert[0], ["alpha/1"]) as bystander:
        with Client(port) as plain, Client(port) as silent:
            plain_port = plain.sock.getsockname()[1]
            silent_port = silent.sock.getsockname()[1]
            plain.send(b"ALPHA in the clear\n")
            assert plain.read_to_eof() == b""
            assert silent.read_to_eof(timeout=10) == b""
        server.wait_log(r"debug: service multiplex_ssl: TLS handshake failed for connection "
                        rf"from \('127\.0\.0\.1', {plain_port}\): ")  # fmt: skip
        server.wait_log(r"debug: service multiplex_ssl: TLS handshake failed for connection "
                        rf"from \('127\.0\.0\.1', {silent_port}\): .*taking longer")  # fmt: skip
        bystander.send(b"unharmed\n")
        assert bystander.read_until(b"\n") == b"alpha[ssl=True alpn=alpha/1]:unharmed\n"
    assert server.log.count("info: onconnect") == 1
    assert "no data matching" not in server.log  # the handshake timed out, not the sniffing
