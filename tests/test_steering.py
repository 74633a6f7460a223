"""Steering new connections away from stalled or retiring workers (mpnet/steering.py).

Three layers: the program and the group-order mirror in pure Python; the same against a real
reuseport group of plain sockets made here (which socket does the kernel pick when members are
excluded, and how does it reorder a group after a close and a new member); and end to end, a
server whose worker is stuck in a callback. Kernels that refuse the program skip with the reason.
"""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import (
    DEADLINE,
    PID_MODULE,
    Client,
    config,
    run_in_private_netns,
    run_mpnet,
    status,
    wait_for,
)

from mpnet import steering
from mpnet.pure.config import ConfigError, parse_config

# -- pure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "positions", [[0], [3], [0, 1], [1, 2], [0, 2, 5], [4, 0, 2], list(range(7)), [6]]
)
def test_program_maps_every_hash_onto_the_given_positions_only(positions):
    program = steering.build_program(positions)
    chosen = Counter(steering.run_program(program, h * 2654435761) for h in range(4000))
    assert set(chosen) == set(positions)
    # every position gets its share of hashes (mod n: within a few percent here)
    assert min(chosen.values()) > 4000 / len(positions) * 0.8


def test_program_refuses_nothing_to_choose_from():
    with pytest.raises(ValueError):
        steering.build_program([])


def test_group_order_moves_the_last_member_into_a_hole():
    order = steering.GroupOrder()
    for key in "abcd":
        order.add(key)
    order.remove("b")
    assert order.members == ["a", "d", "c"]
    order.add("e")
    assert order.members == ["a", "d", "c", "e"]
    order.sync(["a", "d"])  # the ledger shrank to two slots
    assert [order.position(k) for k in ("a", "d")] == [0, 1]


class FakeHandle:
    def __init__(self, slot, state="ready", heartbeat=100.0, accepting=True, kill_at=None):
        self.slot, self.state, self.last_heartbeat = slot, state, heartbeat
        self.accepting, self.kill_at = accepting, kill_at


def test_healthy_slots_are_ready_accepting_recent_and_wanted():
    workers = [
        FakeHandle(0),
        FakeHandle(1, heartbeat=98.0),  # late by 2 s
        FakeHandle(2, state="booting"),
        FakeHandle(3, state="draining"),
        FakeHandle(4),  # beyond the slot count (TTOU)
        FakeHandle(2, kill_at=200.0),  # being killed
    ]
    assert steering.healthy_slots(workers, 4, 1.0, 100.5) == {0}
    assert steering.healthy_slots(workers, 4, 0, 100.5) == {0, 1}  # stall_timeout 0: off


def test_load_shares_pour_new_connections_into_the_less_busy_past_the_margin():
    assert steering.load_shares({0: 100, 1: 130}, 0, 64, skewed=False) is None  # within it
    # A trickle: all to the lightest, the others keep one entry each.
    assert steering.load_shares({0: 0, 1: 100, 2: 90}, 0, 20, skewed=False) == {0: 32, 1: 1, 2: 1}
    # A burst of 300 expected: 100 fill the gap, the other 200 are spread evenly.
    shares = steering.load_shares({0: 0, 1: 100}, 300, 20, skewed=False)
    assert shares == {0: 21, 1: 11}
    # Three slots, 60 arriving: they lift the two lightest to 50 (40 to slot 0, 20 to slot 1).
    assert steering.load_shares({0: 10, 1: 30, 2: 200}, 60, 20, skewed=False) == {
        0: 21,
        1: 11,
        2: 1,
    }
    # Hysteresis: once skewed, balancing goes on until the gap is within half the margin.
    assert steering.load_shares({0: 80, 1: 100}, 0, 20, skewed=False) is None
    assert steering.load_shares({0: 85, 1: 100}, 0, 20, skewed=True) is not None
    assert steering.load_shares({0: 90, 1: 100}, 0, 20, skewed=True) is None
    assert steering.load_shares({0: 0, 1: 1000}, 0, 0, skewed=False) is None  # margin 0: off
    assert steering.load_shares({0: 1000}, 0, 20, skewed=False) is None  # one slot


def test_arrival_rate_follows_served_totals_across_a_replaced_worker():
    rate = steering.ArrivalRate()
    assert rate.update({11: 0, 12: 0}, 100.0) == 0
    assert rate.update({11: 60, 12: 40}, 101.0) == 100  # a whole horizon passed: the new rate
    # pid 11 died (its total is gone, not counted negative); its replacement 13 accepted 20.
    assert rate.update({12: 70, 13: 20}, 101.5) == 100
    # Half a horizon without anything new: halfway down.
    assert rate.update({12: 70, 13: 20}, 101.75) == 50


def test_load_margin_is_a_count_of_connections():
    assert _config("")["load_margin"] == 64
    assert _config("load_margin = 0\n")["load_margin"] == 0
    with pytest.raises(ConfigError, match=r"key 'load_margin': .*an integer \(0 or more\)"):
        _config("load_margin = -1\n")


def _config(text):
    return parse_config('modules = ["echo"]\n' + text, "mpnet.toml", Path("."))


def test_stall_timeout_must_be_below_worker_timeout():
    with pytest.raises(ConfigError, match=r"key 'stall_timeout': must be below worker_timeout"):
        _config("worker_timeout = 2\nstall_timeout = 2\n")
    assert _config("")["stall_timeout"] == 1.0
    assert _config("worker_timeout = 1\n")["stall_timeout"] == 0.5  # unset: follows it down
    assert _config("worker_timeout = 0\nstall_timeout = 5\n")["stall_timeout"] == 5
    assert _config("stall_timeout = 0\n")["stall_timeout"] == 0


# -- a real reuseport group -----------------------------------------------------------------


def _listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


@pytest.fixture
def group():
    """Four listening sockets in one reuseport group; closed afterwards."""
    first = _listener(0)
    port = first.getsockname()[1]
    socks = [first] + [_listener(port) for _ in range(3)]
    try:
        steering.attach(first, steering.build_program([0]))
    except OSError as exc:
        for sock in socks:
            sock.close()
        pytest.skip(f"kernel refuses SO_ATTACH_REUSEPORT_CBPF: {exc}")
    steering.detach(first)
    yield port, socks
    for sock in socks:
        sock.close()


def _which(socks: list[socket.socket], port: int) -> int:
    """Connect once; the index in *socks* of the socket that got the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        live = [s for s in socks if s.fileno() != -1]
        readable, _, _ = select.select(live, [], [], 5)
        assert len(readable) == 1, readable
        conn, _ = readable[0].accept()
        conn.close()
        return socks.index(readable[0])


def test_kernel_picks_only_the_healthy_members(group):
    port, socks = group
    for healthy in ([0, 2], [1], [3, 1], [0, 1, 3]):
        steering.attach(socks[0], steering.build_program(sorted(healthy)))
        seen = Counter(_which(socks, port) for _ in range(60))
        assert set(seen) == set(healthy), (healthy, seen)
    steering.detach(socks[0])
    seen = Counter(_which(socks, port) for _ in range(80))
    assert set(seen) == {0, 1, 2, 3}


def test_kernel_follows_a_table_that_repeats_positions(group):
    port, socks = group
    steering.attach(socks[0], steering.build_program([0, 0, 0, 0, 0, 0, 0, 2]))
    seen = Counter(_which(socks, port) for _ in range(80))
    assert set(seen) <= {0, 2} and seen[0] > 3 * seen[2], seen  # 7 in 8 expected at 0
    steering.detach(socks[0])


def test_group_order_mirror_matches_the_kernel_after_close_and_add(group):
    port, socks = group
    order = steering.GroupOrder()
    for sock in socks:
        order.add(sock)
    socks[1].close()
    order.remove(socks[1])
    newcomer = _listener(port)
    socks.append(newcomer)
    order.add(newcomer)
    for position, expected in enumerate(order.members):
        steering.attach(socks[0], steering.build_program([position]))
        for _ in range(5):
            assert socks[_which(socks, port)] is expected, position
    # A position outside the group: the kernel's own hash picks any live member.
    steering.attach(socks[0], [(steering.BPF_RET_K, 0, 0, 10)])
    assert {_which(socks, port) for _ in range(40)} == {0, 2, 3, 4}


def test_queued_reads_a_listeners_accept_queue(group):
    port, socks = group
    steering.attach(socks[0], steering.build_program([2]))
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        wait_for(lambda: steering.queued(socks[2]) == 3, 5, "three queued connections")
        assert steering.queued(socks[0]) == 0
    finally:
        for client in clients:
            client.close()


# -- end to end -----------------------------------------------------------------------------

STALL_MODULE = """\
import os, time
class listener:
    def onconnect(conn):
        conn.write(f"{os.getpid()}\\n")
    def onincoming(conn, data):
        if data.startswith(b"stall"):
            conn.write("stalling\\n")
            time.sleep(float(data.split()[1]))
        else:
            conn.write(data)
module.provides("net", listener=listener, default_port=0)
"""


class Greeted:
    """Open a connection in a thread and record when its greeting (the worker's pid) came."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.opened = time.monotonic()
        self.latency: float | None = None
        self.pid: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(port, timeout), daemon=True)
        self._thread.start()

    def _run(self, port: int, timeout: float) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(64)
                    if not chunk:
                        raise ConnectionError(f"closed before the greeting (got {data!r})")
                    data += chunk
                self.latency = time.monotonic() - self.opened
                self.pid = int(data)
        except BaseException as exc:  # recorded, asserted by the test
            self.error = exc

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "a client is still waiting for its greeting"


def _stall_worker(port: int, seconds: float) -> tuple[socket.socket, int, float]:
    """Connect, trigger the stall in whichever worker answered; (its socket, pid, start time)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    pid = int(sock.recv(64))
    sock.sendall(f"stall {seconds}\n".encode())
    assert sock.recv(64) == b"stalling\n"
    return sock, pid, time.monotonic()


def _skip_without_steering(server) -> None:
    if "steering off" in server.log:
        pytest.skip("kernel refused the reuseport program: " + server.log)


@pytest.mark.server
def test_new_connections_avoid_a_stalled_worker_which_gets_them_back(mpnet, write_module):
    path = write_module("stall", STALL_MODULE)
    server = mpnet(config([str(path)], workers=2, worker_timeout=30, log_level="debug"))
    port = server.port("stall")
    pids = {h.pid for h in server.workers()}
    assert len(pids) == 2
    stalled_sock, stalled, began = _stall_worker(port, 8)
    try:
        early = [Greeted(port) for _ in range(20)]  # about half queue at the stalled worker
        wait_for(lambda: time.monotonic() - began >= 2.0, 5, "2 s into the stall")
        late = []
        while time.monotonic() - began < 5.0:
            late.append(Greeted(port))
            time.sleep(0.05)  # pacing the load, not synchronisation
        for client in late:
            client.join(DEADLINE)
        _skip_without_steering(server)
        slow = [(c.latency, c.error) for c in late if c.error or c.latency > 1.0]
        assert not slow, f"{len(slow)} of {len(late)} waited > 1 s: {slow[:5]}"
        assert {c.pid for c in late} == pids - {stalled}
        for client in early:
            client.join(DEADLINE)
        assert [c.error for c in early if c.error] == []  # queued ones: served, never reset
        assert stalled in {c.pid for c in early}, "none queued at the stalled worker?"
        assert all(c.latency > 5 for c in early if c.pid == stalled)
        # Recovered: the kernel chooses its sockets again.
        wait_for(
            lambda: _greet(port) == stalled, DEADLINE, "the recovered worker to get connections"
        )
    finally:
        stalled_sock.close()


def _greet(port: int) -> int:
    client = Greeted(port, timeout=5)
    client.join(10)
    if client.error:
        raise client.error
    assert client.pid is not None
    return client.pid


@pytest.mark.server
def test_a_worker_killed_by_worker_timeout_is_steered_around(mpnet, write_module):
    path = write_module("stall", STALL_MODULE)
    server = mpnet(config([str(path)], workers=2, worker_timeout=4, log_level="debug"))
    port = server.port("stall")
    before = server.worker_pids()
    stalled_sock, stalled, began = _stall_worker(port, 60)
    try:
        early = [Greeted(port) for _ in range(20)]
        wait_for(lambda: time.monotonic() - began >= 2.0, 5, "2 s into the stall")
        late = []
        while time.monotonic() - began < 8.0:  # across the kill and the replacement's boot
            late.append(Greeted(port))
            time.sleep(0.05)
        for client in late + early:
            client.join(DEADLINE)
        _skip_without_steering(server)
        server.wait_log(r"event loop blocked", what="the stalled worker to be killed")
        slow = [(c.latency, c.error) for c in late if c.error or c.latency > 1.0]
        assert not slow, f"{len(slow)} of {len(late)} waited > 1 s: {slow[:5]}"
        assert [c.error for c in early if c.error] == []
        assert stalled not in {c.pid for c in early + late}
        replacement = wait_for(
            lambda: server.worker_pids() - before,
            DEADLINE,
            "the replacement worker",
        )
        # the queued ones went to the replacement, which gets new connections too
        assert {c.pid for c in early} & replacement
        wait_for(lambda: _greet(port) in replacement, DEADLINE, "connections to the replacement")
    finally:
        stalled_sock.close()


TTOU_SCRIPT = """\
import errno, json, signal, subprocess, sys, threading
from collections import Counter
from pathlib import Path
sys.path.insert(0, {tests!r})
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("0")  # this namespace's own, never the host's
from harness import DEADLINE, Server, config, wait_for
from test_steering import STALL_MODULE, _greet
directory = Path({directory!r})
module = directory / "stall.py"
module.write_text(STALL_MODULE)
server = Server(directory, config([str(module)], workers=4, log_level="debug"))
results = Counter()
stop = threading.Event()

def load():
    while not stop.is_set():
        try:
            _greet(port)
            results["ok"] += 1
        except (OSError, AssertionError) as exc:
            code = getattr(exc, "errno", None)
            results[errno.errorcode.get(code, repr(exc)) if code else repr(exc)] += 1

threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
try:
    server.start()
    Path({pidfile!r}).write_text(str(server.pid))
    port = server.port("stall")
    for thread in threads:
        thread.start()
    wait_for(lambda: results["ok"] > 200, DEADLINE, "connect load")
    for count in (3, 2, 1):
        server.signal(signal.SIGTTOU)
        server.wait_log(rf"worker count \\d -> {{count}}", what=f"{{count}} workers")
        wait_for(lambda n=count: len(server.workers()) == n, DEADLINE, f"{{count}} workers")
    before = results["ok"]
    wait_for(lambda: results["ok"] > before + 100, DEADLINE, "load after the last TTOU")
finally:
    stop.set()
    for thread in threads:
        thread.join(DEADLINE)
    server.stop()
print(json.dumps({{
    "results": results,
    "steering_off": "steering off" in server.log,
    "warned": "may be reset" in server.log,
    "steered": server.log.count("removing slots: new connections steered away"),
}}))
"""


@pytest.mark.server
def test_fewer_workers_under_connect_load_resets_nothing(tmp_path):
    """TTOU three times under connect load, in a network namespace of our own with
    net.ipv4.tcp_migrate_req = 0: steering drains each removed slot, so nothing is reset."""
    report = run_in_private_netns(tmp_path, TTOU_SCRIPT, timeout=90)
    if report["steering_off"]:
        pytest.skip("the kernel refused the reuseport program")
    assert set(report["results"]) == {"ok"}, report["results"]
    assert report["results"]["ok"] > 300
    assert report["steered"] == 3 and not report["warned"]


@pytest.mark.server
def test_reload_while_a_worker_is_stalled_keeps_every_connection(mpnet, write_module):
    """Steering active across a reload: the stalled worker's successor takes its slot (and its
    queue); connections opened once the stall was noticed are greeted at once; none fails."""
    path = write_module("stall", STALL_MODULE)
    server = mpnet(config([str(path)], workers=2, worker_timeout=30, log_level="debug"))
    port = server.port("stall")
    stalled_sock, stalled, began = _stall_worker(port, 6)
    try:
        clients = [Greeted(port) for _ in range(10)]
        wait_for(lambda: time.monotonic() - began >= 2.0, 5, "2 s into the stall")
        server.signal(signal.SIGHUP)
        steered = []
        while "reload complete: generation 2" not in server.log:
            assert time.monotonic() - began < DEADLINE, "the reload did not complete"
            steered.append(Greeted(port))
            time.sleep(0.05)  # pacing the load, not synchronisation
        for client in clients + steered:
            client.join(DEADLINE)
        _skip_without_steering(server)
        assert [c.error for c in clients + steered if c.error] == []
        slow = [c.latency for c in steered if c.latency > 1.0]
        assert not slow, f"{len(slow)} of {len(steered)} waited > 1 s"
        assert stalled not in {c.pid for c in steered}
    finally:
        stalled_sock.close()


def _greeted_pid(port: int) -> tuple[Client, int]:
    client = Client(port, timeout=DEADLINE)
    return client, int(client.read_until(b"\n"))


@pytest.mark.server
def test_new_connections_go_mostly_to_the_worker_that_churn_left_lighter(mpnet, write_module):
    """Long-lived connections, then every one of one worker's closes: without balancing the
    hash would split the next ones evenly and keep the gap (about 100 here, rarely below 70).
    With it the gap closes, give or take what arrives between two heartbeats (the counts'
    lag): 25 connections at this pace."""
    path = write_module("pid", PID_MODULE)
    server = mpnet(config([str(path)], workers=2, load_margin=20, log_level="debug"))
    port = server.port("pid")
    held: dict[int, list[Client]] = {pid: [] for pid in server.worker_pids()}
    try:
        for _ in range(200):
            client, pid = _greeted_pid(port)
            held[pid].append(client)
        lighter, heavier = sorted(held, key=lambda pid: len(held[pid]))
        for client in held[lighter]:
            client.close()
        held[lighter].clear()

        def balancing() -> bool:
            now = status(server)
            slots = {w["pid"]: str(w["slot"]) for w in now["workers"]}
            shares = now["steering"]["load_shares"]
            return bool(shares) and shares[slots[lighter]] > shares[slots[heavier]]

        wait_for(balancing, DEADLINE, "the master to see the gap and share out by load")
        shown = run_mpnet(server.directory, "status", "-c", str(server.config_path))
        assert "new connections balanced by load (slot" in shown.stdout, shown.stdout
        began = time.monotonic()
        for n in range(200):  # arriving over 2 s, as reconnecting clients would
            time.sleep(max(0.0, began + n / 100 - time.monotonic()))  # pacing, not waiting
            client, pid = _greeted_pid(port)
            held[pid].append(client)
        _skip_without_steering(server)
        gap = len(held[heavier]) - len(held[lighter])
        assert abs(gap) <= 50, {pid: len(clients) for pid, clients in held.items()}
    finally:
        for clients in held.values():
            for client in clients:
                client.close()
