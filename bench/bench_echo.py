"""Echo benchmark: mpnet (one worker running bench/echo_raw.py) against baseline servers.

Run by hand (not in CI), after ``bench/build.sh``::

    python bench/bench_echo.py [--rounds 5] [--seconds 5] [--connections 50]
    python bench/bench_echo.py --baselines uvloop,node,prosody
    python bench/bench_echo.py --metrics    # mpnet with metrics off vs on (and the histogram)
    python bench/bench_echo.py --together --pin --rounds 12 --seconds 3   # both in one window

The baselines, each echoing every chunk straight back: ``uvloop`` (a raw ``asyncio.Protocol``
server on uvloop, bench/baseline_echo.py; the default), ``asyncio`` (the same on the stdlib loop),
``node`` (a Node ``cluster`` primary with one ``net.createServer`` worker, bench/node_echo.js) and
``prosody`` (Prosody running bench/prosody/mod_bench_echo.lua, a net provider module, from a
config generated into the temporary directory).  A baseline whose binary is missing is skipped
with a message (exit status 3 if the rest went well).

For every round, and for every server kind in an order that rotates from round to round, it starts
a fresh server, waits for its port, runs a short warm-up, then two measured loads with
``bench/loadgen``:

* echo:    N connections doing ping-pong with S-byte messages (messages per second, p50/p99);
* connect: M concurrent loops of connect, one message, verified reply, close.

Over each load window it samples the CPU time (user + system) of the server's whole process tree
(the root process and all its descendants), so the result depends much less on how much CPU the
noisy machine happened to leave over: *messages per server CPU-second* is the figure to compare.
The headline is the ratio mpnet / baseline of that figure, the median of the per-round ratios.

``--together`` runs the kinds at the same time instead of one after the other: in every round all
servers are started and warmed up, then for each test every server gets its own loadgen (the same
command, so the same connections as alone), all loadgens run over the same window, and every tree
is sampled before and after it.  Why: on a shared VM one server's work per CPU-second drifts by
+-20 % between windows a few seconds apart (CPU steal, frequency), so sequential rounds give
per-round ratios from 0.7 to 1.2 even on a quiet machine; servers sharing one window (and, with
``--pin``, one CPU) see the same conditions, and the drift cancels out of their ratio.  The order
in which the servers start and their loadgens are launched rotates from round to round, and each
server's share of the CPU is printed per window and summarized: the ratio is fair only if the
scheduler gave them comparable shares (within BALANCED of each other).  The absolute figures are
not those of a server alone (each has about half a core, so it batches more per wake-up); only
the ratios carry over.

``--metrics`` measures what metrics cost instead: mpnet as usual against ``mpnet-m`` (the same
with ``metrics_listen`` set, scraped once a second during every window) and ``mpnet-h`` (that,
plus ``metrics_callback_durations = true``); the budget is 2 % more server CPU per message.

Every error that loadgen counts is printed; if there is any, a banner says so and the exit status
is 1.  Every process this script starts is stopped by PID in ``finally`` blocks, Ctrl-C included
(the root by SIGTERM, then every descendant ever seen in its tree, e.g. Node's cluster workers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
LOADGEN = BENCH_DIR / "loadgen"
ECHO_RAW = BENCH_DIR / "echo_raw.py"
BASELINE = BENCH_DIR / "baseline_echo.py"
NODE_ECHO = BENCH_DIR / "node_echo.js"
PROSODY_PLUGINS = BENCH_DIR / "prosody"  # holds mod_bench_echo.lua

ERROR_KINDS = ("refused", "reset", "timeout", "truncated", "mismatch", "other")
TESTS = ("echo", "connect")
BASELINE_KINDS = ("uvloop", "asyncio", "node", "prosody")
METRICS_KINDS = ("mpnet-m", "mpnet-h")  # --metrics: metrics on; and the callback histogram too
REFERENCE_KIND = "mpnet-ref"  # --reference: mpnet run from another checkout (before/after A/B)
METRICS_BUDGET = 0.02  # with metrics on, at most 2 % more server CPU per message
SCRAPE_EVERY = 1.0
metrics_ports: dict[int, int] = {}  # service port -> metrics port, for the scraper
# The targets for the ratio mpnet / baseline of work per server CPU-second ("per core"): issue
# 12 asks for 0.97 of a raw uvloop Protocol server on echo and 0.95 on connect (the project brief
# said within 5 % on echo); 1.4x a Node cluster and 2x Prosody on the same load.
TARGETS: dict[tuple[str, str], float] = {
    ("echo", "uvloop"): 0.97,
    ("connect", "uvloop"): 0.95,
    ("echo", "node"): 1.4,
    ("connect", "node"): 1.4,
    ("echo", "prosody"): 2.0,
    ("connect", "prosody"): 2.0,
}
# A server that gets less than this share of a core is starved by other load; some servers (Node
# most) then do less work per CPU-second, so the ratios are also shown over the rounds in which
# both servers got at least this much.
SATURATED = 0.7
# With --together, a window in which one server got less than this fraction of the other's CPU
# is flagged, and the ratios are also shown over the windows in which the shares were this close.
BALANCED = 0.8
EXIT_SKIPPED = 3  # everything ran cleanly, but a requested baseline's binary was missing


# -- small helpers ------------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:port succeeds right now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def greeting(port: int, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """Connect to 127.0.0.1:*port* and read the server's first line (a greeting); the caller
    closes the socket, which is closed here if the line never comes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(64)
            if not chunk:
                raise ConnectionError("closed before the greeting")
            data += chunk
    except BaseException:
        sock.close()
        raise
    return sock, data


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the report: how busy the machine was."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median(values: list[float]) -> float:
    """Median of a list, NaN when empty."""
    return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while cleaning up; they are delivered afterwards."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Interrupted(Exception):
    """Raised from the SIGTERM handler so that the ``finally`` blocks run."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


# -- process tree CPU accounting -----------------------------------------------------------------


@dataclass
class TreeSample:
    """CPU seconds (user + system) and thread count of every process in a tree at one moment."""

    cpu: dict[tuple[int, float], float]  # (pid, create_time) -> seconds
    threads: dict[tuple[int, float], int]
    root: tuple[int, float]

    @property
    def total(self) -> float:
        return sum(self.cpu.values())


def sample_tree(root: psutil.Process) -> TreeSample:
    """Take the user+sys CPU time of root and all its recursive children.

    Each process counts its own time plus that of the children it has reaped
    (``children_user``/``children_system``): a worker that exits and is reaped by the master
    during the window moves its time into the master's, so the tree's total stays exact. The
    difference of two totals is the CPU the tree used in between, even if workers came and went
    (which the caller flags anyway). Processes are keyed by (pid, create_time) so a reused PID
    is noticed. Children that exit while we look are skipped.
    """
    cpu: dict[tuple[int, float], float] = {}
    threads: dict[tuple[int, float], int] = {}
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        try:
            with proc.oneshot():
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
                cpu[key] = times.user + times.system + times.children_user + times.children_system
                threads[key] = proc.num_threads()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            if proc is root:
                raise
    return TreeSample(cpu, threads, (root.pid, root.create_time()))


# -- servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    """A server subprocess (and its process tree) that this script started."""

    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    known: set[tuple[int, float]] = field(default_factory=set)  # every (pid, ctime) ever seen

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def remember_tree(self) -> None:
        """Note every process currently in the tree, so stop() can reap leftovers by PID."""
        with contextlib.suppress(psutil.NoSuchProcess):
            root = self.ps
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.known.add((proc.pid, proc.create_time()))

    def stop(self, timeout: float = 15.0) -> float:
        """SIGTERM the root, wait, SIGKILL if needed, then kill any descendant left behind.

        Returns how long the root took to exit after SIGTERM.  Ctrl-C is held back meanwhile,
        so that an impatient second Ctrl-C cannot leave processes behind.
        """
        with signals_deferred():
            return self._stop(timeout)

    def _stop(self, timeout: float) -> float:
        self.remember_tree()
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  ! {self.kind}: pid {self.proc.pid} ignored SIGTERM, sending SIGKILL")
                self.proc.kill()
                self.proc.wait()
        took = time.monotonic() - start
        # Descendants (mpnet workers) should be gone with their master; make sure of it.
        deadline = time.monotonic() + 5.0
        for pid, ctime in sorted(self.known):
            if pid == self.proc.pid:
                continue
            try:
                proc = psutil.Process(pid)
                if proc.create_time() != ctime:
                    continue  # the PID now belongs to someone else
                remaining = max(0.1, deadline - time.monotonic())
                try:
                    proc.wait(remaining)
                except psutil.TimeoutExpired:
                    print(f"  ! {self.kind}: child pid {pid} outlived its parent, killing it")
                    proc.kill()
            except psutil.NoSuchProcess:
                pass
        return took


def launch_mpnet(workdir: Path, port: int, config_text: str, mpnet_cmd: list[str]) -> Server:
    """``mpnet serve`` on *config_text* (written to *workdir*), logging to a file there; returns
    once *port* accepts. The caller stops it (``Server.stop``), which this does itself if the
    start fails."""
    config = workdir / f"mpnet-{port}.toml"
    config.write_text(config_text)
    log = workdir / f"mpnet-{port}.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [*mpnet_cmd, "serve", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            cwd=workdir,
        )
    server = Server("mpnet", port, proc, log)
    try:
        wait_for_port(server, 30)
    except BaseException:
        server.stop()
        raise
    return server


def prosody_listening(server: Server) -> bool:
    """Whether Prosody's log says it opened the port; raise if it says it could not.

    Prosody logs a port it cannot bind (e.g. taken since free_port() looked) and carries on,
    so the port accepting connections is not enough: it could be someone else's.
    """
    try:
        text = server.log.read_text(errors="replace")
    except OSError:
        return False
    if "Failed to open server port" in text or "Failed to activate service" in text:
        raise RuntimeError(
            f"prosody could not listen on port {server.port}; its log ends with:\n"
            f"{tail(server.log)}"
        )
    return f"Activated service 'bench_echo' on [127.0.0.1]:{server.port}" in text


def wait_for_port(server: Server, deadline_s: float) -> None:
    """Wait until the server accepts connections; fail early if it exits."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.kind} exited with status {server.proc.returncode} before listening "
                f"on port {server.port}; its log ends with:\n{tail(server.log)}"
            )
        if (server.kind != "prosody" or prosody_listening(server)) and port_accepts(server.port):
            return
        time.sleep(0.05)
    raise RuntimeError(
        f"{server.kind} did not accept connections on port {server.port} within {deadline_s} s; "
        f"its log ends with:\n{tail(server.log)}"
    )


def pin_to(cpu: int | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child (and whatever it forks later) to one CPU, or None."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def lua_str(text: str) -> str:
    """A Lua string literal (JSON's escapes are valid Lua for the paths used here)."""
    return json.dumps(text)


def prosody_config(workdir: Path, port: int, opportunistic_writes: bool) -> Path:
    """Write a minimal Prosody config serving mod_bench_echo on 127.0.0.1:port; return its path.

    Everything Prosody writes goes to a directory of its own in the temporary directory: the
    pidfile, data_path, an (empty) certificates directory, and its log, which goes to stdout
    and so to the server's log file.  Prosody refuses to start without a VirtualHost, so there
    is one, with every module that Prosody loads by itself on hosts disabled (c2s and s2s
    would listen on 5222 and 5269): the process runs mod_posix (pidfile, signals, and it
    refuses root unless run_as_root is set) and mod_bench_echo, nothing else of note.

    The network settings are Prosody's defaults unless ``opportunistic_writes``: then
    ``conn:write()`` sends at once when the socket is writable, instead of buffering until the
    next pass of the epoll loop (which costs two epoll_ctl calls and a wake-up per write).
    """
    pdir = workdir / f"prosody-{port}"
    (pdir / "certs").mkdir(parents=True)
    lines = [
        "-- Generated by bench/bench_echo.py for one benchmark run.",
        "daemonize = false -- deprecated since 0.12 in favour of -F, which is passed too",
        f"pidfile = {lua_str(str(pdir / 'prosody.pid'))}",
        f"data_path = {lua_str(str(pdir))}",
        f"certificates = {lua_str(str(pdir / 'certs'))}",
        f"plugin_paths = {{ {lua_str(str(PROSODY_PLUGINS))} }}",
        'network_backend = "epoll" -- net.server_epoll, the default since 0.12',
        'interfaces = { "127.0.0.1" }',
        'modules_enabled = { "bench_echo" }',
        "modules_disabled = {",
        '  "c2s", "s2s", "s2s_auth_certs", "offline", "presence", "message", "iq",',
        "}",
        f"bench_echo_ports = {{ {port} }}",
        'log = { { levels = { min = "info" }, to = "stdout" } }',
    ]
    if opportunistic_writes:
        lines.append("network_settings = { opportunistic_writes = true }")
    if os.geteuid() == 0:
        # mod_posix shuts Prosody down when it runs as root, unless told to (as mpnet's
        # allow_root).  Only prosodyctl switches to the prosody user; the daemon does not.
        lines.append("run_as_root = true")
    lines.append('VirtualHost "localhost"')
    config = pdir / "prosody.cfg.lua"
    config.write_text("\n".join(lines) + "\n")
    return config


def server_command(
    kind: str, port: int, workdir: Path, args: argparse.Namespace
) -> tuple[list[str], dict[str, str] | None]:
    """The command line (and environment, None to inherit) of one server of the given kind."""
    # bench_idle.py's many-connection runs use several worker processes (one without it).
    workers = getattr(args, "workers", 1)
    env: dict[str, str] | None = None  # None: this process's environment
    if kind == "mpnet" or kind in METRICS_KINDS or kind == REFERENCE_KIND:
        config = workdir / f"mpnet-{port}.toml"
        text = (
            f"workers = {workers}\n"
            f"modules = [{json.dumps(str(ECHO_RAW))}]\n"
            'interfaces = ["127.0.0.1"]\n'
            f"echo_raw_ports = [{port}]\n"
        )
        if kind in METRICS_KINDS:
            metrics_ports[port] = free_port()
            text += f'metrics_listen = "127.0.0.1:{metrics_ports[port]}"\n'
            if kind == "mpnet-h":
                text += "metrics_callback_durations = true\n"
        if os.geteuid() == 0:
            # mpnet refuses to run its workers as root unless told to (or given `user`).
            text += "allow_root = true\n"
        config.write_text(text)
        command = [*args.mpnet_cmd, "serve", "-c", str(config), "--workers", str(workers)]
        if kind == REFERENCE_KIND:
            # The other checkout's package comes first on the path, ahead of this one's.
            env = {**os.environ, "PYTHONPATH": str(args.reference)}
            # -P: not the current directory first either (it may be this checkout).
            return [sys.executable, "-P", "-m", "mpnet", *command[len(args.mpnet_cmd) :]], env
        return command, None
    if kind == "node":
        # One worker, as mpnet runs with --workers 1; the primary counts in the tree's CPU.
        if args.node_sched:
            env = {**os.environ, "NODE_CLUSTER_SCHED_POLICY": args.node_sched}
        return [args.node, str(NODE_ECHO), str(port), "1", "127.0.0.1"], env
    if kind == "prosody":
        config = prosody_config(workdir, port, args.prosody_opportunistic_writes)
        return [args.prosody, "-F", "--config", str(config)], None
    processes = ["--processes", str(workers)] if workers > 1 else []
    return [sys.executable, str(BASELINE), str(port), "--loop", kind, *processes], None


def start_server(kind: str, workdir: Path, args: argparse.Namespace) -> Server:
    """Start one server of the given kind on a fresh port and wait until it listens."""
    port = free_port()
    log = workdir / f"{kind}-{port}.log"
    cmd, env = server_command(kind, port, workdir, args)
    with log.open("wb") as logf:
        # A session of its own: Ctrl-C reaches only this script, which then stops the server
        # in order instead of racing it.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            preexec_fn=pin_to(args.server_cpu),
            env=env,
        )
    server = Server(kind, port, proc, log)
    try:
        wait_for_port(server, args.start_timeout)
    except BaseException:
        server.stop()
        raise
    server.remember_tree()
    return server


# -- load runs ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured load window against one server."""

    kind: str
    round: int
    test: str
    result: dict[str, Any]  # loadgen's JSON
    server_cpu: float  # seconds, whole tree
    cpu_by_process: dict[str, float]
    wall: float
    loadgen_cpu: float
    tree_changed: str | None

    @property
    def messages(self) -> int:
        return int(self.result["messages"])

    @property
    def errors(self) -> dict[str, int]:
        return {k: int(self.result["errors"].get(k, 0)) for k in ERROR_KINDS}

    @property
    def cpu_share(self) -> float:
        """The server tree's CPU over the window, as a fraction of one core."""
        return self.server_cpu / self.wall if self.wall > 0 else 0.0

    @property
    def per_cpu(self) -> float:
        return self.messages / self.server_cpu if self.server_cpu > 0 else float("nan")


def run_loadgens(
    cmds: list[list[str]], timeout: float, cpu: int | None
) -> list[tuple[dict[str, Any], float]]:
    """Run loadgens at the same time, launched in the order given, and wait for them all.

    Returns, per command, loadgen's JSON result and the CPU seconds that loadgen used.  Each is
    waited for within *timeout* seconds of the launch; if anything goes wrong, every one still
    running is killed by PID.
    """
    deadline = time.monotonic() + timeout
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cmd in cmds:
            procs.append(
                subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=pin_to(cpu)
                )
            )
        return [reap_loadgen(proc, deadline) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def reap_loadgen(proc: subprocess.Popen[bytes], deadline: float) -> tuple[dict[str, Any], float]:
    """Wait for one loadgen until *deadline* (monotonic), reap it, return its JSON and CPU time.

    Its CPU time is how much RUSAGE_CHILDREN grew while reaping it: exact, since this script
    reaps no other child meanwhile (servers are reaped when stopped, after the window), and
    per loadgen even when several ran at once.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.decode(errors='replace')}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(out), cpu


def run_loadgen(cmd: list[str], timeout: float, cpu: int | None) -> dict[str, Any]:
    """Run one loadgen to completion and return its JSON result (see run_loadgens)."""
    return run_loadgens([cmd], timeout, cpu)[0][0]


def loadgen_cmd(test: str, port: int, seconds: float, args: argparse.Namespace) -> list[str]:
    """The loadgen command line for one test."""
    conns = args.connections if test == "echo" else args.connect_concurrency
    return [
        str(args.loadgen),
        test,
        "-p",
        str(port),
        "-c",
        str(conns),
        "-s",
        str(args.size),
        "-d",
        str(seconds),
    ]


@contextlib.contextmanager
def scraping(port: int | None) -> Iterator[None]:
    """GET /metrics every SCRAPE_EVERY seconds from a thread while the block runs (a scrape
    costs the master CPU, counted in the server's tree like the rest)."""
    if port is None:
        yield
        return
    import threading
    import urllib.request

    stop = threading.Event()
    failures: list[str] = []

    def scrape() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    r.read()
            except OSError as exc:
                failures.append(str(exc))
            stop.wait(SCRAPE_EVERY)

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        if failures:
            print(f"  ! {len(failures)} scrape(s) failed: {failures[0]}")


def measure(servers: list[Server], test: str, rnd: int, args: argparse.Namespace) -> list[Run]:
    """Run one load window over *servers* and account each server tree's CPU over it.

    Each server gets its own loadgen with the normal mode's command line (so the load it would
    get alone), all launched at once in the order of *servers* (which the caller rotates), and
    every tree is sampled before the first launch and after the last loadgen ended: one shared
    window, so that the servers' figures saw the same machine.
    """
    roots = [server.ps for server in servers]
    cmds = [loadgen_cmd(test, server.port, args.seconds, args) for server in servers]
    before = [sample_tree(root) for root in roots]
    t0 = time.monotonic()
    with contextlib.ExitStack() as scrapers:
        for server in servers:
            scrapers.enter_context(scraping(metrics_ports.get(server.port)))
        results = run_loadgens(cmds, args.seconds + 60, args.loadgen_cpu)
    wall = time.monotonic() - t0
    after = [sample_tree(root) for root in roots]
    return [
        account(server, test, rnd, b, a, result, wall, lg_cpu)
        for server, b, a, (result, lg_cpu) in zip(servers, before, after, results, strict=True)
    ]


def account(
    server: Server,
    test: str,
    rnd: int,
    before: TreeSample,
    after: TreeSample,
    result: dict[str, Any],
    wall: float,
    lg_cpu: float,
) -> Run:
    """The Run of one server over a window: its tree's CPU between the two samples, by process,
    and whether the tree changed in between."""
    changed = None
    if set(before.cpu) != set(after.cpu):
        gone = sorted(pid for pid, _ in set(before.cpu) - set(after.cpu))
        new = sorted(pid for pid, _ in set(after.cpu) - set(before.cpu))
        changed = f"process tree changed during the window (gone: {gone}, new: {new})"
    # Label each process; the thread count is shown because a multithreaded process pays more
    # per syscall (see baseline_echo.py), which is worth knowing when comparing.
    by_process = {
        f"{'root' if key == after.root else 'child'} {key[0]} ({after.threads[key]} thr)": (
            after.cpu[key] - before.cpu.get(key, 0.0)
        )
        for key in after.cpu
    }
    cpu = after.total - before.total
    server.remember_tree()
    return Run(server.kind, rnd, test, result, cpu, by_process, wall, lg_cpu, changed)


def warm_up(server: Server, args: argparse.Namespace) -> dict[str, int]:
    """A short unmeasured echo load so that both servers start the window warm."""
    if args.warmup <= 0:
        return {}
    cmd = loadgen_cmd("echo", server.port, args.warmup, args)
    result = run_loadgen(cmd, args.warmup + 60, args.loadgen_cpu)
    return {k: int(v) for k, v in result["errors"].items() if v}


# -- reporting ----------------------------------------------------------------------------------


def fmt_errors(errors: dict[str, int]) -> str:
    """'-' for none, else 'kind=N ...' for the nonzero kinds."""
    nonzero = [f"{k}={v}" for k, v in errors.items() if v]
    return " ".join(nonzero) if nonzero else "-"


def spread(values: list[float]) -> str:
    """'median [min .. max]' of a non-empty list, and from four values on the interquartile
    range 'IQR q1 .. q3' (how far the middle half of the rounds spread)."""
    text = f"{median(values):5.3f} [{min(values):.3f} .. {max(values):.3f}]"
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        text += f" IQR {q1:.3f} .. {q3:.3f}"
    return text


def windows(runs: list[Run], together: bool) -> list[list[Run]]:
    """The measured windows: each run on its own, or with --together a round's test."""
    if not together:
        return [[run] for run in runs]
    grouped: dict[tuple[int, str], list[Run]] = {}
    for run in runs:
        grouped.setdefault((run.round, run.test), []).append(run)
    return list(grouped.values())


def share_balance(a: Run, b: Run) -> float:
    """The smaller of two runs' CPU shares over the larger: 1.0 when they got the same."""
    low, high = sorted((a.cpu_share, b.cpu_share))
    return low / high if high > 0 else 0.0


def comparable(a: Run, b: Run, together: bool) -> bool:
    """Whether two runs' work per CPU-second compares fairly.

    One after the other, both servers must have had at least SATURATED of a core (a starved
    server does less per CPU-second); together they share a core, and neither may have had
    less than BALANCED of the other's CPU.
    """
    if together:
        return share_balance(a, b) >= BALANCED
    return min(a.cpu_share, b.cpu_share) >= SATURATED


def print_window(window: list[Run]) -> None:
    """After a --together window's runs: the servers' shares of a core, and mpnet's
    per-CPU-second ratio to each other server, to follow the fairness as it runs."""
    shares = " + ".join(f"{run.kind} {run.cpu_share:.0%}" for run in window)
    line = f"      together: CPU {shares} = {sum(run.cpu_share for run in window):.0%} of a core"
    mpnet = next((run for run in window if run.kind == "mpnet"), None)
    if mpnet is not None:
        line += "".join(
            f", mpnet / {run.kind} {mpnet.per_cpu / run.per_cpu:.3f} per CPU-s"
            for run in window
            if run is not mpnet and run.per_cpu > 0
        )
    print(line)


def print_run(run: Run) -> None:
    """One line per server and measured window, printed as soon as it is done."""
    r = run.result
    unit = "msg/s" if run.test == "echo" else "conn/s"
    errors = fmt_errors(run.errors)
    flag = "  <<< ERRORS" if errors != "-" else ""
    print(
        f"  round {run.round} {run.kind:<7} {run.test:<7} {r['rate_per_s']:>9.0f} {unit:<6} "
        f"p50 {r['p50_us']:>6} us  p99 {r['p99_us']:>6} us  "
        f"server CPU {run.server_cpu:6.2f} s ({100 * run.server_cpu / run.wall:3.0f}%)  "
        f"{run.per_cpu:>8.0f} per CPU-s  loadgen CPU {run.loadgen_cpu:5.2f} s  "
        f"errors: {errors}{flag}"
    )
    parts = ", ".join(f"{name}: {cpu:.2f} s" for name, cpu in run.cpu_by_process.items())
    print(f"      CPU by process: {parts}")
    if run.tree_changed:
        print(f"      !!! {run.kind}: {run.tree_changed}")


def summarize(runs: list[Run], kinds: list[str], args: argparse.Namespace) -> None:
    """Per kind and test: medians over rounds; then the mpnet/baseline ratios."""
    print()
    print("=" * 100)
    print(
        f"Summary: medians over {max(r.round for r in runs)} round(s); "
        f"echo = {args.connections} connections x "
        f"{args.size}-byte messages, connect = {args.connect_concurrency} concurrent loops, "
        f"{args.seconds} s windows"
        + (", all kinds together in each window" if args.together else "")
        + f"; load average now {load_average()}"
    )
    print("=" * 100)
    header = (
        f"{'test':<8}{'kind':<9}{'rate/s':>10}{'p50 us':>9}{'p99 us':>9}"
        f"{'srv CPU s':>11}{'per CPU-s':>12}{'errors':>8}"
    )
    print(header)
    for test in TESTS:
        for kind in kinds:
            sel = [r for r in runs if r.kind == kind and r.test == test]
            if not sel:
                continue
            errs = sum(sum(r.errors.values()) for r in sel)
            print(
                f"{test:<8}{kind:<9}"
                f"{median([r.result['rate_per_s'] for r in sel]):>10.0f}"
                f"{median([r.result['p50_us'] for r in sel]):>9.0f}"
                f"{median([r.result['p99_us'] for r in sel]):>9.0f}"
                f"{median([r.server_cpu for r in sel]):>11.2f}"
                f"{median([r.per_cpu for r in sel]):>12.0f}"
                f"{errs:>8}"
            )
    measured = windows(runs, args.together)
    busy = [w for w in measured if sum(r.server_cpu for r in w) < 0.8 * w[0].wall]
    if busy:
        print(
            f"note: in {len(busy)} of {len(measured)} windows the "
            f"{'servers together' if args.together else 'server'} got less than 80 % of a core: "
            "the machine was busy, so raw rates are unreliable; the per-CPU-second figures hold "
            "up better"
        )
    if "mpnet" not in kinds:
        return
    print()
    print(
        "Ratios mpnet / baseline (median of the per-round ratios, [min .. max], interquartile "
        "range):"
    )
    if args.together:
        fair = f"the CPU shares were within {BALANCED:.0%} of each other"
    else:
        fair = f"both had >= {SATURATED:.0%} of a core"
    indent = " " * 23
    verdicts: list[str] = []
    for base in (k for k in kinds if k != "mpnet"):
        for test in TESTS:
            pairs: list[tuple[Run, Run]] = []  # (mpnet, base) per round
            for rnd in range(1, args.rounds + 1):
                m = [r for r in runs if r.kind == "mpnet" and r.test == test and r.round == rnd]
                b = [r for r in runs if r.kind == base and r.test == test and r.round == rnd]
                if m and b and b[0].per_cpu > 0 and b[0].result["rate_per_s"] > 0:
                    pairs.append((m[0], b[0]))
            if not pairs:
                continue
            per_cpu = [m.per_cpu / b.per_cpu for m, b in pairs]
            rate = [m.result["rate_per_s"] / b.result["rate_per_s"] for m, b in pairs]
            print(
                f"  {test:<8} vs {base:<8} per CPU-second: {spread(per_cpu)}   "
                f"raw rate: {median(rate):5.3f} [{min(rate):.3f} .. {max(rate):.3f}]"
            )
            print(f"{indent}per round: {' '.join(f'{x:.3f}' for x in per_cpu)}")
            if args.together:
                shares = [m.cpu_share / b.cpu_share for m, b in pairs if b.cpu_share > 0]
                if shares:
                    print(f"{indent}CPU share mpnet / {base}: {spread(shares)}")
            fair_ratios = [
                m.per_cpu / b.per_cpu for m, b in pairs if comparable(m, b, args.together)
            ]
            if len(fair_ratios) < len(per_cpu):
                print(
                    f"{indent}per CPU-second in the {len(fair_ratios)} of {len(per_cpu)} rounds "
                    f"where {fair}: {spread(fair_ratios) if fair_ratios else '-'}"
                )
            if base in METRICS_KINDS:
                # per_cpu is off/on of messages per CPU-second: on costs this much more CPU
                cost = median(per_cpu) - 1
                met = "met" if cost <= METRICS_BUDGET else "NOT met"
                verdicts.append(
                    f"  {test:<8} {base} costs {cost:+.1%} per message vs metrics off "
                    f"(budget {METRICS_BUDGET:.0%}) {met}"
                )
            target = TARGETS.get((test, base))
            if target is not None:
                met = "met" if median(per_cpu) >= target else "NOT met"
                if min(per_cpu) >= target:
                    met += " (in every round)"
                elif max(per_cpu) >= target:
                    met += " (not in every round)"
                verdicts.append(
                    f"  {test:<8} mpnet / {base:<8} {median(per_cpu):6.3f}   "
                    f"target >= {target:<4g} {met}"
                )
    if verdicts:
        print()
        print(
            "Targets, per server CPU-second (issue 12: 0.97 of uvloop on echo, 0.95 on "
            "connect; the brief: 1.4x a Node cluster, 2x Prosody):"
        )
        for line in verdicts:
            print(line)


def report_errors(runs: list[Run], warmup_errors: list[tuple[str, int, dict[str, int]]]) -> bool:
    """Print a prominent banner listing every error; return True if there was any."""
    lines = [
        f"  round {r.round} {r.kind} {r.test}: {fmt_errors(r.errors)}"
        + (f" (last 'other': {r.result.get('other_last')})" if r.errors["other"] else "")
        for r in runs
        if any(r.errors.values())
    ]
    lines += [
        f"  round {rnd} {kind} warm-up: {fmt_errors(errs)}" for kind, rnd, errs in warmup_errors
    ]
    lines += [
        f"  round {r.round} {r.kind} {r.test}: {r.tree_changed}" for r in runs if r.tree_changed
    ]
    print()
    if not lines:
        print("No errors: every reply arrived complete and byte-exact.")
        return False
    print("!" * 100)
    print("!!! ERRORS (loadgen error counts, or server process trees that changed under load):")
    for line in lines:
        print(line)
    print("!" * 100)
    return True


# -- main ---------------------------------------------------------------------------------------


def choose_kinds(
    p: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[str], list[str]]:
    """The server kinds to run (mpnet first), and messages about requested ones to skip.

    A baseline whose binary is not found is skipped, with a message saying how to get it.
    """
    if args.metrics and args.baselines is None:
        baselines = []
    elif args.baselines is None:
        baselines = {"uvloop": ["uvloop"], "asyncio": ["asyncio"], "both": ["uvloop", "asyncio"]}[
            args.loop
        ]
    else:
        baselines = []
        for name in (x.strip() for x in args.baselines.split(",")):
            if name not in BASELINE_KINDS:
                p.error(
                    f"--baselines: unknown baseline {name!r} (known: {', '.join(BASELINE_KINDS)})"
                )
            if name not in baselines:
                baselines.append(name)
        if args.loop != "uvloop" and "asyncio" not in baselines:
            baselines.append("asyncio")
    skipped = []
    binaries = {"node": args.node, "prosody": args.prosody}
    hints = {
        "node": "install Node.js (e.g. apt-get install -y nodejs) or pass --node PATH",
        "prosody": "apt-get install -y prosody, then stop/disable its service; or --prosody PATH",
    }
    for kind, binary in binaries.items():
        if kind not in baselines:
            continue
        found = shutil.which(binary)
        if found is None:
            skipped.append(f"{kind}: binary {binary!r} not found, skipping it; {hints[kind]}")
            baselines.remove(kind)
        else:
            setattr(args, kind, found)
    if args.metrics:
        baselines += METRICS_KINDS
    if args.reference is not None:
        baselines.append(REFERENCE_KIND)
    kinds = ([] if args.no_mpnet else ["mpnet"]) + baselines
    return kinds, skipped


def binary_version(kind: str, binary: str) -> str:
    """A short version string for the header ('?' if it cannot be found out quickly)."""
    try:
        if kind == "node":
            out = subprocess.run([binary, "--version"], capture_output=True, timeout=10, check=True)
            return out.stdout.decode().strip()
        # prosody is a Lua script that names its source directory, which holds the version.
        text = Path(binary).read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("CFG_SOURCEDIR="):
                src = line.split("=", 1)[1].strip().strip(";").strip("'\"")
                return (Path(src) / "prosody.version").read_text().strip()
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        pass
    return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each window (default 5)")
    p.add_argument("--connections", type=int, default=50, help="echo test connections (default 50)")
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=20,
        help="concurrent loops in the connect test (default 20)",
    )
    p.add_argument("--size", type=int, default=64, help="message size in bytes (default 64)")
    p.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured echo seconds per server (default 1)"
    )
    p.add_argument(
        "--baselines",
        default=None,
        help="comma-separated baselines to interleave with mpnet, from "
        f"{','.join(BASELINE_KINDS)} (default: uvloop, or what --loop says)",
    )
    p.add_argument(
        "--loop",
        choices=("uvloop", "asyncio", "both"),
        default="uvloop",
        help="event loop of the Python baseline: 'asyncio' alone means --baselines asyncio, "
        "'both' means --baselines uvloop,asyncio; with --baselines, 'asyncio' or 'both' add "
        "the stdlib-loop server to the list (default uvloop)",
    )
    p.add_argument("--node", default="node", help="the node binary (default: node on PATH)")
    p.add_argument(
        "--node-sched",
        choices=("rr", "none"),
        default=None,
        help="NODE_CLUSTER_SCHED_POLICY for the Node cluster (default: Node's own, rr on Linux: "
        "the primary accepts and hands connections to the worker)",
    )
    p.add_argument(
        "--prosody", default="prosody", help="the prosody binary (default: prosody on PATH)"
    )
    p.add_argument(
        "--prosody-opportunistic-writes",
        action="store_true",
        help="set network_settings.opportunistic_writes = true (default: Prosody's default, "
        "false: every write waits for the next pass of the epoll loop)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin loadgen to the first CPU and the server's process tree to the last one",
    )
    p.add_argument(
        "--together",
        action="store_true",
        help="run the kinds at the same time, each with its own loadgen, over the same windows "
        "(with --pin, on the same CPU): the per-window ratio cancels the machine's drift",
    )
    p.add_argument("--no-mpnet", action="store_true", help="measure the baseline(s) only")
    p.add_argument(
        "--metrics",
        action="store_true",
        help="measure mpnet with metrics off against on (mpnet-m, scraped every second) and on "
        "with the callback histogram (mpnet-h); without --baselines, no other baseline",
    )
    p.add_argument(
        "--mpnet-cmd",
        default=None,
        help="command that runs the mpnet CLI (default: the 'mpnet' script next to this Python, "
        "else on PATH)",
    )
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="also run mpnet from this other checkout (its directory holding mpnet/, put first "
        "on PYTHONPATH) as the kind 'mpnet-ref': a before/after A/B in the same run, e.g. "
        "git archive HEAD~3 | tar -x -C /tmp/old",
    )
    p.add_argument("--loadgen", type=Path, default=LOADGEN, help="path of the loadgen binary")
    p.add_argument(
        "--start-timeout", type=float, default=30.0, help="seconds to wait for a server's port"
    )
    p.add_argument("--json", type=Path, help="also write every run's raw figures to this file")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.connections < 1 or args.size < 1:
        p.error("--rounds, --seconds, --connections and --size must be positive")
    if not args.loadgen.exists():
        p.error(f"{args.loadgen} not found: run bench/build.sh first")
    args.server_cpu = args.loadgen_cpu = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            p.error("--pin needs at least two CPUs")
        args.loadgen_cpu, args.server_cpu = cpus[0], cpus[-1]
    args.kinds, args.skipped = choose_kinds(p, args)
    if args.together and len(args.kinds) < 2:
        p.error("--together needs at least two kinds to run together")
    if args.mpnet_cmd:
        args.mpnet_cmd = args.mpnet_cmd.split()
    else:
        beside = Path(sys.executable).with_name("mpnet")
        found = str(beside) if beside.exists() else shutil.which("mpnet")
        args.mpnet_cmd = [found] if found else [sys.executable, "-m", "mpnet"]
    return args


@contextlib.contextmanager
def running(
    kind: str, workdir: Path, args: argparse.Namespace, slow_stops: list[str]
) -> Iterator[Server]:
    """Start a server of *kind* for the block and stop it by PID afterwards, whatever happens;
    a slow stop is noted in *slow_stops*, an unexpected exit status printed with its log."""
    server = start_server(kind, workdir, args)
    try:
        yield server
    finally:
        took = server.stop()
        if took > 5:
            slow_stops.append(f"{kind} took {took:.1f} s to stop after SIGTERM")
        if server.proc.returncode not in (0, -signal.SIGTERM):
            print(
                f"  ! {kind} exited with status {server.proc.returncode}; "
                f"log ends with:\n{tail(server.log)}"
            )


def run_round(
    servers: list[Server],
    rnd: int,
    args: argparse.Namespace,
    runs: list[Run],
    warmup_errors: list[tuple[str, int, dict[str, int]]],
) -> None:
    """Warm each server up, then measure every test over *servers* in one window (one server:
    the normal mode; several: --together), appending to *runs* and printing as it goes."""
    for server in servers:
        errs = warm_up(server, args)
        if errs:
            warmup_errors.append((server.kind, rnd, errs))
            print(f"  ! {server.kind} warm-up errors: {fmt_errors(errs)}")
    for test in TESTS:
        window = measure(servers, test, rnd, args)
        runs.extend(window)
        for run in window:
            print_run(run)
        if len(window) > 1:
            print_window(window)


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved rounds and print the report."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    kinds = args.kinds
    for line in args.skipped:
        print(f"!!! {line}")
    if not kinds:
        print("!!! nothing left to run")
        return EXIT_SKIPPED
    print(
        f"bench_echo: kinds {kinds}, {args.rounds} round(s), {args.seconds} s windows, "
        f"load average {load_average()}, "
        f"{os.cpu_count()} CPUs"
        + (
            f", loadgen on CPU {args.loadgen_cpu}, servers on CPU {args.server_cpu}"
            if args.pin
            else ""
        )
        + (", together: one loadgen per server, all in the same windows" if args.together else "")
    )
    if args.together and not args.pin:
        print("note: without --pin the servers may run on different CPUs, whose drift differs")
    if "mpnet" in kinds:
        print(f"mpnet command: {' '.join(args.mpnet_cmd)}")
    for kind in ("node", "prosody"):
        if kind in kinds:
            binary = getattr(args, kind)
            extra = ""
            if kind == "node":
                extra = f", cluster scheduling {args.node_sched or 'Node default (rr on Linux)'}"
            else:
                writes = "true" if args.prosody_opportunistic_writes else "false (default)"
                extra = f", network_backend epoll, opportunistic_writes {writes}"
            print(f"{kind}: {binary} {binary_version(kind, binary)}{extra}")

    runs: list[Run] = []
    warmup_errors: list[tuple[str, int, dict[str, int]]] = []
    slow_stops: list[str] = []
    interrupted = False
    failure = None
    with tempfile.TemporaryDirectory(prefix="mpnet-bench-") as tmp:
        workdir = Path(tmp)
        try:
            for rnd in range(1, args.rounds + 1):
                # Rotate the order so that no kind always runs first (or right after another);
                # together, so that no kind's loadgen is always launched first.
                order = kinds[(rnd - 1) % len(kinds) :] + kinds[: (rnd - 1) % len(kinds)]
                print(
                    f"round {rnd}/{args.rounds}: {(' + ' if args.together else ' -> ').join(order)}"
                    f"{' together' if args.together else ''}, load average "
                    f"{load_average()}"
                )
                if args.together:
                    with contextlib.ExitStack() as stack:
                        servers = [
                            stack.enter_context(running(kind, workdir, args, slow_stops))
                            for kind in order
                        ]
                        run_round(servers, rnd, args, runs, warmup_errors)
                else:
                    for kind in order:
                        with running(kind, workdir, args, slow_stops) as server:
                            run_round([server], rnd, args, runs, warmup_errors)
        except (KeyboardInterrupt, Interrupted):
            interrupted = True
            print("\ninterrupted: servers stopped; partial results follow")
        except (RuntimeError, psutil.Error, OSError, ValueError, subprocess.SubprocessError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
            print(f"\n!!! benchmark aborted: {failure}")

    if not runs:
        return 130 if interrupted else 1 if failure is None else 2
    summarize(runs, kinds, args)
    for line in slow_stops:
        print(f"note: {line}")
    for line in args.skipped:
        print(f"note: skipped {line}")
    had_errors = report_errors(runs, warmup_errors)
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "kind": r.kind,
                        "round": r.round,
                        "together": args.together,
                        "test": r.test,
                        "loadgen": r.result,
                        "server_cpu_s": r.server_cpu,
                        "cpu_by_process": r.cpu_by_process,
                        "wall_s": r.wall,
                        "loadgen_cpu_s": r.loadgen_cpu,
                        "per_cpu_s": r.per_cpu,
                        "tree_changed": r.tree_changed,
                    }
                    for r in runs
                ],
                indent=1,
            )
        )
    if failure:
        print(f"!!! the benchmark did not finish: {failure}")
        return 2
    if interrupted:
        return 130
    if had_errors:
        return 1
    return EXIT_SKIPPED if args.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
