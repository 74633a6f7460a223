"""The README's install recipe, as a Debian 12 user runs it: a venv (a system-wide ``pip
install`` is refused there: externally-managed-environment), the unit naming the venv's
``mpnet``, and modules in a directory of their own beside the config.

The venv is built in a temp dir from a copy of the checkout (pip writes ``build/`` and an
egg-info into the source tree), with PyPI reachable; nothing of the checkout is imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server  # every test here runs mpnet or builds a venv

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "mpnet.service"
VENV_EXEC = "/opt/mpnet/bin/mpnet"  # what the README and the unit say
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

MODULE = """\
class listener:
    def onconnect(conn):
        conn.write("hi\\n")
module.provides("net", listener=listener, default_port=0)
"""


def clean_env() -> dict[str, str]:
    """No PYTHONPATH: the venv's own copy of mpnet must be the one that runs."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python3 -m venv <tmp>/opt/mpnet && <tmp>/opt/mpnet/bin/pip install <copy>``."""
    base = tmp_path_factory.mktemp("install")
    source = base / "src"
    for name in ("mpnet", "workers"):
        shutil.copytree(
            ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    prefix = base / "opt" / "mpnet"
    env = clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(prefix)], check=True, timeout=120, env=env)
    result = subprocess.run(
        [str(prefix / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
        cwd=base,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return prefix


@pytest.mark.timeout(600)
def test_venv_install_runs_check_on_modules_beside_the_config(venv: Path, tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "mpnet"
    (etc / "modules").mkdir(parents=True)
    (etc / "modules" / "hello.py").write_text(MODULE)
    (etc / "mpnet.toml").write_text(
        'modules = ["hello"]\nmodule_paths = ["modules"]\ninterfaces = ["127.0.0.1"]\n'
        "hello_ports = [0]\nallow_root = true\n"
    )
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mpnet.workers.worker as w; print(w.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    result = subprocess.run(
        [str(venv / "bin" / "mpnet"), "check", "-c", str(etc / "mpnet.toml")],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout and "hello (module hello) -> 127.0.0.1:0" in result.stdout


def test_unit_starts_the_venv_mpnet() -> None:
    exec_start = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    assert exec_start == [f"ExecStart={VENV_EXEC} serve -c /etc/mpnet/mpnet.toml"]
    readme = (ROOT / "README.md").read_text()
    assert "python3 -m venv /opt/mpnet && /opt/mpnet/bin/pip install ." in readme


@pytest.mark.timeout(600)
@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_verifies_with_the_venv_path(venv: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` refuses an ExecStart= that points at nothing: the unit, with
    /opt/mpnet moved to where this test built the venv, verifies cleanly."""
    unit = UNIT.read_text()
    assert unit.count(VENV_EXEC) == 1
    (tmp_path / "mpnet.service").write_text(unit.replace(VENV_EXEC, str(venv / "bin" / "mpnet")))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(tmp_path / "mpnet.service")],  # type: ignore[list-item]
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_COLORS": "0"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mpnet.service" not in result.stderr, result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mpnet.service").write_text(unit.replace(VENV_EXEC, str(tmp_path / "nothing")))
    refused = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(broken / "mpnet.service")],  # type: ignore[list-item]
        capture_output=True,
        text=True,
        timeout=60,
        cwd=broken,
    )
    assert refused.returncode != 0 and "nothing" in refused.stderr  # the check has teeth
