"""What each accepted connection allocates in a server process, by allocation site.

Run by hand (not in CI)::

    python bench/bench_alloc.py [--count 2000] [--mpnet-cmd "mpnet"] [--baseline]

Starts mpnet (1 worker) with a module that echoes like bench/echo_raw.py and that, on the line
``SNAP <path>``, runs a full collection and dumps a ``tracemalloc`` snapshot (tracing starts when
the module loads, in the worker). With ``--baseline``, a raw uvloop ``Protocol`` server with the
same two behaviours instead. Snapshots are taken after 200 warm-up connections have come and gone
and again with *count* idle connections open (each echoed one 64-byte message, as in
bench_idle.py); the difference, grouped by traceback, divided by *count*, is printed: bytes and
blocks per connection and the newest frames of each site (allocations made by C code called from
the event loop show the loop's frame). Every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_echo import free_port, port_accepts
from bench_idle import close_all, open_idle, raise_fd_limit

PROBE_MODULE = """# ruff: noqa: F821
import gc
import tracemalloc

tracemalloc.start(12)


class listener:
    def onincoming(conn, data):
        if data.startswith(b"SNAP "):
            gc.collect()
            tracemalloc.take_snapshot().dump(data[5:].strip().decode())
            conn.write(b"ok\\n")
            return
        conn.write(data)


module.provides("net", name="echo_raw", listener=listener, default_port=0)
"""

PROBE_BASELINE = """import asyncio, gc, socket, sys, tracemalloc
import uvloop
tracemalloc.start(12)
class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        if data.startswith(b"SNAP "):
            gc.collect()
            tracemalloc.take_snapshot().dump(data[5:].strip().decode())
            self.transport.write(b"ok\\n")
            return
        self.transport.write(data)
async def serve(port):
    sock = socket.create_server(("127.0.0.1", port), backlog=1024)
    await asyncio.get_running_loop().create_server(Echo, sock=sock, backlog=1024)
    await asyncio.Event().wait()
uvloop.run(serve(int(sys.argv[1])))
"""


def snapshot(port: int, path: Path) -> tracemalloc.Snapshot:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"SNAP {path}\n".encode())
        if sock.recv(16) != b"ok\n":
            raise RuntimeError("the probe did not answer")
    return tracemalloc.Snapshot.load(str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--mpnet-cmd", default="mpnet")
    parser.add_argument("--baseline", action="store_true", help="a raw uvloop server instead")
    parser.add_argument("--frames", type=int, default=3, help="newest frames shown per site")
    args = parser.parse_args(argv)
    raise_fd_limit(args.count + 1024)
    with tempfile.TemporaryDirectory(prefix="bench-alloc-") as tmp:
        work, port = Path(tmp), free_port()
        if args.baseline:
            script = work / "probe_baseline.py"
            script.write_text(PROBE_BASELINE)
            cmd = [sys.executable, str(script), str(port)]
        else:
            module = work / "probe.py"
            module.write_text(PROBE_MODULE)
            config = work / "mpnet.toml"
            config.write_text(
                f'workers = 1\nmodules = [{str(module)!r}]\ninterfaces = ["127.0.0.1"]\n'
                f"echo_raw_ports = [{port}]\n"
                + ("allow_root = true\n" if os.geteuid() == 0 else "")
            )
            cmd = [*shlex.split(args.mpnet_cmd), "serve", "-c", str(config), "--workers", "1"]
        log = (work / "server.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        socks: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 30
            while not port_accepts(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {(work / 'server.log').read_text()}")
                time.sleep(0.1)  # polling for the port, with a deadline
            close_all(open_idle(port, 200))
            before = snapshot(port, work / "before")
            socks = open_idle(port, args.count)
            after = snapshot(port, work / "after")
        finally:
            close_all(socks)
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(ignore), after.filter_traces(ignore)
    n = args.count
    stats = after.compare_to(before, "traceback")
    total = sum(stat.size_diff for stat in stats)
    print(f"{'mpnet' if not args.baseline else 'raw uvloop'}: {total / n:.0f} B per connection")
    for stat in stats:
        if abs(stat.size_diff) < 2 * n:
            continue  # under 2 bytes per connection
        print(f"{stat.size_diff / n:8.1f} B  {stat.count_diff / n:5.2f} blocks per connection")
        for frame in list(stat.traceback)[-args.frames :]:
            print(f"           {frame.filename}:{frame.lineno}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
