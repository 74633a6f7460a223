"""Baseline for the echo benchmarks: a plain single-process asyncio echo server.

This is the "raw uvloop Protocol server" that mpnet is compared against: one process, one event
loop, a ``Protocol`` whose ``data_received`` writes the bytes straight back.  Nothing else runs in
it, so the difference to mpnet is what mpnet's layers (connection objects, listener dispatch,
worker machinery) cost.

Usage::

    python bench/baseline_echo.py PORT [--host 127.0.0.1] [--loop uvloop|asyncio]

The first line on stdout is the bound port (useful with port 0).  SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
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


async def serve(host: str, port: int, backlog: int) -> None:
    """Listen on host:port, print the bound port, and serve until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    # Bind the socket here rather than passing host and port: resolving them would run
    # getaddrinfo in a thread pool (libuv's, or asyncio's executor), leaving idle threads
    # behind.  An mpnet worker is handed ready sockets and stays single-threaded, so the
    # baseline does too (a multithreaded process pays slightly more per syscall).
    sock = socket.create_server((host, port), backlog=backlog)
    server = await loop.create_server(EchoProtocol, sock=sock, backlog=backlog)
    bound = server.sockets[0].getsockname()[1]
    print(bound, flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


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
    args = parser.parse_args(argv)

    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.host, args.port, args.backlog))
    else:
        asyncio.run(serve(args.host, args.port, args.backlog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
