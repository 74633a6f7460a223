"""Workers: several serve, crashes are replaced on the same sockets, stops are clean."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import psutil
import pytest
from harness import PID_MODULE, Client, config, wait_for

pytestmark = pytest.mark.server


def _pid_of_server(port: int) -> int:
    with Client(port) as client:
        return int(client.read_until(b"\n"))


def test_several_workers_serve_connections(mpnet, write_module):
    path = write_module("pid", PID_MODULE)
    server = mpnet(config([str(path)], workers=2))
    port = server.port("pid")
    seen: set[int] = set()
    wait_for(lambda: seen.add(_pid_of_server(port)) or len(seen) >= 2, what="two workers")
    assert seen == server.worker_pids()


def test_raising_callback_is_logged_and_everything_carries_on(mpnet, write_module):
    path = write_module(
        "fragile",
        "class listener:\n"
        "    def onincoming(conn, data):\n"
        "        if data.startswith(b'boom'):\n"
        "            raise ValueError('kaboom')\n"
        "        conn.write(data)\n"
        'module.provides("net", listener=listener, default_port=0)\n',
    )
    server = mpnet(config([str(path)], workers=1))
    port = server.port("fragile")
    with Client(port) as victim, Client(port) as bystander:
        victim.send("boom\n")
        server.wait_log(r"\[fragile\] error: onincoming failed for connection")
        server.wait_log(r"ValueError: kaboom")  # the traceback's last line
        assert "Traceback" in server.log
        victim.send("still here\n")
        assert victim.read_until(b"\n") == b"still here\n"
        bystander.send("fine\n")
        assert bystander.read_until(b"\n") == b"fine\n"


def test_async_callbacks_run_in_order(mpnet, write_module):
    path = write_module(
        "slow",
        "import asyncio, random\n"
        "class listener:\n"
        "    async def onconnect(conn):\n"
        "        await asyncio.sleep(0.05)\n"
        "        conn.write('hello\\n')\n"
        "    async def onincoming(conn, data):\n"
        "        await asyncio.sleep(random.random() / 100)\n"
        "        conn.write(data)\n"
        'module.provides("net", listener=listener, default_port=0)\n',
    )
    server = mpnet(config([str(path)], workers=1))
    with Client(server.port("slow")) as client:
        for index in range(50):
            client.send(f"{index},")
        assert client.read_until(b"hello\n") == b"hello\n"
        expected = "".join(f"{index}," for index in range(50)).encode()
        assert client.read_exactly(len(expected)) == expected


def _steady_connects(port: int, stop: threading.Event, outcomes: list) -> None:
    """Connect, read the greeting (a pid), close; record (start time, pid or error)."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(100)
                    if not chunk:
                        raise ConnectionError(f"closed after {data!r}")
                    data += chunk
                outcomes.append((started, int(data)))
        except OSError as exc:
            outcomes.append((started, repr(exc)))


def test_kill_9_worker_is_replaced_without_refusing_anyone(mpnet, write_module):
    path = write_module("pid", PID_MODULE)
    server = mpnet(config([str(path)], workers=2))
    port = server.port("pid")
    before = server.worker_pids()
    stop = threading.Event()
    outcomes: list[tuple[float, int | str]] = []
    clients = [
        threading.Thread(target=_steady_connects, args=(port, stop, outcomes)) for _ in range(4)
    ]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: len(outcomes) > 50, what="steady connections")
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not _alive(victim), what="the victim to die")
        dead_at = time.monotonic()
        server.wait_log(rf"pid {victim}\) killed by signal SIGKILL; replacing it")
        wait_for(lambda: len(server.worker_pids() - before) == 1, what="a replacement worker")
        replacement = (server.worker_pids() - before).pop()
        wait_for(
            lambda: any(pid == replacement for _, pid in outcomes[:]),
            what="the replacement to serve",
        )
        count_after = sum(1 for started, _ in outcomes[:] if started > dead_at)
        wait_for(
            lambda: sum(1 for started, _ in outcomes[:] if started > dead_at) > count_after + 20,
            what="more connections after the replacement",
        )
    finally:
        stop.set()
        for thread in clients:
            thread.join(15)
    # A connection the victim had already accepted dies with it; every connection begun after
    # its death is served: queued in the kernel on the slot's socket, then by the replacement.
    after = [outcome for started, outcome in outcomes if started > dead_at]
    assert [o for o in after if isinstance(o, str)] == []
    assert victim not in after
    assert {replacement, *(before - {victim})} >= set(after)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_graceful_stop_lets_connections_finish(mpnet, write_module):
    path = write_module(
        "bye",
        "class listener:\n"
        "    def onincoming(conn, data):\n"
        "        conn.write(data)\n"
        "    def ondisconnect(conn, err):\n"
        "        module.log('info', 'gone: %s', err)\n"
        'module.provides("net", listener=listener, default_port=0)\n',
    )
    server = mpnet(config([str(path)], workers=2, graceful_timeout=30))
    port = server.port("bye")
    client = Client(port)
    client.send("before\n")
    assert client.read_until(b"\n") == b"before\n"
    server.signal(signal.SIGTERM)
    server.wait_log(r"graceful stop \(SIGTERM\)")
    wait_for(lambda: _refused(port), what="the port to stop accepting")
    client.send("during\n")
    assert client.read_until(b"\n") == b"during\n"
    client.close()
    assert server.wait_exit() == 0
    assert "gone: None" in server.log


def test_graceful_timeout_closes_lingering_connections(mpnet, write_module):
    path = write_module(
        "bye",
        "class listener:\n"
        "    def onincoming(conn, data):\n"
        "        conn.write(data)\n"
        "    def ondisconnect(conn, err):\n"
        "        module.log('info', 'gone: %s', err)\n"
        'module.provides("net", listener=listener, default_port=0)\n',
    )
    server = mpnet(config([str(path)], workers=1, graceful_timeout=1))
    with Client(server.port("bye")) as client:
        client.send("x\n")
        client.read_until(b"\n")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert client.read_to_eof(timeout=15) == b""
        assert server.wait_exit() == 0
    assert time.monotonic() - started < 10
    assert "gone: server shutting down" in server.log


def test_quick_stop(mpnet):
    server = mpnet(config(["echo"], workers=2, echo_ports=[0], graceful_timeout=60))
    with Client(server.port("echo")) as client:
        client.read_until(b"\n")
        server.signal(signal.SIGINT)
        assert client.read_to_eof(timeout=10) == b""
    assert server.wait_exit(10) == 0
    assert "quick stop (SIGINT)" in server.log


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True  # reset: the connection was queued on a listener that closed meanwhile
    return False


def test_module_failing_only_in_workers_does_not_restart_loop(mpnet, write_module, tmp_path):
    # Loads in the checker, fails in workers: the start fails with the worker's error.
    path = write_module(
        "flaky",
        "import os\n"
        "if os.environ.get('MPNET_TEST_CHECKER') is None and __import__('mpnet.log').log.role()"
        " != 'checker':\n"
        "    raise RuntimeError('worker-only failure')\n"
        "class listener:\n"
        "    def onconnect(conn):\n"
        "        conn.write('hi')\n"
        'module.provides("net", listener=listener, default_port=0)\n',
    )
    server = mpnet(config([str(path)], workers=2), start=False)
    server.start(wait_ready=False)
    assert server.wait_exit() == 1
    assert "cannot start" in server.log
    assert "worker-only failure" in server.log
