"""The seed page's two examples, against the bundled modules, through real processes."""

from __future__ import annotations

import json
import random

import pytest
from harness import Client, config, run_mpnet

pytestmark = pytest.mark.server


def test_embedded_default_config_plans_the_seed_ports(tmp_path):
    result = run_mpnet(tmp_path, "check", "--no-probe", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["config"] == "<default config>"
    assert plan["services"] == {"echo": ["127.0.0.1:5432"], "lastsaid": ["127.0.0.1:5433"]}
    assert plan["modules"] == ["echo", "lastsaid"]


def test_echo_transcript(mpnet):
    server = mpnet(config(["echo"], workers=1, echo_ports=[0]))
    with Client(server.port("echo")) as client:
        assert client.read_until(b"\n") == b"Hello!\n"
        client.send("hi\n")
        # The raw line, as the page says: "You said " .. data .. "\n" with data = "hi\n".
        assert client.read_until(b"\n\n") == b"You said hi\n\n"
    server.wait_log(r"worker \d \[echo\] info: Connection closed: no error")


def test_lastsaid_transcript(mpnet):
    server = mpnet(config(["lastsaid"], workers=2, lastsaid_ports=[0]))
    port = server.port("lastsaid")
    with Client(port) as first, Client(port) as second:
        assert first.read_until(b"\n") == b"Hello!\n"
        assert second.read_until(b"\n") == b"Hello!\n"
        first.send("one\n")
        assert first.read_until(b"\n") == b"Ok.\n"
        second.send("other\n")
        assert second.read_until(b"\n") == b"Ok.\n"
        first.send("two\n")
        assert first.read_until(b"\n\n") == b"But last time you said one\n\n"
        first.send("three\n")
        assert first.read_until(b"\n\n") == b"But last time you said two\n\n"
        second.send("again\n")
        assert second.read_until(b"\n\n") == b"But last time you said other\n\n"


def test_every_byte_arrives_in_order_however_the_client_chunks(mpnet, write_module):
    path = write_module(
        "raw",
        "class listener:\n"
        "    def onincoming(conn, data):\n"
        "        conn.write(data)\n"
        'module.provides("net", listener=listener, default_port=0)\n',
    )
    server = mpnet(config([str(path)], workers=2))
    rng = random.Random(7)
    payload = bytes(rng.randrange(256) for _ in range(200_000))
    with Client(server.port("raw")) as client:
        pos = 0
        while pos < len(payload):
            size = rng.choice([1, 2, 3, 7, 100, 1500, 4096, 65536])
            client.send(payload[pos : pos + size])
            pos += size
        assert client.read_exactly(len(payload)) == payload


def test_bundled_modules_found_with_config_elsewhere(mpnet):
    server = mpnet(config(["echo", "lastsaid"], workers=1, echo_ports=[0], lastsaid_ports=[0]))
    with Client(server.port("echo")) as echo, Client(server.port("lastsaid")) as lastsaid:
        assert echo.read_until(b"\n") == b"Hello!\n"
        assert lastsaid.read_until(b"\n") == b"Hello!\n"
