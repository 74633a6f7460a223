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

``--instructions`` counts CPU instructions instead of timing (valgrind's callgrind, each kind and
test in a child run twice: with no operation and with INSTRUCTION_OPS, the difference divided by
INSTRUCTION_OPS). The count is the same from one run to the next whatever else the machine is
doing, so it shows a change of a few per cent that the timed rounds' spread hides. It does not
see what the instructions cost in time (cache misses, branch mispredictions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OPS = 100_000
INSTRUCTION_OPS = 20_000
DATA = b"x" * 63 + b"\n"


class StubTransport:
    """What the protocols call on a transport, doing nothing."""

    # A C function, as uvloop's write is: no Python frame of the stub's own in either figure.
    write = len

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


def life(factory: Any, transport: Any, ops: int = OPS) -> float:
    start = time.process_time()
    for _ in range(ops):
        conn = factory()
        conn.connection_made(transport)
        conn.data_received(DATA)
        conn.eof_received()
        conn.connection_lost(None)
    return (time.process_time() - start) / max(ops, 1)


def echo(factory: Any, transport: Any, ops: int = OPS) -> float:
    conn = factory()
    conn.connection_made(transport)
    received = conn.data_received
    start = time.process_time()
    for _ in range(ops):
        received(DATA)
    return (time.process_time() - start) / max(ops, 1)


TESTS = {"life": life, "echo": echo}


def factory_of(kind: str) -> Any:
    return mpnet_factory() if kind == "mpnet" else RawEcho


def one_round(kinds: list[str]) -> dict[str, float]:
    """One round of every test for the given kinds ("mpnet", "raw") in this process."""
    transport = StubTransport()
    factories = {kind: factory_of(kind) for kind in kinds}
    return {
        f"{name} {kind}": test(factories[kind], transport)
        for kind in kinds
        for name, test in TESTS.items()
    }


def instructions(kind: str, test: str, reference: Path | None) -> float:
    """Instructions per operation of *test* for *kind* ("mpnet", "raw" or "reference")."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict probes in every run
    if kind == "reference":
        env["PYTHONPATH"] = str(reference)
        kind = "mpnet"
    counts = []
    for ops in (0, INSTRUCTION_OPS):
        command = [sys.executable, "-P", __file__, "--count", kind, test, str(ops)]
        child = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command],
            env=env,
            capture_output=True,
            check=True,
            text=True,
        )
        found = re.search(r"Collected : (\d+)", child.stderr)
        if found is None:
            raise RuntimeError(f"no instruction count in callgrind's output:\n{child.stderr}")
        counts.append(int(found[1]))
    return (counts[1] - counts[0]) / INSTRUCTION_OPS


def count_instructions(reference: Path | None) -> int:
    if shutil.which("valgrind") is None:
        print("--instructions needs valgrind (apt-get install valgrind)")
        return 3
    kinds = ["mpnet", "raw"] + (["reference"] if reference is not None else [])
    print(f"instructions per operation ({INSTRUCTION_OPS:,} operations, callgrind):")
    for test in TESTS:
        counted = {kind: instructions(kind, test, reference) for kind in kinds}
        for kind, count in counted.items():
            print(f"{test} {kind:9s} {count:8,.0f}")
        print(f"{test} mpnet over raw: {counted['mpnet'] - counted['raw']:+,.0f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reference", type=Path, help="another checkout to measure as well")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions (callgrind) instead"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", nargs=3, help=argparse.SUPPRESS)  # KIND TEST OPS, untimed
    args = parser.parse_args(argv)
    if args.child:  # one round for the parent, mpnet only, as JSON
        print(json.dumps(one_round(["mpnet"])))
        return 0
    if args.count:
        kind, test, ops = args.count
        TESTS[test](factory_of(kind), StubTransport(), int(ops))
        return 0
    import mpnet

    print(f"this tree: {Path(mpnet.__file__).parent.parent}")
    if args.instructions:
        return count_instructions(args.reference)
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
