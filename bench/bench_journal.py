"""Journal recovery benchmark: how long loading a journal takes, per 64 MiB.

Run by hand (not in CI)::

    PYTHONPATH=. python bench/bench_journal.py [--rounds 3]

Cases, each replayed with :func:`mpnet.journal.replay_journal` (pure, in this process):

1. **torn 30 MB record**: one small record, then a 30 MB ``set`` cut short by a crash (issue 9.5:
   this took 42 s when the tail was searched offset by offset);
2. **torn 30 MB record, zero-filled**: the same with its last 4 KiB zeroed (a power loss);
3. **64 MiB of small records**: kv-like ``set`` of 100-byte values (a journal just before
   compaction, which happens at 64 MiB).

Baseline in the same run: ``zlib.crc32`` over the same bytes (the least any checked recovery
costs). Reported: CPU seconds of this process (median of rounds), per 64 MiB, and the
ratio to the baseline.
Target: <= 1 s per 64 MiB for every case.
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

from mpnet.journal import replay_journal
from mpnet.pure.frames import encode

MIB = 1024 * 1024


def record(name: str, op: str, args: list) -> bytes:
    payload = encode([name, op, args])[4:]
    return len(payload).to_bytes(4, "big") + zlib.crc32(payload).to_bytes(4, "big") + payload


def cases() -> dict[str, bytes]:
    head = record("kv", "set", [b"a", 1])
    big = record("kv", "set", [b"big", bytes(range(256)) * (30 * MIB // 256)])
    torn = head + big[: len(big) - 12345]
    zeroed = torn[:-4096] + bytes(4096)
    small = []
    size = i = 0
    while size < 64 * MIB:
        item = record("kv", "set", [b"key:%d" % i, b"v" * 100])
        small.append(item)
        size += len(item)
        i += 1
    return {
        "torn 30 MB record": torn,
        "same, zero-filled": zeroed,
        "64 MiB of small records": b"".join(small),
    }


def timed(action) -> float:
    """CPU seconds (this process), so that other load on the machine does not count."""
    started = time.process_time()
    action()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    worst = 0.0
    for name, data in cases().items():
        replays, crcs = [], []
        for _ in range(args.rounds):
            crcs.append(timed(lambda data=data: zlib.crc32(data)))
            replays.append(timed(lambda data=data: replay_journal(data, {}, "bench")))
        replay, crc = statistics.median(replays), statistics.median(crcs)
        per_64 = replay * 64 * MIB / len(data)
        worst = max(worst, per_64)
        print(
            f"{name:28} {len(data) / MIB:6.1f} MiB  replay {replay:7.3f} s  "
            f"{per_64:6.3f} s per 64 MiB  {replay / crc:6.1f}x crc32"
        )
    print(f"worst: {worst:.3f} s per 64 MiB; target <= 1 s: {'met' if worst <= 1 else 'MISSED'}")


if __name__ == "__main__":
    main()
