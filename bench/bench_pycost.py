"""mpnet's Python-side cost per connection and per message, with the sockets taken away.

Run by hand (not in CI)::

    python bench/bench_pycost.py [--rounds 7] [--reference /tmp/old]

The loopback benchmarks (bench_echo.py) measure the whole server per CPU-second, and on a shared
2-core VM their rounds spread by ±20 % or more, more than the few per cent that mpnet's own layer
costs. This one isolates that layer: a worker's real :class:`~mpnet.workers.connection.Service`
and ``Connection`` (bench/echo_raw.py's ``onincoming``: ``conn.write(data)``) driven directly with
a stub transport, against a raw ``asyncio.Protocol`` doing the same:

* life: create the protocol, ``connection_made``, one 64-byte ``data_received`` echoed,
  ``eof_received``, ``connection_lost`` (what an accept, one echo and a close cost in Python);
* echo: one ``data_received`` echoed on an open connection.

CPU time (``time.process_time``) per operation, the best and the median over rounds of 100,000.
``--reference DIR`` measures another checkout too (its directory holding ``mpnet/``), in a child
process, the rounds interleaved with this tree's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OPS = 100_000
DATA = b"x" * 63 + b"\n"


class StubTransport:
    """What the protocols call on a transport, doing nothing."""

    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class RawEcho(asyncio.Protocol):
    """bench/baseline_echo.py's protocol."""

    transport: Any

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def onincoming(conn: Any, data: bytes) -> None:
    """bench/echo_raw.py's callback."""
    conn.write(data)


def mpnet_factory() -> Any:
    """A Service as a worker builds it for echo_raw (no limits but the default per worker)."""
    from mpnet.workers.connection import Service, ServiceSettings, WorkerCounters

    class Module:
        logger = None

    class Provider:
        name = "echo_raw"
        module = Module()
        callbacks = {"onincoming": onincoming}

    service = Service(Provider(), "w0.", ServiceSettings(), WorkerCounters(1 << 20))  # type: ignore[arg-type]
    return service.protocol_factory


def life(factory: Any, transport: Any) -> float:
    start = time.process_time()
    for _ in range(OPS):
        conn = factory()
        conn.connection_made(transport)
        conn.data_received(DATA)
        conn.eof_received()
        conn.connection_lost(None)
    return (time.process_time() - start) / OPS


def echo(factory: Any, transport: Any) -> float:
    conn = factory()
    conn.connection_made(transport)
    received = conn.data_received
    start = time.process_time()
    for _ in range(OPS):
        received(DATA)
    return (time.process_time() - start) / OPS


def one_round(kinds: list[str]) -> dict[str, float]:
    """One round of every test for the given kinds ("mpnet", "raw") in this process."""
    transport = StubTransport()
    factories = {"mpnet": mpnet_factory(), "raw": RawEcho}
    return {
        f"{test.__name__} {kind}": test(factories[kind], transport)
        for kind in kinds
        for test in (life, echo)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reference", type=Path, help="another checkout to measure as well")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one round for the parent, mpnet only, as JSON
        print(json.dumps(one_round(["mpnet"])))
        return 0
    import mpnet

    print(f"this tree: {Path(mpnet.__file__).parent.parent}")
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, value in one_round(["mpnet", "raw"]).items():
            results.setdefault(name, []).append(value)
        if args.reference is not None:
            child = subprocess.run(
                [sys.executable, "-P", __file__, "--child"],
                env={"PYTHONPATH": str(args.reference)},
                capture_output=True,
                check=True,
                text=True,
            )
            for name, value in json.loads(child.stdout).items():
                results.setdefault(name.replace("mpnet", "reference"), []).append(value)
    for name in sorted(results):
        values = [v * 1e9 for v in results[name]]
        print(
            f"{name:16s} best {min(values):6.0f} ns   median {statistics.median(values):6.0f} ns"
            f"   [{min(values):.0f} .. {max(values):.0f}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
