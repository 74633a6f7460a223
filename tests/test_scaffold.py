"""``mpnet new NAME``: the generated project's tests pass as generated, its config checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import run_mpnet

pytestmark = pytest.mark.server


@pytest.mark.timeout(600)  # pytest in a subprocess: slow on a busy machine
def test_the_generated_project_passes_its_own_tests(tmp_path):
    result = run_mpnet(tmp_path, "new", "greeter", "-d", "proj", "--port", "7321")
    assert result.returncode == 0, result.stderr
    project = tmp_path / "proj"
    assert sorted(p.name for p in project.iterdir()) == [
        "greeter.py",
        "mpnet.toml",
        "test_greeter.py",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "2 passed" in tests.stdout

    config = project / "mpnet.toml"
    if os.geteuid() == 0:  # as generated, root must choose: user = ... or allow_root
        denied = run_mpnet(project, "check", "--no-probe", "-c", str(config))
        assert denied.returncode != 0 and "allow_root" in denied.stderr
        config.write_text("allow_root = true\n" + config.read_text())
    check = run_mpnet(project, "check", "--json", "--no-probe", "-c", str(config))
    assert check.returncode == 0, check.stderr
    assert '"greeter": ["127.0.0.1:7321"]' in check.stdout


def test_new_refuses_bad_names_and_never_overwrites(tmp_path: Path):
    bad = run_mpnet(tmp_path, "new", "my-service")
    assert bad.returncode == 2 and "not a module name" in bad.stderr
    assert not list(tmp_path.iterdir())
    (tmp_path / "mpnet.toml").write_text("# mine\n")
    again = run_mpnet(tmp_path, "new", "svc")
    assert again.returncode == 2 and "already exist" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mpnet.toml"]
    assert (tmp_path / "mpnet.toml").read_text() == "# mine\n"


def tutorial_files() -> dict[str, str]:
    """The files of the README's tutorial: each fenced block after ``<!-- tutorial: NAME -->``."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"<!-- tutorial: (\S+) -->\n```\w*\n(.*?)```", readme, re.S)
    return dict(blocks)


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env=env,
    )


@pytest.mark.timeout(600)  # pytest in a subprocess: slow on a busy machine
def test_the_readme_tutorial_goes_red_then_green(tmp_path):
    files = tutorial_files()
    assert set(files) == {
        "test_echo.py",
        "echo.py",
        "test_lastsaid.py",
        "lastsaid.py",
        "test_over_tcp.py",
        "mpnet.toml",
    }
    assert run_mpnet(tmp_path, "new", "echo", "--port", "5432").returncode == 0
    (tmp_path / "test_echo.py").write_text(files["test_echo.py"])
    red = run_pytest(tmp_path, "test_echo.py")
    assert red.returncode == 1 and "You said hi" in red.stdout, red.stdout
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    green = run_pytest(tmp_path)
    assert green.returncode == 0 and "3 passed" in green.stdout, green.stdout + green.stderr
    config = tmp_path / "mpnet.toml"
    if os.geteuid() == 0:
        config.write_text("allow_root = true\n" + config.read_text())
    check = run_mpnet(tmp_path, "check", "--json", "--no-probe", "-c", str(config))
    assert check.returncode == 0, check.stderr
    assert '"echo": ["127.0.0.1:5432"], "lastsaid": ["127.0.0.1:5433"]' in check.stdout
