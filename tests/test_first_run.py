"""A new user's first mistakes, each answered clearly: JSON errors for ``--json``, a module that
provides nothing, a module name that is not found, ``conn.write(5)``, the platform, the licence."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from harness import Client, config, run_mpnet

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.server
def test_json_commands_answer_errors_in_json(tmp_path):
    missing = run_mpnet(tmp_path, "check", "--json", "-c", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert json.loads(missing.stdout) == {
        "error": f"{tmp_path / 'nope.toml'}: config file not found"
    }

    (tmp_path / "bad.toml").write_text(config(["./broken.py"]))
    (tmp_path / "broken.py").write_text("raise RuntimeError('no database')\n")
    broken = run_mpnet(tmp_path, "check", "--json", "-c", str(tmp_path / "bad.toml"))
    assert broken.returncode == 1
    assert "RuntimeError: no database" in json.loads(broken.stdout)["error"]

    status = run_mpnet(tmp_path, "status", "--json", "-s", str(tmp_path / "none.sock"))
    assert status.returncode == 1
    assert json.loads(status.stdout) == {
        "error": f"no control socket at {tmp_path / 'none.sock'}: is mpnet running?"
    }
    plain = run_mpnet(tmp_path, "status", "-s", str(tmp_path / "none.sock"))
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.startswith("mpnet: error: no control socket")


QUIET_MODULE = "counters = module.shared('counters')\n"  # hooks or shares, serves nothing


@pytest.mark.server
def test_a_module_that_provides_nothing_is_warned_about_once(tmp_path, mpnet):
    (tmp_path / "quiet.py").write_text(QUIET_MODULE)
    (tmp_path / "mpnet.toml").write_text(config(["echo", "./quiet.py"], echo_ports=[0]))
    result = run_mpnet(tmp_path, "check", "-c", str(tmp_path / "mpnet.toml"))
    assert result.returncode == 0, result.stderr
    assert "module quiet provides nothing: no module.provides('net', ...) ran" in result.stderr
    server = mpnet(config(["echo", str(tmp_path / "quiet.py")], workers=2, echo_ports=[0]))
    server.wait_log(r"ready: 2 worker")
    assert (
        server.log.count("module quiet provides nothing") == 1
    )  # the checker's, not each worker's


@pytest.mark.server
def test_module_not_found_says_how_to_name_a_file(tmp_path):
    (tmp_path / "hello.py").write_text("module.provides('net', listener={}, default_port=0)\n")
    (tmp_path / "mpnet.toml").write_text(config(["hello"]))
    beside = run_mpnet(tmp_path, "check", "-c", str(tmp_path / "mpnet.toml"))
    assert beside.returncode == 1
    assert f'{tmp_path / "hello.py"} exists: write "./hello.py" in modules' in beside.stderr
    (tmp_path / "mpnet.toml").write_text(config(["nowhere"]))
    elsewhere = run_mpnet(tmp_path, "check", "-c", str(tmp_path / "mpnet.toml"))
    assert elsewhere.returncode == 1
    assert (
        'write its path ("./nowhere.py", relative to the config), or add its directory to '
        "module_paths" in elsewhere.stderr
    )


WRITER_MODULE = """\
class listener:
    def onconnect(conn):
        for bad in (5, None, [b"x"]):
            try:
                conn.write(bad)
            except TypeError as exc:
                conn.write(f"{exc}\\n")
        conn.write(bytearray(b"bytearray ok\\n"))
        conn.write(memoryview(b"memoryview ok\\n"))
module.provides("net", listener=listener, default_port=0)
"""


@pytest.mark.server
def test_conn_write_of_a_non_bytes_raises_a_clear_type_error(mpnet, write_module):
    path = write_module("writer", WRITER_MODULE)
    server = mpnet(config([str(path)], workers=1, writer_ports=[0]))
    with Client(server.port("writer")) as client:
        for name, shown in (("int", "5"), ("NoneType", "None"), ("list", "[b'x']")):
            assert client.read_until(b"\n").decode() == (
                f"conn.write() takes bytes or str, not {name} ({shown}); "
                "encode it first, e.g. conn.write(str(value))\n"
            )
        assert client.read_until(b"\n") == b"bytearray ok\n"
        assert client.read_until(b"\n") == b"memoryview ok\n"


def test_elsewhere_than_linux_mpnet_stops_at_once_saying_why(tmp_path):
    code = (
        "import sys; sys.platform = 'darwin'; from mpnet.cli import main; sys.exit(main(['check']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr == (
        "mpnet: error: mpnet runs on Linux only (it relies on fork, SO_REUSEPORT load balancing "
        "and passing descriptors between processes); this system is 'darwin'\n"
    )


def test_licence_and_platform_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert "Operating System :: POSIX :: Linux" in project["classifiers"]
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License\n") and "WITHOUT WARRANTY OF ANY KIND" in licence
    assert "mpnet runs on Linux only" in (ROOT / "README.md").read_text()
