"""Time to greeting while one worker is stuck: mpnet with steering (``stall_timeout = 1``, the
default) against the same mpnet without it (``stall_timeout = 0``: every worker keeps its share of
new connections, as before steering), measured in the same run, interleaved round by round.

Run by hand (not in CI)::

    python bench/bench_stall.py [--rounds 3] [--stall 8] [--from 2] [--rate 40] [--mpnet-cmd CMD]

Each round and mode starts a fresh mpnet with 2 workers and a module that greets with its
worker's pid and, sent ``stall S``, blocks its event loop in ``time.sleep(S)`` (a callback stuck in
blocking code). The script makes one worker stall for ``--stall`` seconds, then from ``--from``
seconds into the stall until 1 s before it ends opens ``--rate`` connections per second and records
each one's time from ``connect()`` to its greeting line. Also recorded: a burst of 60 connections
opened at once the moment the stall begins (before any steering can act), all of which must be
greeted, none reset. Printed per mode: p50, p99 and max of time to greeting, how many waited over
1 s, and errors; then the ratio off / on of p99 and max.

Every process started here is stopped by PID in ``finally`` blocks, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_echo  # the house helpers (launch_mpnet, greeting, free_port, Server)

STALL_MODULE = """\
# ruff: noqa: F821
import os, time
class listener:
    def onconnect(conn):
        conn.write(f"{os.getpid()}\\n")
    def onincoming(conn, data):
        if data.startswith(b"stall"):
            conn.write("stalling\\n")
            time.sleep(float(data.split()[1]))
module.provides("net", name="stall", listener=listener, default_port=0)
"""


class Greeting(threading.Thread):
    """One client: connect, wait for the greeting line, record the delay (or the error)."""

    def __init__(self, port: int, timeout: float) -> None:
        super().__init__(daemon=True)
        self.port, self.timeout = port, timeout
        self.delay: float | None = None
        self.error: str | None = None
        self.start()

    def run(self) -> None:
        opened = time.monotonic()
        try:
            sock, _ = bench_echo.greeting(self.port, self.timeout)
            sock.close()
            self.delay = time.monotonic() - opened
        except OSError as exc:
            self.error = type(exc).__name__


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def start_mpnet(workdir: Path, stall_timeout: float, args: argparse.Namespace) -> bench_echo.Server:
    port = bench_echo.free_port()
    module = workdir / "stall.py"
    module.write_text(STALL_MODULE)
    server = bench_echo.launch_mpnet(
        workdir,
        port,
        "workers = 2\n"
        f'modules = ["{module}"]\n'
        'interfaces = ["127.0.0.1"]\n'
        f"stall_ports = [{port}]\n"
        f"worker_timeout = {args.stall + 20}\n"
        f"stall_timeout = {stall_timeout}\n"
        'control_socket = "control.sock"\n'
        "allow_root = true\n",
        args.mpnet_cmd,
    )
    try:
        deadline = time.monotonic() + 30
        while "ready: 2 worker" not in server.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError("mpnet did not report ready:\n" + bench_echo.tail(server.log))
            time.sleep(0.05)
    except BaseException:
        server.stop()
        raise
    server.remember_tree()
    return server


def one_round(mode: str, workdir: Path, args: argparse.Namespace) -> dict[str, list]:
    server = start_mpnet(workdir, 1.0 if mode == "on" else 0, args)
    stuck = None
    try:
        stuck, _ = bench_echo.greeting(server.port)
        stuck.sendall(f"stall {args.stall}\n".encode())
        assert stuck.recv(64) == b"stalling\n"
        began = time.monotonic()
        burst = [Greeting(server.port, args.stall + 15) for _ in range(60)]
        late: list[Greeting] = []
        next_at = began + args.start
        while next_at < began + args.stall - 1:
            time.sleep(max(0.0, next_at - time.monotonic()))  # pacing the load
            late.append(Greeting(server.port, args.stall + 15))
            next_at += 1.0 / args.rate
        for client in late + burst:
            client.join(args.stall + 20)
        return {"late": late, "burst": burst}
    finally:
        if stuck is not None:
            stuck.close()
        server.stop()


def summary(clients: list[Greeting]) -> tuple[list[float], int, int]:
    delays = [c.delay for c in clients if c.delay is not None]
    errors = sum(1 for c in clients if c.error)
    return delays, sum(1 for d in delays if d > 1.0), errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stall", type=float, default=8.0, help="seconds the worker is stuck")
    parser.add_argument("--from", dest="start", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=40.0, help="new connections per second")
    parser.add_argument("--mpnet-cmd", default="mpnet")
    args = parser.parse_args(argv)
    args.mpnet_cmd = shlex.split(args.mpnet_cmd)
    signal.signal(signal.SIGTERM, bench_echo._on_sigterm)  # the finally blocks stop servers
    results: dict[str, dict[str, list[Greeting]]] = {"on": {}, "off": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-stall-") as tmp:
        for round_ in range(args.rounds):
            for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                workdir = Path(tmp) / f"{mode}-{round_}"
                workdir.mkdir()
                got = one_round(mode, workdir, args)
                for key, clients in got.items():
                    results[mode].setdefault(key, []).extend(clients)
                delays, slow, errors = summary(got["late"])
                _, bslow, berrors = summary(got["burst"])
                failed = failed or bool(errors or berrors)
                print(
                    f"round {round_ + 1} steering {mode:3s}: {len(got['late'])} new conns, "
                    f"p50 {statistics.median(delays) * 1e3:7.1f} ms  p99 "
                    f"{percentile(delays, 0.99) * 1e3:7.1f} ms  max {max(delays) * 1e3:7.1f} ms  "
                    f"> 1 s: {slow}  errors: {errors};  burst at stall start: > 1 s: {bslow}/60, "
                    f"errors: {berrors}",
                    flush=True,
                )
    print(
        f"\nTime to greeting of connections opened {args.start:g} s into a {args.stall:g} s "
        f"stall until 1 s before its end, {args.rate:g}/s, all rounds:"
    )
    figures = {}
    for mode in ("on", "off"):
        delays, slow, errors = summary(results[mode]["late"])
        figures[mode] = (percentile(delays, 0.99), max(delays))
        print(
            f"  steering {mode:3s}: n={len(delays) + errors}  p50 "
            f"{statistics.median(delays) * 1e3:7.1f} ms  p99 {figures[mode][0] * 1e3:7.1f} ms  "
            f"max {figures[mode][1] * 1e3:7.1f} ms  > 1 s: {slow}  errors: {errors}"
        )
    print(
        f"  off / on: p99 {figures['off'][0] / figures['on'][0]:.0f}x, "
        f"max {figures['off'][1] / figures['on'][1]:.0f}x"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, bench_echo.Interrupted):
        sys.exit(130)
