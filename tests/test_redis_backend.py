"""Shared tables on Redis (``shared_backend = "redis"``): a real ``redis-server`` on a free port,
one or two mpnet instances ("hosts" on one machine) sharing it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from harness import (
    WELCOME,
    Client,
    RespClient,
    config,
    free_port,
    mpnet_cli,
    run_mpnet,
    settled,
    status,
    wait_for,
)

REDIS_SERVER = shutil.which("redis-server")
REDIS_BENCHMARK = shutil.which("redis-benchmark")
pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        REDIS_SERVER is None,
        reason="redis-server not installed (Debian redis-server; .ci/run has it)",
    ),
]


class RedisServer:
    """A ``redis-server`` of the test's own, in a temp dir, stopped by PID."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.directory), *self.args]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self.answers, timeout=30, what="redis-server to answer PING")
        return self

    def answers(self) -> bool:
        try:
            return self.call("PING") in (b"+PONG\r\n", b"-NOAUTH Authentication required.\r\n")
        except OSError:
            return False

    def call(self, *args: str | bytes | int) -> bytes:
        """One command on a fresh connection; the raw reply."""
        with RespClient(self.port) as client:
            return client.call(*args)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        server = RedisServer(directory, *args)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def redis_config(modules: list[str], url: str, **keys) -> str:
    keys.setdefault("workers", 2)
    return config(modules, shared_backend="redis", redis_url=url, **keys)


PROBE = """\
import asyncio
import json
import os
import mpnet
t = module.shared("probe")
tasks = set()
heard = []  # payloads of the broadcasts on "news" this worker's hook ran for
resyncs = []  # the RESYNC hook's payloads, with what the table held when it ran

module.hook("news", heard.append)
module.hook(mpnet.RESYNC, lambda payload: resyncs.append({**payload, "k": t.get("k")}))

class listener:
    def onconnect(conn):
        conn.write(f"{os.getpid()}\\n")

    def onincoming(conn, data):
        for line in data.decode().splitlines():
            task = asyncio.ensure_future(answer(conn, line.split()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

async def answer(conn, words):
    op = words[0]
    try:
        if op == "set":  # acknowledged once Redis has it
            await t.set(words[1], int(words[2]))
            conn.write("ok\\n")
        elif op == "get":  # after the read barrier
            await t.sync()
            conn.write(f"{t.get(words[1])}\\n")
        elif op == "peek":  # the replica as it is
            conn.write(f"{t.get(words[1])}\\n")
        elif op == "incr":
            conn.write(f"{await t.incr(words[1])}\\n")
        elif op == "say":
            module.broadcast("news", words[1])
            conn.write("ok\\n")
        elif op == "heard":
            conn.write(json.dumps(heard) + "\\n")
        elif op == "resyncs":
            conn.write(json.dumps(resyncs) + "\\n")
    except Exception as exc:
        conn.write(f"error {type(exc).__name__}: {exc}\\n")

module.provides("net", listener=listener, default_port=0)
"""


@pytest.fixture
def probe_module(write_module):
    return str(write_module("probe", PROBE).parent)


class LineClient(Client):
    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.pid = int(self.read_until(b"\n"))

    def ask(self, line: str) -> str:
        self.send(line + "\n")
        return self.read_until(b"\n").decode().strip()


def two_hosts(mpnet, redis, modules, **keys):
    """Two mpnet instances (two "hosts" on one machine) on one Redis."""
    return [mpnet(redis_config(modules, redis.url, **keys)) for _ in range(2)]


def test_a_write_acknowledged_on_one_host_is_read_on_the_other(mpnet, redis_server, probe_module):
    redis = redis_server()
    hosts = two_hosts(mpnet, redis, ["probe"], module_paths=[probe_module], probe_ports=[0])
    a, b = (LineClient(host.port("probe")) for host in hosts)
    for i in range(300):
        assert a.ask(f"set k{i % 7} {i}") == "ok"
        assert b.ask(f"get k{i % 7}") == str(i)
    assert b.ask("incr n") == "1"
    assert a.ask("incr n") == "2"
    assert a.ask("peek n") == "2"  # an atomic's answer counts once the replica shows it
    a.close()  # open connections would make each host's graceful stop wait
    b.close()


def test_kv_set_answered_on_one_host_is_read_by_get_on_the_other(mpnet, redis_server):
    """kv answers +OK once the write is acknowledged and reads after a barrier: on the Redis
    backend that holds across hosts (the issue's "SET on host A, GET on host B")."""
    redis = redis_server()
    hosts = two_hosts(mpnet, redis, ["kv"], kv_ports=[0])
    with RespClient(hosts[0].port("kv")) as a, RespClient(hosts[1].port("kv")) as b:
        for i in range(200):
            assert a.call("SET", f"k{i % 5}", str(i)) == b"+OK\r\n"
            assert b.call("GET", f"k{i % 5}") == b"$%d\r\n%d\r\n" % (len(str(i)), i)


def test_a_host_started_later_starts_from_the_state_in_redis(mpnet, redis_server, probe_module):
    redis = redis_server()
    keys = {"module_paths": [probe_module], "probe_ports": [0]}
    first = mpnet(redis_config(["probe"], redis.url, **keys))
    with LineClient(first.port("probe")) as client:
        for i in range(50):
            assert client.ask(f"set k{i} {i}") == "ok"
    later = mpnet(redis_config(["probe"], redis.url, **keys))
    with LineClient(later.port("probe")) as client:
        assert [client.ask(f"peek k{i}") for i in range(50)] == [str(i) for i in range(50)]


@pytest.mark.skipif(REDIS_BENCHMARK is None, reason="redis-benchmark not installed")
def test_kv_incr_is_exact_across_two_hosts(mpnet, redis_server):
    redis = redis_server()
    hosts = two_hosts(mpnet, redis, ["kv"], kv_ports=[0])
    requests = 3000
    argv = [REDIS_BENCHMARK, "-t", "incr", "-c", "8", "-q", "-n", str(requests)]
    runs = [
        subprocess.Popen(
            [*argv, "-p", str(host.port("kv"))],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for host in hosts
    ]
    try:
        outputs = [run.communicate(timeout=120)[0] for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert all(run.returncode == 0 for run in runs), outputs
    for extra, host in enumerate(hosts, 1):
        with RespClient(host.port("kv")) as client:
            assert client.call("INCR", "counter:__rand_int__") == b":%d\r\n" % (
                2 * requests + extra
            )


def chat_client(port: int) -> tuple[Client, str]:
    client = Client(port)
    match = WELCOME.match(client.read_until(b"\n"))
    assert match, "no welcome line"
    return client, match.group(1).decode()


def said_lines(client: Client, count: int) -> list[str]:
    """The next *count* room messages a chat client gets (other lines skipped)."""
    said: list[str] = []
    while len(said) < count:
        line = client.read_until(b"\n").decode()
        match = re.match(r"<[^>]+> ([ab]\d+)\n$", line)
        if match:
            said.append(match.group(1))
    return said


def test_chat_room_and_nicks_span_hosts_in_one_order(mpnet, redis_server):
    redis = redis_server()
    hosts = two_hosts(mpnet, redis, ["chat"], chat_ports=[0])
    (alice, alice_nick), (bob, bob_nick) = (chat_client(host.port("chat")) for host in hosts)
    assert alice_nick != bob_nick  # guest numbers come from one shared counter
    alice.send("/nick alice\n")
    bob.read_until(f"* {alice_nick} is now known as alice\n".encode())
    bob.send("/nick ALICE\n")
    bob.read_until(b"! nick ALICE is already taken")
    # both talk at once; both see every line, in the same order
    for i in range(40):
        alice.send(f"a{i}\n")
        bob.send(f"b{i}\n")
    seen = [said_lines(client, 80) for client in (alice, bob)]
    assert seen[0] == seen[1]
    assert sorted(seen[0]) == sorted([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(40)])
    alice.close()
    bob.close()


def test_redis_frozen_then_back_fails_atomics_in_bounded_time_and_recovers(
    mpnet, redis_server, probe_module
):
    redis = redis_server()
    server = mpnet(
        redis_config(
            ["probe"], redis.url, module_paths=[probe_module], probe_ports=[0], redis_timeout=2
        )
    )
    pids = server.worker_pids()
    with LineClient(server.port("probe")) as client:
        assert client.ask("set k 1") == "ok"
        redis.proc.send_signal(signal.SIGSTOP)  # a network cut: no reset, no answer
        try:
            answer = client.ask("incr n")  # Client's own deadline bounds this
            assert answer.startswith("error SharedUnavailable"), answer
            assert client.ask("peek k") == "1"  # reads keep answering from the replica
            assert client.ask("set k 2").startswith("error SharedUnavailable")
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        server.wait_log(r"redis: reconnected", what="the worker to reconnect")

        def incr_works() -> bool:
            return client.ask("incr n").isdigit()

        wait_for(incr_works, what="incr to work again")
        assert client.ask("get k") == "1"
    server.wait_log(
        r"redis: connection to \S+ lost \((no answer|the events subscription was silent)"
    )
    assert server.worker_pids() == pids  # no worker crashed


def test_redis_restarted_under_load_loses_no_acknowledged_write(mpnet, redis_server, tmp_path):
    redis = redis_server("--appendonly", "yes", "--appendfsync", "always")
    server = mpnet(redis_config(["kv"], redis.url, kv_ports=[0], redis_timeout=2))
    port = server.port("kv")
    pids = server.worker_pids()
    acknowledged: list[int] = []
    errors: list[bytes] = []
    stop = threading.Event()

    def load() -> None:
        with RespClient(port) as client:
            while not stop.is_set():
                reply = client.call("INCR", "n")
                if reply.startswith(b":"):
                    acknowledged.append(int(reply[1:]))
                else:
                    errors.append(reply)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(acknowledged) > 200, what="INCRs to be answered")
        redis.stop()
        wait_for(lambda: errors, what="INCR to fail while Redis is down")
        with RespClient(port) as client:
            assert client.call("PING") == b"+PONG\r\n"  # serving goes on
        redis.start()
        count = len(acknowledged)
        wait_for(lambda: len(acknowledged) > count + 100, what="INCRs to work again")
    finally:
        stop.set()
        thread.join(30)
    assert b"unavailable" in errors[0], errors[0]
    final = int(redis.call("HGET", "mpnet:t:kv", b"\xc4\x01n").split(b"\r\n")[1])
    assert final >= acknowledged[-1] == max(acknowledged)
    assert server.worker_pids() == pids
    server.wait_log(r"redis: connection to \S+ lost")
    server.wait_log(r"redis: reconnected")


def test_bad_url_is_a_one_line_config_error(tmp_path):
    (tmp_path / "mpnet.toml").write_text(redis_config(["kv"], "http://127.0.0.1:1/0", kv_ports=[0]))
    result = run_mpnet(tmp_path, "check", "-c", "mpnet.toml")
    assert result.returncode != 0
    assert "key 'redis_url': expected a URL starting redis://" in result.stderr


@pytest.fixture
def start_failure(mpnet):
    def run(url: str, **keys) -> str:
        server = mpnet(redis_config(["kv"], url, kv_ports=[0], **keys), start=False)
        server.start(wait_ready=False)
        code = server.wait_exit()
        assert code != 0
        return server.log

    return run


def test_refused_connection_auth_and_non_redis_fail_the_start(
    redis_server, start_failure, tmp_path
):
    nothing = free_port()
    log = start_failure(f"redis://127.0.0.1:{nothing}/0", redis_timeout=2)
    assert re.search(r"cannot start: redis_url redis://127\.0\.0\.1:\d+/0: cannot use it", log)

    secured = redis_server("--requirepass", "sesame")
    log = start_failure(f"redis://:wrong@127.0.0.1:{secured.port}/0")
    assert "cannot start: redis_url redis://:***@127.0.0.1" in log
    assert "authentication refused" in log
    assert "wrong" not in log.replace("wrong number", "")

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve_http() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
                conn.close()

    thread = threading.Thread(target=serve_http, daemon=True)
    thread.start()
    try:
        log = start_failure(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", redis_timeout=2)
    finally:
        stop.set()
        thread.join(10)
        listener.close()
    assert re.search(r"cannot start: redis_url \S+: ", log), log


def test_a_prefix_holding_foreign_keys_fails_the_start(redis_server, start_failure):
    redis = redis_server()
    assert redis.call("SET", "mpnet:session:1", "x") == b"+OK\r\n"
    log = start_failure(redis.url)
    assert "prefix 'mpnet:' holds keys mpnet did not write" in log
    assert "choose another redis_prefix" in log


def test_check_reports_whether_redis_is_reachable(redis_server, tmp_path):
    redis = redis_server()
    (tmp_path / "mpnet.toml").write_text(redis_config(["kv"], redis.url, kv_ports=[0]))
    result = run_mpnet(tmp_path, "check", "-c", "mpnet.toml")
    assert result.returncode == 0, result.stderr
    assert f"shared tables on Redis: reachable at {redis.url}, prefix 'mpnet:'" in result.stdout
    redis.stop()
    result = run_mpnet(tmp_path, "check", "-c", "mpnet.toml")
    assert result.returncode != 0
    assert f"redis_url {redis.url}: cannot use it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_killing_one_host_leaves_the_other_serving_with_every_acknowledged_write(
    mpnet, redis_server, probe_module
):
    redis = redis_server()
    doomed, survivor = two_hosts(
        mpnet, redis, ["probe"], module_paths=[probe_module], probe_ports=[0]
    )
    on_survivor = LineClient(survivor.port("probe"))
    with LineClient(doomed.port("probe")) as client:
        for i in range(100):
            assert client.ask(f"set k{i} {i}") == "ok"
        doomed.workers()  # remember its workers' pids for the teardown
        os.killpg(doomed.pid, signal.SIGKILL)  # master and workers at once
    doomed.wait_exit()
    assert [on_survivor.ask(f"get k{i}") for i in range(100)] == [str(i) for i in range(100)]
    with LineClient(survivor.port("probe")) as fresh:
        assert fresh.ask("incr after") == "1"
    on_survivor.close()


def test_an_idle_connection_is_not_taken_for_a_lost_one(mpnet, redis_server, probe_module):
    """redis-py's default read timeout (5 s) must not end a quiet but healthy connection."""
    redis = redis_server()
    server = mpnet(redis_config(["probe"], redis.url, module_paths=[probe_module], probe_ports=[0]))
    with LineClient(server.port("probe")) as client:
        assert client.ask("set k 1") == "ok"
        time.sleep(7)  # the condition under test is the idle time itself
        assert client.ask("incr n") == "1"
    assert "lost" not in server.log, server.log


def test_a_table_key_clobbered_by_another_program_is_a_clear_error(
    mpnet, redis_server, probe_module
):
    redis = redis_server()
    server = mpnet(redis_config(["probe"], redis.url, module_paths=[probe_module], probe_ports=[0]))
    with LineClient(server.port("probe")) as client:
        assert client.ask("set k 1") == "ok"
        assert redis.call("DEL", "mpnet:t:probe") == b":1\r\n"
        assert redis.call("SET", "mpnet:t:probe", "not a hash") == b"+OK\r\n"
        answer = client.ask("set k 2")
        assert answer == (
            "error SharedError: set: the Redis key of this table is not a hash "
            "(another program's key?)"
        )
        assert client.ask("incr n").startswith("error SharedError: incr: the Redis key")
        server.wait_log(r"redis: set on table 'probe' refused: .*WRONGTYPE")
        assert redis.call("DEL", "mpnet:t:probe") == b":1\r\n"
        assert client.ask("set k 3") == "ok"
        assert client.ask("get k") == "3"


def redis_states(server) -> list[str | None]:
    """Each worker's Redis state as ``mpnet status`` has it (None: no report yet)."""
    return [w.get("redis", {}).get("state") for w in status(server)["workers"]]


def a_client_of_another_worker(port: int, old: set[int]) -> LineClient:
    """A connection served by a worker whose pid is not in *old* (its replacement)."""

    def attempt() -> LineClient | None:
        try:
            client = LineClient(port)
        except (OSError, AssertionError):
            return None
        if client.pid in old:
            client.close()
            return None
        return client

    return wait_for(attempt, what="a connection to the new worker")


def test_status_says_the_redis_state_and_workers_start_during_an_outage(
    mpnet, redis_server, probe_module
):
    """The master learns each worker's Redis state from its reports (it never talks to Redis
    itself); a worker started while Redis is down (a reload, a crash's replacement) serves,
    refuses shared writes, and loads the state once Redis is back."""
    redis = redis_server("--appendonly", "yes")  # the state outlives the restart
    server = mpnet(
        redis_config(
            ["probe", "echo"],
            redis.url,
            module_paths=[probe_module],
            probe_ports=[0],
            echo_ports=[0],
            workers=1,
            redis_timeout=2,
            metrics_listen="127.0.0.1:0",
        )
    )
    port = server.port("probe")
    metrics = int(server.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
    with LineClient(port) as client:
        assert client.ask("set k 1") == "ok"
    wait_for(lambda: redis_states(server) == ["connected"], what="status: connected")
    shown = mpnet_cli(server, "status")
    assert shown.returncode == 0 and " redis\n" in shown.stdout.splitlines()[1] + "\n", shown
    assert shown.stdout.splitlines()[2].endswith(" up"), shown.stdout

    redis.stop()
    wait_for(lambda: redis_states(server) == ["unavailable"], what="status: unavailable")
    server.wait_log(r"redis: connection to \S+ lost")
    row = status(server)["workers"][0]["redis"]
    assert row["lost"] == 1 and row["error"] and row["for"] >= 0, row
    shown = mpnet_cli(server, "status").stdout
    assert re.search(r"redis: worker 0 \(pid \d+\) unavailable since [\d:]+ \(\d+s\): ", shown)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as page:
        text = page.read().decode()
    assert 'mpnet_redis_workers{state="unavailable"} 1.0' in text, text
    assert "mpnet_redis_connections_lost_total 1.0" in text

    result = mpnet_cli(server, "reload", "--wait")
    assert result.returncode == 0, result.stderr
    server.wait_log(r"reload: Redis unreachable: redis_url \S+: cannot use it")
    old = settled(server, 1)
    os.kill(next(iter(old)), signal.SIGKILL)  # its replacement boots while Redis is down
    new = a_client_of_another_worker(port, old)
    server.wait_log(r"redis: \S+ unreachable at start \(cannot use it")
    with Client(server.port("echo")) as echo:
        echo.read_until(b"Hello!\n")
        echo.send("hi\n")
        assert echo.read_until(b"\n\n") == b"You said hi\n\n"
    assert new.ask("incr n").startswith("error SharedUnavailable: Redis unavailable: ")
    assert new.ask("set k 2").startswith("error SharedUnavailable")
    assert new.ask("peek k") == "None"  # nothing loaded yet: its replicas start empty
    wait_for(lambda: redis_states(server) == ["unavailable"], what="the new worker's report")

    redis.start()  # the same port
    wait_for(lambda: redis_states(server) == ["connected"], what="status: connected again")
    assert new.ask("peek k") == "1"  # reloaded before the report said connected
    assert new.ask("incr n") == "1"
    new.close()
    assert worker_pids_of(server) == {new.pid}


def worker_pids_of(server) -> set[int]:
    return {w["pid"] for w in status(server)["workers"]}


class CutProxy:
    """A TCP relay to Redis that the test can cut (every relayed connection closed, new ones
    closed at once) and restore: one host losing Redis while the others keep it."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_off = threading.Event()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.cut_off.is_set():
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            with self.lock:
                self.pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(None)
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.cut_off.set()
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def restore(self) -> None:
        self.cut_off.clear()

    def close(self) -> None:
        self.stopping.set()
        self.cut()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def cut_proxy():
    proxies: list[CutProxy] = []

    def make(upstream: int) -> CutProxy:
        proxies.append(CutProxy(upstream))
        return proxies[-1]

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


def heard(client: LineClient) -> list[str]:
    return json.loads(client.ask("heard"))


def test_broadcasts_across_an_outage_and_the_resync_hook(
    mpnet, redis_server, cut_proxy, probe_module
):
    """What the README promises: a broadcast during the outage raises at the call; what other
    hosts broadcast meanwhile never reaches the cut-off host; after reconnecting and reloading,
    its RESYNC hook runs with the reloaded tables."""
    redis = redis_server()
    proxy = cut_proxy(redis.port)
    keys = {"module_paths": [probe_module], "probe_ports": [0], "workers": 1}
    host_a = mpnet(redis_config(["probe"], proxy.url, redis_timeout=2, **keys))
    host_b = mpnet(redis_config(["probe"], redis.url, **keys))
    a, b = LineClient(host_a.port("probe")), LineClient(host_b.port("probe"))
    assert a.ask("say one") == "ok"
    wait_for(lambda: heard(a) == heard(b) == ["one"], what="both hosts to hear 'one'")

    proxy.cut()
    host_a.wait_log(r"redis: connection to \S+ lost")
    assert a.ask("say two").startswith("error SharedUnavailable: Redis unavailable: ")
    assert b.ask("say three") == "ok"
    assert b.ask("set k 7") == "ok"
    wait_for(lambda: heard(b) == ["one", "three"], what="host B to hear 'three'")
    assert json.loads(a.ask("resyncs")) == []

    proxy.restore()
    resyncs = wait_for(lambda: json.loads(a.ask("resyncs")), what="the RESYNC hook to run")
    assert len(resyncs) == 1 and resyncs[0]["k"] == 7 and resyncs[0]["tables"] >= 1, resyncs
    assert resyncs[0]["unavailable"] > 0
    assert heard(a) == ["one"]  # 'three' was published while A was not subscribed: gone
    assert b.ask("say four") == "ok"
    wait_for(lambda: heard(a) == ["one", "four"], what="host A to hear 'four'")
    assert json.loads(b.ask("resyncs")) == []  # B never lost Redis
    a.close()
    b.close()
