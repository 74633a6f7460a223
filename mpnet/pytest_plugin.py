"""The ``mpnet_server`` pytest fixture: a real ``mpnet serve`` for integration tests.

Active in every pytest run once mpnet is installed (entry point ``pytest11``)::

    def test_echo(mpnet_server):
        srv = mpnet_server(modules=["echo.py"], workers=2, echo_read_timeout=30)
        with srv.connect("echo") as client:
            assert client.recv_until(b"\\n") == b"Hello!\\n"

Every service listens on a free port on 127.0.0.1 (``<service>_ports = [0]``, unless the test
sets them); :meth:`MpnetServer.port` reads the real ones from the master's status through the
control socket, which lives in the test's temporary directory. Run as root, the config gets
``allow_root = true`` (unless the test sets ``user``), so the same test passes in CI containers
and on a laptop. The server and every worker it started are stopped by PID at teardown, even
when the test fails; the server's log is then part of the failure report (captured output).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from .controlclient import ControlError, request
from .pure.controlproto import ControlReply, ReloadRequest, StatusRequest
from .pure.tomlvalue import toml_value

START_TIMEOUT = 60.0  # generous: CI machines are busy


class MpnetServer:
    """One ``mpnet serve`` child process, its config and log in *directory*."""

    def __init__(
        self, directory: Path, modules: list[str], workers: int | str = 1, **options: Any
    ) -> None:
        self.directory = directory
        self.config_path = directory / "mpnet.toml"
        self.log_path = directory / "server.log"
        self.control_path = directory / "control.sock"
        self.modules = [_module_spec(spec) for spec in modules]
        self.options = {"workers": workers, **options}
        self.proc: subprocess.Popen[bytes] | None = None
        self._pids: set[int] = set()
        self._ports: dict[str, list[int]] = {}

    # -- life -------------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> MpnetServer:
        """Write the config (every service on a free port), start, wait until it is ready."""
        keys: dict[str, Any] = {"interfaces": ["127.0.0.1"], **self.options}
        keys.setdefault("control_socket", str(self.control_path))
        if os.geteuid() == 0 and "user" not in keys:
            keys.setdefault("allow_root", True)
        self._write_config(keys)
        for service in self._listening_services():
            keys.setdefault(f"{service}_ports", [0])
        self._write_config(keys)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mpnet", "serve", "-c", str(self.config_path)],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                start_new_session=True,
            )
        self._pids.add(self.proc.pid)
        self.wait_log(r"\bready: \d+ worker", timeout, "the master to report ready")
        self._ports = self._read_ports()
        return self

    def stop(self) -> None:
        """Quick stop (SIGINT: connections closed at once, no graceful wait); whatever the
        server started that is left is then killed, by PID."""
        if self.proc is None:
            return
        self._remember_children()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        for pid in self._pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its session: started with its pid
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def reload(self) -> ControlReply:
        """``mpnet reload``: answered once the new modules are checked (``.ok``, ``.error``)."""
        return request(self.control_path, ReloadRequest())

    # -- what a test reads ----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, Any]:
        """The master's status (``mpnet status --json``), through the control socket."""
        status = request(self.control_path, StatusRequest()).status
        assert status is not None
        return status

    def port(self, service: str) -> int:
        """The port *service* listens on (the first, if several)."""
        return self.ports(service)[0]

    def ports(self, service: str) -> list[int]:
        if service not in self._ports:
            known = ", ".join(self._ports) or "none"
            raise KeyError(f"no service {service!r} listens (services: {known})")
        return self._ports[service]

    def connect(self, service: str, timeout: float = 10.0) -> LineClient:
        """A blocking client connected to *service*."""
        return LineClient(self.port(service), timeout=timeout)

    def wait_log(self, pattern: str, timeout: float = START_TIMEOUT, what: str = "") -> str:
        """Wait until the log matches *pattern*; fail early if the server exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log)
            if match:
                return match.group(0)
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"mpnet exited ({self.proc.returncode}) before {what or pattern!r}; "
                    f"log:\n{self.log}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or pattern!r}; log:\n{self.log}")
            time.sleep(0.05)

    # -- plumbing ---------------------------------------------------------------------------------

    def _write_config(self, keys: dict[str, Any]) -> None:
        lines = [f"modules = {toml_value(self.modules)}"]
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _listening_services(self) -> list[str]:
        """The services the modules provide that listen somewhere (``mpnet check``)."""
        result = subprocess.run(
            [sys.executable, "-m", "mpnet", "check", "--json", "--no-probe", "-c", "mpnet.toml"],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            try:  # with --json, mpnet reports errors as {"error": ...} on stdout
                reason = json.loads(result.stdout)["error"]
            except (ValueError, KeyError, TypeError):
                reason = (result.stderr or result.stdout).strip()
            raise AssertionError(f"mpnet check failed: {reason}")
        services = json.loads(result.stdout)["services"]
        return [name for name, endpoints in services.items() if endpoints]

    def _read_ports(self) -> dict[str, list[int]]:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                services = self.status()["services"]
                break
            except ControlError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return {
            service["name"]: [int(address.rsplit(":", 1)[1]) for address in service["endpoints"]]
            for service in services
        }

    def _remember_children(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            self._pids.update(child.pid for child in psutil.Process(self.proc.pid).children())

    def __enter__(self) -> MpnetServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LineClient:
    """A blocking TCP client with a deadline on every read."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.buffer = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv_until(self, marker: bytes = b"\n", timeout: float | None = None) -> bytes:
        """Everything up to and including *marker* (fails after *timeout* seconds)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while marker not in self.buffer:
            if not self._fill(deadline, f"no {marker!r}"):
                raise AssertionError(f"connection closed before {marker!r}; got {self.buffer!r}")
        index = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:index], self.buffer[index:]
        return data

    def recv_to_eof(self, timeout: float | None = None) -> bytes:
        """Everything until the server closes the connection."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._fill(deadline, "the connection still open"):
            pass
        data, self.buffer = self.buffer, b""
        return data

    def _fill(self, deadline: float, what: str) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{what} within the deadline; got {self.buffer!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"{what} within the deadline; got {self.buffer!r}") from None
        except ConnectionResetError:
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def mpnet_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., MpnetServer]]:
    """``mpnet_server(modules=[...], workers=1, **config_keys)`` -> a started
    :class:`MpnetServer`; every one is stopped at teardown."""
    servers: list[MpnetServer] = []

    def start(modules: list[str], workers: int | str = 1, **options: Any) -> MpnetServer:
        server = MpnetServer(tmp_path_factory.mktemp("mpnet"), modules, workers, **options)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
            # Shown by pytest only when the test fails (captured output of the teardown).
            print(f"--- log of mpnet serve in {server.directory} ---\n{server.log}")


def _module_spec(spec: str | os.PathLike[str]) -> str:
    """Module paths are made absolute (the config lives in a temporary directory)."""
    text = os.fspath(spec)
    if text.endswith(".py") or "/" in text:
        return str(Path(text).resolve())
    return text
