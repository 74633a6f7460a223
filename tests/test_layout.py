"""The tree's promises about imports: pure code pulls in no I/O, the master's modules do not load
a service module, and the public API is where the README says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PURE = sorted(
    f"mpnet.pure.{path.stem}"
    for path in (Path(__file__).resolve().parent.parent / "mpnet" / "pure").glob("*.py")
    if path.stem != "__init__"
)
IO_MODULES = ("asyncio", "socket", "ssl", "selectors", "uvloop")


def imported_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running *statement*."""
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return set(json.loads(out))


def test_the_pure_package_is_listed() -> None:
    assert {"mpnet.pure.config", "mpnet.pure.resp", "mpnet.pure.proxyproto"} <= set(PURE)
    assert "mpnet.pure.frames" in PURE and "mpnet.pure.replica" in PURE


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_no_io(name: str) -> None:
    loaded = imported_after(f"import {name}")
    assert not loaded & set(IO_MODULES), f"{name} imports {sorted(loaded & set(IO_MODULES))}"
    assert not any(m.startswith("mpnet.workers") for m in loaded), name
    # the channel's wire format is msgpack, and the Redis backend stores values in it
    if name not in ("mpnet.pure.frames", "mpnet.pure.redisshared"):
        assert "msgpack" not in loaded, f"{name} imports msgpack"


@pytest.mark.parametrize("name", ["mpnet.pure.resp", "mpnet.pure.proxyproto", "mpnet.pure.config"])
def test_parsers_import_nothing_heavy(name: str) -> None:
    loaded = imported_after(f"import {name}")
    assert not loaded & {"asyncio", "ssl", "msgpack"}


def test_the_public_api_is_importable_from_the_top() -> None:
    loaded = imported_after(
        "from mpnet import ConfigError, Connection, Listener, Module, ModuleError, "
        "SharedError, SharedTable, SharedValueTooLarge"
    )
    assert "mpnet.workers.module" in loaded


def test_the_package_ships_py_typed() -> None:
    import mpnet

    assert (Path(mpnet.__file__).parent / "py.typed").is_file()
