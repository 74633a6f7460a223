"""Redis shared backend benchmark: mpnet's shared ``incr`` and reads on Redis against redis-py.

Run by hand (not in CI)::

    PYTHONPATH=$PWD python bench/bench_redis.py [--rounds 3] [--seconds 3] [--tasks 50]

One ``redis-server --save '' --appendonly no`` on a free port (in a temp dir, stopped by PID), and
in each round, the sides interleaved (their order rotating):

1. **shared incr, 2 instances**: two processes (two "hosts") each run the worker's Redis backend
   (:class:`mpnet.workers.redis_shared.RedisSharedState` on uvloop, as a worker does) with
   ``--tasks`` concurrent tasks doing ``await table.incr("n")`` for ``--seconds``; total rate.
   Each process also receives and applies every change of the other (the replica fan-out);
2. **redis-py INCR, 2 processes**: the same, with ``redis.asyncio.Redis`` (hiredis, its
   connection pool) doing ``await r.incr("n")``;
3. with ``--scaling``: shared incr with 1, 2 and 3 processes ("hosts"), total rate and time per
   client CPU time per operation (one 2-core machine cannot show a speed-up; the figure to read
   is that the cost per operation stays flat as hosts are added, although each host applies
   every other host's changes to its replica); and **echo** with 1, 2 and 3 mpnet instances
   (``mpnet serve``, Redis backend, 1 worker each, ``bench/echo_raw.py`` on its own port of
   127.0.0.1), ``--echo-connections`` ping-pong connections of ``bench/loadgen`` (build it with
   ``bench/build.sh``) spread evenly over the instances, one loadgen per instance at the same
   time: total messages/s and server CPU µs per message (every mpnet process tree, and
   redis-server, which echo does not touch);
4. **cas**: 4 tasks adding 1 to one counter by compare-and-swap, retrying on conflict: the
   shared table's ``cas`` (one Lua script) against redis-py ``WATCH``/``GET``/``MULTI``/``EXEC``;
5. **local read vs Redis GET**: ``table["k"]`` on the replica against ``await r.get("k")``
   (sequential round trips), ns per operation, in one process.

Prints medians (and range) per side and the ratios against the targets: shared incr >= 1.0x
redis-py INCR; local read >= 50x faster than a Redis GET.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_echo  # the house helpers (free_port, launch_mpnet, run_loadgens, sample_tree)

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server not found (apt-get install redis-server)")
    port = bench_echo.free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    proc = subprocess.Popen(
        [*argv, "no", "--dir", directory], stdout=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not start")


def run_loop(coro_factory, *args):
    if uvloop is not None:
        return uvloop.run(coro_factory(*args))
    return asyncio.run(coro_factory(*args))


async def shared_incr(url: str, tasks: int, seconds: float, start_at: float) -> int:
    from mpnet.workers.redis_shared import RedisSharedState

    state = RedisSharedState(url, "bench:", 5.0)
    await state.start()
    table = state.table("counters")
    count = 0

    async def one() -> None:
        nonlocal count
        while time.time() < start_at + seconds:
            await table.incr("n")
            count += 1

    await asyncio.sleep(max(0, start_at - time.time()))
    await asyncio.gather(*(one() for _ in range(tasks)))
    await state.close()
    return count


async def redispy_incr(url: str, tasks: int, seconds: float, start_at: float) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, max_connections=tasks)
    await client.ping()
    count = 0

    async def one() -> None:
        nonlocal count
        while time.time() < start_at + seconds:
            await client.incr("bench:plain")
            count += 1

    await asyncio.sleep(max(0, start_at - time.time()))
    await asyncio.gather(*(one() for _ in range(tasks)))
    await client.aclose()
    return count


def _child(side: str, url: str, tasks: int, seconds: float, start_at: float, out) -> None:
    factory = shared_incr if side == "shared" else redispy_incr
    count = run_loop(factory, url, tasks, seconds, start_at)
    out.send((count, time.process_time()))  # the process's CPU seconds, connecting included


CPU_PER_OP: dict[tuple[str, int], list[float]] = {}  # (side, processes) -> client CPU µs per op


def processes(side: str, url: str, tasks: int, seconds: float, count: int = 2) -> float:
    """Total operations per second of *count* processes running *side* at the same time."""
    context = multiprocessing.get_context("fork")
    start_at = time.time() + 1.5  # all connected and loaded before the clock starts
    pipes, procs = [], []
    for _ in range(count):
        reader, writer = context.Pipe(duplex=False)
        proc = context.Process(target=_child, args=(side, url, tasks, seconds, start_at, writer))
        proc.start()
        pipes.append(reader)
        procs.append(proc)
    total, cpu = 0, 0.0
    for reader, proc in zip(pipes, procs, strict=True):
        if not reader.poll(seconds + 60):
            proc.kill()
            sys.exit(f"{side}: a benchmark process did not answer")
        done, used = reader.recv()
        total += done
        cpu += used
        proc.join(30)
    CPU_PER_OP.setdefault((side, count), []).append(cpu * 1e6 / max(1, total))
    return total / seconds


async def reads(url: str, count: int) -> tuple[float, float]:
    """(ns per local replica read, ns per redis-py GET round trip)."""
    import redis.asyncio as aioredis

    from mpnet.workers.redis_shared import RedisSharedState

    state = RedisSharedState(url, "bench:", 5.0)
    await state.start()
    table = state.table("reads")
    await table.set("k", b"value")
    started = time.perf_counter_ns()
    for _ in range(count):
        table["k"]
    local = (time.perf_counter_ns() - started) / count
    client = aioredis.Redis.from_url(url)
    await client.set("bench:k", b"value")
    gets = max(1, count // 100)
    started = time.perf_counter_ns()
    for _ in range(gets):
        await client.get("bench:k")
    remote = (time.perf_counter_ns() - started) / gets
    await client.aclose()
    await state.close()
    return local, remote


async def cas_rates(url: str, seconds: float, tasks: int) -> tuple[float, float]:
    """(shared ``cas`` increments/s, redis-py WATCH/MULTI/EXEC increments/s): *tasks* tasks in
    one process each add 1 to one counter by compare-and-swap, retrying on conflict."""
    import redis.asyncio as aioredis
    from redis.exceptions import WatchError

    from mpnet.workers.redis_shared import RedisSharedState

    state = RedisSharedState(url, "bench:", 5.0)
    await state.start()
    table = state.table("cas")
    await table.set("c", 0)
    done = 0

    async def shared_one(deadline: float) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            current = table.get("c", 0)
            if await table.cas("c", current, current + 1):
                done += 1

    deadline = time.monotonic() + seconds
    await asyncio.gather(*(shared_one(deadline) for _ in range(tasks)))
    shared = done / seconds
    await state.close()
    client = aioredis.Redis.from_url(url, max_connections=tasks)
    await client.set("bench:cas", 0)
    done = 0

    async def watch_one(deadline: float) -> None:
        nonlocal done
        async with client.pipeline() as pipe:
            while time.monotonic() < deadline:
                try:
                    await pipe.watch("bench:cas")
                    current = int(await pipe.get("bench:cas"))
                    pipe.multi()
                    pipe.set("bench:cas", current + 1)
                    await pipe.execute()
                    done += 1
                except WatchError:
                    continue

    deadline = time.monotonic() + seconds
    await asyncio.gather(*(watch_one(deadline) for _ in range(tasks)))
    await client.aclose()
    return shared, done / seconds


BENCH_DIR = Path(__file__).resolve().parent
ECHO_RAW = BENCH_DIR / "echo_raw.py"


def start_echo_host(directory: str, url: str, index: int) -> bench_echo.Server:
    """One ``mpnet serve`` with the Redis backend and 1 worker serving bench/echo_raw.py: a
    "host" of the echo scaling figure (its own port on 127.0.0.1), stopped by PID."""
    port = bench_echo.free_port()
    text = (
        f"workers = 1\nmodules = [{json.dumps(str(ECHO_RAW))}]\n"
        f'interfaces = ["127.0.0.1"]\necho_raw_ports = [{port}]\n'
        f'shared_backend = "redis"\nredis_url = "{url}"\nredis_prefix = "bench:"\n'
        f'control_socket = "echo{index}.sock"\n'
    )
    if os.geteuid() == 0:
        text += "allow_root = true\n"
    workdir = Path(directory) / f"echo{index}"
    workdir.mkdir()
    server = bench_echo.launch_mpnet(workdir, port, text, [sys.executable, "-m", "mpnet"])
    server.remember_tree()
    return server


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants (reaped children included)."""
    return bench_echo.sample_tree(psutil.Process(pid)).total


ECHO: dict[int, list[tuple[float, float, float]]] = {}  # hosts -> (msgs/s, mpnet µs, redis µs)


def echo_round(
    hosts: list[bench_echo.Server], redis_pid: int, loadgen: Path, connections: int, seconds: float
) -> None:
    """Echo on every instance of *hosts* at once, the connections split evenly."""
    share = max(1, connections // len(hosts))
    before = [tree_cpu(host.proc.pid) for host in hosts], tree_cpu(redis_pid)
    load = ["echo", "-c", str(share), "-s", "64", "-d", str(seconds)]
    cmds = [[str(loadgen), *load, "-p", str(host.port)] for host in hosts]
    results = [result for result, _ in bench_echo.run_loadgens(cmds, seconds + 60, None)]
    mpnet_cpu = sum(tree_cpu(host.proc.pid) for host in hosts) - sum(before[0])
    redis_cpu = tree_cpu(redis_pid) - before[1]
    messages = sum(int(r["messages"]) for r in results)
    errors = sum(sum(int(v) for v in r.get("errors", {}).values()) for r in results)
    if errors:
        sys.exit(f"echo with {len(hosts)} instance(s): loadgen counted {errors} error(s)")
    ECHO.setdefault(len(hosts), []).append(
        (messages / seconds, mpnet_cpu * 1e6 / max(1, messages), redis_cpu * 1e6 / max(1, messages))
    )


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} (range {min(values):,.0f}-{max(values):,.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tasks", type=int, default=50, help="concurrent tasks per process")
    parser.add_argument("--reads", type=int, default=200_000)
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also shared incr with 1, 2 and 3 processes, and echo on 1, 2 and 3 mpnet instances",
    )
    parser.add_argument("--echo-connections", type=int, default=48, help="spread over instances")
    parser.add_argument("--loadgen", type=Path, default=BENCH_DIR / "loadgen")
    args = parser.parse_args()
    if args.scaling and not args.loadgen.exists():
        parser.error(f"{args.loadgen} not found: run bench/build.sh first")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    with tempfile.TemporaryDirectory() as directory:
        proc, url = start_redis(directory)
        echo_hosts: list[bench_echo.Server] = []
        try:
            if args.scaling:
                for index in range(3):
                    echo_hosts.append(start_echo_host(directory, url, index))
            rates: dict[str, list[float]] = {"shared": [], "redis-py": []}
            local_ns, get_ns = [], []
            scaling: dict[int, list[float]] = {}
            cas: dict[str, list[float]] = {"shared": [], "WATCH": []}
            for round_ in range(args.rounds):
                sides = ["shared", "redis-py"]
                if round_ % 2:
                    sides.reverse()
                for side in sides:
                    rates[side].append(processes(side, url, args.tasks, args.seconds))
                shared_cas, watch_cas = run_loop(cas_rates, url, args.seconds, 4)
                cas["shared"].append(shared_cas)
                cas["WATCH"].append(watch_cas)
                local, remote = run_loop(reads, url, args.reads)
                local_ns.append(local)
                get_ns.append(remote)
                if args.scaling:
                    for hosts in (1, 2, 3):
                        rate = processes("shared", url, args.tasks, args.seconds, hosts)
                        scaling.setdefault(hosts, []).append(rate)
                    order = [1, 2, 3] if round_ % 2 == 0 else [3, 2, 1]
                    for hosts in order:
                        echo_round(
                            echo_hosts[:hosts],
                            proc.pid,
                            args.loadgen,
                            args.echo_connections,
                            args.seconds,
                        )
                print(
                    f"round {round_ + 1}: shared incr {rates['shared'][-1]:,.0f}/s, "
                    f"redis-py INCR {rates['redis-py'][-1]:,.0f}/s, local read {local:,.0f} ns, "
                    f"GET {remote:,.0f} ns",
                    flush=True,
                )
        finally:
            for host in echo_hosts:
                host.stop()
            proc.terminate()
            proc.wait(10)
    incr_ratio = statistics.median(rates["shared"]) / statistics.median(rates["redis-py"])
    read_ratio = statistics.median(get_ns) / statistics.median(local_ns)
    print(f"shared incr, 2 processes x {args.tasks} tasks: {summary(rates['shared'])} ops/s")
    print(f"redis-py INCR, 2 processes x {args.tasks} tasks: {summary(rates['redis-py'])} ops/s")
    print(f"local read: {summary(local_ns)} ns; redis-py GET: {summary(get_ns)} ns")
    for hosts, values in scaling.items():
        rate = statistics.median(values)
        cost = statistics.median(CPU_PER_OP["shared", hosts])
        print(f"shared incr, {hosts} process(es): {rate:,.0f} ops/s, {cost:,.1f} client CPU µs/op")
    for hosts, samples in sorted(ECHO.items()):
        rate = statistics.median(s[0] for s in samples)
        cost = statistics.median(s[1] for s in samples)
        redis_cost = statistics.median(s[2] for s in samples)
        print(
            f"echo, {hosts} mpnet instance(s), {args.echo_connections} connections: "
            f"{rate:,.0f} msgs/s, {cost:,.1f} server CPU µs/msg (redis-server {redis_cost:.2f})"
        )
    for side in ("shared", "redis-py"):
        cost = statistics.median(CPU_PER_OP[side, 2])
        print(f"{side}, 2 processes: {cost:,.1f} client CPU µs per operation")
    print(
        f"cas increments, 4 tasks on one counter: shared (Lua) {summary(cas['shared'])}/s, "
        f"redis-py WATCH/MULTI/EXEC {summary(cas['WATCH'])}/s"
    )
    print(f"shared incr / redis-py INCR = {incr_ratio:.2f}x (target >= 1.0x)")
    print(f"Redis GET / local read = {read_ratio:,.0f}x (target >= 50x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
