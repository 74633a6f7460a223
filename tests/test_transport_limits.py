"""Timeouts, backpressure and limits, with Prosody's key names, measured on real sockets.

``read_timeout`` / ``onreadtimeout``, ``send_timeout``, backpressure (``ondrain``, ``pause``,
``resume``, ``buffered``), ``max_send_buffer_size``, ``max_connections`` (per worker),
``max_connections_per_ip`` (per service), ``limit_message``, running out of file descriptors,
and what slow or greedy peers cost in memory (worker RSS via psutil).
"""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import threading
import time

import psutil
import pytest
from harness import Client, config, wait_for, worker_status

pytestmark = pytest.mark.server

# One module for most tests: greets, echoes, and obeys a few commands.
TOOLS = """
import mpnet.workers.connection
mpnet.workers.connection.LIMIT_LOG_EVERY = 1.0  # report refusals every second, not every 10 s

paused = set()
class listener:
    def onconnect(conn):
        module.log("info", "onconnect %s", conn.id)
        conn.write("hi\\n")
    def onincoming(conn, data):
        if data.startswith(b"flood "):
            ok, chunk = True, b"z" * 1048576
            for _ in range(int(data.split()[1])):
                ok = conn.write(chunk)
                if not ok:
                    break
            module.log("info", "flooded %s ok=%s buffered=%d", conn.id, ok, conn.buffered())
        elif data == b"pause\\n":
            conn.pause()
            paused.add(conn)
            conn.write("paused\\n")
        elif data == b"resume\\n":
            for other in list(paused):
                other.resume()
                paused.discard(other)
            conn.write("resumed\\n")
        else:
            conn.write(data)
    def ondrain(conn):
        module.log("info", "ondrain %s buffered=%d", conn.id, conn.buffered())
    def ondisconnect(conn, err):
        paused.discard(conn)
        module.log("info", "ondisconnect %s %s", conn.id, err)
module.provides("net", listener=listener, default_port=0)
"""

# onreadtimeout keeps the connection the first time, lets it go the second time.
PATIENT = """
timeouts = {}
class listener:
    def onconnect(conn):
        conn.write("hi\\n")
    def onincoming(conn, data):
        conn.write(data)
    def onreadtimeout(conn):
        timeouts[conn] = timeouts.get(conn, 0) + 1
        module.log("info", "onreadtimeout %s #%d", conn.id, timeouts[conn])
        if timeouts[conn] == 1:
            conn.write("still there?\\n")
            return True
        return False
    def ondisconnect(conn, err):
        module.log("info", "ondisconnect %s %s", conn.id, err)
module.provides("net", listener=listener, default_port=0)
"""


def _worker(server) -> psutil.Process:
    workers = wait_for(server.workers, what="a worker")
    assert len(workers) == 1
    return workers[0]


def _rss(process: psutil.Process) -> int:
    return process.memory_info().rss


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def test_read_timeout_asks_onreadtimeout_then_closes(mpnet, write_module):
    patient = write_module("patient", PATIENT)
    tools = write_module("tools", TOOLS)
    text = config(
        [str(patient), str(tools)], workers=1, patient_ports=[0], tools_ports=[0],
        read_timeout=30, patient_read_timeout=1,
    )  # fmt: skip
    server = mpnet(text)
    stop, failures = threading.Event(), []

    def chat(client: Client) -> None:  # sending keeps a connection alive
        try:
            while not stop.is_set():
                client.send(b"ping\n")
                assert client.read_until(b"\n") == b"ping\n"
                stop.wait(0.3)
        except Exception as exc:
            failures.append(exc)

    patient_port, tools_port = server.port("patient"), server.port("tools")
    with Client(patient_port) as idle, Client(patient_port) as chatty, Client(tools_port) as other:
        started = time.monotonic()
        for client in (idle, chatty, other):
            client.read_until(b"hi\n")
        chatter = threading.Thread(target=chat, args=(chatty,))
        chatter.start()
        try:
            # The first timeout asks the module, which keeps the connection...
            assert idle.read_until(b"\n", timeout=5) == b"still there?\n"
            assert time.monotonic() - started >= 0.9
            # ...the second one, a read_timeout later, closes it.
            assert idle.read_to_eof(timeout=5) == b""
            assert 1.9 <= time.monotonic() - started < 8
        finally:
            stop.set()
            chatter.join(10)
        assert failures == []
        # The other service has read_timeout = 30: still open.
        other.send(b"x\n")
        assert other.read_until(b"\n") == b"x\n"
    idle_id = server.wait_log(r"\[patient\] info: onreadtimeout (w0\.c\d+) #1").group(1)
    server.wait_log(rf"\[patient\] info: onreadtimeout {re.escape(idle_id)} #2")
    server.wait_log(rf"\[patient\] info: ondisconnect {re.escape(idle_id)} read timeout")
    timed_out = set(re.findall(r"onreadtimeout (w0\.c\d+)", server.log))
    assert timed_out == {idle_id}  # never the chatty one


def test_read_timeout_without_callback_closes(mpnet, write_module):
    tools = write_module("tools", TOOLS)
    server = mpnet(config([str(tools)], workers=1, tools_ports=[0], tools_read_timeout=1))
    with Client(server.port("tools")) as client:
        started = time.monotonic()
        client.read_until(b"hi\n")
        assert client.read_to_eof(timeout=5) == b""
        assert 0.9 <= time.monotonic() - started < 5
    server.wait_log(r"\[tools\] info: ondisconnect w0\.c1 read timeout")


def test_send_timeout_closes_a_peer_that_does_not_read(mpnet, write_module):
    tools = write_module("tools", TOOLS)
    text = config([str(tools)], workers=1, tools_ports=[0], send_timeout=60, tools_send_timeout=1)
    server = mpnet(text)
    port = server.port("tools")
    with Client(port) as stuck, Client(port) as bystander:
        stuck.read_until(b"hi\n")
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        started = time.monotonic()
        stuck.send(b"flood 8\n")
        match = server.wait_log(r"flooded w0\.c1 ok=True buffered=(\d+)")
        assert int(match.group(1)) > 1024 * 1024  # conn.buffered(): the queue mpnet holds
        server.wait_log(r"\[tools\] info: ondisconnect w0\.c1 send timeout", timeout=10)
        server.wait_log(
            r"service tools: closing connection w0\.c1 from 127\.0\.0\.1:\d+: send timeout "
            r"\(\d+ bytes unsent for 1s\)"
        )
        assert time.monotonic() - started < 6
        bystander.read_until(b"hi\n")
        bystander.send(b"fine\n")
        assert bystander.read_until(b"\n") == b"fine\n"


def test_max_send_buffer_size_closes_with_no_space_left(mpnet, write_module):
    tools = write_module("tools", TOOLS)
    text = config([str(tools)], workers=1, tools_ports=[0], tools_max_send_buffer_size=2_000_000)
    server = mpnet(text)
    with Client(server.port("tools")) as greedy:
        greedy.read_until(b"hi\n")
        greedy.send(b"flood 8\n")  # 8 MiB written at once to a peer that does not read
        server.wait_log(r"flooded w0\.c1 ok=False buffered=0")
        server.wait_log(r"\[tools\] info: ondisconnect w0\.c1 no space left in buffer")
        server.wait_log(
            r"service tools: closing connection w0\.c1 from 127\.0\.0\.1:\d+: no space left "
            r"in buffer \(more than max_send_buffer_size \(2000000\) bytes queued\)"
        )
        assert len(greedy.read_to_eof()) < 8 * 1024 * 1024


def test_pause_resume_from_the_module(mpnet, write_module):
    tools = write_module("tools", TOOLS)
    server = mpnet(config([str(tools)], workers=1, tools_ports=[0]))
    port = server.port("tools")
    with Client(port) as sleeper, Client(port) as waker:
        sleeper.read_until(b"hi\n")
        waker.read_until(b"hi\n")
        sleeper.send(b"pause\n")
        assert sleeper.read_until(b"\n") == b"paused\n"
        sleeper.send(b"are you there\n")
        # Nothing is read from a paused connection (let a little time pass to show it).
        sleeper.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sleeper.sock.recv(100)
        waker.send(b"resume\n")
        assert waker.read_until(b"\n") == b"resumed\n"
        assert sleeper.read_until(b"\n") == b"are you there\n"


def test_backpressure_keeps_memory_bounded_for_a_peer_that_sends_100_mb(mpnet, write_module):
    """The peer sends 100 MB to an echo and does not read the replies: once the reply queue
    passes the high-water mark mpnet stops reading from it, so the worker's memory stays flat;
    when the peer reads again, everything arrives intact and ``ondrain`` fires."""
    tools = write_module("tools", TOOLS)
    server = mpnet(config([str(tools)], workers=1, tools_ports=[0]))
    worker = _worker(server)
    port = server.port("tools")
    block = bytes(range(256)) * 4096  # 1 MiB
    total = 100 * len(block)
    sent = [0]
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        assert sock.recv(3) == b"hi\n"
        baseline = _rss(worker)

        def send_all() -> None:
            for _ in range(100):
                view = memoryview(block)
                while view:
                    count = sock.send(view[:65536])
                    sent[0] += count
                    view = view[count:]

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        # Wait until the sender is stuck: mpnet stopped reading.
        last = [-1, time.monotonic()]

        def stalled() -> bool:
            if sent[0] != last[0]:
                last[:] = [sent[0], time.monotonic()]
                return False
            return time.monotonic() - last[1] > 0.5

        wait_for(stalled, what="the sender to stall")
        stuck_at = sent[0]
        growth = _rss(worker) - baseline
        print(f"stalled after {stuck_at / 2**20:.1f} MiB; worker RSS +{growth / 2**20:.1f} MiB")
        assert stuck_at < 32 * 2**20  # kernel buffers and one write queue, not 100 MB
        assert growth < 16 * 2**20
        server.wait_log(r"\[tools\] info: onconnect")
        assert "ondrain" not in server.log
        # Now read everything: every byte comes back in order.
        expected = hashlib.sha256()
        for _ in range(100):
            expected.update(block)
        received, digest = 0, hashlib.sha256()
        sock.settimeout(20)
        while received < total:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {received} bytes"
            digest.update(chunk)
            received += len(chunk)
        sender.join(20)
        assert digest.hexdigest() == expected.hexdigest()
        assert _rss(worker) - baseline < 16 * 2**20
    finally:
        sock.close()
    server.wait_log(r"\[tools\] info: ondrain w0\.c1 buffered=0")


def test_max_connections_per_worker_with_limit_message(mpnet, write_module):
    tools = write_module("tools", TOOLS)
    text = config([str(tools)], workers=1, tools_ports=[0], max_connections=2)
    server = mpnet(text + 'limit_message = "busy, try later\\n"\n')
    port = server.port("tools")
    first, second = Client(port), Client(port)
    try:
        first.read_until(b"hi\n")
        second.read_until(b"hi\n")
        with Client(port) as third:
            assert third.read_to_eof() == b"busy, try later\n"
        server.wait_log(r"service tools refused 1 connection\(s\).*max_connections \(2\) reached")
        first.send(b"unharmed\n")
        assert first.read_until(b"\n") == b"unharmed\n"
        first.close()
        server.wait_log(r"ondisconnect w0\.c1")
        with Client(port) as fourth:
            assert fourth.read_until(b"\n") == b"hi\n"
    finally:
        first.close()
        second.close()
    # Refused ones never reach the module: the log is in order, so by the time the fourth
    # connection's onconnect has been read, any onconnect of a refused one would be there too.
    server.wait_log(r"\[tools\] info: onconnect", count=3)
    assert server.log.count("[tools] info: onconnect") == 3


def test_refusals_are_counted_and_logged_at_a_limited_rate(mpnet, write_module):
    tools = write_module("tools", TOOLS)
    server = mpnet(config([str(tools)], workers=1, tools_ports=[0], max_connections=1))
    port = server.port("tools")
    with Client(port) as holder:
        holder.read_until(b"hi\n")
        started = time.monotonic()
        for _ in range(20):
            with Client(port) as refused:
                assert refused.read_to_eof() == b""  # no limit_message: closed at once
        # The first refusal is reported at once, the other 19 in one line a second later.
        server.wait_log(r"refused 1 connection\(s\) since the last report: max_connections")
        server.wait_log(r"refused 19 connection\(s\) since the last report", timeout=5)
        assert time.monotonic() - started < 5
    assert server.log.count("refused") == 2
    # ... and counted in `mpnet status` (the next heartbeat carries it).
    wait_for(lambda: [w["refused"] for w in worker_status(server)] == [20], what="refused 20")


def test_max_connections_per_ip_is_per_service(mpnet, write_module):
    first = write_module("first", TOOLS)
    second = write_module("second", TOOLS)
    text = config(
        [str(first), str(second)], workers=1, first_ports=[0], second_ports=[0],
        first_max_connections_per_ip=2, limit_message="x", first_limit_message="y",
    )  # fmt: skip
    server = mpnet(text.replace('"x"', '"busy\\n"').replace('"y"', '"first is full\\n"'))
    clients = [Client(server.port("first")) for _ in range(2)]
    clients += [Client(server.port("second")) for _ in range(3)]
    try:
        for client in clients:
            assert client.read_until(b"\n") == b"hi\n"
        with Client(server.port("first")) as refused:
            assert refused.read_to_eof() == b"first is full\n"
        server.wait_log(r"service first refused 1 .*max_connections_per_ip \(2\) .*127\.0\.0\.1")
        clients[0].close()
        server.wait_log(r"\[first\] info: ondisconnect")
        with Client(server.port("first")) as again:
            assert again.read_until(b"\n") == b"hi\n"
    finally:
        for client in clients:
            client.close()


def test_max_connections_overridden_per_service(mpnet, write_module):
    first = write_module("first", TOOLS)
    second = write_module("second", TOOLS)
    text = config(
        [str(first), str(second)], workers=1, first_ports=[0], second_ports=[0],
        first_max_connections=1,
    )  # fmt: skip
    server = mpnet(text)
    with Client(server.port("first")) as one, Client(server.port("second")) as other:
        one.read_until(b"hi\n")
        other.read_until(b"hi\n")
        with Client(server.port("first")) as refused:
            assert refused.read_to_eof(timeout=2) == b""


def test_max_connections_per_ip_holds_across_workers(mpnet, write_module):
    tools = write_module("tools", TOOLS)
    server = mpnet(config([str(tools)], workers=2, tools_ports=[0], max_connections_per_ip=1))
    port = server.port("tools")
    clients = [Client(port) for _ in range(16)]  # spread over both workers by the kernel
    try:
        served = [c for c in clients if _outcome(c) == "served"]
        assert len(served) == 1
        # Both workers refused some: the limit held in each, counting the other's connection.
        for slot in (0, 1):
            server.wait_log(rf"worker {slot} \[tools\] warn: service tools refused \d+ ")
    finally:
        for client in clients:
            client.close()


def _holder(server, client: Client) -> psutil.Process:
    """The worker process that holds *client*'s connection."""

    def find() -> psutil.Process | None:
        local = client.sock.getsockname()
        for worker in server.workers():
            for conn in worker.net_connections("tcp"):
                if conn.raddr and (conn.raddr.ip, conn.raddr.port) == local:
                    return worker
        return None

    return wait_for(find, what="the worker holding the connection")


def test_per_ip_counts_of_a_killed_worker_are_released(mpnet, write_module):
    """A worker killed with SIGKILL never decrements its counts: the master zeroes its row
    when it reaps it, so the address is not locked out by connections that no longer exist."""
    tools = write_module("tools", TOOLS)
    server = mpnet(config([str(tools)], workers=2, tools_ports=[0], max_connections_per_ip=1))
    port = server.port("tools")
    with Client(port) as first:
        assert first.read_until(b"\n") == b"hi\n"
        with Client(port) as refused:
            assert _outcome(refused) == "closed"
        victim = _holder(server, first)
        victim.kill()
        assert first.read_to_eof() == b""
    server.wait_log(rf"worker \d \(pid {victim.pid}\) killed by signal SIGKILL")
    wait_for(lambda: len(server.workers()) == 2, what="the replacement worker")
    clients = [Client(port) for _ in range(8)]  # whichever worker takes them
    try:
        assert [_outcome(c) for c in clients].count("served") == 1
    finally:
        for client in clients:
            client.close()


def test_per_ip_limit_holds_across_a_reload(mpnet, write_module):
    """During a reload the draining generation's connections still count."""
    tools = write_module("tools", TOOLS)
    text = config(
        [str(tools)], workers=1, tools_ports=[0], max_connections_per_ip=1, graceful_timeout=30
    )
    server = mpnet(text)
    port = server.port("tools")
    with Client(port) as old:
        assert old.read_until(b"\n") == b"hi\n"
        server.signal(signal.SIGHUP)
        server.wait_log(r"reload complete: generation 2")
        server.wait_log(r"worker 0 \[mpnet\] info: stopping: waiting up to")
        with Client(port) as new:
            assert _outcome(new) == "closed"  # refused by generation 2: old is still open
        server.wait_log(r"worker 0 \[tools\] warn: service tools refused 1 .*127\.0\.0\.1")
        old.send(b"still served by generation 1\n")
        assert old.read_until(b"\n") == b"still served by generation 1\n"
    # The old worker learns of the close asynchronously: until it has, the address still counts.
    wait_for(lambda: _served_once(port), what="a connection served once the old one closed")


def _served_once(port: int) -> bool:
    with Client(port) as client:
        return _outcome(client) == "served"


EMFILE = """
import os, resource
# Leave this worker ~24 descriptors beyond what it uses at load time.
_limit = len(os.listdir("/proc/self/fd")) + 24
resource.setrlimit(resource.RLIMIT_NOFILE, (_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
class listener:
    def onconnect(conn):
        conn.write("hi\\n")
    def onincoming(conn, data):
        conn.write(data)
module.provides("net", listener=listener, default_port=0)
"""


def _outcome(client: Client) -> str:
    try:
        data = client.read_until(b"\n", timeout=5)
    except AssertionError as exc:
        return "closed" if "closed before" in str(exc) else "hung"
    except ConnectionResetError:
        return "closed"
    return "served" if data == b"hi\n" else repr(data)


def test_out_of_file_descriptors_no_busy_loop_and_recovery(mpnet, write_module):
    """uvloop (libuv) keeps a spare descriptor: on EMFILE it closes the spare, accepts and
    closes every pending connection, and reopens it. So: no busy loop, excess connections are
    closed at once (not left hanging), and the worker serves again when descriptors free up."""
    path = write_module("fdlimit", EMFILE)
    server = mpnet(config([str(path)], workers=1, fdlimit_ports=[0]))
    worker = _worker(server)
    port = server.port("fdlimit")
    fds_idle = worker.num_fds()
    clients = [Client(port) for _ in range(60)]
    try:
        outcomes = [_outcome(client) for client in clients]
        served = [c for c, o in zip(clients, outcomes, strict=True) if o == "served"]
        served_count, closed_count = outcomes.count("served"), outcomes.count("closed")
        print(
            f"60 connections at the limit: {served_count} served, {closed_count} closed; "
            f"worker fds {fds_idle} -> {worker.num_fds()}"
        )
        assert set(outcomes) == {"served", "closed"}
        assert len(served) >= 10
        # At the limit the worker idles: no busy loop on the listening socket.
        extra = [Client(port) for _ in range(10)]
        before = _cpu(worker)
        time.sleep(1.0)  # let time pass: the assertion is about CPU used meanwhile
        used = _cpu(worker) - before
        print(f"worker CPU time over 1 s at the descriptor limit: {used:.3f} s")
        assert used < 0.2
        assert [_outcome(client) for client in extra] == ["closed"] * 10
        for client in extra:
            client.close()
        # The connections already served carry on.
        served[0].send(b"still served\n")
        assert served[0].read_until(b"\n") == b"still served\n"
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: worker.num_fds() <= fds_idle + 1, what="the worker to close its sockets")
    # Recovered by itself: new connections are served again.
    fresh = [Client(port) for _ in range(5)]
    try:
        assert [_outcome(client) for client in fresh] == ["served"] * 5
    finally:
        for client in fresh:
            client.close()
    assert "Traceback" not in server.log


def test_slowloris_costs_bounded_memory_per_connection(mpnet, write_module):
    """500 clients that each trickle a byte at a time: the worker's memory per connection is
    a few KiB and does not grow while they trickle."""
    tools = write_module("tools", TOOLS)
    server = mpnet(config([str(tools)], workers=1, tools_ports=[0]))
    worker = _worker(server)
    port = server.port("tools")
    with Client(port) as warm:  # let the loop allocate its buffers first
        warm.read_until(b"hi\n")
    baseline = _rss(worker)
    clients = []
    try:
        for _ in range(500):
            client = Client(port)
            clients.append(client)
        for client in clients:
            client.read_until(b"hi\n")
        opened = _rss(worker)
        for _ in range(10):
            for client in clients:
                client.send(b"G")
            time.sleep(0.1)  # a slow client is slow: let time pass between bytes
        wait_for(lambda: server.log.count("onconnect") >= 501, what="all connections")
        trickled = _rss(worker)
        per_connection = (opened - baseline) / len(clients)
        print(f"500 slow connections: {per_connection / 1024:.1f} KiB each; "
              f"+{(trickled - opened) / 1024:.0f} KiB after 5000 trickled bytes")  # fmt: skip
        assert per_connection < 64 * 1024
        assert trickled - opened < 2 * 2**20
    finally:
        for client in clients:
            client.close()
