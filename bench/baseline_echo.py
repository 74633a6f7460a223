"""Baseline for the echo benchmarks: a plain single-process asyncio echo server.

This is the "raw uvloop Protocol server" that mpnet is compared against: one process, one event
loop, a ``Protocol`` whose ``data_received`` writes the bytes straight back.  Nothing else runs in
it, so the difference to mpnet is what mpnet's layers (connection objects, listener dispatch,
worker machinery) cost.

Usage::

    python bench/baseline_echo.py PORT [--host 127.0.0.1] [--loop uvloop|asyncio] [--processes N]

The first line on stdout is the bound port (useful with port 0).  SIGTERM or SIGINT stops it.

``--processes N`` (for bench/bench_idle.py's many-connection runs, set against mpnet with N
workers): N server processes, each with its own listening socket on the one port
(``SO_REUSEPORT``, as mpnet gives each worker its own), under an idle parent that stops them on
SIGTERM or SIGINT. Each is a fresh interpreter (started with its socket, ``--fd``), not a fork:
a forked child would copy, page by page, the parent's free heap as it allocates, which would
charge the baseline's connections with memory that is not theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
from typing import cast


class EchoProtocol(asyncio.Protocol):
    """Write every received chunk back unchanged."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport of the new connection."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Echo the bytes."""
        self.transport.write(data)


async def serve(host: str, port: int, backlog: int, sock: socket.socket | None = None) -> None:
    """Listen on host:port (or on *sock*, bound already), print the bound port (not with
    *sock*: the parent did), and serve until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    # Bind the socket here rather than passing host and port: resolving them would run
    # getaddrinfo in a thread pool (libuv's, or asyncio's executor), leaving idle threads
    # behind.  An mpnet worker is handed ready sockets and stays single-threaded, so the
    # baseline does too (a multithreaded process pays slightly more per syscall).
    given = sock is not None
    if sock is None:
        sock = socket.create_server((host, port), backlog=backlog)
    server = await loop.create_server(EchoProtocol, sock=sock, backlog=backlog)
    if not given:
        print(server.sockets[0].getsockname()[1], flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def run(args: argparse.Namespace, sock: socket.socket | None = None) -> None:
    """Serve in this process on the loop the options name."""
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.host, args.port, args.backlog, sock))
    else:
        asyncio.run(serve(args.host, args.port, args.backlog, sock))


def run_processes(args: argparse.Namespace) -> None:
    """Bind one SO_REUSEPORT socket per process on one port, start a server on each, print the
    port, and stop the servers (by PID) on SIGTERM or SIGINT."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)  # runs the finally block below

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children: list[subprocess.Popen[bytes]] = []
    port = args.port
    try:
        for _ in range(args.processes):
            sock = socket.create_server((args.host, port), backlog=args.backlog, reuse_port=True)
            port = sock.getsockname()[1]
            with sock:
                command = [sys.executable, __file__, str(port), "--loop", args.loop]
                children.append(
                    subprocess.Popen(
                        [*command, "--fd", str(sock.fileno())],
                        pass_fds=(sock.fileno(),),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        process_group=0,  # its own group: a Ctrl-C is for the parent to pass on
                    )
                )
        print(port, flush=True)
        while True:
            signal.pause()
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="TCP port to listen on (0: pick a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop implementation (default uvloop)",
    )
    parser.add_argument("--backlog", type=int, default=1024, help="listen backlog (default 1024)")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes sharing the port with SO_REUSEPORT (default 1: this one)",
    )
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # a listening socket, given
    args = parser.parse_args(argv)
    if args.processes > 1:
        run_processes(args)
    elif args.fd is not None:
        run(args, socket.socket(fileno=args.fd))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
