"""Idle-connection memory: mpnet (running bench/echo_raw.py) against a raw uvloop
``asyncio.Protocol`` server (bench/baseline_echo.py), measured in the same run.

Run by hand (not in CI)::

    python bench/bench_idle.py [--counts 10000,18000] [--rounds 2] [--mpnet-cmd "mpnet"]
    python bench/bench_idle.py --counts 50000 --servers 4   # 4 workers vs 4 uvloop processes
    python bench/bench_idle.py --reference /tmp/old          # also mpnet from another checkout

For every round, count and server kind (the kinds' order rotates from round to round) it starts a
fresh server on a free port, opens a few warm-up connections (100 per server process), reads the
*unique* memory (USS, via psutil: pages only this process maps, so what one more process really
costs) of every process of the server's tree, then opens N connections, each echoing one 64-byte
message so that the server has read from it, and reads the USS again once it stopped moving.
Memory per idle connection is the difference of the two sums over N: each process's own
baseline (what it held before the N connections) is subtracted, whatever it is. mpnet's tree is
its master and its workers; the master holds no connection, so its USS hardly moves, but it
counts (a page a worker copies from it on write becomes unique to both).

One process cannot hold 50,000 connections where the descriptor limit is 20,000 and cannot be
raised (root without CAP_SYS_RESOURCE). ``--servers K`` then measures K server processes: mpnet
with K workers, against K raw uvloop processes forked by one idle parent, each with its own
``SO_REUSEPORT`` socket on the one port (as mpnet's workers have); the kernel spreads the
connections over them. The N client connections are opened by client processes of this script,
at most 15,000 each (``--per-client``), each from its own loopback source addresses (127.0.0.2,
127.0.0.3, ...: 10,000 per address, well inside the ephemeral port range). An N that does not fit
under the descriptor limit (N / K per server process, with a margin for an uneven spread) is
skipped with a message (exit status 3).

The headline is the ratio mpnet / baseline of bytes per connection, the median of the per-round
ratios. Every process started here is stopped by PID in ``finally`` blocks, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_echo import (
    REFERENCE_KIND,
    Interrupted,
    Server,
    _on_sigterm,
    load_average,
    start_server,
)

PER_SOURCE = 10000  # connections per loopback source address (well below the ephemeral range)
IP_BIND_ADDRESS_NO_PORT = 24
MESSAGE = b"x" * 63 + b"\n"
EXIT_SKIPPED = 3  # a requested N did not fit under the descriptor limit; the others ran
WARMUP_PER_PROCESS = 100
SPREAD_MARGIN = 1.15  # SO_REUSEPORT hashing is not exactly even: room for 15 % more


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard as root) to *needed*; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, needed)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
        return target
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def tree_processes(server: Server) -> list[psutil.Process]:
    root = server.ps
    return [root, *root.children(recursive=True)]


def tree_uss(server: Server) -> int:
    """Unique memory (bytes) of the server's root and all its descendants."""
    total = 0
    for proc in tree_processes(server):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_full_info().uss
    return total


def settled_uss(server: Server, timeout: float = 10.0) -> int:
    """The tree's USS once two readings 0.3 s apart agree within 64 KiB (or after *timeout*)."""
    deadline = time.monotonic() + timeout
    last = tree_uss(server)
    while time.monotonic() < deadline:
        time.sleep(0.3)  # sampling interval of a settling measurement, not synchronisation
        now = tree_uss(server)
        if abs(now - last) < 65536:
            return now
        last = now
    return last


def open_idle(port: int, count: int, first_source: int = 0) -> list[socket.socket]:
    """*count* connections, each having echoed one message; the caller closes them. They come
    from 127.0.0.(2 + first_source), the next address every PER_SOURCE connections."""
    socks: list[socket.socket] = []
    try:
        for index in range(count):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((f"127.0.0.{2 + first_source + index // PER_SOURCE}", 0))
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            sock.sendall(MESSAGE)
            got = b""
            while len(got) < len(MESSAGE):
                chunk = sock.recv(len(MESSAGE) - len(got))
                if not chunk:
                    raise ConnectionError(f"connection {index} closed before its echo")
                got += chunk
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    """Close with a reset (SO_LINGER 0): no TIME_WAIT left holding the next run's ports."""
    linger = struct.pack("ii", 1, 0)
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.close()
    socks.clear()


def client_main(port: int, count: int, first_source: int) -> int:
    """A client process (``--client``): open *count* idle connections, say "ready", hold them
    until stdin closes (or a line comes), then close them and exit."""
    raise_fd_limit(count + 512)
    socks = open_idle(port, count, first_source)
    try:
        print("ready", flush=True)
        sys.stdin.readline()
    finally:
        close_all(socks)
    return 0


class Clients:
    """Client processes holding N idle connections between them (stopped by PID)."""

    def __init__(self, port: int, count: int, per_client: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        sources_each = math.ceil(per_client / PER_SOURCE)
        try:
            for index, start in enumerate(range(0, count, per_client)):
                share, first_source = min(per_client, count - start), index * sources_each
                self.procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            __file__,
                            "--client",
                            f"{port}",
                            f"{share}",
                            f"{first_source}",
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        start_new_session=True,
                    )
                )
            for proc in self.procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":  # blocks until opened, or exit
                    raise RuntimeError(f"client pid {proc.pid} failed (status {proc.wait(10)})")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def measure(kind: str, count: int, workdir: Path, args: argparse.Namespace) -> float:
    """Bytes of unique server memory per idle connection for one server of *kind*."""
    server = start_server(kind, workdir, args)
    clients: Clients | None = None
    try:
        # Warm-up (first-use allocations), enough to reach every server process.
        close_all(open_idle(server.port, WARMUP_PER_PROCESS * args.workers))
        before = settled_uss(server)
        fds_before = {p.pid: p.num_fds() for p in tree_processes(server)}
        started = time.monotonic()
        clients = Clients(server.port, count, args.per_client)
        opened = time.monotonic() - started
        after = settled_uss(server)
        spread = [p.num_fds() - fds_before.get(p.pid, 0) for p in tree_processes(server)]
        server.remember_tree()
        per = (after - before) / count
        held = "" if args.workers == 1 else f"  held per process {sorted(spread)[1:]}"
        print(
            f"  {kind:9s} N={count:6d}  USS {before / 2**20:7.1f} -> {after / 2**20:7.1f} MiB"
            f"  {per:7.0f} B/conn  (opened in {opened:.1f} s){held}",
            flush=True,
        )
        return per
    finally:
        if clients is not None:
            clients.close()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10000,18000", help="comma-separated N")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mpnet-cmd", default="mpnet", help="how to run the mpnet CLI")
    parser.add_argument("--baseline", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument(
        "--servers",
        type=int,
        default=1,
        help="server processes: mpnet workers, and as many baseline processes (default 1)",
    )
    parser.add_argument("--per-client", type=int, default=15000, help="connections per client")
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="also measure mpnet from this other checkout (see bench_echo.py --reference)",
    )
    parser.add_argument("--client", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return client_main(*args.client)
    args.mpnet_cmd = shlex.split(args.mpnet_cmd)
    args.workers = args.servers
    signal.signal(signal.SIGTERM, _on_sigterm)  # so that the finally blocks stop the servers
    args.server_cpu, args.start_timeout = None, 30.0
    wanted = [int(c) for c in args.counts.split(",")]
    # The servers inherit this limit; each of their processes holds about N / servers.
    limit = raise_fd_limit(max(wanted) + 4096)
    args.per_client = min(args.per_client, limit - 1024)
    margin = SPREAD_MARGIN if args.servers > 1 else 1.0  # one process: no spread
    counts = [c for c in wanted if c / args.servers * margin + 512 <= limit]
    for count in sorted(set(wanted) - set(counts)):
        print(
            f"skipped N={count}: the descriptor limit is {limit} (the hard limit cannot be raised "
            f"here: root without CAP_SYS_RESOURCE?); try --servers "
            f"{math.ceil(count * SPREAD_MARGIN / (limit - 512))}",
            file=sys.stderr,
        )
    if not counts:
        return EXIT_SKIPPED
    kinds = ["mpnet", args.baseline] + ([REFERENCE_KIND] if args.reference else [])
    print(
        f"bench_idle: {args.servers} server process(es) per kind, counts {counts}, "
        f"load average {load_average()}",
        flush=True,
    )
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        for round_ in range(args.rounds):
            for count in counts:
                shift = round_ % len(kinds)
                order = kinds[shift:] + kinds[:shift]
                print(f"round {round_ + 1} N={count}", flush=True)
                for kind in order:
                    per = measure(kind, count, Path(tmp), args)
                    results.setdefault((kind, count), []).append(per)
    print("\nBytes of unique memory per idle connection (median over rounds):")
    for count in counts:
        base = results[(args.baseline, count)]
        for kind in (k for k in kinds if k != args.baseline):
            mine = results[(kind, count)]
            ratios = [m / b for m, b in zip(mine, base, strict=True)]
            print(
                f"  N={count:6d}  {kind} {statistics.median(mine):6.0f} B  {args.baseline} "
                f"{statistics.median(base):6.0f} B  ratio {statistics.median(ratios):.3f} "
                f"[{min(ratios):.3f} .. {max(ratios):.3f}]"
                + ("  (target <= 1.10)" if kind == "mpnet" else "")
            )
    return EXIT_SKIPPED if len(counts) < len(wanted) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Interrupted):
        sys.exit(130)
