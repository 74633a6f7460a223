"""Several hosts for real: one network namespace per mpnet host and one for Redis, joined by veth
pairs on a bridge made by the test, with HAProxy (``send-proxy-v2``, health checks) in front.
Needs root, ``ip`` and ``haproxy``; skipped with the reason otherwise."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from harness import WELCOME, Client, RespClient, Server, config, free_port, wait_for

REDIS_SERVER = shutil.which("redis-server")
REDIS_BENCHMARK = shutil.which("redis-benchmark")
KV_PORT, CHAT_PORT, REDIS_PORT = 6380, 5434, 6379
NETNS_EXEC = ("ip", "netns", "exec")
PASSWORD = secrets.token_hex(8)  # Redis refuses other hosts without one (protected mode)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    for tool, package in (("ip", "iproute2"), ("haproxy", "haproxy")):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian {package})"
    if REDIS_SERVER is None or REDIS_BENCHMARK is None:
        return "redis-server / redis-benchmark not installed"
    name = f"mpnchk{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


WHY_NOT = _why_not()
pytestmark = [pytest.mark.server, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


def ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class Lan:
    """A bridge in the test's namespace (HAProxy's side) and namespaces plugged into it."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.bridge = f"mpb{self.tag}"
        self.namespaces: list[str] = []
        self.links: list[str] = []
        ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def host(self) -> tuple[str, str]:
        """A new namespace on the bridge: (its name, its address)."""
        index = len(self.namespaces) + 1
        netns, outside, inside = (f"mp{kind}{self.tag}{index}" for kind in "nvp")
        address = f"{self.subnet}.{10 + index}"
        ip("netns", "add", netns)
        self.namespaces.append(netns)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self.links.append(outside)
        ip("link", "set", inside, "netns", netns)
        ip("link", "set", outside, "master", self.bridge)
        ip("link", "set", outside, "up")
        ip("addr", "add", f"{address}/24", "dev", inside, netns=netns)
        ip("link", "set", inside, "up", netns=netns)
        ip("link", "set", "lo", "up", netns=netns)
        return netns, address

    def remove(self) -> None:
        for netns in self.namespaces:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        for link in reversed(self.links):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)


class NsServer(Server):
    """``mpnet serve`` inside a network namespace (``ip netns exec`` execs it: same pid)."""

    def __init__(self, directory: Path, config_text: str, netns: str) -> None:
        super().__init__(directory, config_text)
        self.netns = netns

    def argv(self, command: str, extra: tuple[str, ...]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().argv(command, extra)]


HAPROXY_CFG = """\
global
    maxconn 500
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    default-server send-proxy-v2
frontend kv
    bind 127.0.0.1:{kv}
    default_backend kv
backend kv
    balance roundrobin
    server a {a}:{kv_port} check check-send-proxy inter 300ms fall 2 rise 1
    server b {b}:{kv_port} check check-send-proxy inter 300ms fall 2 rise 1
frontend chat
    bind 127.0.0.1:{chat}
    default_backend chat
backend chat
    balance roundrobin
    server a {a}:{chat_port}
    server b {b}:{chat_port}
"""


@pytest.fixture
def lan():
    network = Lan()
    processes: list[subprocess.Popen[bytes]] = []
    servers: list[Server] = []
    network.processes = processes  # type: ignore[attr-defined]
    network.servers = servers  # type: ignore[attr-defined]
    try:
        yield network
    finally:
        for server in servers:
            server.stop()
        for proc in processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        network.remove()


def listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    assert proc.poll() is None, "exited early"
    try:
        conns = psutil.Process(proc.pid).net_connections("tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


def answers(proc: subprocess.Popen[bytes], address: str) -> bool:
    assert proc.poll() is None, "redis-server exited early"
    try:
        with RespClient(REDIS_PORT, host=address, timeout=2) as client:
            return client.call("PING").startswith(b"-NOAUTH")
    except (OSError, AssertionError):
        return False


def test_two_hosts_behind_haproxy_share_kv_and_chat_and_survive_losing_one(lan, tmp_path):
    redis_ns, redis_ip = lan.host()
    argv = [REDIS_SERVER, "--bind", redis_ip, "--port", str(REDIS_PORT), "--requirepass"]
    argv += [PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    redis = subprocess.Popen(
        [*NETNS_EXEC, redis_ns, *argv],
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    lan.processes.append(redis)
    wait_for(lambda: answers(redis, redis_ip), what="redis-server to answer over the bridge")
    hosts = []
    for _ in range(2):
        netns, address = lan.host()
        directory = tmp_path / netns
        directory.mkdir()
        text = config(
            ["kv", "chat"],
            workers=2,
            kv_interfaces=[address],
            chat_interfaces=[address],
            kv_ports=[KV_PORT],
            chat_ports=[CHAT_PORT],
            kv_proxy_protocol=True,
            chat_proxy_protocol=True,
            shared_backend="redis",
            redis_url=f"redis://:{PASSWORD}@{redis_ip}:{REDIS_PORT}/0",
        )
        server = NsServer(directory, text, netns)
        lan.servers.append(server)
        hosts.append((server.start(), address))
    (host_a, ip_a), (host_b, ip_b) = hosts
    fronts = {"kv": free_port(), "chat": free_port()}
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        HAPROXY_CFG.format(**fronts, a=ip_a, b=ip_b, kv_port=KV_PORT, chat_port=CHAT_PORT)
    )
    haproxy = subprocess.Popen(
        ["haproxy", "-db", "-f", str(cfg)],
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    lan.processes.append(haproxy)
    wait_for(lambda: listening(haproxy, fronts["chat"]), what="haproxy to listen")

    # kv: clients land on both hosts; INCR is exact across them
    pids_a, pids_b = host_a.worker_pids(), host_b.worker_pids()
    clients: dict[str, RespClient] = {}

    def one_on_each_host() -> bool:
        client = RespClient(fronts["kv"])
        pid = client.pid()
        side = "a" if pid in pids_a else "b" if pid in pids_b else "?"
        assert side != "?", f"pid {pid} is on neither host"
        if side in clients:
            client.close()
        else:
            clients[side] = client
        return len(clients) == 2

    wait_for(one_on_each_host, what="kv clients on both hosts")
    benchmark = subprocess.run(
        [REDIS_BENCHMARK, "-p", str(fronts["kv"]), "-t", "incr", "-n", "2000", "-c", "8", "-q"],
        capture_output=True,
        timeout=120,
    )
    assert benchmark.returncode == 0, benchmark.stdout
    acknowledged = 2000
    for client in clients.values():
        acknowledged += 1
        assert client.call("INCR", "counter:__rand_int__") == b":%d\r\n" % acknowledged

    # chat: one room and one set of nicks over both hosts
    chatters = []
    for _ in range(2):
        chatter = Client(fronts["chat"])
        assert WELCOME.match(chatter.read_until(b"\n"))
        chatters.append(chatter)
    chatters[0].send("/nick alice\n")
    chatters[1].read_until(b"is now known as alice\n")
    chatters[1].send("/nick Alice\n")
    chatters[1].read_until(b"! nick Alice is already taken")
    chatters[1].send("hello from the other one\n")
    chatters[0].read_until(b"> hello from the other one\n")
    for host, _ in hosts:  # round robin put one chatter on each host
        host.wait_log(r"\[chat\] info: guest\d+ joined from")

    # kill -9 host A: B's connections carry on, new ones go to B, every acknowledged INCR holds
    host_a.workers()
    os.killpg(host_a.pid, signal.SIGKILL)
    host_a.wait_exit()
    acknowledged += 1
    assert clients["b"].call("INCR", "counter:__rand_int__") == b":%d\r\n" % acknowledged

    def fresh_incr() -> bytes | None:
        """INCR on a new connection, or None if HAProxy still sent it to the dead host."""
        with contextlib.suppress(OSError, AssertionError), RespClient(fronts["kv"]) as client:
            return client.call("INCR", "counter:__rand_int__")
        return None

    reply = wait_for(fresh_incr, what="a new connection through HAProxy to be served by host B")
    assert reply == b":%d\r\n" % (acknowledged + 1)
    for client in clients.values():
        client.close()
    for chatter in chatters:
        chatter.close()
