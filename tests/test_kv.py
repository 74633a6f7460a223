"""The bundled kv module (a subset of Redis): raw RESP, redis-cli, redis-benchmark, redis-py."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import threading
import time

import pytest
import redis
from harness import Client, RespClient, clients_on_distinct_workers, command, config, wait_for

pytestmark = pytest.mark.server

REDIS_CLI = shutil.which("redis-cli")
REDIS_BENCHMARK = shutil.which("redis-benchmark")
needs_cli = pytest.mark.skipif(
    REDIS_CLI is None, reason="redis-cli not installed (Debian redis-tools; .ci/run installs it)"
)
needs_benchmark = pytest.mark.skipif(
    REDIS_BENCHMARK is None,
    reason="redis-benchmark not installed (Debian redis-tools; .ci/run installs it)",
)


@pytest.fixture
def kv(mpnet):
    """``kv(workers=1, **keys)`` -> (server, port)."""

    def start(workers: int = 1, **keys):
        server = mpnet(config(["kv"], workers=workers, kv_ports=[0], **keys))
        return server, server.port("kv")

    return start


# -- exact replies through a raw socket --------------------------------------------------------

E_NAME = b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"

TRANSCRIPT: list[tuple[tuple[str | bytes | int, ...], bytes]] = [
    (("PING",), b"+PONG\r\n"),
    (("ping", "hi"), b"$2\r\nhi\r\n"),
    (("ECHO", "a\r\nb"), b"$4\r\na\r\nb\r\n"),
    (("GET", "missing"), b"$-1\r\n"),
    (("SET", "k", "v"), b"+OK\r\n"),
    (("GET", "k"), b"$1\r\nv\r\n"),
    (("SET", "k", "w", "NX"), b"$-1\r\n"),
    (("SET", "k", "w", "XX", "GET"), b"$1\r\nv\r\n"),
    (("SET", "nope", "w", "XX"), b"$-1\r\n"),
    (("SET", "new", "x", "NX"), b"+OK\r\n"),
    (("SET", "k", "v", "NX", "XX"), b"-ERR syntax error\r\n"),
    (("SET", "k", "v", "EX", "0"), b"-ERR invalid expire time in 'set' command\r\n"),
    (("SET", "k", "v", "EX", "x"), b"-ERR value is not an integer or out of range\r\n"),
    (("SET", "k", "v", "EX"), b"-ERR syntax error\r\n"),
    (("SET", "k", "v", "BOGUS"), b"-ERR syntax error\r\n"),
    (("EXISTS", "k", "new", "missing", "k"), b":3\r\n"),
    (("DEL", "k", "missing", "new"), b":2\r\n"),
    (("INCR", "n"), b":1\r\n"),
    (("INCRBY", "n", "41"), b":42\r\n"),
    (("DECR", "n"), b":41\r\n"),
    (("DECRBY", "n", "-9"), b":50\r\n"),
    (("GET", "n"), b"$2\r\n50\r\n"),
    (("SET", "n", "-7"), b"+OK\r\n"),
    (("INCR", "n"), b":-6\r\n"),
    (("SET", "z", "010"), b"+OK\r\n"),  # not canonical: stays a string, as in Redis
    (("INCR", "z"), b"-ERR value is not an integer or out of range\r\n"),
    (("GET", "z"), b"$3\r\n010\r\n"),
    (("SET", "s", "hello"), b"+OK\r\n"),
    (("INCR", "s"), b"-ERR value is not an integer or out of range\r\n"),
    (("INCRBY", "n", "1.5"), b"-ERR value is not an integer or out of range\r\n"),
    (("SET", "max", "9223372036854775807"), b"+OK\r\n"),
    (("INCR", "max"), b"-ERR increment or decrement would overflow\r\n"),
    (("GET", "max"), b"$19\r\n9223372036854775807\r\n"),
    (("SET", "big", "9223372036854775808"), b"+OK\r\n"),
    (("INCR", "big"), b"-ERR value is not an integer or out of range\r\n"),
    (("MSET", "a", "1", "b", "2"), b"+OK\r\n"),
    (("MGET", "a", "missing", "b"), b"*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n"),
    (("MSET", "a"), b"-ERR wrong number of arguments for 'mset' command\r\n"),
    (("TYPE", "a"), b"+string\r\n"),
    (("TYPE", "missing"), b"+none\r\n"),
    (("TTL", "a"), b":-1\r\n"),
    (("TTL", "missing"), b":-2\r\n"),
    (("EXPIRE", "a", "100"), b":1\r\n"),
    (("TTL", "a"), b":100\r\n"),
    (("EXPIRE", "a", "50", "GT"), b":0\r\n"),
    (("EXPIRE", "a", "50", "LT"), b":1\r\n"),
    (("EXPIRE", "a", "5", "NX"), b":0\r\n"),
    (("EXPIRE", "missing", "100"), b":0\r\n"),
    (("INCR", "a"), b":2\r\n"),  # a key with a TTL: compare-and-swap, TTL kept
    (("TTL", "a"), b":50\r\n"),
    (("PERSIST", "a"), b":1\r\n"),
    (("PERSIST", "a"), b":0\r\n"),
    (("TTL", "a"), b":-1\r\n"),
    (("EXPIRE", "b", "-1"), b":1\r\n"),  # a deadline in the past deletes, as in Redis
    (("EXISTS", "b"), b":0\r\n"),
    (("SET", "t", "v", "PX", "100000"), b"+OK\r\n"),
    (("SET", "t", "w", "KEEPTTL"), b"+OK\r\n"),
    (("TTL", "t"), b":100\r\n"),
    (("SET", "t", "x"), b"+OK\r\n"),  # a plain SET drops the TTL
    (("TTL", "t"), b":-1\r\n"),
    (("GET", "nope", "extra"), b"-ERR wrong number of arguments for 'get' command\r\n"),
    (
        ("NOSUCH", "a", "b"),
        b"-ERR unknown command 'NOSUCH', with args beginning with: 'a' 'b' \r\n",
    ),
    (("SELECT", "0"), b"+OK\r\n"),
    (("SELECT", "1"), b"-ERR DB index is out of range\r\n"),
    (("CONFIG", "GET", "save"), b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n"),
    (("CONFIG", "GET", "appendonly"), b"*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"),
    (("CONFIG", "GET", "nosuchparam"), b"*0\r\n"),
    (("COMMAND", "DOCS"), b"*0\r\n"),
    (("CLIENT", "SETNAME", "me"), b"+OK\r\n"),
    (("CLIENT", "GETNAME"), b"$2\r\nme\r\n"),
    (("CLIENT", "SETINFO", "LIB-NAME", "test"), b"+OK\r\n"),
    (("CLIENT", "SETNAME", "a\r\nb"), E_NAME),
    (("CLIENT", "SETNAME", "a b"), E_NAME),
    (("CLIENT", "SETNAME", "caf\u00e9"), E_NAME),
    (("CLIENT", "SETNAME", "x" * 1_000_000), b"-ERR Client names are limited to 512 bytes.\r\n"),
    (("CLIENT", "GETNAME"), b"$2\r\nme\r\n"),  # unchanged by the refusals
    (("HELLO", "2", "SETNAME", "new\nline"), E_NAME),
    (("CLIENT", "SETNAME", ""), b"+OK\r\n"),
    (("CLIENT", "GETNAME"), b"$-1\r\n"),
    (("SCAN", "0", "COUNT", "0"), b"-ERR syntax error\r\n"),
    (("SCAN", "0", "COUNT", "x"), b"-ERR value is not an integer or out of range\r\n"),
    (("SCAN", "0", "MATCH"), b"-ERR syntax error\r\n"),
    (("SCAN", "0", "BOGUS", "1"), b"-ERR syntax error\r\n"),
    (("SCAN", "x"), b"-ERR invalid cursor\r\n"),
    (("SCAN", "0", "MATCH", "nomatch*", "COUNT", "1000"), b"*2\r\n$1\r\n0\r\n*0\r\n"),
    (("SCAN", "0", "TYPE", "hash", "COUNT", "1000"), b"*2\r\n$1\r\n0\r\n*0\r\n"),
]


def test_commands_answer_exactly_like_redis(kv):
    _, port = kv()
    with RespClient(port) as client:
        for args, expected in TRANSCRIPT:
            assert (args, client.call(*args)) == (args, expected)


def test_keys_glob_patterns_follow_redis(kv):
    _, port = kv()
    names = ["hello", "hallo", "hxllo", "hllo", "heeeello", "h*llo", "a?b", "x", "hELLO"]
    with RespClient(port) as client:
        for name in names:
            client.call("SET", name, "1")

        def keys(pattern: str) -> list[str]:
            reply = client.call("KEYS", pattern)
            return sorted(item.decode() for item in re.findall(rb"\$\d+\r\n(.*?)\r\n", reply))

        assert keys("*") == sorted(names)
        assert keys("h?llo") == ["h*llo", "hallo", "hello", "hxllo"]
        assert keys("h*llo") == ["h*llo", "hallo", "heeeello", "hello", "hllo", "hxllo"]
        assert keys("h[ae]llo") == ["hallo", "hello"]
        assert keys("h[^e]llo") == ["h*llo", "hallo", "hxllo"]
        assert keys("h[a-e]llo") == ["hallo", "hello"]
        assert keys("h[e-a]llo") == ["hallo", "hello"]  # reversed ranges, as in Redis
        assert keys("h\\*llo") == ["h*llo"]
        assert keys("a\\?b") == ["a?b"]
        assert keys("nothing*") == []
        assert client.call("DBSIZE") == b":9\r\n"
        assert client.call("FLUSHDB") == b"+OK\r\n"
        assert client.call("DBSIZE") == b":0\r\n"


def test_inline_commands_and_binary_values(kv):
    _, port = kv()
    with RespClient(port) as client:
        client.send(b"SET greeting hello\r\nGET greeting\nPING\r\n")
        assert [client.reply() for _ in range(3)] == [b"+OK\r\n", b"$5\r\nhello\r\n", b"+PONG\r\n"]
        blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
        assert client.call("SET", b"\x00bin\xff", blob) == b"+OK\r\n"
        assert client.call("GET", b"\x00bin\xff") == b"$%d\r\n%s\r\n" % (len(blob), blob)
        assert client.call("SET", "empty", b"") == b"+OK\r\n"
        assert client.call("GET", "empty") == b"$0\r\n\r\n"


def test_pipelined_commands_are_answered_in_order(kv):
    _, port = kv(workers=2)
    with RespClient(port) as client:
        script = [("SET", "p", "1")] + [("INCR", "p")] * 50 + [("GET", "p"), ("INCRBY", "p", 5)]
        script += [("SET", "p", "abc"), ("INCR", "p"), ("DEL", "p", "q"), ("GET", "p")]
        script += [("SET", "q", "1", "NX"), ("INCR", "q"), ("SET", "q", "9", "XX", "GET")]
        script += [("MGET", "p", "q"), ("PING",)]
        client.send(b"".join(command(*args) for args in script))
        replies = [client.reply() for _ in script]
    expected = [b"+OK\r\n"] + [b":%d\r\n" % i for i in range(2, 52)]
    expected += [b"$2\r\n51\r\n", b":56\r\n", b"+OK\r\n"]
    expected += [b"-ERR value is not an integer or out of range\r\n", b":1\r\n", b"$-1\r\n"]
    expected += [b"+OK\r\n", b":2\r\n", b"$1\r\n2\r\n", b"*2\r\n$-1\r\n$1\r\n9\r\n", b"+PONG\r\n"]
    assert replies == expected


def test_resp3_after_hello_3(kv):
    _, port = kv()
    with RespClient(port) as client:
        hello = client.call("HELLO", "3")
        assert hello.startswith(b"%7\r\n$6\r\nserver\r\n")
        assert b"$5\r\nproto\r\n:3\r\n" in hello
        assert client.call("GET", "missing") == b"_\r\n"
        assert client.call("MGET", "missing") == b"*1\r\n_\r\n"
        assert client.call("CONFIG", "GET", "save") == b"%1\r\n$4\r\nsave\r\n$0\r\n\r\n"
        assert client.call("HELLO", "4") == b"-NOPROTO unsupported protocol version\r\n"
        assert client.call("HELLO", "2").startswith(b"*14\r\n")
        assert client.call("GET", "missing") == b"$-1\r\n"


def test_quit_closes_after_answering(kv):
    _, port = kv()
    with RespClient(port) as client:
        client.send(command("QUIT") + command("PING"))
        assert client.read_to_eof() == b"+OK\r\n"


@pytest.mark.parametrize(
    ("garbage", "error"),
    [
        (b"*1\r\n$-5\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"*3\r\n$3\r\nSET\r\nxx", b"-ERR Protocol error: expected '$', got 'x'\r\n"),
        (b"*99999999999\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
        (b"*1\r\n$3\r\nabcde\r\n", b"-ERR Protocol error: bulk data not terminated by CRLF\r\n"),
        (b"x" * 70000, b"-ERR Protocol error: too big inline request\r\n"),
        (
            b"*1\r\n$" + b"9" * 70000,
            b"-ERR Protocol error: too big bulk count string\r\n",
        ),
        (b"*1\r\n$99999999999\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    ],
    ids=["negative bulk", "no dollar", "huge count", "unterminated", "inline", "count", "bulk"],
)
def test_protocol_errors_answer_and_close_but_the_worker_lives(kv, garbage, error):
    _, port = kv()
    with RespClient(port) as client:
        pid = client.pid()
        client.send(command("SET", "before", "1") + garbage)
        assert client.read_to_eof() == b"+OK\r\n" + error
    with RespClient(port) as client:
        assert client.pid() == pid
        assert client.call("GET", "before") == b"$1\r\n1\r\n"


def test_random_garbage_never_takes_a_worker_down(kv):
    server, port = kv(workers=2)
    pids = server.worker_pids()
    rng = random.Random(1)
    pieces = [b"*", b"$", b"\r\n", b"-1", b"3", b"99999999999", b"GET", b"SET", b"\x00", b"\xff"]
    for _ in range(60):
        with RespClient(port) as client:
            blob = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
            blob += bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
            client.send(blob)
            client.sock.shutdown(1)
            client.read_to_eof()
    assert server.worker_pids() == pids
    assert "Traceback" not in server.log
    with RespClient(port) as client:
        assert client.call("PING") == b"+PONG\r\n"


def test_incr_is_exact_across_workers(kv):
    _, port = kv(workers=2)
    clients = clients_on_distinct_workers(port, 2)
    clients += [RespClient(port) for _ in range(2)]
    per_client = 1000

    def hammer(client: RespClient) -> None:
        for _ in range(per_client // 100):  # pipelined in batches of 100
            client.send(command("INCR", "shared") * 100)
            replies = [client.reply() for _ in range(100)]
            assert all(reply.startswith(b":") for reply in replies), replies[:3]

    threads = [threading.Thread(target=hammer, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    total = per_client * len(clients)
    for client in clients[:2]:  # both workers' replicas
        wait_for(
            lambda c=client: c.call("GET", "shared") == b"$%d\r\n%d\r\n" % (len(str(total)), total)
        )
        client.close()
    for client in clients[2:]:
        client.close()


def test_expired_key_set_again_elsewhere_is_not_deleted_by_the_lazy_expiry(kv):
    _, port = kv(workers=2)
    first, second = clients_on_distinct_workers(port, 2)
    try:
        for round_ in range(20):
            key = f"race{round_}"
            deadline = int(time.time() * 1000) + 5
            assert first.call("SET", key, "old", "PXAT", deadline) == b"+OK\r\n"
            # An atomic answers after every write sequenced before it has reached that worker:
            # once both have answered, the second worker's replica holds the entry.
            first.call("INCR", "barrier")
            second.call("INCR", "barrier")
            wait_for(lambda d=deadline: time.time() * 1000 > d + 1, what="the deadline to pass")
            second.send(command("GET", key))  # a lazy expiry from the second worker...
            first.send(command("SET", key, "new"))  # ...racing a new value from the first
            assert second.reply() in (b"$-1\r\n", b"$3\r\nnew\r\n")
            assert first.reply() == b"+OK\r\n"
            for client in (first, second):
                wait_for(lambda c=client, k=key: c.call("GET", k) == b"$3\r\nnew\r\n")
    finally:
        first.close()
        second.close()


def test_wrong_type_in_the_table_answers_wrongtype(kv, mpnet, write_module):
    path = write_module(
        "other",
        "table = module.shared('kv')\n"
        "class listener:\n"
        "    def onincoming(conn, data):\n"
        "        table[b'weird'] = {'not': 'a string'}\n"
        "        conn.write('done\\n')\n"
        "module.provides('net', listener=listener, default_port=0)\n",
    )
    server = mpnet(config(["kv", str(path)], workers=1, kv_ports=[0]))
    with Client(server.port("other")) as other:
        other.send("go\n")
        other.read_until(b"done\n")
    with RespClient(server.port("kv")) as client:
        wrongtype = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
        assert client.call("GET", "weird") == wrongtype
        assert client.call("INCR", "weird") == wrongtype
        assert client.call("SET", "weird", "x", "GET") == wrongtype
        assert client.call("SET", "weird", "x") == b"+OK\r\n"
        assert client.call("GET", "weird") == b"$1\r\nx\r\n"


# -- real clients ------------------------------------------------------------------------------


def _cli(port: int, *args: str, stdin: str | None = None) -> str:
    assert REDIS_CLI is not None
    result = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_cli
def test_redis_cli(kv):
    _, port = kv(workers=2)
    assert _cli(port, "PING") == "PONG\n"
    assert _cli(port, "SET", "greeting", "hello world") == "OK\n"
    assert _cli(port, "GET", "greeting") == "hello world\n"
    assert _cli(port, "INCRBY", "count", "5") == "5\n"
    assert _cli(port, "MGET", "greeting", "nope", "count") == "hello world\n\n5\n"
    assert _cli(port, "--no-raw", "MGET", "greeting", "nope") == '1) "hello world"\n2) (nil)\n'
    assert _cli(port, "SET", "t", "v", "EX", "30") == "OK\n"
    assert _cli(port, "TTL", "t") == "30\n"
    assert sorted(_cli(port, "KEYS", "*").split()) == ["count", "greeting", "t"]
    assert _cli(port, "DBSIZE") == "3\n"
    assert "ERR unknown command 'BOGUS'" in _cli(port, "BOGUS")
    # Commands on stdin: redis-cli asks for COMMAND DOCS first, then runs them one by one.
    assert _cli(port, stdin="SET piped 1\nINCR piped\nGET piped\n") == "OK\n2\n2\n"
    assert _cli(port, "--pipe", stdin="SET a 1\r\nSET b 2\r\n").count("errors: 0") == 1


@needs_cli
def test_redis_cli_scan(kv):
    _, port = kv(workers=2)
    with RespClient(port) as client:
        keys = [f"user:{i}" for i in range(500)] + [f"other:{i}" for i in range(50)]
        args: list[str] = []
        for key in keys:
            args += [key, "1"]
        assert client.call("MSET", *args) == b"+OK\r\n"
        client.call("SET", "gone", "x", "PX", "1")
        wait_for(lambda: client.call("EXISTS", "gone") == b":0\r\n")

    def all_seen() -> bool:  # redis-cli may land on the other worker: wait for its replica
        return sorted(_cli(port, "--scan").split()) == sorted(keys)

    wait_for(all_seen, what="redis-cli --scan to list every key")
    users = _cli(port, "--scan", "--pattern", "user:*").split()
    assert sorted(users) == sorted(keys[:500])


def test_redis_py_scan_iter_while_keys_change(kv):
    _, port = kv(workers=2)
    r = redis.Redis(host="127.0.0.1", port=port)
    try:
        stable = {f"stable:{i}".encode() for i in range(300)}
        r.mset({key: b"v" for key in stable})
        seen: set[bytes] = set()
        for n, key in enumerate(r.scan_iter(match="*", count=5)):
            seen.add(key)
            if n % 3 == 0:  # churn between pages: new keys and deleted ones
                r.set(f"new:{n}", 1)
                r.delete(f"new:{n - 3}")
        assert stable <= seen
        assert {key for key in r.scan_iter(match="stable:1?", count=1000)} == {
            f"stable:1{i}".encode() for i in range(10)
        }
        assert list(r.scan_iter(_type="list")) == []
        with pytest.raises(redis.ResponseError, match="cannot contain spaces, newlines"):
            r.client_setname("bad\r\nname")
    finally:
        r.close()


@needs_benchmark
@pytest.mark.parametrize("pipeline", [1, 16])
def test_redis_benchmark_incr_is_exact_with_two_workers(kv, pipeline):
    _, port = kv(workers=2)
    requests = 20000
    result = subprocess.run(
        [
            REDIS_BENCHMARK,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-t",
            "incr",
            "-n",
            str(requests),
            "-r",
            "1",
            "-c",
            "50",
            "-P",
            str(pipeline),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "INCR:" in result.stdout
    assert "WARNING" not in result.stderr  # it fetched CONFIG like from a real Redis
    with RespClient(port) as client:
        assert client.call("GET", "counter:000000000000") == b"$5\r\n20000\r\n"


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_expiry(kv, protocol):
    _, port = kv(workers=2)
    r = redis.Redis(host="127.0.0.1", port=port, protocol=protocol)
    try:
        assert r.ping() is True
        assert r.set("session", "data", ex=100) is True
        assert r.ttl("session") == 100
        assert 99_000 < r.pttl("session") <= 100_000
        assert r.get("session") == b"data"
        assert r.expire("session", 200) is True
        assert r.ttl("session") == 200
        assert r.persist("session") is True
        assert r.ttl("session") == -1
        assert r.ttl("nothing") == -2
        assert r.set("flag", "1", nx=True, px=200) is True
        assert r.set("flag", "2", nx=True) is None
        assert r.incr("flag") == 2  # keeps its TTL
        assert 0 < r.pttl("flag") <= 200
        wait_for(lambda: r.get("flag") is None, timeout=5, what="the key to expire")
        assert r.exists("flag") == 0
        assert r.set("flag", "3", xx=True) is None
        assert r.set("old", "v", px=1) is True
        wait_for(lambda: r.get("old") is None, timeout=5)
        assert r.set("old", "fresh") is True  # a lazy expiry never deletes the new value
        assert r.get("old") == b"fresh"
        assert r.mget("session", "nothing") == [b"data", None]
        assert r.pexpire("session", 150) is True
        wait_for(lambda: r.exists("session") == 0, timeout=5)
        assert r.set("x", "1", get=True) is None
        assert r.set("x", "2", get=True) == b"1"
        assert r.delete("x", "nothing") == 1
    finally:
        r.close()


def test_expired_keys_are_swept_without_being_read(kv):
    _, port = kv(workers=2)
    r = redis.Redis(host="127.0.0.1", port=port, protocol=2)
    try:
        r.mset({f"keep{i}": i for i in range(10)})
        for i in range(300):
            r.set(f"short{i}", i, px=50)
        assert r.dbsize() in range(10, 311)  # some may have expired already

        def stored_keys() -> int:  # expired or not: what the table still holds
            return r.info()["db0"]["keys"]

        wait_for(lambda: stored_keys() == 10, timeout=10, what="the sweep to delete them")
        assert r.dbsize() == 10
    finally:
        r.close()


def test_ttl_set_on_one_worker_is_seen_on_another(kv):
    _, port = kv(workers=2)
    first, second = clients_on_distinct_workers(port, 2)
    try:
        assert first.call("SET", "shared", "v", "EX", "100") == b"+OK\r\n"
        wait_for(lambda: second.call("TTL", "shared") == b":100\r\n")
        assert second.call("EXPIRE", "shared", "300") == b":1\r\n"
        wait_for(lambda: first.call("TTL", "shared") == b":300\r\n")
        started = time.monotonic()
        assert second.call("PEXPIRE", "shared", "100") == b":1\r\n"
        wait_for(lambda: first.call("GET", "shared") == b"$-1\r\n", timeout=5)
        assert time.monotonic() - started >= 0.09
    finally:
        first.close()
        second.close()
