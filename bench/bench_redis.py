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
   every other host's changes to its replica);
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
import multiprocessing
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server not found (apt-get install redis-server)")
    port = free_port()
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


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} (range {min(values):,.0f}-{max(values):,.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tasks", type=int, default=50, help="concurrent tasks per process")
    parser.add_argument("--reads", type=int, default=200_000)
    parser.add_argument(
        "--scaling", action="store_true", help="also shared incr with 1, 2 and 3 processes"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    with tempfile.TemporaryDirectory() as directory:
        proc, url = start_redis(directory)
        try:
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
                print(
                    f"round {round_ + 1}: shared incr {rates['shared'][-1]:,.0f}/s, "
                    f"redis-py INCR {rates['redis-py'][-1]:,.0f}/s, local read {local:,.0f} ns, "
                    f"GET {remote:,.0f} ns",
                    flush=True,
                )
        finally:
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
