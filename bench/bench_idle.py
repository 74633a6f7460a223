"""Idle-connection memory: mpnet (one worker running bench/echo_raw.py) against a raw uvloop
``asyncio.Protocol`` server (bench/baseline_echo.py), measured in the same run.

Run by hand (not in CI)::

    python bench/bench_idle.py [--counts 10000,50000] [--rounds 2] [--mpnet-cmd "mpnet"]

For every round, count and server kind (the kinds' order rotates from round to round) it starts a
fresh server on a free port, opens a few warm-up connections, reads the *unique* memory (USS, via
psutil: pages only this process maps, so what one more process really costs) of every process of
the server's tree, then opens N connections, each echoing one 64-byte message so that the server
has read from it, and reads the USS again once it stopped moving. Memory per idle connection is the
difference over N. mpnet's tree is its master and its worker; the master holds no connection, so
its USS hardly moves, but it counts.

N above the ephemeral port range of one source address (28k by default) is spread over several
loopback source addresses (127.0.0.2, 127.0.0.3, ...). The descriptor limit is raised for this
script and the servers it starts (above the hard limit too with CAP_SYS_RESOURCE), so 50,000
connections fit; an N that does not fit is skipped with a message (exit status 3).

The headline is the ratio mpnet / baseline of bytes per connection, the median of the per-round
ratios. Every process started here is stopped by PID in ``finally`` blocks, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shlex
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_echo import Interrupted, Server, _on_sigterm, start_server  # the house helpers

PER_SOURCE = 10000  # connections per loopback source address (well below the ephemeral range)
IP_BIND_ADDRESS_NO_PORT = 24
MESSAGE = b"x" * 63 + b"\n"
EXIT_SKIPPED = 3  # a requested N did not fit under the descriptor limit; the others ran


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


def tree_uss(server: Server) -> int:
    """Unique memory (bytes) of the server's root and all its descendants."""
    total = 0
    root = server.ps
    for proc in [root, *root.children(recursive=True)]:
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


def open_idle(port: int, count: int) -> list[socket.socket]:
    """*count* connections, each having echoed one message; the caller closes them."""
    socks: list[socket.socket] = []
    try:
        for index in range(count):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((f"127.0.0.{2 + index // PER_SOURCE}", 0))
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


def measure(kind: str, count: int, workdir: Path, args: argparse.Namespace) -> float:
    """Bytes of unique server memory per idle connection for one server of *kind*."""
    server = start_server(kind, workdir, args)
    socks: list[socket.socket] = []
    try:
        close_all(open_idle(server.port, 100))  # warm-up: first-use allocations
        before = settled_uss(server)
        started = time.monotonic()
        socks = open_idle(server.port, count)
        opened = time.monotonic() - started
        after = settled_uss(server)
        server.remember_tree()
        per = (after - before) / count
        print(
            f"  {kind:7s} N={count:6d}  USS {before / 2**20:7.1f} -> {after / 2**20:7.1f} MiB"
            f"  {per:7.0f} B/conn  (opened in {opened:.1f} s)",
            flush=True,
        )
        return per
    finally:
        close_all(socks)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10000,50000", help="comma-separated N")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mpnet-cmd", default="mpnet", help="how to run the mpnet CLI")
    parser.add_argument("--baseline", default="uvloop", choices=("uvloop", "asyncio"))
    args = parser.parse_args(argv)
    args.mpnet_cmd = shlex.split(args.mpnet_cmd)
    signal.signal(signal.SIGTERM, _on_sigterm)  # so that the finally blocks stop the servers
    args.server_cpu, args.start_timeout = None, 30.0
    wanted = [int(c) for c in args.counts.split(",")]
    limit = raise_fd_limit(max(wanted) + 4096)
    # The client (this script) and the server each hold one descriptor per connection.
    counts = [c for c in wanted if c + 512 <= limit]
    for count in sorted(set(wanted) - set(counts)):
        print(
            f"skipped N={count}: the descriptor limit is {limit} (the hard limit cannot be raised "
            f"here: root without CAP_SYS_RESOURCE?); try --counts {limit - 1024}",
            file=sys.stderr,
        )
    if not counts:
        return EXIT_SKIPPED
    kinds = ["mpnet", args.baseline]
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        for round_ in range(args.rounds):
            for count in counts:
                order = kinds[round_ % 2 :] + kinds[: round_ % 2]
                print(f"round {round_ + 1} N={count}", flush=True)
                for kind in order:
                    per = measure(kind, count, Path(tmp), args)
                    results.setdefault((kind, count), []).append(per)
    print("\nBytes of unique memory per idle connection (median over rounds):")
    for count in counts:
        mine, base = results[("mpnet", count)], results[(args.baseline, count)]
        ratios = [m / b for m, b in zip(mine, base, strict=True)]
        print(
            f"  N={count:6d}  mpnet {statistics.median(mine):6.0f} B  {args.baseline} "
            f"{statistics.median(base):6.0f} B  ratio {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f} .. {max(ratios):.2f}]  (target <= 1.10)"
        )
    return EXIT_SKIPPED if len(counts) < len(wanted) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Interrupted):
        sys.exit(130)
