"""``mpnet serve --reload``: a changed module or config file runs the SIGHUP reload."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from harness import Client, config

from mpnet.devreload import FileWatcher


def greeter(text: str, padding: int = 0) -> str:
    """A module that greets with *text* then echoes (*padding* changes the file's size)."""
    return (
        "class listener:\n"
        "    def onconnect(conn):\n"
        f"        conn.write(module.get_option('prefix', '') + {text!r} + '\\n')\n"
        "    def onincoming(conn, data):\n"
        "        conn.write(data)\n"
        f"module.provides('net', listener=listener, default_port=0)\n{'#' * padding}\n"
    )


def greeting(port: int) -> bytes:
    with Client(port) as client:
        return client.read_until(b"\n")


def replace(path: Path, text: str) -> None:
    """Save as editors do: write a new file, rename it over the old one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


@pytest.mark.server
def test_module_and_config_changes_reload_and_a_syntax_error_keeps_the_old_code(mpnet, tmp_path):
    module = tmp_path / "greeter.py"
    module.write_text(greeter("v1"))
    server = mpnet(config([str(module)], workers=2), "--reload")
    server.wait_log(r"--reload: watching .*greeter\.py", what="the watcher to start")
    port = server.port("greeter")
    assert greeting(port) == b"v1\n"
    with Client(port) as old:
        old.read_until(b"\n")

        module.write_text(greeter("v2", padding=10))
        server.wait_log(r"reload complete", what="the first reload")
        assert greeting(port) == b"v2\n"
        old.send(b"still here\n")  # connections of the old code are drained, not cut
        assert old.read_until(b"\n") == b"still here\n"

    module.write_text(greeter("v3") + "def broken(:\n")
    server.wait_log(r"reload failed", what="the reload of the broken module to fail")
    assert greeting(port) == b"v2\n"  # the old code serves on

    replace(module, greeter("v4"))
    server.wait_log(r"reload complete", count=2, what="the reload after the fix")
    assert greeting(port) == b"v4\n"
    assert len(re.findall(r"SyntaxError", server.log)) == 1, server.log  # printed once

    server.config_path.write_text(server.config_path.read_text() + '[greeter]\nprefix = "> "\n')
    server.wait_log(r"reload complete", count=3, what="the reload after the config change")
    assert greeting(port) == b"> v4\n"
    assert len(re.findall(r"reload failed", server.log)) == 1


def test_the_watcher_acts_once_a_change_has_settled(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("a")
    watcher = FileWatcher(interval=0.5)
    files = lambda: [path]  # noqa: E731
    assert watcher.poll(files, now=0.0) == []  # first sight: the baseline
    path.write_text("ab")
    assert watcher.poll(files, now=0.1) == []  # not due yet
    assert watcher.poll(files, now=0.5) == []  # changed, but maybe still being written
    assert watcher.poll(files, now=1.0) == [path]  # unchanged since: settled
    assert watcher.poll(files, now=1.5) == []  # reported once
    path.unlink()
    assert watcher.poll(files, now=2.0) == []
    assert watcher.poll(files, now=2.5) == [path]  # a deleted file is a change too
    path.write_text("ab")
    assert watcher.poll(files, now=3.0) == []
    assert watcher.poll(files, now=3.5) == [path]
