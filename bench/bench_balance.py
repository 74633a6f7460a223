"""Per-worker spread of long-lived connections after a worker crash: mpnet balancing new
connections by load (``load_margin = 64``, the default) against the same mpnet without it
(``load_margin = 0``: the kernel's even hash), in the same run, interleaved round by round.

Run by hand (not in CI)::

    python bench/bench_balance.py [--rounds 3] [--workers 2] [--connections 2000]

Each round and mode starts a fresh mpnet whose module greets with its worker's pid and keeps the
connection (a chat or XMPP server's long-lived sessions). The script opens ``--connections``
connections, then ``kill -9``s the worker holding the most: its clients are cut off and, like real
clients, reconnect from that moment on, spread over ``--reconnect`` seconds (the first ones while
the replacement worker boots, and steering sends those to the others), while the replacement
starts with none. Without balancing the reconnects are spread evenly, so
the replacement ends with about 1/workers of the crashed worker's share and the gap stays; with
it, most of them go to the replacement. Printed per round and mode: connections per worker
(counted from the greetings), the gap (most - least) and most / least; then the medians.

Every process started here is stopped by PID in ``finally`` blocks, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_echo  # the house helpers (launch_mpnet, greeting, free_port, Server)

from mpnet.controlclient import request
from mpnet.pure.controlproto import StatusRequest

PID_MODULE = """\
# ruff: noqa: F821
import os
class listener:
    def onconnect(conn):
        conn.write(f"{os.getpid()}\\n")
module.provides("net", name="pid", listener=listener, default_port=0)
"""


def start_mpnet(workdir: Path, margin: int, args: argparse.Namespace) -> bench_echo.Server:
    port = bench_echo.free_port()
    module = workdir / "pid.py"
    module.write_text(PID_MODULE)
    server = bench_echo.launch_mpnet(
        workdir,
        port,
        f"workers = {args.workers}\n"
        f'modules = ["{module}"]\n'
        'interfaces = ["127.0.0.1"]\n'
        f"pid_ports = [{port}]\n"
        f"load_margin = {margin}\n"
        'control_socket = "control.sock"\n'
        "allow_root = true\n",
        args.mpnet_cmd,
    )
    try:
        wait_ready(workdir, args.workers, set())
    except BaseException:
        server.stop()
        raise
    server.remember_tree()
    return server


def wait_ready(workdir: Path, workers: int, gone: set[int]) -> None:
    """Until *workers* workers are ready and none of them is one of the *gone* pids."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = request(workdir / "control.sock", StatusRequest(), timeout=5).status["workers"]
        ready = [r for r in rows if r["state"] == "ready" and r["pid"] not in gone]
        if len(ready) == workers:
            return
        time.sleep(0.05)  # polling the control socket, with the deadline above
    raise RuntimeError(f"workers not ready (log in {workdir})")


def greet(port: int) -> tuple[socket.socket, int]:
    """A connection and the pid of the worker that greeted it."""
    sock, line = bench_echo.greeting(port)
    return sock, int(line)


def one_round(margin: int, workdir: Path, args: argparse.Namespace) -> list[int]:
    server = start_mpnet(workdir, margin, args)
    held: dict[int, list[socket.socket]] = {}
    try:
        for _ in range(args.connections):
            sock, pid = greet(server.port)
            held.setdefault(pid, []).append(sock)
        crashed = max(held, key=lambda pid: len(held[pid]))
        os.kill(crashed, signal.SIGKILL)
        lost = held.pop(crashed)
        for sock in lost:
            sock.close()
        began = time.monotonic()
        for n in range(len(lost)):  # every cut-off client reconnects, spread over the period
            time.sleep(max(0.0, began + n * args.reconnect / len(lost) - time.monotonic()))
            sock, pid = greet(server.port)
            held.setdefault(pid, []).append(sock)
        wait_ready(workdir, args.workers, {crashed})
        counts = sorted((len(socks) for socks in held.values()), reverse=True)
        return counts + [0] * (args.workers - len(counts))
    finally:
        for socks in held.values():
            for sock in socks:
                sock.close()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument(
        "--reconnect", type=float, default=2.0, help="seconds over which the clients reconnect"
    )
    parser.add_argument("--margin", type=int, default=64, help="load_margin of the 'on' mode")
    parser.add_argument("--mpnet-cmd", default="mpnet")
    args = parser.parse_args(argv)
    args.mpnet_cmd = shlex.split(args.mpnet_cmd)
    signal.signal(signal.SIGTERM, bench_echo._on_sigterm)  # the finally blocks stop servers
    gaps: dict[str, list[int]] = {"on": [], "off": []}
    ratios: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="bench-balance-") as tmp:
        for round_ in range(args.rounds):
            for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                workdir = Path(tmp) / f"{mode}-{round_}"
                workdir.mkdir()
                counts = one_round(args.margin if mode == "on" else 0, workdir, args)
                gap, ratio = counts[0] - counts[-1], counts[0] / max(1, counts[-1])
                gaps[mode].append(gap)
                ratios[mode].append(ratio)
                print(
                    f"round {round_ + 1} balancing {mode:3s}: per worker {counts}  gap {gap:5d}  "
                    f"most/least {ratio:5.2f}",
                    flush=True,
                )
    print(
        f"\n{args.connections} long-lived connections on {args.workers} workers; the busiest "
        f"worker killed, its clients reconnected (medians of {args.rounds} rounds):"
    )
    for mode in ("on", "off"):
        print(
            f"  balancing {mode:3s}: gap {statistics.median(gaps[mode]):7.0f}  most/least "
            f"{statistics.median(ratios[mode]):5.2f}"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, bench_echo.Interrupted):
        sys.exit(130)
