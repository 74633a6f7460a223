"""bench_shared.py on two checkouts, interleaved: is one tree's local backend slower?

Run by hand (not in CI), e.g. the tree before the Redis backend against this one::

    git worktree add --detach /tmp/wt-before <commit>
    python bench/ab_shared.py --before /tmp/wt-before --after . --pairs 7 [-- --requests 30000]
    git worktree remove /tmp/wt-before

Each pair runs ``bench/bench_shared.py --rounds 1`` once per tree (with ``PYTHONPATH`` set to
that tree, so its servers run its code), the order alternating between pairs so that both trees
see the same machine. Prints, per figure, the median over pairs of each tree and their ratio
(after / before). bench_shared's redis-server rows run the same program on both sides: their
ratios show the noise of the run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW = re.compile(r"\s+(.+?)\s{2,}(\d+) ops/s .*p50\s+([\d.]+) us")
BENCHMARK = re.compile(
    r"\s+(SET|GET|INCR)\s+(kv, \d workers?|redis-server)\s+(\d+) rps .*?(\d+) per CPU-s"
)
READ = re.compile(r"\s+local table read / dict read\s+([\d.]+)x")


def figures(output: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in output.splitlines():
        if match := ROW.match(line):
            found[f"{match[1].strip()} ops/s"] = float(match[2])
            found[f"{match[1].strip()} p50 us"] = float(match[3])
        elif match := BENCHMARK.match(line):
            found[f"redis-benchmark {match[1]} {match[2]} rps"] = float(match[3])
            found[f"redis-benchmark {match[1]} {match[2]} per CPU-s"] = float(match[4])
        elif match := READ.match(line):
            found["table read / dict read"] = float(match[1])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout A")
    parser.add_argument("--after", type=Path, required=True, help="checkout B")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("extra", nargs="*", help="more bench_shared.py arguments (after --)")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as scratch:
        for pair in range(args.pairs):
            order = list(trees) if pair % 2 == 0 else list(reversed(trees))
            for name in order:
                started = time.monotonic()
                script = str(trees[name] / "bench" / "bench_shared.py")
                run = subprocess.run(
                    [sys.executable, script, "--rounds", "1", *args.extra],
                    cwd=scratch,
                    env=dict(os.environ, PYTHONPATH=str(trees[name])),
                    capture_output=True,
                    text=True,
                    timeout=3600,
                )
                if run.returncode != 0:
                    print(run.stdout + run.stderr, file=sys.stderr)
                    return 1
                results[name].append(figures(run.stdout))
                print(
                    f"pair {pair + 1}/{args.pairs} {name}: {time.monotonic() - started:.0f}s, "
                    f"load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    keys = [k for k in results["after"][0] if all(k in r for rs in results.values() for r in rs)]
    print(f"\n{'figure (median of pairs)':<56} {'before':>10} {'after':>10} {'after/before':>12}")
    for key in keys:
        before = statistics.median(r[key] for r in results["before"])
        after = statistics.median(r[key] for r in results["after"])
        print(f"{key:<56} {before:10.1f} {after:10.1f} {after / before:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
