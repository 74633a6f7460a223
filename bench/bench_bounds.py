"""Attacks that used to grow a worker without bound or keep a service down, at full size.

Run by hand (not in CI); each attack prints one line of figures::

    python3 bench/bench_bounds.py                    # this tree
    python3 bench/bench_bounds.py --tree /tmp/old    # another tree: ``git archive`` of an
                                                     # older commit, mpnet/workers -> ../workers
    python3 bench/bench_bounds.py --only request,replies

* ``request``: one kv ``*200`` request of 16 MB bulks (3.2 GB announced), default limits;
* ``replies``: ``GET big`` (a 30 MB value) pipelined x40 and x100 by a client that does not read,
  and the longest wait of another client's PING meanwhile;
* ``memory``: a module allocating 40 MB/s against ``max_worker_memory = 300 MB``;
* ``unadmitted``: 500 silent connections to a PROXY service, 256 descriptors per process;
* ``poison``: 20 s of requests that each kill the worker of slot 0 (2 workers), then how long
  until every new client is served.

Memory is the worker's peak RSS (the kernel's ``VmHWM``) minus its RSS before the attack. Every
process started here is stopped by PID (the harness's ``Server.stop``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import Client, Server, config, wait_for
from test_bounds import (
    GREETER,
    HOG,
    POISON,
    LowNofileServer,
    _all_served,
    _poison,
    _send_quietly,
    kv_config,
    only_worker,
    peak_rss,
)
from test_kv import RespClient, command

MiB = 2**20


def request(start) -> str:
    server = start(kv_config())
    port = server.port("kv")
    worker = only_worker(server)
    before = peak_rss(worker.pid)
    bulk = b"$16000000\r\n" + b"x" * 16_000_000 + b"\r\n"
    attacker = RespClient(port, timeout=120)
    sender = threading.Thread(
        target=_send_quietly, args=(attacker.sock, [b"*200\r\n"] + [bulk] * 200), daemon=True
    )
    began = time.monotonic()
    sender.start()
    try:
        reply = attacker.read_to_eof(timeout=120)
    except AssertionError as exc:
        reply = str(exc)[:80].encode()
    finally:
        attacker.close()
        sender.join(120)
    grown = peak_rss(worker.pid) - before
    return (
        f"request: *200 x 16 MB -> worker peak RSS +{grown / MiB:.0f} MiB in "
        f"{time.monotonic() - began:.1f} s; reply {reply[:90]!r}"
    )


def _ping_worst(port: int, stop: threading.Event, worst: list[float]) -> None:
    try:
        with RespClient(port, timeout=60) as client:
            while not stop.is_set():
                began = time.monotonic()
                client.call("PING")
                worst[0] = max(worst[0], time.monotonic() - began)
                time.sleep(0.05)
    except (OSError, AssertionError):
        worst[0] = float("inf")  # the worker died


def replies(start) -> str:
    server = start(kv_config())
    port = server.port("kv")
    worker = only_worker(server)
    with RespClient(port, timeout=60) as setter:
        setter.call("SET", "big", b"v" * 30_000_000)
    lines = []
    for count in (40, 100):
        worker = only_worker(server)
        before = peak_rss(worker.pid)
        stop, worst = threading.Event(), [0.0]
        pinger = threading.Thread(target=_ping_worst, args=(port, stop, worst))
        pinger.start()
        greedy = socket.create_connection(("127.0.0.1", port))
        greedy.sendall(command("GET", "big") * count)
        time.sleep(5)  # the attack runs: memory and PING latency are sampled meanwhile
        stop.set()
        pinger.join(60)
        try:
            grown = peak_rss(worker.pid) - before
        except (FileNotFoundError, AssertionError):
            grown = -1  # the worker died: its peak is lost
        alive = worker.is_running()
        greedy.close()
        died = [line for line in server.log.splitlines() if "replacing it" in line]
        lines.append(
            f"GET big (30 MB) x{count} not read: peak RSS +{grown / MiB:.0f} MiB, "
            f"slowest PING {worst[0] * 1000:.0f} ms, worker alive {alive} {died[-1:]}"
        )
    return "replies: " + "; ".join(lines)


def memory(start, write_module) -> str:
    slower = HOG.replace("asyncio.sleep(0.02)", "asyncio.sleep(0.025)")  # 40 MB/s
    path = write_module("hog", slower)
    server = start(config([str(path)], workers=1, hog_ports=[0], max_worker_memory=300_000_000))
    port = server.port("hog")
    hog = only_worker(server)
    peak, began = 0, time.monotonic()
    with Client(port) as client:
        client.read_until(b"\n")
        client.send(b"grow\n")
        while hog.is_running() and time.monotonic() - began < 60:
            with contextlib.suppress(OSError, AssertionError):
                peak = max(peak, peak_rss(hog.pid))
            time.sleep(0.02)
    return (
        f"memory: 40 MB/s against max_worker_memory 300 MB: peak RSS {peak / MiB:.0f} MiB, "
        f"worker gone after {time.monotonic() - began:.1f} s"
    )


def unadmitted(start, write_module) -> str:
    path = write_module("greeter", GREETER)
    server = start(
        config([str(path)], workers=1, greeter_ports=[0], greeter_proxy_protocol=True),
        cls=LowNofileServer,
    )
    port = server.port("greeter")
    silent = []
    try:
        for _ in range(500):
            with contextlib.suppress(OSError):
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        outcomes = []
        for _ in range(20):
            began = time.monotonic()
            try:
                with Client(port, timeout=5) as client:
                    client.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 80\r\n")
                    client.read_until(b"\n", 5)
                outcomes.append(f"{(time.monotonic() - began) * 1000:.0f}ms")
            except (OSError, AssertionError) as exc:
                outcomes.append(type(exc).__name__)
    finally:
        for sock in silent:
            sock.close()
    served = sum(o.endswith("ms") for o in outcomes)
    return f"unadmitted: 500 silent, nofile 256: {served}/20 proxy clients served ({outcomes[:5]})"


def poison(start, write_module) -> str:
    path = write_module("poison", POISON)
    server = start(config([str(path)], workers=2, poison_ports=[0]))
    port = server.port("poison")
    end = time.monotonic() + 20
    threads = [threading.Thread(target=_poison, args=(port, end)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    crashes = server.log.count("exited with code 7")
    try:
        wait_for(lambda: _all_served(port), timeout=150, what="every new client served")
        recovered = f"{time.monotonic() - end:.1f} s"
    except AssertionError:
        recovered = "> 150 s"
    return f"poison: {crashes} crashes in 20 s; all new clients served {recovered} after the attack"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", help="run the servers from this source tree (PYTHONPATH)")
    parser.add_argument("--only", default="request,replies,memory,unadmitted,poison")
    args = parser.parse_args()
    env = {"PYTHONPATH": str(Path(args.tree).resolve())} if args.tree else None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        servers: list[Server] = []

        def start(text: str, cls: type[Server] = Server) -> Server:
            directory = root / f"server{len(servers)}"
            directory.mkdir()
            server = cls(directory, text, env=env)
            servers.append(server)
            server.start()
            return server

        def write_module(name: str, source: str) -> Path:
            path = root / f"{name}.py"
            path.write_text(source)
            return path

        attacks = {
            "request": lambda: request(start),
            "replies": lambda: replies(start),
            "memory": lambda: memory(start, write_module),
            "unadmitted": lambda: unadmitted(start, write_module),
            "poison": lambda: poison(start, write_module),
        }
        try:
            for name in args.only.split(","):
                print(attacks[name](), flush=True)
                for server in servers:
                    server.stop()
        finally:
            for server in servers:
                server.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
