"""Shared fixtures: ``mpnet`` starts real servers and stops every one of them afterwards."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import harness
from harness import Server

# Every process a test starts (mpnet serve, python -c ...) runs this checkout's code, whatever
# other copy of mpnet the interpreter has installed.
_ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)


@pytest.fixture
def mpnet(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``mpnet(config_text, *args, start=True)`` → a started :class:`Server` in tmp_path."""
    servers: list[Server] = []

    def make(config: str | None, *args: str, start: bool = True, **kwargs) -> Server:
        directory = tmp_path / f"server{len(servers)}"
        directory.mkdir()
        server = Server(directory, config, *args, **kwargs)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def write_module(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a service module file into tmp_path/modules and return its path."""
    directory = tmp_path / "modules"
    directory.mkdir(exist_ok=True)

    def write(name: str, source: str) -> Path:
        path = directory / f"{name}.py"
        path.write_text(source)
        return path

    return write


def pytest_runtest_setup(item: pytest.Item) -> None:
    harness.SERVER_TEST[0] = item.get_closest_marker("server") is not None


@pytest.fixture(autouse=True)
def _close_leftover_clients() -> Iterator[None]:
    yield
    for client in list(harness.OPEN_CLIENTS):
        client.close()
