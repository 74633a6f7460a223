"""Test harness: real ``mpnet serve`` processes, real sockets on 127.0.0.1, deadlines not sleeps.

Every process started here is stopped by PID (the whole session group is killed in ``stop``),
whatever the test's outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from mpnet.controlclient import request as control_request
from mpnet.pure.controlproto import StatusRequest
from mpnet.pure.resp import RespParser, RespProtocolError

DEADLINE = 20.0


def free_port() -> int:
    """A port that was free a moment ago (for tests that need the same port twice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float = DEADLINE, what: str = "") -> Any:
    """Poll *condition* until it returns something true, or fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


OPEN_CLIENTS: set[Client] = set()
"""Clients a test opened and has not closed: conftest closes them after each test, so a leaked
socket is not reported (as a ResourceWarning, an error here) in whatever test runs at the next
garbage collection."""


class Client:
    """A blocking TCP client with a deadline on every read."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""
        self.timeout = timeout
        OPEN_CLIENTS.add(self)

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def read_until(self, marker: bytes, timeout: float | None = None) -> bytes:
        """Read until *marker* has arrived; return everything up to and including it."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while marker not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker!r} within the deadline; got {self.buffer!r}")
            chunk = self._recv(remaining, f"no {marker!r}")
            if not chunk:
                raise AssertionError(f"connection closed before {marker!r}; got {self.buffer!r}")
            self.buffer += chunk
        index = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:index], self.buffer[index:]
        return data

    def read_exactly(self, size: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(self.buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"only {len(self.buffer)} of {size} bytes arrived")
            chunk = self._recv(remaining, f"only {len(self.buffer)} of {size} bytes")
            if not chunk:
                raise AssertionError(f"connection closed after {len(self.buffer)} of {size} bytes")
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_to_eof(self, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"connection still open; got {self.buffer!r}")
            try:
                chunk = self._recv(remaining, "connection still open")
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                data, self.buffer = self.buffer, b""
                return data
            self.buffer += chunk

    def _recv(self, timeout: float, what: str) -> bytes:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"{what} within the deadline; got {self.buffer!r}") from None

    def close(self) -> None:
        self.sock.close()
        OPEN_CLIENTS.discard(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SERVER_TEST: list[bool] = [True]
"""Whether the running test carries the ``server`` marker (set by conftest for each test)."""


def require_server_marker() -> None:
    """Keep ``-m "not server"`` honest: a test that starts mpnet must say so."""
    if not SERVER_TEST[0]:
        raise AssertionError("this test starts mpnet processes: mark it @pytest.mark.server")


class Server:
    """One ``mpnet serve`` (or any mpnet command) as a child process with its log captured."""

    def __init__(self, directory: Path, config: str | None, *args: str, env: dict | None = None):
        self.directory = directory
        self.config_path = directory / "mpnet.toml"
        if config is not None:
            self.config_path.write_text(config)
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._lock = threading.Condition()
        self._reader: threading.Thread | None = None
        self.known_pids: set[int] = set()

    def argv(self, command: str, extra: tuple[str, ...]) -> list[str]:
        """The command line ``start`` runs (a subclass may wrap it in another program)."""
        argv = [sys.executable, "-m", "mpnet", command]
        if self.config_path.exists():
            argv += ["-c", str(self.config_path)]
        return argv + self.args + list(extra)

    def start(self, *extra: str, command: str = "serve", wait_ready: bool = True) -> Server:
        require_server_marker()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self.proc = subprocess.Popen(
            self.argv(command, extra),
            cwd=self.directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.known_pids.add(self.proc.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_ready:
            self.wait_log(r"\bready: \d+ worker", what="the master to report ready")
        return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            with self._lock:
                self._lines.append(line)
                self._lock.notify_all()
        with self._lock:
            self._lines.append("")  # EOF marker keeps waiters from spinning forever
            self._lock.notify_all()

    @property
    def log(self) -> str:
        with self._lock:
            return "".join(self._lines)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_log(
        self, pattern: str, timeout: float = DEADLINE, count: int = 1, what: str = ""
    ) -> re.Match[str]:
        """Wait until *pattern* has matched *count* times in the log; return the last match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                matches = list(regex.finditer("".join(self._lines)))
                if len(matches) >= count:
                    return matches[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.proc
                    and self.proc.poll() is not None
                    and self._lines
                    and self._lines[-1] == ""
                ):
                    raise AssertionError(
                        f"log never showed {what or pattern!r} ({count}x); log:\n"
                        + "".join(self._lines)
                    )
                self._lock.wait(min(remaining, 0.2))

    def port(self, service: str) -> int:
        """The real port of *service* as the master logged it."""
        match = self.wait_log(rf"service {service} \(module \w+\) -> [^\n]*?:(\d+)")
        return int(match.group(1))

    def workers(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        self.known_pids.update(child.pid for child in children)
        alive = []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
        return alive

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.workers()}

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        """Wait for the master to exit, then for its last log lines to be read (the reader
        thread lags behind the process), so ``log`` is complete afterwards."""
        assert self.proc is not None
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"mpnet did not exit within {timeout}s; log:\n{self.log}"
            ) from None
        if self._reader is not None:
            self._reader.join(10)  # EOF once no process of the tree holds the pipe
        return status

    def stop(self) -> None:
        """Stop everything this server started, by PID; used in fixtures' teardown."""
        if self.proc is None:
            return
        self.workers()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        for pid in self.known_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        # The reader ends at EOF; closing the pipe under it instead would raise in its thread.
        # If something outside the group still holds the pipe, the reader keeps it.
        if self._reader:
            self._reader.join(5)
        if self.proc.stdout and not (self._reader and self._reader.is_alive()):
            self.proc.stdout.close()


def run_mpnet(directory: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a short mpnet command (``check``, a failing ``serve``...) to completion."""
    require_server_marker()
    return subprocess.run(
        [sys.executable, "-m", "mpnet", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


PID_MODULE = """\
import os
class listener:
    def onconnect(conn):
        conn.write(f"{os.getpid()}\\n")
    def onincoming(conn, data):
        conn.write(data)
module.provides("net", listener=listener, default_port=0)
"""
"""A service module that greets with its worker's pid, then echoes."""


def worker_status(server: Server) -> list[dict[str, Any]]:
    """The workers' rows of ``mpnet status --json`` (the CLI, through the control socket)."""
    result = run_mpnet(server.directory, "status", "--json", "-c", str(server.config_path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["status"]["workers"]


def config(modules: list[str], **keys: Any) -> str:
    """A TOML config: ``config(["echo"], workers=2, echo_ports=[0])``."""
    lines = [f"modules = {_toml(modules)}", 'interfaces = ["127.0.0.1"]']
    if os.geteuid() == 0 and "user" not in keys:
        keys.setdefault("allow_root", True)
    keys.setdefault("control_socket", "control.sock")  # beside the config, in the test's tmp dir
    for key, value in keys.items():
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


# -- helpers several test modules share ----------------------------------------------------


NOBODY_CLIENT = """\
import os, pwd, socket, sys
from mpnet.controlclient import ControlError, request
from mpnet.pure.controlproto import StatusRequest

how, path = sys.argv[1], sys.argv[2]
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)


def raw():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
    except PermissionError as exc:
        return f"connect: errno {exc.errno}"
    try:
        sock.sendall(b'{"command": "status"}\\n')
    except (BrokenPipeError, ConnectionResetError):
        pass  # may be too late: refused at once
    data = b""
    try:
        while not data.endswith(b"\\n") and (chunk := sock.recv(65536)):
            data += chunk
    except ConnectionResetError:
        pass  # after the answer: it was not read
    sock.close()
    return data.decode()


def client():
    try:
        request(path, StatusRequest(), timeout=5)
    except ControlError as exc:
        return f"ControlError: {exc}"
    return "answered"


sys.stdout.write(raw() if how == "raw" else client())
"""
"""Runs as root until its imports are done, then as ``nobody``: ``raw PATH`` connects, asks for
the status and prints the answer line (or why there is none); ``client PATH`` does what
``mpnet status`` does (mpnet.controlclient.request), as the refused user would run it."""


def as_nobody(request: list[str], timeout: float = 10.0) -> str:
    """Run *request* (``raw_request``/``client_request``) as ``nobody``; return what it printed.

    A new Python rather than a fork of this process: the harness's log-reader threads run here,
    and a fork() while threads run may deadlock the child (Python 3.12 warns). The pyenv Python
    under /root is out of ``nobody``'s reach, hence the drop after the imports."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", NOBODY_CLIENT, *request],
        env=dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        ),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def raw_request(path: Path) -> list[str]:
    return ["raw", str(path)]


def client_request(path: Path) -> list[str]:
    return ["client", str(path)]


def connect_to_each_worker(port: int, pids: set[int]) -> dict[int, Client]:
    """One connection to every worker (SO_REUSEPORT picks the worker by hash: try until)."""
    clients: dict[int, Client] = {}

    def more() -> bool:
        client = Client(port)
        pid = int(client.read_until(b"\n"))
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
        return set(clients) >= pids

    wait_for(more, what="a connection to every worker")
    return clients


def mpnet_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return run_mpnet(server.directory, *args, "-c", str(server.config_path), timeout=30)


def worker_pids(server: Server) -> set[int]:
    """The live workers' pids. (The harness's Server.worker_pids() raises if a worker exits
    between psutil's children() and status(), which happens during reloads.)"""
    try:
        children = psutil.Process(server.pid).children()
    except psutil.NoSuchProcess:
        return set()
    pids = set()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
    server.known_pids.update(pids)
    return pids


def settled(server: Server, count: int) -> set[int]:
    """Wait until exactly *count* workers run, all ready and of the current generation (none
    draining or exiting); return their pids."""

    def check() -> set[int] | None:
        current = status(server)
        workers = current["workers"]
        pids = {w["pid"] for w in workers}
        if len(workers) == count and all(
            w["state"] == "ready" and w["generation"] == current["generation"] for w in workers
        ):
            return pids if worker_pids(server) == pids else None
        return None

    return wait_for(check, what=f"{count} settled workers")


def status(server: Server) -> dict:
    configured = tomllib.loads(server.config_path.read_text())["control_socket"]
    path = server.directory / configured  # an absolute path stays as it is
    return control_request(path, StatusRequest(), timeout=10).status


class BioClient:
    """A TLS client driven through memory BIOs over a plain socket, so that the test decides
    what each send holds: here a PROXY header and the ClientHello in one segment."""

    def __init__(self, sock: socket.socket, cafile: Path) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = ssl.create_default_context(cafile=str(cafile))
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.plain = b""

    def client_hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def _pump(self, deadline: float) -> None:
        """Send what TLS wants sent, then wait for bytes from the server."""
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())
        self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError("the server closed the connection")
        self.incoming.write(data)

    def handshake(self, timeout: float = 10.0, flush: bool = True) -> None:
        """Complete the handshake; with *flush* False, the client's last flight stays queued
        (to go out with what is sent next)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._pump(deadline)
        if flush and self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.plain:
            try:
                self.plain += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._pump(deadline)
        index = self.plain.index(marker) + len(marker)
        data, self.plain = self.plain[:index], self.plain[index:]
        return data


def resp_outcome(chunks: list[bytes], **limits: int) -> tuple[list[list[bytes]], str | None]:
    """Feed a RESP parser the chunks in order, draining commands after each; return the
    commands and the protocol error, if any."""
    parser = RespParser(**limits)
    commands: list[list[bytes]] = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            commands.extend(parser)
    except RespProtocolError as exc:
        return commands, str(exc)
    return commands, None


WELCOME = re.compile(rb"\* welcome, you are (guest\d+);")  # the chat module's greeting


def command(*args: bytes | str | int) -> bytes:
    """One multibulk request."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespClient(Client):
    """A raw client that reads one whole reply at a time, as the exact bytes."""

    def reply(self) -> bytes:
        line = self.read_until(b"\r\n")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$" and rest != b"-1":
            return line + self.read_exactly(int(rest) + 2)
        if kind in (b"*", b"%") and not rest.startswith(b"-"):
            count = int(rest) * (2 if kind == b"%" else 1)
            return line + b"".join(self.reply() for _ in range(count))
        return line

    def call(self, *args: bytes | str | int) -> bytes:
        self.send(command(*args))
        return self.reply()

    def pid(self) -> int:
        info = self.call("INFO")
        return int(re.search(rb"process_id:(\d+)", info).group(1))


def clients_on_distinct_workers(port: int, count: int) -> list[RespClient]:
    found: dict[int, RespClient] = {}

    def attempt() -> bool:
        client = RespClient(port)
        pid = client.pid()
        if pid in found:
            client.close()
        else:
            found[pid] = client
        return len(found) >= count

    wait_for(attempt, what=f"kv connections on {count} workers")
    return list(found.values())


def make_cert(directory: Path, name: str = "server", cn: str = "localhost") -> tuple[Path, Path]:
    """A self-signed EC certificate for localhost/127.0.0.1: (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-nodes"),
            *("-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def ssl_table(cert: Path, key: Path) -> str:
    return f'{{ certificate = "{cert}", key = "{key}" }}'


def tls_client(port: int, cafile: Path, context: ssl.SSLContext | None = None) -> Client:
    """A harness Client whose socket is wrapped in TLS (verified against *cafile*)."""
    if context is None:
        context = ssl.create_default_context(cafile=str(cafile))
    client = Client(port)
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    return client


def run_in_private_netns(tmp_path: Path, script_template: str, timeout: float) -> Any:
    """Run a Python script in a network namespace of its own (``unshare -n``; the test skips
    unless root with unshare(1) and ip(8)); return the JSON object its last line prints.

    The template gets ``tests``, ``directory`` (a fresh dir) and ``pidfile``; the script writes
    mpnet's pid there, so mpnet (in a session of its own) is ended whatever happens."""

    if shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root, unshare(1) and ip(8) for a private network namespace")
    directory = tmp_path / "netns"
    directory.mkdir()
    pidfile = tmp_path / "mpnet.pid"
    script = tmp_path / "netns_script.py"
    script.write_text(
        script_template.format(
            tests=str(Path(__file__).parent), directory=str(directory), pidfile=str(pidfile)
        )
    )
    proc = subprocess.Popen(
        ["unshare", "-n", sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if pidfile.exists():  # mpnet runs in a session of its own: end it whatever happened
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])
