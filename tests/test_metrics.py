"""The metrics endpoint of a real ``mpnet serve``: scrapes over HTTP parsed with
prometheus_client's parsers (and promtool when installed), exact counts after traffic, counters
that survive kill -9, reloads and TTIN/TTOU, and an endpoint no scraper can stall."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Client, Server, config, run_mpnet, wait_for
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from mpnet.metricsserver import CLIENT_TIMEOUT, MAX_CLIENTS

pytestmark = pytest.mark.server  # every test here runs mpnet

COUNTING_MODULE = """\
import os, time

hits = module.shared("hits")
class listener:
    def onconnect(conn):
        conn.write(f"{os.getpid()}\\n")
    async def onincoming(conn, data):
        if data.startswith(b"boom"):
            raise ValueError("boom on purpose")
        if data.startswith(b"block"):
            time.sleep(600)
        await hits.incr("n")
        conn.write(data)
module.provides("net", listener=listener, default_port=0)
"""

Figures = dict[str, dict[tuple[tuple[str, str], ...], float]]


def http(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send *request* raw and read the whole answer (the endpoint closes after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def scrape_raw(port: int, accept: str = "") -> tuple[str, str]:
    """GET /metrics: (content type, body)."""
    extra = f"Accept: {accept}\r\n" if accept else ""
    answer = http(port, f"GET /metrics HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK", answer[:200]
    content_type = next(line.split(": ", 1)[1] for line in lines if line.startswith("Content-Type"))
    return content_type, body.decode()


def scrape(port: int) -> Figures:
    """Every sample of a scrape, parsed by prometheus_client: name -> sorted labels -> value."""
    _, body = scrape_raw(port)
    figures: Figures = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            figures.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return figures


def value(figures: Figures, name: str, **labels: str) -> float:
    return figures.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def metrics_port(server: Server) -> int:
    return int(server.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    servers: list[Server] = []

    def start(workers: int = 2, **keys: object) -> Server:
        (tmp_path / "counting.py").write_text(COUNTING_MODULE)
        keys.setdefault("metrics_listen", "127.0.0.1:0")
        text = config(["./counting.py"], workers=workers, counting_ports=[0], **keys)
        server = Server(tmp_path, text)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


class Traffic:
    """Connections and bytes sent through the service, every byte accounted for."""

    def __init__(self) -> None:
        self.connections = self.lines = self.to_server = self.to_client = 0
        self.pids: set[int] = set()

    def run(self, port: int, connections: int) -> None:
        for i in range(connections):
            with Client(port) as client:
                greeting = client.read_until(b"\n")
                self.connections += 1
                self.pids.add(int(greeting))
                self.to_client += len(greeting)
                for j in range(1 + i % 3):
                    line = f"line {i}.{j} {'x' * (i * 7 % 50)}\n".encode()
                    client.send(line)
                    self.to_client += len(client.read_until(line))
                    self.to_server += len(line)
                    self.lines += 1

    def greeted(self, client: Client) -> Client:
        """*client* once its greeting arrived (counted)."""
        self.connections += 1
        self.to_client += len(client.read_until(b"\n"))
        return client


def test_a_scrape_gives_exact_counts_after_traffic_through_two_workers(serve) -> None:
    server = serve(workers=2)
    port, mport = server.port("counting"), metrics_port(server)
    done = Traffic()
    deadline = time.monotonic() + 60
    while len(done.pids) < 2:  # SO_REUSEPORT spreads connections: until both workers had some
        assert time.monotonic() < deadline, "every connection went to one worker"
        done.run(port, 20)
    with done.greeted(Client(port)) as failing:  # two callback errors
        for n, line in enumerate((b"boom\n", b"boom again\n"), 1):
            failing.send(line)
            done.to_server += len(line)
            wait_for(lambda n=n: server.log.count("boom on purpose") >= n, what="the error")
    hold = done.greeted(Client(port))  # stays open for the gauge
    try:

        def exact() -> Figures | None:
            figures = scrape(mport)
            accepted = value(figures, "mpnet_connections_accepted_total", service="counting")
            sent = value(figures, "mpnet_sent_bytes_total", service="counting")
            open_now = value(figures, "mpnet_connections_open", service="counting")
            if (accepted, sent, open_now) != (done.connections, done.to_client, 1):
                return None
            return figures

        figures = wait_for(exact, what="the scrape to show every connection and byte")
    finally:
        hold.close()
    assert value(figures, "mpnet_received_bytes_total", service="counting") == done.to_server
    callback = {"service": "counting", "callback": "onincoming"}
    assert value(figures, "mpnet_callback_errors_total", **callback) == 2
    assert value(figures, "mpnet_shared_operations_total", op="incr") == done.lines
    assert value(figures, "mpnet_workers", state="ready") == 2
    assert value(figures, "mpnet_worker_resident_memory_bytes", slot="0") > 1_000_000
    assert value(figures, "mpnet_worker_cpu_seconds_total", slot="1") > 0
    assert (("slot", "0"),) in figures["mpnet_event_loop_lag_seconds"]
    assert "mpnet_callback_duration_seconds_count" not in figures  # opt-in


def test_counters_never_go_backwards_across_kill_9_reload_and_ttin_ttou(serve) -> None:
    server = serve(workers=2)
    port, mport = server.port("counting"), metrics_port(server)
    done = Traffic()
    done.run(port, 12)

    def settled(connections: int) -> Figures:
        def check() -> Figures | None:
            figures = scrape(mport)
            accepted = value(figures, "mpnet_connections_accepted_total", service="counting")
            ready = value(figures, "mpnet_workers", state="ready")
            return figures if accepted == connections and ready == 2 else None

        return wait_for(check, timeout=60, what=f"{connections} connections and 2 ready workers")

    before = settled(done.connections)
    victim = min(server.worker_pids())
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in server.worker_pids(), what="the killed worker to go")
    after_kill = settled(done.connections)
    assert value(after_kill, "mpnet_worker_restarts_total", reason="crashed") == 1
    for name, rows in before.items():
        if name.endswith("_total") and name != "mpnet_shared_operations_total":
            for labels, number in rows.items():
                assert after_kill[name].get(labels, 0) >= number, (name, labels)
    assert value(after_kill, "mpnet_received_bytes_total", service="counting") == done.to_server

    done.run(port, 6)
    server.signal(signal.SIGHUP)
    server.wait_log(r"reload complete", what="the reload to complete")
    after_reload = settled(done.connections)
    assert value(after_reload, "mpnet_reloads_total", result="success") == 1
    assert value(after_reload, "mpnet_sent_bytes_total", service="counting") == done.to_client

    server.signal(signal.SIGTTIN)
    wait_for(lambda: len(server.worker_pids()) == 3, what="a third worker")
    done.run(port, 6)
    server.signal(signal.SIGTTOU)
    wait_for(lambda: len(server.worker_pids()) == 2, timeout=60, what="back to two workers")
    final = settled(done.connections)
    assert value(final, "mpnet_received_bytes_total", service="counting") == done.to_server
    assert value(final, "mpnet_sent_bytes_total", service="counting") == done.to_client
    assert value(final, "mpnet_shared_operations_total", op="incr") == done.lines
    assert value(final, "mpnet_worker_restarts_total", reason="crashed") == 1
    for slot in ("0", "1"):
        cpu = value(final, "mpnet_worker_cpu_seconds_total", slot=slot)
        assert cpu >= value(before, "mpnet_worker_cpu_seconds_total", slot=slot)


def test_a_failed_reload_is_counted_and_the_workers_serve_on(serve) -> None:
    server = serve(workers=1)
    mport = metrics_port(server)
    module = server.directory / "counting.py"
    good = module.read_text()
    module.write_text("raise RuntimeError('broken on purpose')\n")
    server.signal(signal.SIGHUP)
    server.wait_log(r"reload failed", what="the reload to fail")
    module.write_text(good)
    figures = scrape(mport)
    assert value(figures, "mpnet_reloads_total", result="failure") == 1
    assert value(figures, "mpnet_reloads_total", result="success") == 0
    assert value(figures, "mpnet_workers", state="ready") == 1
    assert value(figures, "mpnet_worker_restarts_total", reason="crashed") == 0


def test_refusals_and_blocked_workers_are_counted_by_reason(serve) -> None:
    server = serve(workers=1, counting_max_connections=1, worker_timeout=2)
    port, mport = server.port("counting"), metrics_port(server)
    with Client(port) as first:
        first.read_until(b"\n")
        with Client(port) as second:
            assert second.read_to_eof() == b""  # refused: closed at once
        reason = {"service": "counting", "reason": "counting_max_connections"}
        wait_for(
            lambda: value(scrape(mport), "mpnet_connections_refused_total", **reason) == 1,
            what="the refusal to be reported",
        )
        first.send(b"block\n")  # its loop stops: killed after worker_timeout, replaced
        wait_for(lambda: "event loop blocked" in server.log, timeout=60, what="the health check")

    def replaced() -> Figures | None:
        figures = scrape(mport)
        restarts = value(figures, "mpnet_worker_restarts_total", reason="unresponsive")
        return figures if restarts == 1 and value(figures, "mpnet_workers", state="ready") else None

    figures = wait_for(replaced, timeout=60, what="the blocked worker to be replaced")
    assert value(figures, "mpnet_connections_refused_total", **reason) == 1
    assert value(figures, "mpnet_connections_accepted_total", service="counting") == 1
    assert value(figures, "mpnet_worker_restarts_total", reason="crashed") == 0


def test_openmetrics_when_the_scraper_asks_for_it(serve) -> None:
    server = serve(workers=1)
    mport = metrics_port(server)
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    content_type, body = scrape_raw(mport, accept)
    assert content_type.startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(body)}
    assert {"mpnet_connections_accepted", "mpnet_workers", "mpnet_reloads"} <= names
    content_type, body = scrape_raw(mport)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "# TYPE mpnet_connections_accepted_total counter" in body


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_page(serve) -> None:
    server = serve(workers=1, metrics_callback_durations=True)
    done = Traffic()
    done.run(server.port("counting"), 3)
    _, body = scrape_raw(metrics_port(server))
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_callback_histogram_is_opt_in_and_counts_every_call(serve) -> None:
    server = serve(workers=2, metrics_callback_durations=True)
    port, mport = server.port("counting"), metrics_port(server)
    done = Traffic()
    done.run(port, 8)
    labels = {"service": "counting", "callback": "onincoming"}

    def counted() -> Figures | None:
        figures = scrape(mport)
        count = value(figures, "mpnet_callback_duration_seconds_count", **labels)
        return figures if count == done.lines else None

    figures = wait_for(counted, what="every onincoming call in the histogram")
    assert value(figures, "mpnet_callback_duration_seconds_bucket", le="+Inf", **labels) == (
        done.lines
    )
    assert value(figures, "mpnet_callback_duration_seconds_sum", **labels) > 0
    onconnect = {"service": "counting", "callback": "onconnect"}
    assert value(figures, "mpnet_callback_duration_seconds_count", **onconnect) == 8


def test_the_endpoint_answers_bad_requests_and_no_scraper_stalls_the_master(serve) -> None:
    server = serve(workers=1)
    port, mport = server.port("counting"), metrics_port(server)
    assert http(mport, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    answer = http(mport, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET\r\n" in answer
    assert http(mport, b"GET /metrics\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000
    assert http(mport, huge).startswith(b"HTTP/1.1 431 ")
    # Silent scrapers fill every slot: the next one is told so at once, and meanwhile the
    # master serves its workers and the control socket as usual.
    silent: list[socket.socket] = []

    def hold_a_slot() -> None:
        sock = socket.create_connection(("127.0.0.1", mport), timeout=10)
        silent.append(sock)
        sock.sendall(b"GET /metr")

    try:
        for _ in range(MAX_CLIENTS):
            hold_a_slot()

        def refused() -> bool:
            try:  # told at once; a reset if the request came after the answer
                answer = http(mport, b"GET /metrics HTTP/1.1\r\n\r\n")
            except ConnectionResetError:
                return True
            if answer.startswith(b"HTTP/1.1 503 "):
                return True
            # A slot was free: the master had not yet seen a scraper above (or an earlier
            # probe) close when the silent ones came, and refused one of them instead.
            hold_a_slot()
            return False

        wait_for(refused, what="a scrape beyond the limit to be refused")
        Traffic().run(port, 2)  # shared-table increments need the master's loop
        status = run_mpnet(server.directory, "status", "--json", "-c", str(server.config_path))
        assert status.returncode == 0, status.stderr
        ends = []
        for sock in silent:  # dropped after CLIENT_TIMEOUT (or refused at once, if a client
            sock.settimeout(CLIENT_TIMEOUT + 30)  # of the requests above was still closing)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            ends.append(answer)
        assert all(end == b"" or end.startswith(b"HTTP/1.1 503 ") for end in ends), ends
        assert ends.count(b"") >= MAX_CLIENTS - 4, ends
    finally:
        for sock in silent:
            sock.close()
    assert scrape(mport)["mpnet_workers"][(("state", "ready"),)] == 1


def test_status_json_shows_the_same_figures(serve) -> None:
    server = serve(workers=2)
    port, mport = server.port("counting"), metrics_port(server)
    done = Traffic()
    done.run(port, 5)

    def both() -> tuple[dict, Figures] | None:
        result = run_mpnet(server.directory, "status", "--json", "-c", str(server.config_path))
        status = json.loads(result.stdout)["status"]
        rows = status["metrics"]["mpnet_connections_accepted_total"]
        if rows != [{"service": "counting", "value": done.connections}]:
            return None
        return status, scrape(mport)

    status, figures = wait_for(both, what="status to count every connection")
    assert status["metrics_endpoints"] == [f"127.0.0.1:{mport}"]
    rows = status["metrics"]["mpnet_sent_bytes_total"]
    assert rows[0]["value"] == value(figures, "mpnet_sent_bytes_total", service="counting")
    workers = {row["state"]: row["value"] for row in status["metrics"]["mpnet_workers"]}
    assert workers["ready"] == 2


def test_top_refreshes_the_table(serve) -> None:
    server = serve(workers=1)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "mpnet", "top", "-c", str(server.config_path)),
            *("--interval", "0.2"),
        ],
        cwd=server.directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + 30
        while seen.count(b"mpnet pid") < 3:
            assert time.monotonic() < deadline, seen[-2000:]
            seen += proc.stdout.read1(4096)
        assert b"accepted" in seen and b"\x1b[H" in seen  # the screen is redrawn in place
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        ('"9150"', "has no port"),
        ('"localhost:9150"', "is not an IP address"),
        ('"::1:9150"', "brackets"),
        ('["127.0.0.1:9150", 5]', "a list of them"),
        ('"127.0.0.1:99999"', "has no port"),
    ],
)
def test_a_bad_metrics_listen_is_refused_naming_the_key(
    tmp_path: Path, listen: str, words: str
) -> None:
    (tmp_path / "mpnet.toml").write_text(f'modules = ["echo"]\nmetrics_listen = {listen}\n')
    result = run_mpnet(tmp_path, "check", "-c", "mpnet.toml", "--no-probe")
    assert result.returncode == 2
    assert "metrics_listen" in result.stderr and words in result.stderr, result.stderr


def test_a_metrics_port_in_use_stops_the_start_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        text = config(["echo"], workers=1, echo_ports=[0], metrics_listen=f"127.0.0.1:{busy}")
        (tmp_path / "mpnet.toml").write_text(text)
        result = run_mpnet(tmp_path, "serve", "-c", "mpnet.toml")
    assert result.returncode == 1
    assert f"metrics_listen 127.0.0.1:{busy}" in result.stderr


TLS_MODULE = """\
class listener:
    def onconnect(conn):
        conn.write("hello\\n")
module.provides("net", listener=listener, default_port=0, encryption="ssl")
"""


def test_failed_tls_handshakes_are_counted_and_never_accepted(tmp_path: Path) -> None:
    import ssl

    from harness import make_cert, ssl_table

    cert, key = make_cert(tmp_path)
    (tmp_path / "tlsecho.py").write_text(TLS_MODULE)
    text = config(["./tlsecho.py"], workers=1, tlsecho_ports=[0], metrics_listen="127.0.0.1:0")
    server = Server(tmp_path, text + f"ssl = {ssl_table(cert, key)}\n")
    try:
        server.start()
        port, mport = server.port("tlsecho"), metrics_port(server)
        with Client(port) as plain:  # not TLS: the handshake fails
            plain.send(b"hello in the clear\r\n\r\n")
            assert plain.read_to_eof() == b""
        context = ssl.create_default_context(cafile=str(cert))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.recv(100) == b"hello\n"

        def counted() -> Figures | None:
            figures = scrape(mport)
            failed = value(figures, "mpnet_tls_handshake_failures_total", service="tlsecho")
            accepted = value(figures, "mpnet_connections_accepted_total", service="tlsecho")
            return figures if (failed, accepted) == (1, 1) else None

        wait_for(counted, what="one failed handshake and one accepted connection")
    finally:
        server.stop()
