"""The central port ledger: conflicts between services, and with other processes."""

from __future__ import annotations

import os
import socket

import pytest
from harness import Client, config, free_port, run_mpnet

pytestmark = pytest.mark.server


def _serve(tmp_path, text):
    path = tmp_path / "mpnet.toml"
    path.write_text(text)
    return run_mpnet(tmp_path, "serve", "-c", str(path))


def test_two_services_on_one_endpoint(tmp_path):
    port = free_port()
    result = _serve(
        tmp_path, config(["echo", "lastsaid"], echo_ports=[port], lastsaid_ports=[port])
    )
    assert result.returncode == 1
    assert f"port conflict on 127.0.0.1:{port}" in result.stderr
    assert "'echo'" in result.stderr and "'lastsaid'" in result.stderr
    assert "change lastsaid_ports or interfaces" in result.stderr
    assert "Traceback" not in result.stderr


def test_wildcard_overlaps_a_specific_address(tmp_path):
    port = free_port()
    text = config(
        ["echo", "lastsaid"],
        echo_ports=[port],
        lastsaid_ports=[port],
        echo_interfaces=["*"],
    )
    result = _serve(tmp_path, text)
    assert result.returncode == 1
    assert f"port conflict on 127.0.0.1:{port}" in result.stderr
    assert f"'echo' (0.0.0.0:{port})" in result.stderr


def test_port_held_by_another_process(tmp_path):
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _serve(tmp_path, config(["echo"], echo_ports=[port]))
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"port {port} is already in use by pid {os.getpid()}" in result.stderr
    assert "change echo_ports" in result.stderr


def test_port_held_with_so_reuseport_is_still_refused(tmp_path):
    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _serve(tmp_path, config(["echo"], echo_ports=[port]))
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"port {port} is already in use" in result.stderr


def test_second_mpnet_on_the_same_config_is_refused(mpnet, tmp_path):
    port = free_port()
    text = config(["echo"], workers=1, echo_ports=[port])
    first = mpnet(text)
    second = mpnet(text, start=False)
    result = run_mpnet(second.directory, "serve", "-c", str(second.config_path))
    assert result.returncode == 1
    assert f"port {port} is already in use by pid {first.pid}" in result.stderr
    assert "mpnet serve" in result.stderr
    # The first instance is untouched and still serves.
    with Client(port) as client:
        assert client.read_until(b"\n") == b"Hello!\n"
