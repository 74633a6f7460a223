"""The mpnet_server fixture (mpnet.pytest_plugin): real servers on free ports, stopped by PID."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from mpnet.pytest_plugin import MpnetServer

sys.path.insert(0, str(Path(__file__).parent))
from harness import wait_for

pytestmark = pytest.mark.server


def test_two_services_on_free_ports_with_two_workers(mpnet_server):
    srv = mpnet_server(modules=["echo", "lastsaid"], workers=2, echo_read_timeout=30)
    ports = {srv.port("echo"), srv.port("lastsaid")}
    assert len(ports) == 2 and not ports & {5432, 5433}
    with srv.connect("echo") as client:
        assert client.recv_until(b"\n") == b"Hello!\n"
        client.send(b"hi\n")
        assert client.recv_until(b"\n\n") == b"You said hi\n\n"
    with srv.connect("lastsaid") as client:
        client.recv_until()
        client.send("one\n")
        assert client.recv_until() == b"Ok.\n"
    workers = srv.status()["workers"]
    assert len({w["pid"] for w in workers if w["state"] == "ready"}) == 2
    with pytest.raises(KeyError, match="no service 'nope'"):
        srv.port("nope")


def test_a_module_file_with_its_options_and_a_reload(mpnet_server, tmp_path):
    module = tmp_path / "greeter.py"
    module.write_text(
        "class l:\n"
        "    def onconnect(conn):\n"
        "        conn.write(module.get_option('greeting', 'hi') + '\\n')\n"
        "module.provides('net', listener=l, default_port=5999)\n"
    )
    srv = mpnet_server(modules=[module], greeter={"greeting": "howdy"})
    assert srv.port("greeter") != 5999
    with srv.connect("greeter") as client:
        assert client.recv_until() == b"howdy\n"
    module.write_text(module.read_text().replace("+ '\\n'", "+ ' v2\\n'"))
    assert srv.reload().ok
    srv.wait_log(r"reload complete", what="the reload to complete")
    with srv.connect("greeter") as client:
        assert client.recv_until() == b"howdy v2\n"


def test_stop_ends_the_master_and_every_worker(tmp_path):
    server = MpnetServer(tmp_path, ["echo"], workers=2)
    try:
        server.start()
        pids = {server.pid} | {child.pid for child in psutil.Process(server.pid).children()}
        assert len(pids) == 3
    finally:
        server.stop()
    assert server.proc is not None and server.proc.returncode is not None

    def all_gone() -> bool:
        return not any(psutil.pid_exists(pid) and _alive(pid) for pid in pids)

    wait_for(all_gone, what="every process of the server to exit")


def test_a_module_that_fails_to_load_is_reported_with_its_error(tmp_path):
    module = tmp_path / "broken.py"
    module.write_text("raise RuntimeError('no database')\n")
    server = MpnetServer(tmp_path, [module])
    try:
        with pytest.raises(AssertionError, match="no database"):
            server.start()
    finally:
        server.stop()


@pytest.mark.timeout(600)  # pytest in a subprocess: slow on a busy machine
def test_the_fixture_is_active_without_a_conftest(tmp_path):
    """The entry point makes the fixture available to any project's tests."""
    (tmp_path / "test_it.py").write_text(
        "def test_it(mpnet_server):\n"
        "    srv = mpnet_server(modules=['echo'])\n"
        "    with srv.connect('echo') as c:\n"
        "        assert c.recv_until() == b'Hello!\\n'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
