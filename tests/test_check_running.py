"""``mpnet check -c X`` beside the running server of X: its own ports are not a conflict."""

from __future__ import annotations

import json
import socket

import pytest
from harness import config, free_port, run_mpnet

pytestmark = pytest.mark.server  # every test here runs mpnet or builds a venv


def test_check_recognises_the_running_server_of_the_same_config(mpnet):
    echo, lastsaid = free_port(), free_port()
    server = mpnet(config(["echo", "lastsaid"], workers=2, echo_ports=[echo],
                          lastsaid_ports=[lastsaid]))  # fmt: skip
    result = run_mpnet(server.directory, "check", "-c", str(server.config_path))
    assert result.returncode == 0, result.stderr
    assert "ok (2 workers)" in result.stdout
    ours = ", ".join(sorted([f"127.0.0.1:{echo}", f"127.0.0.1:{lastsaid}"]))
    assert f"{ours}: in use by the running mpnet (pid {server.pid})" in result.stdout
    as_json = run_mpnet(server.directory, "check", "--json", "-c", str(server.config_path))
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["running"] == {
        "pid": server.pid,
        "endpoints": sorted([f"127.0.0.1:{echo}", f"127.0.0.1:{lastsaid}"]),
    }


def test_a_port_the_running_server_does_not_hold_is_still_refused(mpnet):
    echo = free_port()
    server = mpnet(config(["echo"], workers=1, echo_ports=[echo]))
    # The config now also wants a port some other program holds.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        server.config_path.write_text(
            config(["echo", "lastsaid"], workers=1, echo_ports=[echo], lastsaid_ports=[taken])
        )
        result = run_mpnet(server.directory, "check", "-c", str(server.config_path))
    assert result.returncode == 1
    assert f"port {taken} is already in use" in result.stderr
    assert f"port {echo} " not in result.stderr


def test_without_a_running_server_a_taken_port_is_refused(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        (tmp_path / "mpnet.toml").write_text(config(["echo"], echo_ports=[taken]))
        result = run_mpnet(tmp_path, "check", "-c", str(tmp_path / "mpnet.toml"))
    assert result.returncode == 1
    assert f"port {taken} is already in use" in result.stderr
    assert "running mpnet" not in result.stdout + result.stderr
