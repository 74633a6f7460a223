"""Logs of a real ``mpnet serve``: JSON lines from every role, systemd's journal stream (the
``<N>`` priority prefix on the actual stderr named by JOURNAL_STREAM) and per-module levels."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Client, Server, config, run_mpnet, wait_for

pytestmark = pytest.mark.server  # every test here runs mpnet


NOISY_MODULE = """\
module.log("warn", "loaded, pid %d", __import__("os").getpid())
class listener:
    def onconnect(conn):
        module.log("info", "hello %s", conn.id)
        module.log("debug", "debug detail %s", conn.id)
        conn.write("hi\\n")
    def onincoming(conn, data):
        raise RuntimeError("kaput " + data.decode().strip())
module.provides("net", listener=listener, default_port=0)
"""


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def write_modules(directory: Path, *names: str) -> None:
    for name in names:
        (directory / f"{name}.py").write_text(NOISY_MODULE)


def provoke(port: int, word: str) -> None:
    """One connection: onconnect logs, onincoming raises."""
    with Client(port) as client:
        client.read_until(b"hi\n")
        client.send(f"{word}\n")


def test_json_lines_carry_time_level_pid_role_module_and_the_traceback(
    tmp_path: Path, servers: list[Server]
) -> None:
    write_modules(tmp_path, "noisy")
    text = config(["./noisy.py"], workers=2, noisy_ports=[0], log_format="json")
    server = Server(tmp_path, text)
    servers.append(server)
    server.start()
    provoke(server.port("noisy"), "first")
    server.wait_log(r"kaput first", what="the callback's error")
    server.signal(signal.SIGTERM)
    server.wait_exit()
    entries = [json.loads(line) for line in server.log.splitlines() if line.strip()]
    roles = {entry["role"] for entry in entries}
    assert {"master", "checker", "worker 0", "worker 1"} <= roles, roles
    for entry in entries:
        assert {"time", "level", "pid", "role", "message"} <= entry.keys()
        assert datetime.datetime.fromisoformat(entry["time"]).utcoffset() is not None
        assert entry["level"] in ("debug", "info", "warn", "error")
    loaded = [e for e in entries if e["message"].startswith("loaded, pid")]
    assert all(e["module"] == "noisy" and e["level"] == "warn" for e in loaded)
    assert {e["role"] for e in loaded} >= {"checker", "worker 0", "worker 1"}
    assert all(e["message"] == f"loaded, pid {e['pid']}" for e in loaded)
    failure = next(e for e in entries if "exc_info" in e)
    assert failure["module"] == "noisy" and failure["level"] == "error"
    assert failure["exc_info"].startswith("Traceback (most recent call last):")
    assert failure["exc_info"].rstrip().endswith("RuntimeError: kaput first")
    assert "onincoming failed" in failure["message"]
    ready = next(e for e in entries if e["message"].startswith("ready:"))
    assert "module" not in ready and ready["role"] == "master" and ready["pid"] == server.pid
    assert not any(e["message"].startswith("debug detail") for e in entries)  # log_level info


class JournaledServer:
    """``mpnet serve`` whose stderr is a file named by JOURNAL_STREAM (dev:ino), as systemd
    sets it up for a service whose output goes to the journal."""

    def __init__(self, directory: Path, text: str, journal_stream: str | None = None) -> None:
        (directory / "mpnet.toml").write_text(text)
        self.output = directory / "stderr.log"
        self._file = self.output.open("wb")
        stat = os.fstat(self._file.fileno())
        env = dict(os.environ, JOURNAL_STREAM=journal_stream or f"{stat.st_dev}:{stat.st_ino}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mpnet", "serve", "-c", "mpnet.toml"],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=self._file,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def port(self) -> int:
        import re

        match = wait_for(
            lambda: re.search(r"\(module \w+\) -> [^\n]*?:(\d+)", self.text()), what="the port"
        )
        wait_for(lambda: "ready: " in self.text(), what="ready")
        return int(match.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # any worker left behind
        self._file.close()


@pytest.fixture
def journaled(tmp_path: Path) -> Iterator:
    started: list[JournaledServer] = []

    def start(text: str, journal_stream: str | None = None) -> JournaledServer:
        write_modules(tmp_path, "noisy")
        server = JournaledServer(tmp_path, text, journal_stream)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_on_the_journal_stream_every_line_starts_with_its_syslog_priority(journaled) -> None:
    server = journaled(config(["./noisy.py"], workers=1, noisy_ports=[0]))
    provoke(server.port(), "journal")
    wait_for(lambda: "RuntimeError: kaput journal" in server.text(), what="the traceback")
    server.stop()
    lines = server.text().splitlines()
    assert lines and all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines
    assert any(line.startswith("<6>") and "ready: 1 worker" in line for line in lines)
    assert any(line.startswith("<4>") and "[noisy] warn: loaded" in line for line in lines)
    error = next(i for i, line in enumerate(lines) if "onincoming failed" in line)
    assert lines[error].startswith("<3>")
    traceback = lines[error + 1 :]
    end = next(i for i, line in enumerate(traceback) if "RuntimeError: kaput journal" in line)
    assert all(line.startswith("<3>") for line in traceback[: end + 1])  # the whole traceback


def test_json_on_the_journal_stream_is_prefixed_too(journaled) -> None:
    text = config(["./noisy.py"], workers=1, noisy_ports=[0], log_format="json")
    server = journaled(text)
    server.port()
    server.stop()
    for line in server.text().splitlines():
        assert line[0] == "<" and line[2] == ">", line
        entry = json.loads(line[3:])
        assert int(line[1]) == {"debug": 7, "info": 6, "warn": 4, "error": 3}[entry["level"]]


def test_no_prefix_when_stderr_is_not_the_journal_stream(journaled) -> None:
    server = journaled(config(["./noisy.py"], workers=1, noisy_ports=[0]), "1:1")
    server.port()
    server.stop()
    lines = server.text().splitlines()
    assert lines and not any(line.startswith("<") for line in lines), lines


def test_log_levels_give_one_module_its_own_level(tmp_path: Path, servers: list[Server]) -> None:
    write_modules(tmp_path, "chatty", "quiet")
    text = config(["./chatty.py", "./quiet.py"], workers=1, chatty_ports=[0], quiet_ports=[0])
    text += 'log_levels = { chatty = "debug", quiet = "error" }\n'
    server = Server(tmp_path, text)
    servers.append(server)
    server.start()
    for name in ("chatty", "quiet"):
        provoke(server.port(name), name)
    server.wait_log(r"\[chatty\] debug: debug detail", what="chatty's debug line")
    server.wait_log(r"kaput quiet", what="quiet's error")
    log = server.log
    assert "[chatty] info: hello" in log
    assert "[quiet] info: hello" not in log and "[quiet] warn: loaded" not in log
    assert "[quiet] debug" not in log
    assert "[mpnet] debug" not in log  # the framework keeps log_level (info)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('log_format = "xml"', "'log_format': expected 'text' or 'json'"),
        ('log_levels = { echo = "loud" }', "'log_levels': expected a table of module = level"),
        ('log_levels = "debug"', "'log_levels': expected a table"),
        ('log_levels = { ecko = "debug" }', "no loaded module named 'ecko' (did you mean 'echo'?)"),
    ],
)
def test_bad_log_settings_are_refused_naming_the_key(tmp_path: Path, line: str, words: str) -> None:
    (tmp_path / "mpnet.toml").write_text(config(["echo"], echo_ports=[0]) + line + "\n")
    result = run_mpnet(tmp_path, "check", "-c", "mpnet.toml", "--no-probe")
    assert result.returncode != 0
    assert words in result.stderr, result.stderr
