"""What ``mpnet serve --reload`` costs the master: one poll of the config and N module files.

The master polls twice a second (mpnet/devreload.py); this measures a poll (one ``stat`` per
file; the files are found again only when the config changes) and prints the share of one core
it takes.
Run by hand: ``python3 bench/bench_watch.py --files 1 10 100``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mpnet.devreload import POLL_INTERVAL, FileWatcher
from mpnet.pure.config import load_config


def measure(count: int, polls: int) -> float:
    """Seconds per poll with *count* module files."""
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        names = [f"m{i}" for i in range(count)]
        for name in names:
            (base / f"{name}.py").write_text("# module\n")
        config_path = base / "mpnet.toml"
        config_path.write_text(f"modules = {[f'./{n}.py' for n in names]!r}\n".replace("'", '"'))
        config = load_config(config_path)
        watcher = FileWatcher(interval=0)
        watcher.check(config, 0.0)
        start = time.perf_counter()
        for step in range(polls):
            watcher.check(config, float(step + 1))
        return (time.perf_counter() - start) / polls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--polls", type=int, default=5000)
    args = parser.parse_args()
    for count in args.files:
        seconds = measure(count, args.polls)
        share = seconds / POLL_INTERVAL * 100
        print(f"{count:4d} module files: {seconds * 1e6:8.1f} us per poll, {share:.4f}% of a core")


if __name__ == "__main__":
    main()
