"""Reload benchmark: many reloads back to back under full load, and not one failed connection.

Run by hand (not in CI), after ``bench/build.sh``::

    python bench/bench_reload.py [--reloads 20] [--workers 2] [--seconds 30]

It starts ``mpnet serve`` with a small echo-like module whose greeting is a version marker
(``v000\\n``, then ``v001\\n``...), and runs for the whole time, concurrently:

* ``loadgen echo``: long-lived connections doing ping-pong (every reply byte checked);
* ``loadgen connect``: loops of connect, one verified echo, close, at full rate;
* a version probe: a loop of connect, read the greeting, close, noting when each began.

Meanwhile it rewrites the module with the next version and reloads (``mpnet reload --wait``, or
SIGHUP and the "reload complete" log line with ``--via signal``), ``--reloads`` times back to back.
loadgen discards the greeting, so its verification does not depend on the version; the probe
checks that no connection begun after a reload completed was greeted by an older version, and at
the end that new connections see the final one.

Old workers drain their connections for up to ``graceful_timeout``; the echo connections live for
the whole run, so the config sets ``graceful_timeout`` longer than the run: a worker that closed
one of them at its drain deadline would cut a ping-pong short (loadgen counts it as truncated).

Exit status: 0 if every count is zero and the final version is seen, 1 if any error or stale
greeting was counted, 2 if the benchmark could not run (no loadgen, mpnet did not start, the run
was too short for the reloads). Every process started here is stopped by PID, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
LOADGEN = BENCH_DIR / "loadgen"
ERROR_KINDS = ("refused", "reset", "timeout", "truncated", "mismatch", "other")
GREETING = len("v000\n")

MODULE = """\
# Written by bench/bench_reload.py: the greeting names the module's version.
VERSION = "{version}"


class listener:
    def onconnect(conn):
        conn.write(VERSION + "\\n")

    def onincoming(conn, data):
        conn.write(data)


module.provides("net", listener=listener, default_port=0)
"""


class BenchError(Exception):
    """The benchmark could not run (exit status 2)."""


def version_name(number: int) -> str:
    return f"v{number:03d}"


def write_module(path: Path, number: int) -> None:
    """Replace the module file in one step, so the checker never reads half a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(MODULE.format(version=version_name(number)))
    os.replace(temporary, path)


class Mpnet:
    """``mpnet serve`` in its own session, its log in a file."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.config = workdir / "mpnet.toml"
        self.log_path = workdir / "mpnet.log"
        self.command = args.mpnet_cmd.split() if args.mpnet_cmd else [sys.executable, "-m", "mpnet"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> int:
        """Start, wait for ``ready``, return the service's port."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*self.command, "serve", "-c", str(self.config)],
                cwd=self.config.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_log(r"\bready: \d+ worker", timeout)
        match = re.search(r"service reload_echo \(module \w+\) -> 127\.0\.0\.1:(\d+)", self.log())
        if match is None:
            raise BenchError(f"no port in the log:\n{self.log()}")
        return int(match.group(1))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, pattern: str, timeout: float, count: int = 1) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while len(regex.findall(self.log())) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"mpnet exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"no {pattern!r} in the log after {timeout:g}s")
            time.sleep(0.01)

    def reload(self, via: str, generation: int, timeout: float) -> None:
        assert self.proc is not None
        if via == "signal":
            os.kill(self.proc.pid, signal.SIGHUP)
            self.wait_log(rf"reload complete: generation {generation} serves every slot", timeout)
            return
        result = subprocess.run(
            [*self.command, "reload", "--wait", "-c", str(self.config), "--timeout", str(timeout)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout + 10,
        )
        if result.returncode != 0:
            raise BenchError(f"mpnet reload failed: {result.stderr.strip()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole session; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its session: workers included
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        return self.proc.returncode


class VersionProbe(threading.Thread):
    """Connect, read the greeting, close, in a loop; remember (start time, version or error)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.results: list[tuple[float, int | str]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            self.results.append(probe_once(self.port))


def probe_once(port: int) -> tuple[float, int | str]:
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            data = b""
            while len(data) < GREETING:
                chunk = sock.recv(GREETING - len(data))
                if not chunk:
                    raise ConnectionError(f"closed after {data!r}")
                data += chunk
        return started, int(data[1:4])
    except (OSError, ValueError) as exc:
        return started, f"{type(exc).__name__}: {exc}"


def start_loadgen(mode: str, port: int, connections: int, seconds: float) -> subprocess.Popen[str]:
    command = [str(LOADGEN), mode, "-p", str(port), "-c", str(connections), "-d", str(seconds)]
    command += ["--greeting", str(GREETING)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def loadgen_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"loadgen exited with {proc.returncode}: {err.strip()}")
    return json.loads(out)


def stale_greetings(
    probes: list[tuple[float, int | str]], completed: list[tuple[float, int]]
) -> tuple[int, int, list[str]]:
    """(stale, errors, examples): a connection begun after version N's reload completed must
    not be greeted by an older version."""
    stale = errors = 0
    examples: list[str] = []
    for started, outcome in probes:
        if isinstance(outcome, str):
            errors += 1
            if len(examples) < 5:
                examples.append(outcome)
            continue
        expected = max((v for done, v in completed if done <= started), default=0)
        if outcome < expected:
            stale += 1
            if len(examples) < 5:
                examples.append(
                    f"greeted by {version_name(outcome)}, {version_name(expected)} live"
                )
    return stale, errors, examples


def format_errors(result: dict[str, Any]) -> str:
    return " ".join(f"{kind} {result['errors'][kind]}" for kind in ERROR_KINDS)


def run(args: argparse.Namespace, workdir: Path) -> int:
    module = workdir / "reload_echo.py"
    write_module(module, 0)
    server = Mpnet(workdir, args)
    server.config.write_text(
        "\n".join(
            [
                f'modules = ["{module}"]',
                'interfaces = ["127.0.0.1"]',
                f"workers = {args.workers}",
                "reload_echo_ports = [0]",
                f"graceful_timeout = {args.seconds + 30}",
                'control_socket = "control.sock"',
                *(["allow_root = true"] if os.geteuid() == 0 else []),
                "",
            ]
        )
    )
    loadgens: list[subprocess.Popen[str]] = []
    probe: VersionProbe | None = None
    try:
        port = server.start()
        print(f"mpnet: {args.workers} workers on 127.0.0.1:{port}; loadgen for {args.seconds:g} s")
        began = time.monotonic()
        loadgens.append(start_loadgen("echo", port, args.echo_connections, args.seconds))
        loadgens.append(start_loadgen("connect", port, args.connect_concurrency, args.seconds))
        probe = VersionProbe(port)
        probe.start()
        time.sleep(args.warmup)  # the load is up before the first reload
        completed: list[tuple[float, int]] = []
        durations = []
        for number in range(1, args.reloads + 1):
            write_module(module, number)
            started = time.monotonic()
            server.reload(args.via, number + 1, timeout=30)
            done = time.monotonic()
            durations.append(done - started)
            completed.append((done, number))
        reloads_done = time.monotonic()
        left = args.seconds - (reloads_done - began)
        if left < 1.0:
            raise BenchError(
                f"the reloads took {reloads_done - began:.1f} s of a {args.seconds:g} s run; "
                "run longer (--seconds) so that the load outlasts them"
            )
        results = [loadgen_result(proc, args.seconds + 30) for proc in loadgens]
        probe.stop.set()
        probe.join(10)
        final = [probe_once(port)[1] for _ in range(20)]
    finally:
        if probe is not None:
            probe.stop.set()
        for proc in loadgens:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        exit_status = server.stop()
    echo, connect = results
    stale, probe_errors, examples = stale_greetings(probe.results, completed)
    final_seen = sum(1 for outcome in final if outcome == args.reloads)
    log = server.log()
    problems = [line for line in log.splitlines() if re.search(r"\] (warn|error):", line)]

    print(
        f"reloads: {len(durations)} back to back via {args.via} in {sum(durations):.2f} s "
        f"(each: median {statistics.median(durations):.3f} s, max {max(durations):.3f} s), "
        f"then {left:.1f} s more load"
    )
    print(
        f"echo    {args.echo_connections} long-lived connections: {echo['messages']} messages, "
        f"{echo['connects']} connects, p99 {echo['p99_us']} us, max {echo['max_us']} us; "
        f"errors: {format_errors(echo)}"
    )
    print(
        f"connect {args.connect_concurrency} loops: {connect['messages']} connections "
        f"({connect['rate_per_s']:.0f}/s), p99 {connect['p99_us']} us, max {connect['max_us']} us; "
        f"errors: {format_errors(connect)}"
    )
    print(
        f"version probe: {len(probe.results)} connections, {stale} greeted by a version older "
        f"than the last completed reload, {probe_errors} failed"
        + (f" (e.g. {'; '.join(examples)})" if examples else "")
    )
    print(
        f"final version {version_name(args.reloads)}: seen by {final_seen}/{len(final)} new "
        f"connections; mpnet exit status {exit_status}; "
        f"{len(problems)} warn/error line(s) in its log"
    )
    for line in problems[:10]:
        print(f"  {line}")
    failed = (
        echo["errors_total"]
        + connect["errors_total"]
        + stale
        + probe_errors
        + (len(final) - final_seen)
        + (exit_status != 0)
    )
    print("RESULT: " + ("OK, zero errors" if not failed else "FAILED: see the counts above"))
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reloads", type=int, default=20, help="reloads back to back (20)")
    parser.add_argument("--workers", type=int, default=2, help="mpnet workers (2)")
    parser.add_argument("--seconds", type=float, default=25, help="length of the load (25)")
    parser.add_argument("--warmup", type=float, default=1.0, help="load before the first reload")
    parser.add_argument("--echo-connections", type=int, default=20, help="loadgen echo -c (20)")
    parser.add_argument("--connect-concurrency", type=int, default=10, help="loadgen connect -c")
    parser.add_argument("--via", choices=["cli", "signal"], default="cli", help="how to reload")
    parser.add_argument("--mpnet-cmd", help="how to run the mpnet CLI (default: python -m mpnet)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (config, log)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(LOADGEN, os.X_OK):
        print(f"bench_reload: {LOADGEN} not found: run bench/build.sh first", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.keep:
            directory = Path(args.keep)
            directory.mkdir(parents=True, exist_ok=True)
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mpnet-")))
        try:
            return run(args, directory)
        except BenchError as exc:
            print(f"bench_reload: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
