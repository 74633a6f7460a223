"""Shared-table benchmark: mpnet's shared tables and kv module against a real redis-server.

Run by hand (not in CI)::

    python bench/bench_shared.py [--rounds 3] [--incrs 20000] [--requests 50000]

In one run, with every server started by this script on 127.0.0.1 and stopped by PID:

1. **local reads**: ``table[key]`` on a shared table against ``dict[key]`` (ns per read, in this
   process: a replica read is a dict read behind one method call);
2. **incr round trips**: a bench module in the worker(s) runs N *awaited* ``incr`` calls in a
   loop (each one goes to the master and back) and reports its rate and latencies; with 1 worker,
   then with 2 workers running their loops at the same time (total rate, pooled percentiles);
   the same with ``await table.sync()`` (the read barrier kv waits for before a read), 1 worker;
3. **redis-server through redis-py**: N sequential ``INCR`` and ``GET`` round trips from this
   process (``redis-server --save '' --appendonly no``, a free port);
4. **redis-benchmark** ``-t set``, ``get``, ``incr`` (``-c 50``) against the kv module (1 and
   2 workers) and against redis-server, with the server process tree's CPU time per test.

Rounds are interleaved (the order of the sides rotates each round) so that every side sees the
same machine; medians over rounds are reported with their range, then the ratios and the targets:
shared-table incr rate >= 1.5 x redis-py's INCR rate; a local read >= 50 x faster than a Redis GET.
Exit status: 0 done, 2 a server did not start, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

BENCH_MODULE = '''
"""bench_shared's module: N awaited incr (or sync) round trips by T tasks, timed in the worker."""
import asyncio, json, os, time

table = module.shared("bench")


class listener:
    def onconnect(conn):
        conn.buffer = b""

    async def onincoming(conn, data):
        conn.buffer += data
        while b"\\n" in conn.buffer:
            line, conn.buffer = conn.buffer.split(b"\\n", 1)
            words = line.split()
            if words[0] == b"pid":
                conn.write(f"{os.getpid()}\\n")
                continue
            count, tasks = int(words[1]), int(words[2])
            key = b"c%d" % os.getpid()
            op = table.sync if words[0] == b"sync" else (lambda: table.incr(key))
            latencies = []
            clock = time.perf_counter_ns

            async def run(times):
                for _ in range(times):
                    t0 = clock()
                    await op()
                    latencies.append(clock() - t0)

            started = clock()
            await asyncio.gather(*(run(count // tasks) for _ in range(tasks)))
            elapsed = (clock() - started) / 1e9
            count = count // tasks * tasks
            answer = {"pid": os.getpid(), "count": count, "elapsed": elapsed, "ns": latencies}
            conn.write(json.dumps(answer) + "\\n")


module.provides("net", name="incrbench", listener=listener, default_port=0)
'''


class BenchError(Exception):
    """A server could not be started or died."""


# -- helpers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total
    except psutil.NoSuchProcess:
        return 0.0


def read_line(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise BenchError("bench module closed the connection")
        data += chunk
    return data


class Line:
    """A line-oriented TCP client for the bench module."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def ask(self, text: str, timeout: float = 300) -> bytes:
        self.sock.sendall(text.encode() + b"\n")
        return read_line(self.sock, time.monotonic() + timeout)

    def close(self) -> None:
        self.sock.close()


# -- servers -----------------------------------------------------------------------------------


class MpnetServer:
    """``mpnet serve`` with the bench module and kv, in a temporary directory."""

    def __init__(self, workers: int, directory: Path) -> None:
        self.workers = workers
        self.directory = directory / f"mpnet{workers}"
        self.directory.mkdir()
        (self.directory / "incrbench.py").write_text(BENCH_MODULE)
        lines = [
            f'modules = ["{self.directory / "incrbench.py"}", "kv"]',
            'interfaces = ["127.0.0.1"]',
            f"workers = {workers}",
            "incrbench_ports = [0]",
            "kv_ports = [0]",
            'control_socket = "control.sock"',
        ]
        if os.geteuid() == 0:
            lines.append("allow_root = true")
        (self.directory / "mpnet.toml").write_text("\n".join(lines) + "\n")
        self.log_path = self.directory / "mpnet.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mpnet", "serve", "-c", str(self.directory / "mpnet.toml")],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.pids.add(self.proc.pid)
        deadline = time.monotonic() + 30
        while True:
            text = self.log_path.read_text(errors="replace")
            if "ready:" in text:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"mpnet ({self.workers} workers) did not start:\n{text[-2000:]}")
            time.sleep(0.05)
        for service in ("incrbench", "kv"):
            marker = f"service {service} (module {service}) -> 127.0.0.1:"
            line = next(line for line in text.splitlines() if marker in line)
            self.ports[service] = int(line.split(marker)[1].split()[0])
        self.pids.update(child.pid for child in psutil.Process(self.proc.pid).children())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            self.pids.update(c.pid for c in psutil.Process(self.proc.pid).children())
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory / "redis"
        self.directory.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server not found (Debian package redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("redis-server did not start") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- measurements ------------------------------------------------------------------------------


def local_reads(keys: int = 1000, number: int = 200_000, repeat: int = 5) -> dict[str, float]:
    """ns per read: a shared table's replica against a plain dict with the same content."""
    from mpnet.workers.shared import SharedState

    content = {f"key{i}": i for i in range(keys)}
    table = SharedState(lambda message: None, {"t": dict(content)}).table("t")
    plain = dict(content)
    names = [f"key{i}" for i in range(0, keys, keys // 10)]
    results = {}
    for label, stmt in (
        ("dict[k]", "for k in names: plain[k]"),
        ("table[k]", "for k in names: table[k]"),
        ("table.get(k)", "for k in names: table.get(k)"),
    ):
        env = {"names": names, "plain": plain, "table": table}
        best = min(timeit.repeat(stmt, globals=env, number=number, repeat=repeat))
        results[label] = best / (number * len(names)) * 1e9
    return results


def incr_round_trips(
    server: MpnetServer, count: int, tasks: int = 1, op: str = "incr"
) -> dict[str, float]:
    """Each worker runs *count* awaited incrs, or syncs with ``op="sync"`` (in *tasks* concurrent
    loops) at the same time as the others; pooled figures."""
    port = server.ports["incrbench"]
    by_pid: dict[int, Line] = {}
    deadline = time.monotonic() + 20
    while len(by_pid) < server.workers:
        client = Line(port)
        pid = int(client.ask("pid"))
        if pid in by_pid:
            client.close()
        else:
            by_pid[pid] = client
        if time.monotonic() > deadline:
            raise BenchError("could not reach every worker")
    results: list[Any] = []

    def run(client: Line) -> None:
        results.append(json.loads(client.ask(f"{op} {count} {tasks}")))

    try:
        for client in by_pid.values():  # warm-up
            client.ask(f"{op} {min(count, 2000)} {tasks}")
        threads = [threading.Thread(target=run, args=(c,)) for c in by_pid.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for client in by_pid.values():
            client.close()
    if len(results) != len(by_pid):
        raise BenchError("a worker did not answer")
    latencies = sorted(ns / 1000 for result in results for ns in result["ns"])
    return {
        "rate": sum(result["count"] / result["elapsed"] for result in results),
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
    }


def redis_py_round_trips(port: int, count: int) -> dict[str, float]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, protocol=2)
    try:
        client.set("bench:get", "x" * 16)
        figures: dict[str, float] = {}
        for label, call in (
            ("incr", lambda: client.incr("bench:c")),
            ("get", lambda: client.get("bench:get")),
        ):
            for _ in range(min(count, 2000)):  # warm-up
                call()
            latencies = []
            clock = time.perf_counter_ns
            started = clock()
            for _ in range(count):
                t0 = clock()
                call()
                latencies.append((clock() - t0) / 1000)
            elapsed = (clock() - started) / 1e9
            latencies.sort()
            figures[f"{label}_rate"] = count / elapsed
            figures[f"{label}_p50"] = percentile(latencies, 0.50)
            figures[f"{label}_p99"] = percentile(latencies, 0.99)
        return figures
    finally:
        client.close()


def redis_py_concurrent(port: int, count: int, tasks: int) -> dict[str, float]:
    """*count* INCRs by *tasks* concurrent asyncio tasks through redis-py's asyncio client (one
    connection per task, on uvloop like mpnet's workers): the same shape as the module's loops."""
    import asyncio

    import redis.asyncio
    import uvloop

    async def measure() -> dict[str, float]:
        client = redis.asyncio.Redis(host="127.0.0.1", port=port, protocol=2, max_connections=tasks)
        latencies: list[float] = []
        clock = time.perf_counter_ns

        async def run(times: int, record: bool) -> None:
            for _ in range(times):
                t0 = clock()
                await client.incr("bench:c")
                if record:
                    latencies.append((clock() - t0) / 1000)

        try:
            await asyncio.gather(*(run(min(count, 2000) // tasks, False) for _ in range(tasks)))
            started = clock()
            await asyncio.gather(*(run(count // tasks, True) for _ in range(tasks)))
            elapsed = (clock() - started) / 1e9
        finally:
            await client.aclose()
        latencies.sort()
        return {
            "incr_rate": len(latencies) / elapsed,
            "incr_p50": percentile(latencies, 0.50),
            "incr_p99": percentile(latencies, 0.99),
        }

    return uvloop.run(measure())


def redis_benchmark(port: int, server_pid: int, test: str, requests: int) -> dict[str, float]:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {}
    cpu_before = tree_cpu(server_pid)
    result = subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", str(port), "-t", test, "-n", str(requests),
         "-c", "50", "--csv"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    cpu = tree_cpu(server_pid) - cpu_before
    rows = list(csv.reader(io.StringIO(result.stdout)))
    data = [row for row in rows if row and row[0].upper() == test.upper()]
    if result.returncode != 0 or not data:
        raise BenchError(f"redis-benchmark -t {test} failed: {result.stdout}{result.stderr}")
    header = next(row for row in rows if row and row[0] == "test")
    values = dict(zip(header, data[0], strict=False))
    rate = float(values["rps"])
    return {
        "rate": rate,
        "p50": float(values.get("p50_latency_ms", "nan")) * 1000,
        "per_cpu": requests / cpu if cpu > 0 else float("nan"),
    }


# -- the run -----------------------------------------------------------------------------------


class Figures:
    """Every measured value, by name, one per round."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, prefix: str, figures: dict[str, float]) -> None:
        for key, value in figures.items():
            self.values.setdefault(f"{prefix}.{key}", []).append(value)

    def median(self, name: str) -> float:
        values = self.values.get(name)
        return statistics.median(values) if values else float("nan")

    def spread(self, name: str) -> str:
        values = self.values.get(name) or [float("nan")]
        return f"[{min(values):.4g} .. {max(values):.4g}]"


def rounds(order: list[str], count: int) -> Iterator[tuple[int, list[str]]]:
    for index in range(count):
        shift = index % len(order)
        yield index + 1, order[shift:] + order[:shift]


def run(args: argparse.Namespace) -> int:
    figures = Figures()
    print("local reads (ns per read, best of 5):")
    reads = local_reads()
    for label, ns in reads.items():
        print(f"  {label:<14} {ns:7.1f} ns")
    figures.add("read", reads)

    with tempfile.TemporaryDirectory(prefix="bench_shared.") as tmp:
        directory = Path(tmp)
        servers: list[Any] = []
        try:
            mpnet1, mpnet2, redis_server = (
                MpnetServer(1, directory),
                MpnetServer(2, directory),
                RedisServer(directory),
            )
            for server in (mpnet1, mpnet2, redis_server):
                servers.append(server)
                server.start()
            print(f"servers: mpnet 1 worker (kv :{mpnet1.ports['kv']}), mpnet 2 workers "
                  f"(kv :{mpnet2.ports['kv']}), redis-server :{redis_server.port}")  # fmt: skip
            count, redis_port = args.incrs, redis_server.port
            sides: dict[str, Callable[[], None]] = {
                "mpnet1": lambda: figures.add("incr1", incr_round_trips(mpnet1, count)),
                "mpnet2": lambda: figures.add("incr2", incr_round_trips(mpnet2, count)),
                "redis": lambda: figures.add("redispy", redis_py_round_trips(redis_port, count)),
                "sync1": lambda: figures.add("sync1", incr_round_trips(mpnet1, count, 1, "sync")),
            }
            tasks = args.tasks
            if tasks > 1:
                sides["mpnet1-c"] = lambda: figures.add(
                    "incr1c", incr_round_trips(mpnet1, count, tasks)
                )
                sides["mpnet2-c"] = lambda: figures.add(
                    "incr2c", incr_round_trips(mpnet2, count, tasks)
                )
                sides["sync1-c"] = lambda: figures.add(
                    "sync1c", incr_round_trips(mpnet1, count, tasks, "sync")
                )
                sides["redis-c"] = lambda: figures.add(
                    "redispyc", redis_py_concurrent(redis_port, count, tasks)
                )
            if not args.no_benchmark:
                for test in ("set", "get", "incr"):
                    for name, port, pid in (
                        ("kv1", mpnet1.ports["kv"], mpnet1.pid),
                        ("kv2", mpnet2.ports["kv"], mpnet2.pid),
                        ("redis", redis_server.port, redis_server.pid),
                    ):
                        sides[f"bm-{name}-{test}"] = lambda n=name, p=port, s=pid, t=test: (
                            figures.add(f"bm.{n}.{t}", redis_benchmark(p, s, t, args.requests))
                        )
            for number, order in rounds(list(sides), args.rounds):
                print(f"round {number}/{args.rounds} ...", flush=True)
                for side in order:
                    sides[side]()
        finally:
            for server in servers:
                server.stop()
    report(figures, args)
    return 0


def report(figures: Figures, args: argparse.Namespace) -> None:
    m, sp = figures.median, figures.spread
    print(f"\nincr round trips ({args.incrs} per worker; median of {args.rounds} rounds [range]):")
    rows = (
        ("shared incr, 1 worker", "incr1.rate", "incr1.p50", "incr1.p99"),
        ("shared incr, 2 workers (sum)", "incr2.rate", "incr2.p50", "incr2.p99"),
        ("redis-server INCR (redis-py)", *(f"redispy.incr_{x}" for x in ("rate", "p50", "p99"))),
        ("redis-server GET (redis-py)", *(f"redispy.get_{x}" for x in ("rate", "p50", "p99"))),
        ("shared sync (read barrier), 1 worker", "sync1.rate", "sync1.p50", "sync1.p99"),
    )
    if args.tasks > 1:
        rows += (
            (f"shared incr, 1 worker, {args.tasks} tasks", "incr1c.rate", "incr1c.p50",
             "incr1c.p99"),
            (f"shared incr, 2 workers, {args.tasks} tasks each", "incr2c.rate", "incr2c.p50",
             "incr2c.p99"),
            (f"shared sync, 1 worker, {args.tasks} tasks", "sync1c.rate", "sync1c.p50",
             "sync1c.p99"),
            (f"INCR (redis.asyncio), {args.tasks} tasks",
             *(f"redispyc.incr_{x}" for x in ("rate", "p50", "p99"))),
        )  # fmt: skip
    for label, rate, p50, p99 in rows:
        print(f"  {label:<36} {m(rate):9.0f} ops/s {sp(rate):<22} p50 {m(p50):7.1f} us"
              f"   p99 {m(p99):8.1f} us")  # fmt: skip
    if not args.no_benchmark:
        print(f"\nredis-benchmark -c 50 -n {args.requests} (requests/s; per server CPU-second):")
        for test in ("set", "get", "incr"):
            for name, label in (
                ("kv1", "kv, 1 worker"),
                ("kv2", "kv, 2 workers"),
                ("redis", "redis-server"),
            ):
                key = f"bm.{name}.{test}"
                rate, p50, per_cpu = m(f"{key}.rate"), m(f"{key}.p50"), m(f"{key}.per_cpu")
                print(
                    f"  {test.upper():<5} {label:<14} {rate:9.0f} rps {sp(key + '.rate'):<22}"
                    f" p50 {p50:7.0f} us   {per_cpu:9.0f} per CPU-s"
                )
    print("\nratios (medians):")
    incr_ratio = m("incr1.rate") / m("redispy.incr_rate")
    incr2_ratio = m("incr2.rate") / m("redispy.incr_rate")
    read_ratio = m("redispy.get_p50") * 1000 / m("read.table[k]")
    print(
        f"  shared incr rate / redis-py INCR rate, 1 worker   {incr_ratio:6.2f}x"
        f"   target >= 1.5x: {'met' if incr_ratio >= 1.5 else 'MISSED'}"
    )
    print(f"  shared incr rate / redis-py INCR rate, 2 workers  {incr2_ratio:6.2f}x")
    if args.tasks > 1:
        ratio_c = m("incr1c.rate") / m("redispyc.incr_rate")
        print(
            f"  same, {args.tasks} concurrent tasks, 1 worker         {ratio_c:6.2f}x"
            f"   target >= 1.5x: {'met' if ratio_c >= 1.5 else 'MISSED'}"
        )
        ratio_c2 = m("incr2c.rate") / m("redispyc.incr_rate")
        print(f"  same, {args.tasks} concurrent tasks, 2 workers        {ratio_c2:6.2f}x")
    print(
        f"  Redis GET p50 / local table read                  {read_ratio:6.0f}x"
        f"   target >= 50x: {'met' if read_ratio >= 50 else 'MISSED'}"
    )
    print(f"  local table read / dict read                      "
          f"{m('read.table[k]') / m('read.dict[k]'):6.2f}x slower")  # fmt: skip
    if not args.no_benchmark:
        for test in ("set", "get", "incr"):
            for name in ("kv1", "kv2"):
                key, base = f"bm.{name}.{test}", f"bm.redis.{test}"
                print(f"  redis-benchmark {test.upper():<5} {name} / redis-server: "
                      f"rate {m(key + '.rate') / m(base + '.rate'):5.2f}x, "
                      f"per CPU-s {m(key + '.per_cpu') / m(base + '.per_cpu'):5.2f}x")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--incrs", type=int, default=20000, help="round trips per worker/side")
    parser.add_argument("--requests", type=int, default=50000, help="redis-benchmark -n")
    parser.add_argument("--no-benchmark", action="store_true", help="skip redis-benchmark")
    parser.add_argument(
        "--tasks", type=int, default=32, help="concurrent loops in the throughput test (1: skip)"
    )
    args = parser.parse_args()
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench_shared: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
