"""mpnet under systemd's protocols, with real processes: sd_notify datagrams read from a socket
the test binds, socket activation through the real ``systemd-socket-activate``, and the
privilege drop of a master started as root.

(tests/test_systemd.py covers the pieces of mpnet/systemd.py one by one.)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import (
    PID_MODULE,
    Client,
    Server,
    as_nobody,
    client_request,
    config,
    connect_to_each_worker,
    free_port,
    mpnet_cli,
    run_mpnet,
    settled,
    status,
    wait_for,
)

pytestmark = pytest.mark.server

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

BLOCKER_MODULE = """\
import os, time
class listener:
    def onconnect(conn):
        conn.write(f"{os.getpid()}\\n")
    def onincoming(conn, data):
        if data.startswith(b"block"):
            time.sleep(60)
        conn.write(data)
module.provides("net", listener=listener, default_port=0)
"""


class NotifySocket:
    """The service manager's end of $NOTIFY_SOCKET: every datagram, parsed, with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def find(self, key: str, after: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.messages[:] if key in m and t > after]

    def wait(self, key: str, after: float = 0.0, value: str | None = None) -> tuple[float, dict]:
        def found() -> tuple[float, dict] | None:
            for when, message in self.find(key, after):
                if value is None or message[key] == value:
                    return when, message
            return None

        return wait_for(found, what=f"{key}={value or '...'} on $NOTIFY_SOCKET")

    def pings(self, start: float, end: float) -> list[float]:
        return [t for t, m in self.messages[:] if "WATCHDOG" in m and start <= t <= end]


def largest_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        yield notify
    finally:
        notify.close()


def test_notify_protocol(mpnet, write_module, notify_socket):
    path = write_module("blocker", BLOCKER_MODULE)
    server = mpnet(
        config([str(path)], workers=2, worker_timeout=2, graceful_timeout=2),
        start=False,
        env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"},
    )
    server.start()
    port = server.port("blocker")

    # READY=1 once every worker listens; the status line says so.
    ready_at, ready = notify_socket.wait("READY")
    assert ready == {"READY": "1", "STATUS": "2/2 workers ready, 0 connections"}
    assert len(notify_socket.find("READY")) == 1
    assert notify_socket.find("STATUS")

    # WATCHDOG=1 every WATCHDOG_USEC / 2 = 0.2 s while all is well.
    wait_for(lambda: len(notify_socket.pings(ready_at, time.monotonic())) >= 6, what="pings")
    pings = notify_socket.pings(ready_at, time.monotonic())
    assert largest_gap(pings) < 0.4  # systemd would have killed us at 0.4 s
    assert 0.15 < (pings[-1] - pings[0]) / (len(pings) - 1) < 0.3

    # Reload: RELOADING=1 with the request's CLOCK_MONOTONIC, then READY=1 again.
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    server.signal(signal.SIGHUP)
    reloading_at, reloading = notify_socket.wait("RELOADING")
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= before + 5_000_000
    _, again = notify_socket.wait("READY", after=reloading_at)
    assert again["STATUS"].startswith("2/2 workers ready")
    server.wait_log("reload complete: generation 2")

    # A worker's loop blocks: the pings stop until it is killed and replaced.
    clients = connect_to_each_worker(port, settled(server, 2))
    victim, bystander = sorted(clients)
    try:
        blocked_at = time.monotonic()
        clients[victim].send(b"block\n")
        server.wait_log(rf"\(pid {victim}\) killed by signal SIGKILL; replacing it")
        killed_at = time.monotonic()
        wait_for(
            lambda: len(notify_socket.pings(killed_at, time.monotonic())) >= 3,
            what="pings again once the blocked worker is gone",
        )
        during = notify_socket.pings(blocked_at - 1, time.monotonic())
        assert largest_gap(during) > 0.8  # no ping while the loop was blocked
        assert largest_gap(notify_socket.pings(killed_at + 0.5, time.monotonic())) < 0.4

        # Graceful stop: STOPPING=1, and more time for the drain (graceful_timeout + 10 s).
        held = clients[bystander]
        server.signal(signal.SIGTERM)
        notify_socket.wait("STOPPING", value="1")
        _, extend = notify_socket.wait("EXTEND_TIMEOUT_USEC")
        assert int(extend["EXTEND_TIMEOUT_USEC"]) == 12_000_000
        held.send(b"draining\n")
        assert held.read_until(b"\n") == b"draining\n"
    finally:
        for client in clients.values():
            client.close()
    assert server.wait_exit() == 0
    # Workers never talk to systemd: the master removed $NOTIFY_SOCKET before forking.
    assert "NOTIFY_SOCKET" not in server.log


WORKER_ONLY_FAILURE_MODULE = """\
import os
if __import__("mpnet.log").log.role() != "checker" and os.path.exists({flag!r}):
    raise RuntimeError("fails in workers only")  # the reload's check passes
class listener:
    def onconnect(conn):
        conn.write(f"{{os.getpid()}}\\n")
module.provides("net", listener=listener, default_port=0)
"""


def test_reload_whose_workers_fail_to_start_reports_ready_and_keeps_serving(
    mpnet, write_module, notify_socket, tmp_path
):
    flag = tmp_path / "fail"
    path = write_module("fragile", WORKER_ONLY_FAILURE_MODULE.format(flag=str(flag)))
    server = mpnet(
        config([str(path)], workers=2),
        start=False,
        env={"NOTIFY_SOCKET": str(notify_socket.path)},
    )
    server.start()
    port = server.port("fragile")
    notify_socket.wait("READY")
    pids = settled(server, 2)

    flag.touch()
    server.signal(signal.SIGHUP)
    reloading_at, _ = notify_socket.wait("RELOADING")
    _, ready = notify_socket.wait("READY", after=reloading_at)
    assert ready["STATUS"].startswith("2/2 workers ready")
    assert "reload failed" in ready["STATUS"] and "fails in workers only" in ready["STATUS"]
    server.wait_log(r"reload failed: generation 2 did not start \(worker \d \(pid \d+\): ")
    # The old generation serves on, with the same workers; no restart loop.
    current = status(server)
    assert current["generation"] == 1 and not current["reloading"]
    assert current["reload_failed"]["generation"] == 2
    table = mpnet_cli(server, "status").stdout.splitlines()[0]
    assert "; last reload failed: worker " in table and "fails in workers only" in table
    assert settled(server, 2) == pids
    wait_for(lambda: pids <= {greeting_pid(port) for _ in range(6)}, what="the old workers")
    assert "could not start" not in server.log and "crash back-off" not in server.log

    # The same through `mpnet reload --wait`: it says the reload failed.
    result = mpnet_cli(server, "reload", "--wait")
    assert result.returncode == 1
    assert "reload failed" in result.stderr and "fails in workers only" in result.stderr
    assert settled(server, 2) == pids

    # Fixed: the next reload goes through (generation numbers are never reused).
    flag.unlink()
    done_at = time.monotonic()
    result = mpnet_cli(server, "reload", "--wait")
    assert result.returncode == 0, result.stderr
    assert "reload complete: generation 4" in result.stdout
    _, ready = notify_socket.wait("READY", after=done_at)
    assert "reload failed" not in ready["STATUS"]
    assert status(server)["reload_failed"] is None
    assert not pids & settled(server, 2)


# -- socket activation --------------------------------------------------------------------------


class ActivatedServer(Server):
    """``systemd-socket-activate -l ADDR mpnet serve``: it binds, and execs mpnet in its own
    place (same pid) on the first connection."""

    def __init__(self, directory: Path, config_text: str, activator: list[str]) -> None:
        super().__init__(directory, config_text)
        self.activator = activator

    def argv(self, command: str, extra: tuple[str, ...]) -> list[str]:
        # systemd-socket-activate passes on only the variables named by -E: without
        # PYTHONPATH, the exec'ed mpnet would be whatever the interpreter has installed.
        return [*self.activator, "-E", "PYTHONPATH", *super().argv(command, extra)]

    def start(self, *extra: str, command: str = "serve", wait_ready: bool = False) -> Server:
        super().start(*extra, command=command, wait_ready=False)
        self.wait_log(r"Listening on 127\.0\.0\.1:\d+ as 3")
        return self


def _pass_env() -> list[str]:
    """systemd-socket-activate clears the environment: keep PYTHONPATH (a checkout under test
    rather than the installed mpnet)."""
    return ["-E", f"PYTHONPATH={os.environ['PYTHONPATH']}"] if "PYTHONPATH" in os.environ else []


def listening_sockets(pid: int, port: int) -> list[tuple[int, int]]:
    """(fd, inode) of every socket of *pid* listening on *port*."""
    found = []
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.fd != -1:
            found.append((conn.fd, os.stat(f"/proc/{pid}/fd/{conn.fd}").st_ino))
    return sorted(found)


def greeting_pid(port: int) -> int:
    with Client(port) as client:
        return int(client.read_until(b"\n"))


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activation_with_systemd_socket_activate(tmp_path, write_module, workers):
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    path = write_module("pid", PID_MODULE)
    port = free_port()
    directory = tmp_path / "activated"
    directory.mkdir()
    server = ActivatedServer(
        directory,
        config([str(path)], workers=workers, pid_ports=[port]),
        [activate, *_pass_env(), "-l", f"127.0.0.1:{port}", "--fdname=pid"],
    )
    try:
        server.start()
        # Nothing runs yet; the first connection starts mpnet and is served by it.
        with Client(port, timeout=30) as first:
            first_pid = int(first.read_until(b"\n"))
        server.wait_log(rf"\bready: {workers} worker")
        # One socket shared by every worker: no steering (mpnet/steering.py), said once.
        assert server.log.count("steering off for socket-activated endpoints") == 1
        pids = settled(server, workers)
        assert first_pid in pids
        assert "mpnet" in psutil.Process(server.pid).cmdline()  # exec'ed in place
        # The master serves from the passed fd 3 and bound nothing of its own.
        adopted = listening_sockets(server.pid, port)
        assert [fd for fd, _ in adopted] == [3]
        inode = adopted[0][1]
        for pid in pids:  # every worker accepts on that very socket
            assert [ino for _, ino in listening_sockets(pid, port)] == [inode]
        wait_for(lambda: pids <= {greeting_pid(port) for _ in range(4)}, what="every worker")

        # A reload keeps the passed socket: same fd, same socket, new workers on it.
        server.signal(signal.SIGHUP)
        server.wait_log("reload complete: generation 2")
        new = settled(server, workers)
        assert not pids & new
        assert listening_sockets(server.pid, port) == adopted
        wait_for(lambda: new <= {greeting_pid(port) for _ in range(4)}, what="the new workers")

        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    finally:
        server.stop()


def test_socket_activation_logs_adopted_and_refuses_an_unmatched_socket(tmp_path, write_module):
    """Two sockets passed, the config serves one: the other would sit bound and dead, its
    clients hanging, so the master refuses to start and names it."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    path = write_module("pid", PID_MODULE)
    port, stray = free_port(), free_port()
    directory = tmp_path / "activated"
    directory.mkdir()
    server = ActivatedServer(
        directory,
        config([str(path)], workers=1, pid_ports=[port]),
        [activate, "-l", f"127.0.0.1:{port}", "-l", f"127.0.0.1:{stray}"],
    )
    try:
        server.start()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 30):
            pass  # starts mpnet, which refuses
        assert server.wait_exit() == 1
        server.wait_log(
            rf"socket activation: passed fd 3 \(127\.0\.0\.1:{port}, name '[^']*'\) serves pid"
        )
        server.wait_log(
            rf"cannot start: socket activation: passed fd 4 \(127\.0\.0\.1:{stray}, name "
            rf"'[^']*'\) matches no service endpoint \(endpoints: pid 127\.0\.0\.1:{port}\)"
        )
        assert "ready:" not in server.log
    finally:
        server.stop()


# -- privileges ---------------------------------------------------------------------------------

# Python lives under /root/.pyenv here and /root is 0700: a worker that became nobody cannot
# import a stdlib module that was not imported before the drop. The module file itself is read
# and compiled as root (mpnet/module.py load_modules), so modules using only what mpnet has
# already loaded (os, asyncio, time, socket...) work; `import decimal` would not.
UID_MODULE = """\
import itertools
import os
class listener:
    def onconnect(conn):
        conn.write(f"{os.geteuid()} {os.getegid()}\\n")
    def onincoming(conn, data):
        conn.write(data)
module.provides("net", listener=listener, default_port=0)
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that ``nobody`` may traverse (pytest's tmp dirs are 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="mpnet-priv-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@root_only
def test_privilege_drop_to_user(mpnet, write_module, shared_dir):
    nobody = pwd.getpwnam("nobody")
    path = write_module("uid", UID_MODULE)
    control = shared_dir / "control.sock"
    server = mpnet(config([str(path)], workers=2, user="nobody", control_socket=str(control)))
    port = server.port("uid")

    def identities() -> set[str]:
        seen = set()
        for _ in range(6):
            with Client(port) as client:
                seen.add(client.read_until(b"\n").decode().strip())
        return seen

    assert identities() == {f"{nobody.pw_uid} {nobody.pw_gid}"}
    master = psutil.Process(server.pid)
    assert master.uids().real == master.uids().effective == 0  # the master keeps root
    for worker in map(psutil.Process, settled(server, 2)):
        assert set(worker.uids()) == {nobody.pw_uid}  # real, effective and saved
        assert set(worker.gids()) == {nobody.pw_gid}
    assert "worker 0 [mpnet] info: dropped privileges to user nobody" in server.log

    # The service's own user may use the control socket (SO_PEERCRED), once it can reach it.
    control.chmod(0o666)
    assert as_nobody(client_request(control)) == "answered"

    server.signal(signal.SIGHUP)
    server.wait_log("reload complete: generation 2")
    settled(server, 2)
    assert identities() == {f"{nobody.pw_uid} {nobody.pw_gid}"}


@root_only
def test_refuses_workers_as_root_without_user_or_allow_root(tmp_path):
    path = tmp_path / "mpnet.toml"
    path.write_text('modules = ["echo"]\ninterfaces = ["127.0.0.1"]\necho_ports = [0]\n')
    result = run_mpnet(tmp_path, "serve", "-c", str(path))
    assert result.returncode == 1
    assert "refusing to run workers as root" in result.stderr
    assert 'set user = "<account>"' in result.stderr and "allow_root = true" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "control.sock").exists()


def wait_file(path: Path, pattern: str, timeout: float = 20.0) -> None:
    def found() -> bool:
        try:
            return re.search(pattern, path.read_text()) is not None
        except FileNotFoundError:
            return False

    wait_for(found, timeout, what=f"{pattern!r} in {path}")


@root_only
def test_sigusr1_reopens_the_log_of_workers_running_as_user(mpnet, tmp_path):
    """The workers (nobody) cannot open the root-owned path: the master reopens it and hands
    them the descriptor. A worker started later inherits the new file."""
    log_path = tmp_path / "mpnet.log"
    server = mpnet(
        config(["echo"], workers=1, echo_ports=[0], user="nobody", log_file=str(log_path)),
        start=False,
    )
    server.start(wait_ready=False)
    wait_file(log_path, r"ready: 1 worker")
    port = int(re.search(r"-> 127\.0\.0\.1:(\d+)", log_path.read_text()).group(1))
    rotated = log_path.rename(tmp_path / "mpnet.log.1")
    server.signal(signal.SIGUSR1)
    wait_file(log_path, r"log file reopened")
    with Client(port) as client:
        client.read_until(b"\n")
    wait_file(log_path, r"worker 0 \[echo\] info: Connection closed")
    assert "Connection closed" not in rotated.read_text()
    assert "cannot reopen" not in log_path.read_text() + rotated.read_text()

    (worker,) = settled(server, 1)
    os.kill(worker, signal.SIGKILL)  # its replacement forks from the master: the new file
    wait_file(log_path, rf"worker 0 \(pid {worker}\) killed by signal SIGKILL")
    (replacement,) = settled(server, 1)
    with Client(port) as client:
        client.read_until(b"\n")
    wait_file(log_path, r"Connection closed[^\n]*\n(.|\n)*Connection closed")
    assert "Connection closed" not in rotated.read_text()
    assert psutil.Process(replacement).uids().effective == pwd.getpwnam("nobody").pw_uid
