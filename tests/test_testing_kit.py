"""mpnet.testing: modules run in-process on the worker's own code, no sockets, virtual time."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mpnet.testing import ModuleFailed, load
from mpnet.workers.provider import ModuleError

TRACE = """\
import asyncio

class listener:
    def onconnect(conn):
        conn.write(f"hello {conn.ip()}:{conn.port()} on {conn.serverport()}\\n")

    def onincoming(conn, data):
        command = data.strip()
        if command == b"slow":
            return reply_later(conn, 5, b"slow done\\n")
        if command == b"pause":
            conn.pause()
            asyncio.get_running_loop().call_later(3, resume, conn)
            conn.write("paused\\n")
        elif command == b"bye":
            conn.write("bye\\n")
            conn.close("said bye")
            conn.close("twice")
        elif command == b"boom":
            raise ValueError("boom")
        else:
            conn.write(b"got " + command + b"\\n")

    def ondisconnect(conn, err):
        disconnects.append((conn.id, err))


def resume(conn):
    conn.write("resumed\\n")
    conn.resume()


async def reply_later(conn, delay, text):
    await asyncio.sleep(delay)
    conn.write(text)


disconnects = []
module.provides("net", listener=listener, default_port=7100)
"""


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.py"
    path.write_text(TRACE)
    return path


def test_the_seed_lastsaid_module_by_name_and_by_path():
    import mpnet.services

    by_path = Path(next(iter(mpnet.services.__path__))) / "lastsaid.py"
    for spec in ("lastsaid", by_path):
        with load(spec) as svc:
            c = svc.connect()
            assert c.received() == b"Hello!\n"
            c.send(b"one\n")
            assert c.received() == b"Ok.\n"
            c.send(b"two\n")
            assert c.received() == b"But last time you said one\n\n"
            assert len(svc.module_globals("lastsaid")["sessions"]) == 1
            c.close()
            assert c.closed and c.close_reason is None
            assert svc.module_globals("lastsaid")["sessions"] == {}


def test_address_and_a_close_from_inside_a_callback_reach_ondisconnect_once(trace):
    with load(trace) as svc:
        c = svc.connect(ip="10.1.2.3", port=4444)
        assert c.received() == b"hello 10.1.2.3:4444 on 7100\n"
        c.send(b"bye\n")
        assert c.received() == b"bye\n"
        assert c.closed and c.close_reason == "said bye"
        with pytest.raises(ConnectionError, match="said bye"):
            c.send(b"more\n")
        c.close()
        assert svc.module_globals("trace")["disconnects"] == [(c.conn.id, "said bye")]


def test_connection_ids_are_unique_and_numbered_when_first_asked_for(trace):
    with load(trace) as svc:
        first, second, third = svc.connect(), svc.connect(), svc.connect()
        asked = [second.conn.id, first.conn.id, second.conn.id, third.conn.id]
        assert asked[0] == asked[2]  # the same connection keeps its id
        assert len(set(asked)) == 3
        numbers = [int(text.rsplit("c", 1)[1]) for text in asked]
        assert numbers[0] < numbers[1] < numbers[3]


def test_async_callbacks_keep_order_and_wait_for_the_clock(trace):
    with load(trace) as svc:
        c = svc.connect()
        c.received()
        c.send(b"slow\n")
        c.send(b"after\n")  # waits for the slow one, as on a real connection
        assert c.paused and c.received() == b""
        svc.advance(4.9)
        assert c.received() == b""
        svc.advance(0.1)
        assert c.received() == b"slow done\ngot after\n"
        assert not c.paused


def test_pause_holds_data_until_resume_and_close_waits_behind_it(trace):
    with load(trace) as svc:
        c = svc.connect()
        c.received()
        c.send(b"pause\n")
        c.send(b"queued\n")
        c.close()
        assert c.received() == b"paused\n" and not c.closed
        svc.advance(3)
        assert c.received() == b"resumed\ngot queued\n"
        assert c.closed and c.close_reason is None
        assert len(svc.module_globals("trace")["disconnects"]) == 1


def test_a_failing_callback_fails_the_call_in_strict_mode_and_only_logs_otherwise(trace, caplog):
    with load(trace) as svc:
        c = svc.connect()
        with pytest.raises(ModuleFailed, match="ValueError: boom"):
            c.send(b"boom\n")
        c.send(b"still\n")  # the connection lives on, as in a worker
        assert c.received().endswith(b"got still\n")
    with load(trace, strict=False) as svc, caplog.at_level(logging.ERROR):
        c = svc.connect()
        c.send(b"boom\n")
        assert len(svc.errors) == 1 and "onincoming failed" in caplog.text


def test_stop_disconnects_like_a_stopping_worker(trace):
    svc = load(trace)
    c = svc.connect()
    svc.stop()
    assert svc.module_globals("trace")["disconnects"] == [(c.conn.id, "server shutting down")]
    with pytest.raises(RuntimeError, match="stopped"):
        svc.connect()


def test_read_timeout_runs_on_the_virtual_clock():
    with load("echo", config={"echo_read_timeout": 30}) as svc:
        c = svc.connect()
        svc.advance(20)
        c.send(b"x")
        svc.advance(29)
        assert not c.closed
        svc.advance(2)
        assert c.closed and c.close_reason == "read timeout"


def test_the_clock_starts_at_the_same_instant_in_every_run():
    with load("echo") as first, load("echo") as second:
        assert first.loop.time() == second.loop.time()


def test_a_timer_due_at_the_sum_of_fractional_advances_runs_in_the_last_one():
    with load("echo") as svc:
        fired: list[float] = []
        svc.loop.call_later(2.1, lambda: fired.append(svc.loop.time()))
        svc.advance(0.7)
        svc.advance(0.7)
        assert not fired
        svc.advance(0.7)  # 0.7 + 0.7 + 0.7 rounds just below 2.1 on this clock
        assert len(fired) == 1


def test_options_reach_get_option(tmp_path):
    path = tmp_path / "greeter.py"
    path.write_text(
        "class l:\n"
        "    def onconnect(conn):\n"
        "        conn.write(module.get_option('greeting', 'hi') + '\\n')\n"
        "module.provides('net', listener=l, default_port=0)\n"
    )
    with load(path, options={"greeting": "howdy"}) as svc:
        assert svc.connect().received() == b"howdy\n"
    with load(path) as svc:
        assert svc.connect().received() == b"hi\n"


COUNTER = """\
hits = module.shared("hits")
seen = []

class listener:
    async def onincoming(conn, data):
        hits["last"] = data.decode()
        n = await hits.incr("count")
        conn.write(f"{n} {hits['last']}\\n")
        module.broadcast("hit", n)

module.hook("hit", seen.append)
module.provides("net", listener=listener, default_port=0)
"""

WATCHER = """\
heard = []

async def on_hit(n):
    heard.append(n)

module.hook("hit", on_hit)
module.hook("news", heard.append)
module.provides("net", name="watch", listener={"onconnect": lambda conn: None}, default_port=0)
"""


def test_shared_tables_atomics_hooks_and_broadcasts_across_modules_and_workers(tmp_path):
    (tmp_path / "counter.py").write_text(COUNTER)
    (tmp_path / "watcher.py").write_text(WATCHER)
    files = (tmp_path / "counter.py", tmp_path / "watcher.py")
    with load(*files, workers=2, shared={"hits": {"count": 10}}) as svc:
        assert sorted(svc.services) == ["counter", "watch"]
        a = svc.connect("counter", worker=0)
        b = svc.connect("counter", worker=1)
        a.send(b"x")
        b.send(b"y")
        a.send(b"z")
        assert a.received() == b"11 x\n13 z\n"
        assert b.received() == b"12 y\n"
        assert svc.shared("hits") == {"count": 13, "last": "z"}
        for worker in (0, 1):
            assert svc.module_globals("counter", worker)["seen"] == [11, 12, 13]
            assert svc.module_globals("watcher", worker)["heard"] == [11, 12, 13]
        svc.broadcast("news", {"text": "hello"})
        assert svc.module_globals("watcher", 1)["heard"][-1] == {"text": "hello"}


def test_bad_modules_and_calls_get_clear_errors(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("class l:\n    def onconnect(conn)\n")
    with pytest.raises(ModuleError, match="broken"):
        load(broken)
    with pytest.raises(ModuleError, match="not found"):
        load(tmp_path / "missing.py")
    with pytest.raises(TypeError, match="options= is for one module"):
        load("echo", "lastsaid", options={"a": 1})
    with load("echo", "lastsaid") as svc, pytest.raises(TypeError, match="echo, lastsaid"):
        svc.connect()


CONVERSATION = """\
hits = module.shared("hits")
trace = []


class listener:
    async def onconnect(conn):
        n = await hits.incr("connects")
        trace.append("connect")
        conn.write(f"hello {n}\\n")

    def onincoming(conn, data):
        command = data.strip().decode()
        trace.append("incoming " + command)
        if command == "dump":
            conn.write(" | ".join(trace) + "\\n")
        elif command == "bye":
            conn.write("bye\\n")
            conn.close("said bye")
            conn.close("twice")
        else:
            return answer(conn, command)

    def ondisconnect(conn, err):
        trace.append(f"disconnect {err}")


async def answer(conn, command):
    n = await hits.incr("lines")
    conn.write(f"{n} {command}\\n")


module.provides("net", listener=listener, default_port=0)
"""

SCRIPT = [
    ("a", "connect", None),
    ("a", "send", b"x\n"),
    ("a", "send", b"y\n"),
    ("b", "connect", None),
    ("a", "send", b"bye\n"),
    ("b", "send", b"dump\n"),
]


@pytest.mark.server
def test_the_kit_and_a_real_worker_tell_the_same_story(tmp_path, mpnet_server):
    """One conversation, in-process and on a real server: every byte the clients see is equal,
    the module's own trace (async callbacks, shared atomics, a double close) included."""
    module = tmp_path / "conversation.py"
    module.write_text(CONVERSATION)

    in_process = []
    with load(module) as svc:
        clients = {}
        for name, action, data in SCRIPT:
            if action == "connect":
                clients[name] = svc.connect()
            else:
                clients[name].send(data)
            in_process.append(clients[name].received())
        in_process.append(clients["a"].closed)

    real = []
    srv = mpnet_server(modules=[module], workers=1)
    sockets = {}
    try:
        for name, action, data in SCRIPT:
            if action == "connect":
                sockets[name] = srv.connect("conversation")
            else:
                sockets[name].send(data)
            if data == b"bye\n":
                real.append(sockets[name].recv_to_eof())
            else:
                real.append(sockets[name].recv_until(b"\n"))
        real.append(True)  # recv_to_eof returned: the server closed "a"
    finally:
        for client in sockets.values():
            client.close()

    assert in_process == real
    assert real[-2] == (
        b"connect | incoming x | incoming y | connect | incoming bye | disconnect said bye"
        b" | incoming dump\n"
    )


def test_a_kept_read_timeout_fires_again_one_read_timeout_later(tmp_path):
    path = tmp_path / "keeper.py"
    path.write_text(
        "class l:\n"
        "    def onreadtimeout(conn):\n"
        "        conn.write('ping\\n')\n"
        "        return True\n"
        "module.provides('net', listener=l, default_port=0)\n"
    )
    with load(path, config={"read_timeout": 10}) as svc:
        c = svc.connect()
        svc.advance(12)
        assert c.received() == b"ping\n"
        svc.advance(8)
        assert c.received() == b""
        svc.advance(4)
        assert c.received() == b"ping\n" and not c.closed


def test_a_slow_reader_fills_the_queue_then_ondrain_runs(tmp_path):
    path = tmp_path / "firehose.py"
    path.write_text(
        "class l:\n"
        "    def onincoming(conn, data):\n"
        "        while conn.buffered() <= 100_000:\n"
        "            conn.write(b'x' * 10_000)\n"
        "        conn.write(f'queued {conn.buffered()}\\n')\n"
        "    def ondrain(conn):\n"
        "        conn.write(f'drained {conn.buffered()}\\n')\n"
        "        conn.close('done')\n"
        "module.provides('net', listener=l, default_port=0)\n"
    )
    with load(path) as svc:
        c = svc.connect()
        c.stop_reading()
        c.send(b"go")
        assert c.received() == b"" and c.conn.buffered() == 110_000 + len(b"queued 110000\n")
        assert not c.closed  # close() waits for the queue, as on a socket
        c.start_reading()
        data = c.received()
        assert data == b"x" * 110_000 + b"queued 110000\ndrained 0\n"
        assert c.closed and c.close_reason == "done"


LIFECYCLE = """\
events = []
connections = set()


def tick():
    events.append("tick")
    return 5 if events.count("tick") < 3 else None  # repeats twice, then stops


async def ready():
    events.append("ready")


def unload():
    for conn in connections:
        conn.write("goodbye\\n")
    events.append("unload")


class listener:
    def onconnect(conn):
        connections.add(conn)

    def ondisconnect(conn, err):
        connections.discard(conn)
        events.append(f"disconnect {err}")


module.add_timer(5, tick)
module.on_ready(ready)
module.on_unload(unload)
module.provides("net", listener=listener, default_port=0)
"""


def test_timers_ready_and_unload_hooks_run_as_in_a_worker(tmp_path):
    path = tmp_path / "life.py"
    path.write_text(LIFECYCLE)
    svc = load(path)
    events = svc.module_globals("life")["events"]
    assert events == ["ready"]
    c = svc.connect()
    svc.advance(4.9)
    assert events == ["ready"]
    svc.advance(0.1)
    assert events == ["ready", "tick"]
    svc.advance(60)
    assert events == ["ready", "tick", "tick", "tick"]
    svc.stop()
    assert events[4:] == ["unload", "disconnect server shutting down"]
    assert c.received() == b"goodbye\n" and c.closed


def test_the_bundled_chat_room_across_two_workers():
    with load("chat", workers=2) as svc:
        a, b = svc.connect(worker=0), svc.connect(worker=1)
        assert a.received().startswith(b"* welcome, you are guest1")
        b.received()
        a.send(b"/nick alice\nhello\n")
        assert b.received() == b"* guest1 is now known as alice\n<alice> hello\n"
        b.send(b"/nick Alice\n")  # nicks are unique across workers, case-insensitively
        assert b.received() == b"! nick Alice is already taken; choose another with /nick NAME\n"
        a.close()
        assert b.received() == b"* alice left\n"
        assert "alice" not in svc.shared("chat_nicks")


def test_modules_cannot_broadcast_the_resync_topic(tmp_path):
    """mpnet.RESYNC is run by the Redis backend after a reload of the replicas; a module
    broadcasting it would make every hook believe that happened."""
    path = tmp_path / "fake.py"
    path.write_text(
        "import mpnet\n"
        "try:\n"
        "    module.broadcast(mpnet.RESYNC, {})\n"
        "except ValueError as exc:\n"
        "    refused = str(exc)\n"
    )
    with load(path) as svc:
        assert "mpnet's own topic" in svc.module_globals("fake")["refused"]
