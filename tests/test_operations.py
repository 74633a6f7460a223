"""Operations: reload, worker count, log reopening, worker health and the control socket.

Real ``mpnet serve`` processes, real signals and sockets on 127.0.0.1. Timeouts are small
(``worker_timeout = 2``: workers send a heartbeat every second, so 1 s would flag healthy
workers now and then, see the note in test_blocked_loop_is_killed_with_its_traceback).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from harness import (
    Client,
    Server,
    as_nobody,
    client_request,
    config,
    connect_to_each_worker,
    mpnet_cli,
    raw_request,
    run_in_private_netns,
    run_mpnet,
    settled,
    status,
    wait_for,
    worker_pids,
)

from mpnet.checker import Check
from mpnet.controlclient import ControlError
from mpnet.controlclient import request as control_request
from mpnet.master import BACKOFF_MAX, Master
from mpnet.portmanager import PortLedger
from mpnet.pure.controlproto import ControlReply, StatusRequest
from mpnet.reload import Reloads

VERSION_MODULE = """\
import os
VERSION = {version}
class listener:
    def onconnect(conn):
        conn.write(f"v{{VERSION}} {{os.getpid()}}\\n")
    def onincoming(conn, data):
        conn.write(data)
module.provides("net", listener=listener, default_port=0)
"""


def write_version(path: Path, version: int) -> None:
    """Replace the module file in one step (a reload must never read half a file)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(VERSION_MODULE.format(version=version))
    os.replace(temporary, path)


def greeting(port: int) -> tuple[int, int]:
    """(version, pid) from a fresh connection's greeting."""
    with Client(port) as client:
        version, pid = client.read_until(b"\n").split()
    return int(version[1:]), int(pid)


def ready_workers(server: Server) -> list[dict]:
    current = status(server)
    return [
        w
        for w in current["workers"]
        if w["state"] == "ready" and w["generation"] == current["generation"]
    ]


# -- reload -------------------------------------------------------------------------------------


class Load:
    """Connect loops (greeting + one echo) and long-lived echo connections, in threads."""

    def __init__(self, port: int, connectors: int = 3, echoers: int = 4) -> None:
        self.port = port
        self.stop = threading.Event()
        self.greetings: list[tuple[float, int]] = []  # (connection began, version)
        self.errors: list[str] = []
        self.echoed = [0] * echoers
        self.threads = [threading.Thread(target=self._connect_loop) for _ in range(connectors)]
        self.threads += [
            threading.Thread(target=self._echo_loop, args=(i,)) for i in range(echoers)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)

    def _connect_loop(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                with Client(self.port) as client:
                    version = int(client.read_until(b"\n").split()[0][1:])
                    client.send(b"ping\n")
                    if client.read_until(b"\n") != b"ping\n":
                        raise AssertionError("echo mismatch")
                self.greetings.append((began, version))
            except (OSError, AssertionError, ValueError) as exc:
                self.errors.append(f"connect loop: {exc!r}")

    def _echo_loop(self, index: int) -> None:
        try:
            with Client(self.port) as client:
                client.read_until(b"\n")
                count = 0
                while not self.stop.is_set():
                    message = f"{index}:{count}:{'x' * 40}\n".encode()
                    client.send(message)
                    reply = client.read_until(b"\n")
                    if reply != message:
                        raise AssertionError(f"echo mismatch {reply!r} != {message!r}")
                    count += 1
                    self.echoed[index] = count
        except (OSError, AssertionError) as exc:
            self.errors.append(f"echo connection {index}: {exc!r}")


@pytest.mark.server
def test_reload_under_load_zero_errors(mpnet, write_module):
    path = write_module("versioned", VERSION_MODULE.format(version=1))
    server = mpnet(config([str(path)], workers=2, graceful_timeout=30))
    port = server.port("versioned")
    completed: list[tuple[float, int]] = []
    with Load(port) as load:
        wait_for(lambda: len(load.greetings) > 30 and min(load.echoed) > 30, what="load")
        for version in range(2, 7):
            write_version(path, version)
            if version == 6:  # the CLI's way, once; SIGHUP otherwise
                result = mpnet_cli(server, "reload", "--wait")
                assert result.returncode == 0, result.stderr
                assert "reload complete: generation 6" in result.stdout
            else:
                server.signal(signal.SIGHUP)
                server.wait_log(rf"reload complete: generation {version} serves every slot")
            completed.append((time.monotonic(), version))
        done = time.monotonic()
        echoed = list(load.echoed)
        wait_for(
            lambda: (
                min(n - before for n, before in zip(load.echoed, echoed, strict=True)) > 20
                and sum(1 for began, _ in load.greetings[:] if began > done) > 30
            ),
            what="load carrying on after the last reload",
        )
        # The long-lived connections keep their generation-1 workers draining; that did not
        # hold up the five reloads.
        snapshot = status(server)
    # The log helps with the one unexplained reset seen in 1 of 10 suite runs (see the note).
    assert load.errors == [], server.log[-6000:]
    assert not snapshot["reloading"] and snapshot["generation"] == 6
    states = {(w["generation"], w["state"]) for w in snapshot["workers"]}
    assert (1, "draining") in states and (6, "ready") in states
    # A reload is complete once every old worker reported that it stopped accepting: any
    # connection begun after that sees the new code.
    stale = [
        (began, seen)
        for began, seen in load.greetings
        for finished, version in completed
        if began > finished and seen < version
    ]
    assert stale == []
    assert {greeting(port)[0] for _ in range(10)} == {6}
    # The echo connections are closed: the generation-1 workers finish draining and exit.
    wait_for(lambda: {w["generation"] for w in status(server)["workers"]} == {6}, what="drained")


@pytest.mark.server
def test_invalid_reload_keeps_serving(mpnet, write_module):
    path = write_module("versioned", VERSION_MODULE.format(version=1))
    server = mpnet(config([str(path)], workers=2))
    port = server.port("versioned")
    pids = settled(server, 2)

    path.write_text("class listener:\n    def onconnect(conn)\n        pass\n")  # SyntaxError
    server.signal(signal.SIGHUP)
    line = server.wait_log(r"reload failed, still serving the previous configuration: [^\n]*")
    assert "SyntaxError" in line.group(0) and "versioned" in line.group(0)

    path.write_text("raise RuntimeError('no such luck')\n")
    result = mpnet_cli(server, "reload", "--wait")
    assert result.returncode == 1
    assert "reload failed" in result.stderr and "RuntimeError: no such luck" in result.stderr

    good_config = server.config_path.read_text()
    server.config_path.write_text(good_config + "graceful_timeout = 'soon'\n")
    server.signal(signal.SIGHUP)
    server.wait_log(r"reload failed, [^\n]*key 'graceful_timeout'")

    # Still the first generation, same workers, old code.
    assert status(server)["generation"] == 1
    assert worker_pids(server) == pids
    assert {greeting(port)[0] for _ in range(5)} == {1}

    server.config_path.write_text(good_config)
    write_version(path, 2)
    result = mpnet_cli(server, "reload", "--wait")
    assert result.returncode == 0, result.stderr
    assert not pids & settled(server, 2)
    assert {greeting(port)[0] for _ in range(5)} == {2}


@pytest.mark.server
def test_control_socket_keeps_answering_while_workers_come_and_go(mpnet):
    """Regression: a worker's channel, closed at its EOF, was forgotten in the selector a
    second time when the worker was reaped, by its old fd number, which by then could belong
    to a control client (never answered: `mpnet reload --wait` failed) or to a new worker's
    channel (never heard from)."""
    server = mpnet(config(["echo"], workers=2, echo_ports=[0]))
    path = server.directory / "control.sock"
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                control_request(path, StatusRequest(), timeout=3)
                answered[0] += 1
            except (ControlError, OSError) as exc:
                failures.append(repr(exc))

    pollers = [threading.Thread(target=poll) for _ in range(3)]
    for thread in pollers:
        thread.start()
    try:
        for generation in range(2, 22):
            server.signal(signal.SIGHUP)
            server.wait_log(rf"reload complete: generation {generation} serves every slot")
    finally:
        stop.set()
        for thread in pollers:
            thread.join(10)
    assert failures == []
    assert answered[0] > 20
    settled(server, 2)


SLOW_CHECK_MODULE = """\
import os, time
if __import__("mpnet.log").log.role() == "checker" and os.path.exists({flag!r}):
    time.sleep(3)  # a slow import, in the reload's throwaway checker only
class listener:
    def onconnect(conn):
        conn.write("hi\\n")
module.provides("net", listener=listener, default_port=0)
"""


@pytest.mark.server
def test_slow_reload_check_does_not_kill_healthy_workers(mpnet, write_module, tmp_path):
    """Regression: when the master still waited for the checker, heartbeats that arrived
    meanwhile were unread when it judged the workers, which then all looked blocked and were
    killed. (The check no longer blocks the loop; this guards the health judgement still.)"""
    flag = tmp_path / "slow"
    path = write_module("slow", SLOW_CHECK_MODULE.format(flag=str(flag)))
    server = mpnet(config([str(path)], workers=2, worker_timeout=2))
    pids = settled(server, 2)
    flag.touch()
    server.signal(signal.SIGHUP)
    server.wait_log("reload complete: generation 2")
    settled(server, 2)
    for pid in pids:
        server.wait_log(re.escape(f"(pid {pid}) stopped (exited with code 0)"))
    assert "blocked" not in server.log and "killed" not in server.log


SLOW_COUNTER_MODULE = """\
import os, time
if __import__("mpnet.log").log.role() == "checker" and os.path.exists({flag!r}):
    time.sleep({delay})  # a slow import, in the reload's throwaway checker only
counters = module.shared("counters")
class listener:
    async def onincoming(conn, data):
        conn.write(f"{{await counters.incr('n')}}\\n")  # decided by the master
module.provides("net", listener=listener, default_port=0)
"""


@pytest.mark.server
def test_master_serves_while_a_reload_is_checked_and_queues_more_reloads(
    mpnet, write_module, tmp_path
):
    """The checker loads for seconds; meanwhile shared-table atomics and control requests are
    answered, and further reload requests are coalesced into one reload after this one."""
    flag = tmp_path / "slow"
    path = write_module("counter", SLOW_COUNTER_MODULE.format(flag=str(flag), delay=8))
    server = mpnet(config([str(path)], workers=2))
    pids = settled(server, 2)
    cli: subprocess.Popen[str] | None = None
    with Client(server.port("counter")) as client:
        flag.touch()
        server.signal(signal.SIGHUP)
        (checker,) = wait_for(lambda: worker_pids(server) - pids, what="the reload's checker")
        for expected in range(1, 6):
            client.send(b"incr\n")
            assert client.read_until(b"\n") == f"{expected}\n".encode()
        cli = subprocess.Popen(
            [sys.executable, "-m", "mpnet", "reload", "-c", str(server.config_path)],
            cwd=server.directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            server.wait_log("reload requested while a reload's modules are checked: it follows")
            server.signal(signal.SIGHUP)
            server.signal(signal.SIGHUP)
            flag.unlink()  # the running check sleeps on; the next one will not
            # All of this was answered while the first check was still loading.
            current = status(server)
            assert running(checker), "the check ended before the test could tell"
            assert current.get("checking") and current["generation"] == 1
            assert "reload accepted" not in server.log
            out, err = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                os.kill(cli.pid, signal.SIGKILL)
                cli.wait(10)
        # The CLI's request waited for the queued reload's check, not the first one's.
        assert cli.returncode == 0, err
        assert out.strip() == "reload accepted: starting generation 3"
        server.wait_log("reload complete: generation 3")
        client.send(b"incr\n")
        assert client.read_until(b"\n") == b"6\n"
    settled(server, 2)
    assert len(re.findall(r"info: reloading$", server.log, re.MULTILINE)) == 2
    assert "generation 4" not in server.log
    assert "blocked" not in server.log and "killed" not in server.log
    for pid in pids:
        server.wait_log(re.escape(f"(pid {pid}) stopped (exited with code 0)"))


SLOW_BOOT_MODULE = """\
import os, time
if __import__("mpnet.log").log.role().startswith("w") and os.path.exists({flag!r}):
    time.sleep(5)  # a slow start in new workers: the reload replaces them for seconds
class listener:
    def onconnect(conn):
        conn.write("hi\\n")
module.provides("net", listener=listener, default_port=0)
"""


@pytest.mark.server
def test_a_burst_of_sighups_runs_at_most_two_reloads(mpnet, write_module, tmp_path):
    """50 SIGHUPs within about a second: the reload running, plus one queued for all the rest
    (which arrive while the first one's generation replaces the workers), logged."""
    flag = tmp_path / "slow"
    path = write_module("slowboot", SLOW_BOOT_MODULE.format(flag=str(flag)))
    server = mpnet(config([str(path)], workers=1))
    settled(server, 1)
    flag.touch()
    server.signal(signal.SIGHUP)
    server.wait_log("reload accepted: starting generation 2")
    for _ in range(49):
        server.signal(signal.SIGHUP)
        time.sleep(0.02)  # spread over a second, as a signal storm would be
    assert "reload complete" not in server.log, "the replacement ended before the test could tell"
    flag.unlink()
    server.wait_log("reload complete: generation 3", timeout=60)
    settled(server, 1)
    assert len(re.findall(r"info: reloading$", server.log, re.MULTILINE)) == 2
    assert "generation 4" not in server.log
    assert "reload requested while a reload replaces the workers: it follows" in server.log
    assert re.search(
        r"\d+ more reload request\(s\) arrived meanwhile: one reload serves", server.log
    )


@pytest.mark.server
def test_reload_check_that_hangs_is_killed_after_boot_timeout(mpnet, write_module, tmp_path):
    flag = tmp_path / "slow"
    path = write_module("counter", SLOW_COUNTER_MODULE.format(flag=str(flag), delay=600))
    server = mpnet(config([str(path)], workers=1, boot_timeout=6))
    pids = settled(server, 1)
    flag.touch()
    server.signal(signal.SIGHUP)
    (checker,) = wait_for(lambda: worker_pids(server) - pids, what="the reload's checker")
    assert status(server).get("checking") and running(checker)
    line = server.wait_log(r"reload failed, still serving the previous configuration: [^\n]*")
    assert "loading the modules took longer than 6s" in line.group(0)
    wait_for(lambda: not psutil.pid_exists(checker), what="the checker to be killed and reaped")
    current = status(server)
    assert not current["checking"] and not current["reloading"] and current["generation"] == 1
    assert settled(server, 1) == pids
    with Client(server.port("counter")) as client:
        client.send(b"incr\n")
        assert client.read_until(b"\n") == b"1\n"


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.server
def test_reload_adds_and_removes_ports(mpnet, write_module):
    alpha = write_module("alpha", VERSION_MODULE.format(version=1))
    beta = write_module("beta", VERSION_MODULE.format(version=2))
    server = mpnet(config([str(alpha)], workers=1, graceful_timeout=30))
    alpha_port = server.port("alpha")
    held = Client(alpha_port)
    try:
        held.read_until(b"\n")
        server.config_path.write_text(config([str(beta)], workers=1, graceful_timeout=30))
        server.signal(signal.SIGHUP)
        server.wait_log("reload complete: generation 2")
        beta_port = server.port("beta")
        assert greeting(beta_port)[0] == 2
        # The old worker drains its connection to alpha; alpha's listening sockets are
        # closed, since nobody will accept on them again: new clients are refused at once
        # rather than queued until the drain ends and then reset.
        server.wait_log(rf"closed 127\.0\.0\.1:{alpha_port} \(service alpha no longer listens")
        wait_for(lambda: refused(alpha_port), timeout=5, what="alpha's port to refuse")
        held.send(b"still there\n")
        assert held.read_until(b"\n") == b"still there\n"
        assert any(
            w["generation"] == 1 and w["state"] == "draining" for w in status(server)["workers"]
        )
    finally:
        held.close()
    wait_for(lambda: len(status(server)["workers"]) == 1, what="the old worker to finish")
    assert [s["name"] for s in status(server)["services"]] == ["beta"]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False  # the old worker had not yet acted on its SIGTERM: it accepted this one


# -- worker count -------------------------------------------------------------------------------


@pytest.mark.server
def test_ttin_ttou_and_workers_command(mpnet):
    server = mpnet(config(["echo"], workers=1, echo_ports=[0]))

    def count_is(n: int) -> bool:
        current = status(server)
        return current["slots"] == n and len(ready_workers(server)) == n == len(current["workers"])

    server.signal(signal.SIGTTIN)
    wait_for(lambda: count_is(2), what="2 workers")
    server.signal(signal.SIGTTIN)
    wait_for(lambda: count_is(3), what="3 workers")
    server.signal(signal.SIGTTOU)
    wait_for(lambda: count_is(2), what="2 workers")
    if Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() == "0":
        # Steering (mpnet/steering.py) drains the slot; without it, the warning.
        server.wait_log(r"removing slots: .*(set net\.ipv4\.tcp_migrate_req = 1|steered away)")

    result = mpnet_cli(server, "workers", "4")
    assert result.returncode == 0, result.stderr
    assert "worker count 2 -> 4" in result.stdout
    wait_for(lambda: count_is(4), what="4 workers")

    # The count set at run time survives a reload (the config still says 1).
    server.signal(signal.SIGHUP)
    server.wait_log("reload complete: generation 2")
    wait_for(lambda: count_is(4), what="4 workers after the reload")
    assert {w["slot"] for w in status(server)["workers"]} == {0, 1, 2, 3}

    result = mpnet_cli(server, "workers", "0")
    assert result.returncode == 1 and "count from 1 to 1024" in result.stderr
    assert mpnet_cli(server, "workers", "1").returncode == 0
    wait_for(lambda: count_is(1), what="1 worker")
    server.signal(signal.SIGTTOU)
    server.wait_log("SIGTTOU: keeping the last worker")
    assert count_is(1)
    with Client(server.port("echo")) as client:
        assert client.read_until(b"\n") == b"Hello!\n"


NETNS_SCRIPT = """\
import json, os, signal, socket, subprocess, sys, threading, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from harness import Server, config, wait_for
from mpnet.controlclient import request
from mpnet.pure.controlproto import StatusRequest

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1")
directory = Path({directory!r})
server = Server(directory, config(["echo"], workers=3, echo_ports=[0], graceful_timeout=6))
results = {{"errors": [], "slowest": 0.0, "served": 0}}
try:
    server.start()
    Path({pidfile!r}).write_text(str(server.pid))
    port = server.port("echo")
    # Idle connections: every worker almost surely holds one, so a removed worker drains for
    # graceful_timeout while its slot's socket is still hashed new connections.
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            began = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    data = b""
                    while not data.endswith(b"\\n"):
                        chunk = sock.recv(100)
                        if not chunk:
                            raise ConnectionError(f"closed after {{data!r}}")
                        data += chunk
                results["served"] += 1
            except OSError as exc:
                results["errors"].append(repr(exc))
            results["slowest"] = max(results["slowest"], time.monotonic() - began)

    threads = [threading.Thread(target=loop) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: results["served"] > 200, what="load")
        for expected in (2, 1):
            os.kill(server.pid, signal.SIGTTOU)
            server.wait_log(f"worker count {{expected + 1}} -> {{expected}}")
            served = results["served"]
            wait_for(lambda: results["served"] > served + 300, what="load after TTOU")
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    # With steering a removed worker first accepts its queue (mpnet/steering.py), then drains.
    results["draining"] = wait_for(lambda: sum(
        1 for w in request(directory / "control.sock", StatusRequest()).status["workers"]
        if w["state"] == "draining"
    ), 10, "a removed worker draining its idle clients")
    results["warned"] = "removing slots: connections still queued" in server.log
    for sock in idle:
        sock.close()
finally:
    server.stop()
print(json.dumps(results))
"""


@pytest.mark.server
def test_ttou_under_load_migrates_queued_connections(tmp_path):
    """In a network namespace of our own with net.ipv4.tcp_migrate_req = 1 (never the host's):
    removing slots while connections pour in resets none and keeps none waiting."""
    results = run_in_private_netns(tmp_path, NETNS_SCRIPT, timeout=60)
    assert results["errors"] == []
    # Nobody waited behind a socket that no worker accepts on any more.
    assert results["slowest"] < 1.5, results
    assert results["draining"] >= 1  # the removed workers were still draining their idle clients
    assert not results["warned"]  # the sysctl is set in this namespace


# -- logs ---------------------------------------------------------------------------------------


def wait_file(path: Path, pattern: str, timeout: float = 20.0) -> str:
    regex = re.compile(pattern)

    def found() -> str | None:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
            if regex.search(text):
                return text
        return None

    return wait_for(found, timeout, what=f"{pattern!r} in {path.name}")


@pytest.mark.server
def test_sigusr1_reopens_the_log_file(mpnet, tmp_path):
    log_path = tmp_path / "mpnet.log"
    server = mpnet(config(["echo"], workers=2, echo_ports=[0], log_file=str(log_path)), start=False)
    server.start(wait_ready=False)
    text = wait_file(log_path, r"ready: 2 worker")
    port = int(re.search(r"service echo \(module echo\) -> 127\.0\.0\.1:(\d+)", text).group(1))

    rotated = log_path.rename(tmp_path / "mpnet.log.1")  # what logrotate does
    server.signal(signal.SIGUSR1)
    wait_file(log_path, r"master \[mpnet\] info: log file reopened")

    # Every worker reopened too: their lines land in the new file. SO_REUSEPORT picks the
    # worker by a hash, so connect until each has logged one.
    def each_worker_logged() -> bool:
        with Client(port) as client:
            client.read_until(b"\n")
        text = log_path.read_text()
        return all(f"worker {slot} [echo] info: Connection closed" in text for slot in (0, 1))

    wait_for(each_worker_logged, what="a connection closed by each worker in the new log")
    assert "Connection closed" not in rotated.read_text()
    assert server.log == ""  # nothing on stderr either


# -- worker health ------------------------------------------------------------------------------

BLOCKER_MODULE = """\
import os, time

def block_the_loop():
    time.sleep(60)

class listener:
    def onconnect(conn):
        conn.write(f"{os.getpid()}\\n")
    def onincoming(conn, data):
        if data.startswith(b"block"):
            block_the_loop()
        conn.write(data)
module.provides("net", listener=listener, default_port=0)
"""


@pytest.mark.server
def test_blocked_loop_is_killed_with_its_traceback(mpnet, write_module):
    # worker_timeout = 2, not 1: a worker sends its heartbeat every 1.0 s whatever
    # worker_timeout is (mpnet/worker.py HEARTBEAT_INTERVAL), so with 1 s a healthy idle worker
    # is now and then found "blocked for 1.0s" and killed.
    path = write_module("blocker", BLOCKER_MODULE)
    server = mpnet(config([str(path)], workers=2, worker_timeout=2))
    port = server.port("blocker")
    pids = settled(server, 2)
    clients = connect_to_each_worker(port, pids)
    victim, bystander = sorted(clients)
    try:
        blocked_at = time.monotonic()
        clients[victim].send(b"block\n")
        line = server.wait_log(rf"worker \d \(pid {victim}\): event loop blocked for [\d.]+s")
        assert time.monotonic() - blocked_at >= 1.0  # heartbeats are 1 s apart
        # The other worker answers all along.
        clients[bystander].send(b"hello\n")
        assert clients[bystander].read_until(b"\n", timeout=1) == b"hello\n"
        server.wait_log(rf"pid {victim}\) killed by signal SIGKILL; replacing it")
        after = server.log[line.start() :]
        assert "Current thread" in after or "Thread 0x" in after  # faulthandler's dump
        assert re.search(r'File "[^"]*blocker\.py", line 4 in block_the_loop', after)
        assert re.search(r'File "[^"]*blocker\.py", line \d+ in onincoming', after)
        assert after.count("event loop blocked") == 1
        wait_for(lambda: len(worker_pids(server)) == 2 and victim not in worker_pids(server))
        assert bystander in worker_pids(server)
        assert clients[victim].read_to_eof() == b""  # its connections died with it
        clients[bystander].send(b"still\n")
        assert clients[bystander].read_until(b"\n") == b"still\n"
        replacement = (worker_pids(server) - pids).pop()
        wait_for(lambda: greeting_pid(port) == replacement, what="the replacement to serve")
    finally:
        for client in clients.values():
            client.close()


def greeting_pid(port: int) -> int:
    with Client(port) as client:
        return int(client.read_until(b"\n"))


CRASHER_MODULE = """\
import asyncio, os
FLAG = {flag!r}
try:
    loop = asyncio.get_running_loop()  # a worker (the checker has no running loop)
except RuntimeError:
    loop = None
if loop is not None and os.path.exists(FLAG):
    loop.call_later(0.1, os._exit, 7)
class listener:
    def onconnect(conn):
        conn.write(f"{{os.getpid()}}\\n")
module.provides("net", listener=listener, default_port=0)
"""


@pytest.mark.server
def test_crash_loop_backs_off_exponentially(mpnet, write_module, tmp_path):
    flag = tmp_path / "crash"
    path = write_module("crasher", CRASHER_MODULE.format(flag=str(flag)))
    server = mpnet(config([str(path)], workers=2))
    port = server.port("crasher")
    pids = settled(server, 2)
    victim, bystander = sorted(pids)
    flag.touch()  # from now on, a new worker dies 0.1 s after it started serving
    os.kill(victim, signal.SIGKILL)
    server.wait_log(rf"pid {victim}\) killed by signal SIGKILL; replacing it")
    backed_off = server.wait_log(
        r"(\S+ \S+) master \[mpnet\] warn: worker \d failed soon after starting; "
        r"next attempt in 2\.0s \(crash back-off\)"
    )
    delays = re.findall(r"failed soon after starting; next attempt in ([\d.]+)s", server.log)
    assert delays[:3] == ["0.5", "1.0", "2.0"]
    # The victim was serving: replaced at once; its successors' quick crashes back off.
    assert len(re.findall(r"\(pid \d+\) exited with code 7; replacing it", server.log)) == 3
    flag.unlink()
    ready = server.wait_log(
        r"(\S+ \S+) master \[mpnet\] info: worker \d \(pid \d+, generation 1\) ready", count=6
    )
    assert _log_time(ready.group(1)) - _log_time(backed_off.group(1)) >= 2.0
    assert bystander in worker_pids(server)  # the other slot was left alone
    with Client(port) as client:
        assert int(client.read_until(b"\n")) in worker_pids(server)


def _log_time(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_healthy_run():
    master = Master.__new__(Master)  # only the back-off bookkeeping is exercised
    master._backoff, master._respawn_at, master._reset_queue = {}, {}, set()
    crashed = SimpleNamespace(slot=0, ready_at=None)
    delays = []
    for _ in range(9):
        master._schedule_respawn(crashed)
        delays.append(master._backoff[0])
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX, BACKOFF_MAX, BACKOFF_MAX]
    assert BACKOFF_MAX == 30.0
    healthy = SimpleNamespace(slot=0, ready_at=time.monotonic() - 60)
    master._schedule_respawn(healthy)
    assert 0 not in master._backoff


@pytest.mark.server
def test_checker_event_after_a_stop_in_the_same_pass_is_ignored():
    """One select() can return a control client's ``stop`` and the checker's answer: the stop
    kills the checker and closes its pipe, and the checker's event must then be ignored."""

    class Host:  # the part of ReloadHost that a check and a stop use
        def __init__(self, check: Check) -> None:
            self.check = check

        def start_checker(self, _config: object) -> Check:
            return self.check

        def stop_watching(self, _check: Check) -> None:
            pass

        def notify_reloading(self) -> None:
            pass

    class Waiter:
        def __init__(self) -> None:
            self.answers: list[dict] = []

        def resolve(self, response: dict) -> None:
            self.answers.append(response)

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    checker = subprocess.Popen(["sleep", "60"])  # stands in for the checker process
    try:
        reloads = Reloads(Host(Check(checker.pid, read_fd, 60.0)), PortLedger(), SimpleNamespace)
        waiter = Waiter()
        reloads.request(waiter, running=True)
        assert reloads.checking
        os.write(write_fd, b'{"ok": true, "services": []}')  # the checker answers...
        reloads.cancel()  # ...but the stop was handled first in that pass
        reloads.on_readable()
        assert not reloads.checking
        assert waiter.answers == [ControlReply.failure("stopping")]
        assert checker.wait(timeout=10) == -signal.SIGKILL
    finally:
        os.close(write_fd)
        if checker.poll() is None:
            checker.kill()
            checker.wait()


HOG_MODULE = """\
import os
hog = []
class listener:
    def onconnect(conn):
        conn.write(f"{os.getpid()}\\n")
    def onincoming(conn, data):
        if data.startswith(b"grow"):
            hog.append(b"x" * (120 << 20))  # written, so resident
        conn.write(data)
module.provides("net", listener=listener, default_port=0)
"""


@pytest.mark.server
def test_worker_above_max_worker_memory_is_recycled_gracefully(mpnet, write_module):
    path = write_module("hog", HOG_MODULE)
    limit = 100 << 20
    server = mpnet(config([str(path)], workers=1, max_worker_memory=limit, graceful_timeout=20))
    port = server.port("hog")
    (old,) = settled(server, 1)
    with Client(port) as client:
        assert int(client.read_until(b"\n")) == old
        client.send(b"grow\n")
        assert client.read_until(b"\n") == b"grow\n"
        server.wait_log(rf"worker 0 \(pid {old}\) uses \d+ bytes \(max_worker_memory {limit}\)")
        server.wait_log(rf"worker 0 \(pid {old}\) draining: recycled")
        # Graceful: the connection it had is still served while it drains...
        client.send(b"after\n")
        assert client.read_until(b"\n") == b"after\n"
        # ...and new ones go to its successor in the slot.
        (new,) = {w["pid"] for w in ready_workers(server)}
        assert new != old
        wait_for(lambda: greeting_pid(port) == new, what="the successor to take over")
    server.wait_log(rf"worker 0 \(pid {old}\) stopped \(exited with code 0\)")
    assert "killed" not in server.log


# -- control socket -----------------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Path:
    """A directory other users may traverse (pytest's tmp dirs are 0700: no test of the
    socket's own mode could get past them)."""
    directory = Path(tempfile.mkdtemp(prefix="mpnet-control-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.server
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_control_socket_permissions_and_refused_peers(mpnet, shared_dir):
    path = shared_dir / "control.sock"
    server = mpnet(
        config(["echo"], workers=1, echo_ports=[0], control_socket=str(path)), start=False
    )
    old_umask = os.umask(0)  # the mode must not depend on the umask mpnet was started with
    try:
        server.start()
    finally:
        os.umask(old_umask)
    mode = path.lstat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

    # The file mode stops other users at connect().
    assert as_nobody(raw_request(path)) == "connect: errno 13"
    assert as_nobody(client_request(path)) == f"ControlError: permission denied on {path}"

    # With the file opened up, SO_PEERCRED still refuses them, and the master says so.
    path.chmod(0o666)
    answer = as_nobody(raw_request(path))
    assert json.loads(answer) == {"ok": False, "error": "permission denied"}
    assert as_nobody(client_request(path)) == "ControlError: permission denied"
    server.wait_log(r"control socket: refused pid \d+ \(uid 65534\): not allowed", count=2)

    # Root is welcome.
    result = run_mpnet(server.directory, "status", "-s", str(path))
    assert result.returncode == 0, result.stderr
    assert f"mpnet pid {server.pid}" in result.stdout


@pytest.mark.server
def test_status_stop_and_cli_errors(mpnet):
    server = mpnet(config(["echo", "lastsaid"], workers=2, echo_ports=[0], lastsaid_ports=[0]))
    echo_port, lastsaid_port = server.port("echo"), server.port("lastsaid")
    with Client(echo_port) as client:
        client.read_until(b"\n")
        wait_for(lambda: sum(w["connections"] for w in status(server)["workers"]) == 1)

        table = mpnet_cli(server, "status")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert re.match(rf"mpnet pid {server.pid}, up \d+s, generation 1, 2 worker slot", lines[0])
        assert lines[1].split() == [
            "slot", "pid", "gen", "state", "conns", "served", "refused", "tls-fail", "cpu%",
            "rss", "uptime",
        ]  # fmt: skip
        rows = [line.split() for line in lines[2:4]]
        assert {int(row[1]) for row in rows} == settled(server, 2)
        assert all(row[3] == "ready" and row[9].endswith("M") for row in rows)
        assert all(row[6] == row[7] == "0" for row in rows)
        assert sorted(int(row[4]) for row in rows) == [0, 1]
        assert f"  echo (module echo) -> 127.0.0.1:{echo_port}" in lines
        assert f"  lastsaid (module lastsaid) -> 127.0.0.1:{lastsaid_port}" in lines

        raw = mpnet_cli(server, "status", "--json")
        assert raw.returncode == 0, raw.stderr
        data = json.loads(raw.stdout)["status"]
        assert data["pid"] == server.pid and data["slots"] == 2
        worker = data["workers"][0]
        assert set(worker) == {
            "slot", "pid", "generation", "state", "connections", "served", "refused",
            "tls_failures", "cpu_percent", "rss", "uptime",
        }  # fmt: skip
        assert worker["rss"] > 1 << 20 and worker["cpu_percent"] >= 0
        assert {s["name"]: s["endpoints"] for s in data["services"]} == {
            "echo": [f"127.0.0.1:{echo_port}"],
            "lastsaid": [f"127.0.0.1:{lastsaid_port}"],
        }

    result = mpnet_cli(server, "stop")
    assert result.returncode == 0 and "graceful stop started" in result.stdout
    assert server.wait_exit() == 0
    assert not (server.directory / "control.sock").exists()
    result = mpnet_cli(server, "status")
    assert result.returncode == 1 and "is mpnet running?" in result.stderr


@pytest.mark.server
def test_hostile_control_requests_get_an_error_and_the_master_carries_on(mpnet):
    server = mpnet(config(["echo"], workers=1, echo_ports=[0]))
    path = server.directory / "control.sock"
    hostile = [
        b"[" * 50_000 + b"\n",  # ended the master once (RecursionError in json.loads)
        b"{" * 50_000 + b"\n",
        b"\xff\xfe\x00garbage\n",
        b'{"command": "workers", "count": 1e999}\n',
        b'{"command": {"nested": [1, 2, 3]}}\n',
        b"[]\n",
    ]
    for line in hostile:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(str(path))
            sock.sendall(line)
            answer = b""
            while not answer.endswith(b"\n") and (chunk := sock.recv(65536)):
                answer += chunk
        finally:
            sock.close()
        reply = json.loads(answer)
        assert reply["ok"] is False and reply["error"], (line[:20], reply)
    assert server.proc.poll() is None
    assert control_request(path, StatusRequest(), timeout=10).status["workers"]


SHARED_COUNTER = """\
import os
counts = module.shared("counts")
class listener:
    async def onconnect(conn):
        conn.write(f"{os.getpid()} {await counts.incr('connections')}\\n")
module.provides("net", listener=listener, default_port=0)
"""


@pytest.mark.server
def test_the_master_stays_single_threaded(mpnet, write_module):
    """The master forks workers and reload checkers, and a fork while another thread runs may
    deadlock the child: nothing the master does may start a thread (a library's pool included)."""
    path = write_module("counter", SHARED_COUNTER)
    server = mpnet(config([str(path)], workers=2, state_file="state.db"))
    port = server.port("counter")

    def threads() -> dict[int, str]:
        """The master's threads, by id, with their names."""
        task = Path(f"/proc/{server.pid}/task")
        return {int(tid): (task / tid / "comm").read_text().strip() for tid in os.listdir(task)}

    def serve_on_every_worker() -> None:
        seen: set[int] = set()

        def one() -> bool:
            with Client(port) as client:
                seen.add(int(client.read_until(b"\n").split()[0]))
            return seen >= worker_pids(server)

        wait_for(one, what="a connection served by every worker")

    master_only = {server.pid: threads()[server.pid]}
    assert threads() == master_only
    serve_on_every_worker()
    assert threads() == master_only
    assert mpnet_cli(server, "status").returncode == 0
    server.signal(signal.SIGHUP)
    server.wait_log("reload complete: generation 2")
    settled(server, 2)
    serve_on_every_worker()
    assert threads() == master_only
    server.signal(signal.SIGTTIN)
    settled(server, 3)
    serve_on_every_worker()
    assert threads() == master_only
