"""Tests for mpnet.systemd and the shipped systemd units.

The unit checks run the real ``systemd-analyze``; the socket activation test
runs the real ``systemd-socket-activate``.  Both are skipped (with the reason)
where those tools are missing.  Every process started here is killed by PID
in a ``finally`` block, and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from mpnet.privileges import drop_privileges, running_as_root
from mpnet.systemd import ActivatedSocket, Notifier, listen_fds, match_endpoint

ROOT = Path(__file__).resolve().parents[1]
UNIT_DIR = ROOT / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
MAX_EXPOSURE = 2.5
DEADLINE = 20.0

needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)
needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed"
)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def kill_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` by its PID if it still runs, then reap it and close its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=DEADLINE)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def child_env() -> dict[str, str]:
    """Environment for Python children: able to import mpnet from this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_python(code: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------
# Notifier
# --------------------------------------------------------------------------


@pytest.fixture
def notify_server(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path, playing the service manager."""
    path = tmp_path / "notify"
    assert len(os.fsencode(path)) < 108, "tmp_path too long for an AF_UNIX address"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    try:
        yield server, str(path)
    finally:
        server.close()


def make_notifier(address: str, **extra: str) -> Notifier:
    return Notifier.from_environ({"NOTIFY_SOCKET": address, **extra})


def test_disabled_without_notify_socket() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.address is None
    assert notifier.send("READY=1") is False
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None


def test_from_environ_unsets_notify_variables() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "1000000",
        "WATCHDOG_PID": str(os.getpid()),
        "OTHER": "kept",
    }
    notifier = Notifier.from_environ(env)
    assert env == {"OTHER": "kept"}
    assert notifier.enabled
    assert notifier.watchdog_interval() == 0.5

    kept = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000"}
    Notifier.from_environ(kept, unset=False)
    assert kept == {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000"}


def test_from_environ_defaults_to_os_environ(
    monkeypatch: pytest.MonkeyPatch, notify_server: tuple[socket.socket, str]
) -> None:
    server, path = notify_server
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier.from_environ()
    assert "NOTIFY_SOCKET" not in os.environ
    assert notifier.ready()
    assert server.recv(4096) == b"READY=1"


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.ready(), "READY=1"),
        (lambda n: n.ready("serving 4 workers"), "READY=1\nSTATUS=serving 4 workers"),
        (lambda n: n.stopping(), "STOPPING=1"),
        (lambda n: n.stopping("draining"), "STOPPING=1\nSTATUS=draining"),
        (lambda n: n.status("reloaded\nconfig"), "STATUS=reloaded config"),
        (lambda n: n.watchdog(), "WATCHDOG=1"),
        (lambda n: n.extend_timeout(2.5), "EXTEND_TIMEOUT_USEC=2500000"),
        (lambda n: n.mainpid(4242), "MAINPID=4242"),
        (lambda n: n.notify(READY=True, STATUS="x"), "READY=1\nSTATUS=x"),
        (lambda n: n.send("FDSTORE=1"), "FDSTORE=1"),
    ],
    ids=[
        "ready",
        "ready-status",
        "stopping",
        "stopping-status",
        "status",
        "watchdog",
        "extend",
        "mainpid",
        "notify",
        "send",
    ],
)
def test_message_received_exactly(
    notify_server: tuple[socket.socket, str],
    call: Callable[[Notifier], bool],
    expected: str,
) -> None:
    server, path = notify_server
    assert call(make_notifier(path)) is True
    assert server.recv(4096).decode() == expected


def test_reloading_sends_monotonic_usec_in_same_datagram(
    notify_server: tuple[socket.socket, str],
) -> None:
    server, path = notify_server
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert make_notifier(path).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", server.recv(4096).decode())
    assert match, "expected RELOADING=1 and MONOTONIC_USEC in one datagram"
    assert before <= int(match[1]) <= after


def test_abstract_namespace_socket() -> None:
    name = f"mpnet-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        server.settimeout(5)
        notifier = make_notifier("@" + name)
        assert notifier.enabled
        assert notifier.ready("up")
        assert server.recv(4096) == b"READY=1\nSTATUS=up"


def test_send_to_vanished_socket_returns_false(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    notifier = make_notifier(str(path))
    server.close()  # the file is still there, nobody listens: ECONNREFUSED
    caplog.set_level(logging.DEBUG, logger="mpnet.systemd")
    assert notifier.ready() is False
    path.unlink()  # now the file is gone too: ENOENT
    assert notifier.watchdog() is False
    assert notifier.send("X=1" * 100_000) is False  # and an oversized datagram
    assert sum("sd_notify" in r.getMessage() for r in caplog.records) == 3
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


@pytest.mark.parametrize("address", ["vsock:2:9999", "relative/notify"])
def test_unsupported_address_disables(address: str, caplog: pytest.LogCaptureFixture) -> None:
    notifier = make_notifier(address, WATCHDOG_USEC="1000000")
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval() is None
    assert "notifications disabled" in caplog.text


def test_notify_rejects_malformed_fields(notify_server: tuple[socket.socket, str]) -> None:
    _, path = notify_server
    notifier = make_notifier(path)
    with pytest.raises(ValueError, match="field name"):
        notifier.notify(ready=1)
    with pytest.raises(ValueError, match="newline"):
        notifier.notify(STATUS="a\nREADY=1")
    with pytest.raises(ValueError):
        notifier.notify()
    with pytest.raises(ValueError):
        notifier.extend_timeout(-1)


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("1000", None, 0.0005),
        ("30000000", "other", None),
        ("30000000", "junk", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    notify_server: tuple[socket.socket, str],
    usec: str | None,
    pid: str | None,
    expected: float | None,
) -> None:
    _, path = notify_server
    env = {"NOTIFY_SOCKET": path}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(
            pid, pid
        )
    assert Notifier.from_environ(env).watchdog_interval() == expected


def test_notifier_holds_no_descriptor_and_works_after_fork(
    notify_server: tuple[socket.socket, str],
) -> None:
    """Workers forked from the master must not inherit a notify socket."""
    server, path = notify_server
    before = open_fds()
    notifier = make_notifier(path)
    assert notifier.status("before fork")
    assert open_fds() == before
    assert server.recv(4096) == b"STATUS=before fork"

    pid = os.fork()
    if pid == 0:  # child: exit at once, whatever happens
        ok = False
        try:
            ok = notifier.status("from child")
        finally:
            os._exit(0 if ok else 1)
    exited: list[int] = []

    def child_exited() -> bool:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            exited.append(os.waitstatus_to_exitcode(status))
        return bool(exited)

    try:
        wait_for(child_exited, DEADLINE, "the forked child to exit")
    finally:
        if not exited:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert exited == [0]
    assert server.recv(4096) == b"STATUS=from child"
    assert notifier.watchdog()
    assert server.recv(4096) == b"WATCHDOG=1"


# --------------------------------------------------------------------------
# listen_fds
# --------------------------------------------------------------------------


def listen_env(pid: int | str, fds: str = "2", names: str | None = "a:b") -> dict[str, str]:
    env = {"LISTEN_PID": str(pid), "LISTEN_FDS": fds, "OTHER": "kept"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


def test_listen_fds_without_activation() -> None:
    env = {"OTHER": "kept"}
    assert listen_fds(env) == []
    assert env == {"OTHER": "kept"}


def test_listen_fds_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    assert "LISTEN_PID" not in os.environ
    assert "LISTEN_FDS" not in os.environ


def test_listen_fds_for_another_process_is_ignored_and_unset() -> None:
    """Variables inherited from a parent were meant for that parent."""
    env = listen_env(os.getpid() + 1)
    assert listen_fds(env) == []
    assert env == {"OTHER": "kept"}

    kept = listen_env(os.getpid() + 1)
    assert listen_fds(kept, unset=False) == []
    assert kept == listen_env(os.getpid() + 1)


def test_listen_fds_zero() -> None:
    assert listen_fds(listen_env(os.getpid(), fds="0", names="")) == []


@pytest.mark.parametrize(
    "env",
    [
        listen_env("abc"),
        listen_env("{pid}", fds="many"),
        listen_env("{pid}", fds="-1"),
        listen_env("{pid}", fds="2", names="only-one"),
    ],
    ids=["bad-pid", "bad-count", "negative-count", "name-count"],
)
def test_listen_fds_malformed(env: dict[str, str]) -> None:
    env["LISTEN_PID"] = env["LISTEN_PID"].format(pid=os.getpid())
    with pytest.raises(ValueError):
        listen_fds(env)
    assert env == {"OTHER": "kept"}, "variables are unset even when the call fails"


def test_listen_fds_skips_non_sockets_and_defaults_names() -> None:
    """fd 3 a socket, fd 4 a pipe, no LISTEN_FDNAMES: run in a child owning fds 3 and 4."""
    code = r"""
import json, os, socket
from mpnet.systemd import listen_fds
listener = socket.create_server(("127.0.0.1", 0))
r, w = os.pipe()
os.dup2(listener.fileno(), 3)
os.dup2(r, 4)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
got = listen_fds()
print(json.dumps({
    "got": [[a.fd, a.name, a.type.name, a.listening, list(a.local_address())] for a in got],
    "port": listener.getsockname()[1],
    "pipe_cloexec": not os.get_inheritable(4),
}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["got"] == [[3, "unknown", "SOCK_STREAM", True, ["127.0.0.1", report["port"]]]]
    assert report["pipe_cloexec"]
    assert "fd 4 ('unknown') is not a socket, skipped" in result.stderr


ACTIVATED_CHILD = r"""
import json, os, selectors, sys
from mpnet.systemd import listen_fds, match_endpoint

VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
before = {k: os.environ.get(k) for k in VARS}
activated = listen_fds()
report = {
    "pid": os.getpid(),
    "before": before,
    "after": {k: os.environ.get(k) for k in VARS},
    "sockets": [
        {
            "fd": a.fd,
            "name": a.name,
            "family": a.family.name,
            "type": a.type.name,
            "listening": a.listening,
            "address": list(a.local_address()),
            "cloexec": not os.get_inheritable(a.fd),
        }
        for a in activated
    ],
    "matches": [
        [match_endpoint(a, "127.0.0.1", int(p)) for p in sys.argv[1:]] for a in activated
    ],
}
print(json.dumps(report), flush=True)

# Serve the connection that triggered the activation, on whichever socket.
selector = selectors.DefaultSelector()
for a in activated:
    selector.register(a.socket, selectors.EVENT_READ, a)
events = selector.select(timeout=30)
if not events:
    sys.exit("no connection within 30 s")
a = events[0][0].data
conn, _ = a.socket.accept()
with conn:
    conn.sendall(a.name.encode() + b"\n")
"""


def connect_when_listening(
    proc: subprocess.Popen[bytes], port: int, deadline: float
) -> socket.socket:
    """Connect to 127.0.0.1:port, retrying while the activator sets up its sockets."""
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"activator exited early: {stderr}") from None
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listens on port {port}")
            time.sleep(0.02)


def read_line(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    """One line of the child's stdout, failing the test at ``deadline``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no line from the activated child; got {data!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"child closed stdout after {data!r}; stderr: {stderr}")
            data += chunk
    return data.split(b"\n", 1)[0]


@pytest.mark.server
@needs_socket_activate
def test_listen_fds_with_systemd_socket_activate() -> None:
    """The real activator binds two named sockets; the child takes them on first connect.

    systemd-socket-activate (without --accept) waits for the first connection,
    then execs the command in its own process, so ``proc.pid`` is the Python
    child's PID and $LISTEN_PID names it.
    """
    assert SOCKET_ACTIVATE is not None
    for attempt in range(3):  # the free ports may be taken between probe and bind
        ports = [free_port(), free_port()]
        if ports[0] == ports[1]:
            continue
        cmd = [
            SOCKET_ACTIVATE,
            "-l",
            f"127.0.0.1:{ports[0]}",
            "-l",
            f"127.0.0.1:{ports[1]}",
            "--fdname=echo:lastsaid",
            # The activator passes only TERM, PATH, USER, HOME and -E variables.
            "-E",
            f"PYTHONPATH={child_env()['PYTHONPATH']}",
            sys.executable,
            "-c",
            ACTIVATED_CHILD,
            *map(str, ports),
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env()
        )
        try:
            deadline = time.monotonic() + DEADLINE
            try:
                conn = connect_when_listening(proc, ports[0], deadline)
            except RuntimeError as exc:
                if "in use" in str(exc) and attempt < 2:
                    continue
                raise
            with conn:
                report = json.loads(read_line(proc, deadline))
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                reply = conn.makefile("rb").readline()
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            stderr = proc.stderr.read().decode() if proc.stderr else ""
        finally:
            kill_process(proc)
        break
    else:
        pytest.fail("could not find two free ports")

    assert proc.returncode == 0, stderr
    assert report["pid"] == proc.pid
    assert report["before"] == {
        "LISTEN_PID": str(proc.pid),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "echo:lastsaid",
    }
    assert report["after"] == dict.fromkeys(report["before"])
    assert report["sockets"] == [
        {
            "fd": 3,
            "name": "echo",
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "listening": True,
            "address": ["127.0.0.1", ports[0]],
            "cloexec": True,
        },
        {
            "fd": 4,
            "name": "lastsaid",
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "listening": True,
            "address": ["127.0.0.1", ports[1]],
            "cloexec": True,
        },
    ]
    assert report["matches"] == [[True, False], [False, True]]
    assert reply == b"echo\n"


# --------------------------------------------------------------------------
# match_endpoint
# --------------------------------------------------------------------------


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def bound() -> Iterator[Callable[..., ActivatedSocket]]:
    """Factory for ActivatedSocket objects wrapping real bound sockets."""
    opened: list[socket.socket] = []

    def make(family: socket.AddressFamily, host: str, v6only: bool = False) -> ActivatedSocket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        opened.append(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((host, 0))
        sock.listen()
        return ActivatedSocket(fd=sock.fileno(), name="test", socket=sock)

    try:
        yield make
    finally:
        for sock in opened:
            sock.close()


def port_of(activated: ActivatedSocket) -> int:
    local = activated.local_address()
    assert local is not None
    return local[1]


def test_match_endpoint_ipv4(bound: Callable[..., ActivatedSocket]) -> None:
    loopback = bound(socket.AF_INET, "127.0.0.1")
    port = port_of(loopback)
    assert loopback.local_address() == ("127.0.0.1", port)
    assert match_endpoint(loopback, "127.0.0.1", port)
    assert not match_endpoint(loopback, "127.0.0.1", port + 1)
    assert not match_endpoint(loopback, "127.0.0.2", port)
    assert not match_endpoint(loopback, "*", port)
    assert not match_endpoint(loopback, "0.0.0.0", port)
    assert not match_endpoint(loopback, "localhost", port), "names are never resolved"

    wildcard = bound(socket.AF_INET, "0.0.0.0")
    port = port_of(wildcard)
    for host in ("*", "", "0.0.0.0"):
        assert match_endpoint(wildcard, host, port), host
    assert not match_endpoint(wildcard, "::", port), "an IPv4 socket serves no IPv6"
    assert not match_endpoint(wildcard, "127.0.0.1", port)


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback here")
def test_match_endpoint_ipv6(bound: Callable[..., ActivatedSocket]) -> None:
    loopback = bound(socket.AF_INET6, "::1")
    port = port_of(loopback)
    assert loopback.local_address() == ("::1", port)
    assert match_endpoint(loopback, "::1", port)
    assert match_endpoint(loopback, "[0:0::1]", port)
    assert not match_endpoint(loopback, "127.0.0.1", port)

    dual_stack = bound(socket.AF_INET6, "::")  # what ListenStream=PORT binds
    port = port_of(dual_stack)
    for host in ("*", "::", "0.0.0.0"):
        assert match_endpoint(dual_stack, host, port), host

    v6only = bound(socket.AF_INET6, "::", v6only=True)
    port = port_of(v6only)
    assert match_endpoint(v6only, "::", port)
    assert match_endpoint(v6only, "*", port)
    assert not match_endpoint(v6only, "0.0.0.0", port), "a v6-only socket serves no IPv4"

    mapped = bound(socket.AF_INET6, "::ffff:127.0.0.1")
    assert match_endpoint(mapped, "127.0.0.1", port_of(mapped))


def test_matches_takes_an_endpoint_object(bound: Callable[..., ActivatedSocket]) -> None:
    """The master's own Endpoint type (host, port attributes) works directly."""

    class Endpoint(NamedTuple):
        host: str
        port: int

    activated = bound(socket.AF_INET, "127.0.0.1")
    assert activated.matches(Endpoint("127.0.0.1", port_of(activated)))
    assert not activated.matches(Endpoint("127.0.0.1", port_of(activated) + 1))


def test_match_endpoint_unix_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "s"))
        activated = ActivatedSocket(fd=sock.fileno(), name="unix", socket=sock)
        assert activated.local_address() is None
        assert not match_endpoint(activated, "*", 0)


# --------------------------------------------------------------------------
# privileges
# --------------------------------------------------------------------------


def test_running_as_root() -> None:
    assert running_as_root() == (os.geteuid() == 0)


def test_drop_privileges_unknown_user() -> None:
    with pytest.raises(LookupError, match="no-such-user-mpnet"):
        drop_privileges("no-such-user-mpnet")


def test_drop_privileges_unknown_group() -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    with pytest.raises(LookupError, match="no-such-group-mpnet"):
        drop_privileges(me, "no-such-group-mpnet")


def test_drop_privileges_to_current_user_is_a_noop() -> None:
    """What happens under User=/DynamicUser=: systemd already switched."""
    me = pwd.getpwuid(os.getuid())
    if os.getresuid() != (me.pw_uid,) * 3 or os.getresgid() != (me.pw_gid,) * 3:
        pytest.skip("real/effective/saved ids differ in this test process")
    groups = os.getgroups()
    drop_privileges(me.pw_name)
    assert os.getgroups() == groups


@pytest.mark.skipif(os.geteuid() == 0, reason="needs a non-root test process")
def test_drop_privileges_needs_root() -> None:
    with pytest.raises(PermissionError, match="not root"):
        drop_privileges("root")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_drop_privileges_as_root_in_child() -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    code = r"""
import json, os
from mpnet.privileges import drop_privileges
drop_privileges("nobody")
print(json.dumps([os.getresuid(), os.getresgid(), sorted(os.getgroups())]))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    uids, gids, groups = json.loads(result.stdout)
    assert uids == [nobody.pw_uid] * 3
    assert gids == [nobody.pw_gid] * 3
    assert 0 not in groups
    assert nobody.pw_gid in groups


# --------------------------------------------------------------------------
# systemd units
# --------------------------------------------------------------------------


def unit_lines(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for each assignment; keys may repeat in unit files."""
    section = ""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        lines.append((section, key.strip(), value.strip()))
    return lines


def exec_start_command() -> str:
    """The real command that starts mpnet here: its console script, or python -m."""
    script = shutil.which("mpnet")
    return script if script else f"{sys.executable} -m mpnet"


@pytest.fixture
def installed_units(tmp_path: Path) -> Path:
    """Copies of both units, ExecStart pointed at an existing executable.

    `systemd-analyze verify` refuses an ExecStart= binary that does not exist,
    and /opt/mpnet/bin/mpnet usually does not in a development checkout.
    """
    original = "ExecStart=/opt/mpnet/bin/mpnet "
    service = (UNIT_DIR / "mpnet.service").read_text()
    assert service.count(original) == 1
    service = service.replace(original, f"ExecStart={exec_start_command()} ")
    (tmp_path / "mpnet.service").write_text(service)
    shutil.copy(UNIT_DIR / "mpnet.socket", tmp_path / "mpnet.socket")
    return tmp_path


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_COLORS": "0"},
    )


@needs_analyze
def test_units_verify_cleanly(installed_units: Path) -> None:
    # Verified together: the socket unit needs its Service= unit loadable.
    result = analyze(
        "verify",
        str(installed_units / "mpnet.socket"),
        str(installed_units / "mpnet.service"),
        cwd=installed_units,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys and bad values are only warnings (exit status 0): any line
    # about our units is a failure.
    ours = [line for line in output.splitlines() if "mpnet." in line]
    assert ours == [], output


@needs_analyze
def test_verify_reports_problems(installed_units: Path) -> None:
    """Guard for the test above: broken units do produce output."""
    unit = installed_units / "mpnet.service"
    unit.write_text(unit.read_text().replace("[Install]", "Frobnicate=yes\n[Install]"))
    result = analyze("verify", str(unit), cwd=installed_units)
    assert "Frobnicate" in result.stdout + result.stderr


@needs_analyze
def test_service_exposure_score(installed_units: Path) -> None:
    result = analyze(
        "security", "--offline=true", str(installed_units / "mpnet.service"), cwd=installed_units
    )
    output = result.stdout + result.stderr
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"systemd-analyze security --offline unsupported: {result.stderr.strip()}")
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for mpnet\.service: (\d+(?:\.\d+)?)", output)
    assert match, output
    assert float(match[1]) <= MAX_EXPOSURE, output


def test_service_unit_contract() -> None:
    """The settings the master's behaviour relies on are present and consistent."""
    lines = unit_lines(UNIT_DIR / "mpnet.service")
    service = {(key, value) for section, key, value in lines if section == "Service"}
    for setting in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecStart", "/opt/mpnet/bin/mpnet serve -c /etc/mpnet/mpnet.toml"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillMode", "mixed"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("WatchdogSec", "30"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("RuntimeDirectory", "mpnet"),
        ("StateDirectory", "mpnet"),
        ("UMask", "0077"),
    ]:
        assert setting in service, setting
    stop = dict(service)["TimeoutStopSec"]
    assert int(stop) > 30, "TimeoutStopSec must exceed graceful_timeout (30 s)"
    # PrivateUsers= would take CAP_NET_BIND_SERVICE away in the host network namespace.
    assert ("PrivateUsers", "yes") not in service


def test_socket_unit_contract() -> None:
    lines = unit_lines(UNIT_DIR / "mpnet.socket")
    socket_section = [(key, value) for section, key, value in lines if section == "Socket"]
    assert [v for k, v in socket_section if k == "ListenStream"] == [
        "127.0.0.1:5432",
        "127.0.0.1:5433",
    ]
    assert ("ReusePort", "yes") in socket_section
    assert ("Service", "mpnet.service") in socket_section
    # One FileDescriptorName= names every fd of the unit, a second one
    # replaces the first: more than one in a unit is always a mistake.
    assert sum(k == "FileDescriptorName" for k, _ in socket_section) <= 1
