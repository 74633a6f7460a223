"""Bad config and bad modules: one clear line naming the cause, a non-zero exit, no traceback."""

from __future__ import annotations

import os

import pytest
from harness import config, run_mpnet

pytestmark = pytest.mark.server


def _serve_fails(tmp_path, text: str, *args: str):
    path = tmp_path / "mpnet.toml"
    if os.geteuid() == 0 and "allow_root" not in text:
        text = "allow_root = true\n" + text  # the tests run as root in CI
    path.write_text(text)
    result = run_mpnet(tmp_path, "serve", "-c", str(path), *args)
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('modules = ["echo"]\nworkerz = 2\n', "unknown key 'workerz' (did you mean 'workers'?)"),
        ('modules = ["echo"]\nworkers = -1\n', "key 'workers': expected"),
        ('modules = ["echo"]\nworkers = "many"\n', "key 'workers': expected"),
        ('modules = "echo"\n', "key 'modules': expected a list of strings"),
        ('modules = ["echo"]\necho_ports = [70000]\n', "key 'echo_ports': expected a port"),
        ('modules = ["echo"]\necho_ports = ["x"]\n', "key 'echo_ports'"),
        ('modules = ["echo"]\ngraceful_timeout = "soon"\n', "key 'graceful_timeout'"),
        ('modules = ["echo"\n', "invalid TOML"),
        ('modules = ["echo"]\nechoo_ports = [7000]\n', "no service named 'echoo'"),
        ('modules = ["echo"]\n[echoo]\nx = 1\n', "table [echoo]: there is no loaded module"),
        ('modules = ["nosuchmodule"]\n', "module 'nosuchmodule' not found"),
        ('modules = ["./missing.py"]\n', "module file './missing.py' not found"),
        ("modules = []\n", "no modules to load"),
    ],
)
def test_config_errors_are_one_clear_line(tmp_path, text, expected):
    result = _serve_fails(tmp_path, text)
    lines = result.stderr.strip().splitlines()
    assert any(expected in line for line in lines), result.stderr
    assert str(tmp_path / "mpnet.toml") in result.stderr


def test_missing_config_file(tmp_path):
    result = run_mpnet(tmp_path, "serve", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml: config file not found" in result.stderr


def test_bad_workers_option(tmp_path):
    result = run_mpnet(tmp_path, "serve", "--workers", "lots")
    assert result.returncode == 2
    assert "--workers" in result.stderr


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1/0\n", "failed to load: ZeroDivisionError: division by zero (line 1)"),
        ("x = (\n", "failed to load: SyntaxError"),
        ('module.provides("web", listener={})\n', "only 'net' providers exist"),
        ('module.provides("net", default_port=1)\n', "needs a listener"),
        ('module.provides("net", listener={}, default_port=1)\n', "listener has none of"),
        (
            'module.provides("net", listener={"onconnect": 1}, default_port=1)\n',
            "listener.onconnect is not callable",
        ),
        (
            'module.provides("net", listener={"onconnect": print}, default_port=99999)\n',
            "default_port(s) must be port numbers",
        ),
        (
            'module.provides("net", listener={"onconnect": print}, port=1)\n',
            "unknown field(s) port",
        ),
        ('module.provides("net", listener={"onconnect": print})\n', "has no default port"),
    ],
)
def test_bad_module_stops_the_start_with_its_error(tmp_path, write_module, source, expected):
    path = write_module("bad", source)
    result = _serve_fails(tmp_path, config([str(path)], workers=2))
    assert expected in result.stderr, result.stderr
    assert "bad" in result.stderr


def test_check_reports_the_same_errors(tmp_path, write_module):
    path = write_module("bad", "raise RuntimeError('no database')\n")
    (tmp_path / "mpnet.toml").write_text(config([str(path)]))
    result = run_mpnet(tmp_path, "check", "-c", str(tmp_path / "mpnet.toml"))
    assert result.returncode == 1
    assert "module 'bad'" in result.stderr
    assert "RuntimeError: no database (line 1)" in result.stderr


def test_check_prints_the_plan(tmp_path):
    (tmp_path / "mpnet.toml").write_text(
        config(["echo", "lastsaid"], workers=3, echo_ports=[0, 0], lastsaid_interfaces=["::1"])
    )
    result = run_mpnet(tmp_path, "check", "-c", str(tmp_path / "mpnet.toml"))
    assert result.returncode == 0, result.stderr
    assert "ok (3 workers)" in result.stdout
    assert "echo (module echo) -> 127.0.0.1:0" in result.stdout
    assert "lastsaid (module lastsaid) -> [::1]:5433" in result.stdout
