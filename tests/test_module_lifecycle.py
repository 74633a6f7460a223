"""The module API's lifecycle (Prosody's module:add_timer, module.ready, module.unload) and the
typed option getters: timers on a real event loop, hooks in a real worker through a real stop
and a real reload."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Client, config, wait_for

from mpnet.pure.config import parse_config
from mpnet.workers.module import Module
from mpnet.workers.provider import ModuleError


def make_module(tmp_path: Path, table: str = "") -> Module:
    text = 'modules = ["echo"]\n' + (f"[m]\n{table}\n" if table else "")
    return Module(
        "m", tmp_path / "m.py", parse_config(text, str(tmp_path / "mpnet.toml"), tmp_path)
    )


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# -- timers ---------------------------------------------------------------------------------------


def test_a_timer_repeats_while_it_returns_a_number(tmp_path: Path) -> None:
    module = make_module(tmp_path)
    calls: list[int] = []

    def tick() -> float | None:
        calls.append(len(calls))
        return 0.001 if len(calls) < 3 else None

    async def main() -> None:
        timer = module.add_timer(0, tick)
        await until(lambda: timer.stopped)
        assert calls == [0, 1, 2] and module.timers == set()

    asyncio.run(main())


def test_async_timers_and_stop(tmp_path: Path) -> None:
    module = make_module(tmp_path)
    calls: list[str] = []

    async def tick() -> float:
        await asyncio.sleep(0)
        calls.append("tick")
        return 0.001

    async def main() -> None:
        timer = module.add_timer(0.001, tick)
        await until(lambda: len(calls) >= 3)
        timer.stop()
        seen = len(calls)
        await asyncio.sleep(0.05)
        assert len(calls) in (seen, seen + 1)  # at most the call already under way
        assert timer.stopped and timer not in module.timers

    asyncio.run(main())


def test_a_failing_timer_is_logged_and_stopped(tmp_path: Path, caplog: Any) -> None:
    module = make_module(tmp_path)

    def broken() -> float:
        raise RuntimeError("boom")

    async def main() -> None:
        timer = module.add_timer(0, broken)
        other = module.add_timer(0, lambda: None)
        await until(lambda: timer.stopped and other.stopped)

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert "timer test_a_failing_timer_is_logged_and_stopped.<locals>.broken failed" in caplog.text
    assert any(r.name == "mpnet.module.m" and "boom" in (r.exc_text or "") for r in caplog.records)


def test_timers_added_without_a_loop_never_fire(tmp_path: Path) -> None:
    # The checker loads modules without an event loop and never serves.
    module = make_module(tmp_path)
    timer = module.add_timer(0, lambda: pytest.fail("fired"))
    assert not timer.stopped and timer in module.timers


@pytest.mark.parametrize("delay", [-1, "1", None, True])
def test_add_timer_checks_its_arguments(tmp_path: Path, delay: Any) -> None:
    with pytest.raises(TypeError, match="delay must be a number of seconds"):
        make_module(tmp_path).add_timer(delay, lambda: None)


def test_hooks_must_be_callable(tmp_path: Path) -> None:
    module = make_module(tmp_path)
    with pytest.raises(TypeError, match="on_ready"):
        module.on_ready("not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_unload"):
        module.on_unload(None)  # type: ignore[arg-type]


# -- typed options --------------------------------------------------------------------------------


def test_typed_option_getters(tmp_path: Path) -> None:
    module = make_module(
        tmp_path,
        'n = 5\nf = 0.5\ns = "7"\nflag = "yes"\nword = "x"\nlist = [1, 2]\nsingle = "a"',
    )
    assert module.get_option_number("n") == 5 and type(module.get_option_number("n")) is int
    assert module.get_option_number("f") == 0.5
    assert module.get_option_number("s") == 7
    assert module.get_option_number("missing", 3) == 3
    assert module.get_option_number("missing") is None
    assert module.get_option_boolean("flag") is True
    assert module.get_option_boolean("missing", False) is False
    assert module.get_option_string("word") == "x"
    assert module.get_option_array("list") == [1, 2]
    assert module.get_option_array("single") == ["a"]
    assert module.get_option_array("missing", []) == []


@pytest.mark.parametrize(
    ("table", "call", "message"),
    [
        (
            'n = "many"',
            lambda m: m.get_option_number("n"),
            "option 'n' must be a number, not 'many'",
        ),
        ("n = true", lambda m: m.get_option_number("n"), "option 'n' must be a number, not True"),
        ("n = 0", lambda m: m.get_option_number("n", min=1), "option 'n' must be at least 1"),
        ("n = 9", lambda m: m.get_option_number("n", max=8), "option 'n' must be at most 8"),
        ('b = "maybe"', lambda m: m.get_option_boolean("b"), "option 'b' must be true or false"),
        ("s = 5", lambda m: m.get_option_string("s"), "option 's' must be a string, not 5"),
        ("a = {x = 1}", lambda m: m.get_option_array("a"), "option 'a' must be a list"),
    ],
)
def test_typed_option_errors_name_the_key(
    tmp_path: Path, table: str, call: Any, message: str
) -> None:
    with pytest.raises(ModuleError, match=message) as info:
        call(make_module(tmp_path, table))
    assert "[m] table" in str(info.value)


# -- hooks in a real worker -----------------------------------------------------------------------

HOOKS_MODULE = r"""
import asyncio, os

conns = set()
ticks = 0


def tick():
    global ticks
    ticks += 1
    return 0.05


async def ready():
    await asyncio.sleep(0)
    module.log("info", "ready hook in %d, %d tick(s) so far", os.getpid(), ticks)


async def goodbye():
    for conn in list(conns):
        conn.write(f"goodbye from {os.getpid()} after {ticks} tick(s)\n")
    await asyncio.sleep(0.1)
    module.log("info", "unload hook in %d done", os.getpid())


module.add_timer(0.05, tick)
module.on_ready(ready)
module.on_unload(goodbye)


class listener:
    def onconnect(conn):
        conns.add(conn)
        conn.write(f"hello from {os.getpid()}\n")

    def onincoming(conn, data):
        conn.write(f"{ticks}\n")

    def ondisconnect(conn, err):
        conns.discard(conn)


module.provides("net", name="hooks", listener=listener, default_port=0)
"""


@pytest.mark.server
def test_ready_and_unload_hooks_run_in_each_worker(mpnet: Any, write_module: Any) -> None:
    path = write_module("hooks", HOOKS_MODULE)
    server = mpnet(config([str(path)], workers=2, hooks_ports=[0], graceful_timeout=10))
    server.wait_log(r"\[hooks\] info: ready hook in \d+", count=2)
    with Client(server.port("hooks")) as client:
        pid = int(client.read_until(b"\n").split()[-1])
        wait_for(lambda: pid in server.worker_pids(), what="the worker to be known")

        def ticked() -> bool:
            client.send(b"ticks?\n")
            return int(client.read_until(b"\n")) >= 1

        wait_for(ticked, what="the module's timer to run")
        os.kill(server.pid, signal.SIGTERM)  # graceful stop: unload hooks while connections live
        line = client.read_until(b"\n", timeout=20)
        assert line.startswith(f"goodbye from {pid} after ".encode())
        server.wait_log(rf"\[hooks\] info: unload hook in {pid} done")


@pytest.mark.server
def test_unload_hooks_run_in_the_old_workers_of_a_reload(mpnet: Any, write_module: Any) -> None:
    path = write_module("hooks", HOOKS_MODULE)
    server = mpnet(config([str(path)], workers=1, hooks_ports=[0], graceful_timeout=2))
    server.wait_log(r"ready hook in \d+")
    with Client(server.port("hooks")) as client:
        pid = int(client.read_until(b"\n").split()[-1])
        os.kill(server.pid, signal.SIGHUP)
        assert client.read_until(b"\n", timeout=20).startswith(f"goodbye from {pid}".encode())
    server.wait_log(r"ready hook in \d+", count=2)  # the new generation's worker
    with Client(server.port("hooks")) as client:
        assert int(client.read_until(b"\n").split()[-1]) != pid
