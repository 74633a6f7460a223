"""The bundled chat module: nc-like clients on different workers talking through one room."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import threading

import pytest
from harness import WELCOME, Client, config, wait_for

pytestmark = pytest.mark.server


class ChatClient(Client):
    """A chat client that knows its nick and the worker slot that serves it."""

    def __init__(self, server, port: int) -> None:
        super().__init__(port)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        match = WELCOME.match(self.read_until(b"\n"))
        assert match, "no welcome line"
        self.nick = match.group(1).decode()
        local_port = self.sock.getsockname()[1]
        joined = server.wait_log(
            rf"worker (\d+) \[chat\] info: {self.nick} joined from 127\.0\.0\.1:{local_port}\b"
        )
        self.slot = int(joined.group(1))

    def line(self) -> str:
        return self.read_until(b"\n").decode()

    def expect(self, wanted: str) -> list[str]:
        """Read lines until *wanted* (a whole line, without its newline); return those skipped."""
        skipped = []
        while (line := self.line()) != wanted + "\n":
            skipped.append(line)
        return skipped

    def expect_prefix(self, prefix: str) -> str:
        """Read lines until one starts with *prefix* (room events may come in between)."""
        while not (line := self.line()).startswith(prefix):
            pass
        return line

    def expect_room(self, *names: str) -> None:
        """Ask /who until it lists exactly *names* (a just-closed connection may still be
        leaving)."""
        wanted = f"* in the room ({len(names)}): {', '.join(sorted(names, key=str.casefold))}\n"
        seen: list[str] = []

        def ask() -> bool:
            self.say("/who")
            seen.append(self.expect_prefix("* in the room ("))
            return seen[-1] == wanted

        wait_for(ask, timeout=10, what=f"/who to show {wanted!r}; saw {seen[-3:]}")

    def say(self, text: str | bytes) -> None:
        self.send(text if isinstance(text, bytes) else text + "\n")


def _chat_config(workers: int = 2, **chat_options) -> str:
    text = config(["chat"], workers=workers, chat_ports=[0])
    if chat_options:
        text += "[chat]\n" + "".join(f"{k} = {v}\n" for k, v in chat_options.items())
    return text


def clients_on_distinct_workers(server, port: int, count: int) -> list[ChatClient]:
    """One client on each of *count* worker slots (extra connections are closed)."""
    chosen: dict[int, ChatClient] = {}

    def attempt() -> bool:
        client = ChatClient(server, port)
        if client.slot in chosen:
            client.close()
        else:
            chosen[client.slot] = client
        return len(chosen) >= count

    wait_for(attempt, what=f"chat clients on {count} workers")
    return [chosen[slot] for slot in sorted(chosen)]


class Room:
    """A chat server and the clients a test opened (closed by the fixture)."""

    def __init__(self, server) -> None:
        self.server = server
        self.port = server.port("chat")
        self.clients: list[ChatClient] = []

    def on_workers(self, count: int) -> list[ChatClient]:
        found = clients_on_distinct_workers(self.server, self.port, count)
        self.clients.extend(found)
        return found

    def connect(self) -> ChatClient:
        client = ChatClient(self.server, self.port)
        self.clients.append(client)
        return client

    def worker_pid(self, client: ChatClient) -> int:
        return next(
            pid
            for pid in self.server.worker_pids()
            if re.search(rf"worker {client.slot} \(pid {pid}\b", self.server.log)
        )


@pytest.fixture
def chat(mpnet):
    """``chat(workers=2, **chat_options)`` -> a started :class:`Room`."""
    rooms: list[Room] = []

    def start(workers: int = 2, **options) -> Room:
        room = Room(mpnet(_chat_config(workers, **options)))
        rooms.append(room)
        return room

    try:
        yield start
    finally:
        for room in rooms:
            for client in room.clients:
                client.close()


def test_clients_on_different_workers_talk_to_each_other(chat):
    room = chat(workers=2)
    alice, bob = room.on_workers(2)
    assert alice.slot != bob.slot
    carol = room.connect()
    for client in (alice, bob, carol):
        client.expect(f"* {carol.nick} joined")
    alice.say(f"hello from worker {alice.slot}")
    for client in (alice, bob, carol):
        client.expect(f"<{alice.nick}> hello from worker {alice.slot}")
    bob.say("and hello back")
    for client in (alice, bob, carol):
        client.expect(f"<{bob.nick}> and hello back")


def test_messages_keep_one_order_for_everyone(chat):
    room = chat(workers=2)
    alice, bob = room.on_workers(2)
    for i in range(50):  # both talk at once
        alice.say(f"a{i}")
        bob.say(f"b{i}")
    transcripts = []
    for client in (alice, bob):
        lines = []
        while len(lines) < 100:
            line = client.line()
            if line.startswith("<"):
                lines.append(line)
        transcripts.append(lines)
    assert transcripts[0] == transcripts[1]
    assert [line for line in transcripts[0] if line.startswith(f"<{alice.nick}>")] == [
        f"<{alice.nick}> a{i}\n" for i in range(50)
    ]


def test_nick_is_unique_across_workers(chat):
    room = chat(workers=2)
    alice, bob = room.on_workers(2)
    old = alice.nick
    alice.say("/nick alice")
    bob.expect(f"* {old} is now known as alice")
    bob.say("/nick Alice")  # case-insensitively taken, on another worker
    bob.expect("! nick Alice is already taken; choose another with /nick NAME")
    bob.say("/nick bob")
    alice.expect(f"* {bob.nick} is now known as bob")
    alice.say("hi bob")
    bob.expect("<alice> hi bob")
    bob.say("/nick no spaces allowed")
    bob.expect_prefix("! invalid nick")


def test_racing_for_one_nick_from_every_worker_gives_it_to_exactly_one(chat):
    room = chat(workers=2)
    racers = room.on_workers(2) + [room.connect() for _ in range(4)]
    barrier = threading.Barrier(len(racers))
    results: dict[str, str] = {}

    def race(client: ChatClient) -> None:
        barrier.wait()
        client.say("/nick winner")
        while True:
            line = client.line()
            if line.startswith("! nick winner is already taken"):
                results[client.nick] = "refused"
                return
            if line.endswith(" is now known as winner\n"):
                name = line[2 : -len(" is now known as winner\n")]
                if name == client.nick:
                    results[client.nick] = "won"
                    return

    threads = [threading.Thread(target=race, args=(client,)) for client in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results.values()) == ["refused"] * (len(racers) - 1) + ["won"]


def test_who_lists_everyone_whichever_worker_holds_them(chat):
    room = chat(workers=2)
    alice, bob = room.on_workers(2)
    alice.say("/nick alice")
    alice.expect(f"* {alice.nick} is now known as alice")
    bob.expect_room("alice", bob.nick)
    alice.expect_room("alice", bob.nick)


def test_quit_says_bye_announces_and_frees_the_nick(chat):
    room = chat(workers=2)
    alice, bob = room.on_workers(2)
    alice.say("/nick alice")
    bob.expect(f"* {alice.nick} is now known as alice")
    alice.say("/quit")
    alice.expect("* Bye!")
    assert alice.read_to_eof() == b""
    bob.expect("* alice left (quit)")
    bob.expect_room(bob.nick)
    bob.say("/nick alice")  # free again
    bob.expect(f"* {bob.nick} is now known as alice")


def test_closing_or_losing_the_connection_announces_the_leave(chat):
    room = chat(workers=2)
    alice, bob = room.on_workers(2)
    alice.sock.shutdown(socket.SHUT_WR)  # a clean close (FIN), whatever alice left unread
    alice.read_to_eof()
    bob.expect(f"* {alice.nick} left")
    carol = room.connect()
    bob.expect(f"* {carol.nick} joined")
    carol.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    carol.close()  # a reset (RST)
    bob.expect(f"* {carol.nick} left (connection lost)")


def test_partial_lines_and_crlf(chat):
    room = chat(workers=2)
    alice, bob = room.on_workers(2)
    for byte in b"one byte at a time\r\n":  # a line that trickles in
        alice.send(bytes([byte]))
    bob.expect(f"<{alice.nick}> one byte at a time")
    alice.send("/ni")
    alice.send("ck piece")
    alice.send("meal\r")
    alice.send("\nfirst\nsecond\r\nthird\n")  # the end of one line and three more in one chunk
    bob.expect(f"* {alice.nick} is now known as piecemeal")
    for word in ("first", "second", "third"):
        bob.expect(f"<piecemeal> {word}")


def test_overlong_lines_are_dropped_with_a_message(chat):
    room = chat(workers=2, max_line=1024)
    alice, bob = room.on_workers(2)
    alice.say("x" * 5000)  # in one chunk
    alice.expect("! line too long (more than 1024 bytes), dropped")
    for _ in range(50):  # in many chunks: still one message
        alice.send("y" * 100)
    alice.say("tail of the long line")
    alice.expect("! line too long (more than 1024 bytes), dropped")
    alice.say("z" * 1024)  # exactly the limit is fine
    alice.say("short again")
    lines = bob.expect(f"<{alice.nick}> short again")
    assert lines[-1] == f"<{alice.nick}> {'z' * 1024}\n"
    assert not any("x" * 100 in line or "y" * 100 in line or "tail" in line for line in lines)


def test_invalid_utf8_and_control_bytes_are_replaced(chat):
    room = chat(workers=2)
    alice, bob = room.on_workers(2)
    alice.say(b"caf\xe9 \xff\xfe ok \x1b[31mred \xc3\xa9t\xc3\xa9\n")
    line = bob.read_until(b"\n")
    while not line.startswith(f"<{alice.nick}>".encode()):
        line = bob.read_until(b"\n")
    expected = f"<{alice.nick}> caf\ufffd \ufffd\ufffd ok \ufffd[31mred \u00e9t\u00e9\n"
    assert line.decode("utf-8") == expected  # valid UTF-8 out, whatever came in


def test_unknown_commands_and_help(chat):
    room = chat(workers=1)
    alice = room.connect()
    alice.say("/dance")
    alice.expect("! unknown command /dance; try /help")
    alice.say("/help")
    alice.expect_prefix("* commands: /nick NAME, /who, /quit")


def test_nicks_of_a_killed_worker_do_not_stay_taken(chat):
    room = chat(workers=2, stale_sweep=0.5)
    doomed, bob = room.on_workers(2)
    doomed.say("/nick zed")
    bob.expect(f"* {doomed.nick} is now known as zed")
    victim = room.worker_pid(doomed)
    os.kill(victim, signal.SIGKILL)
    # the replacement (or any worker's sweep) finds the stale nick and announces it once
    bob.expect("* zed left (connection lost)")
    bob.expect_room(bob.nick)
    bob.say("/nick zed")
    bob.expect(f"* {bob.nick} is now known as zed")
    room.server.wait_log(rf"\(pid {victim}\) killed by signal SIGKILL; replacing it")


def test_a_stale_nick_can_be_taken_before_any_sweep(chat):
    room = chat(workers=2, stale_sweep=3600)
    doomed, bob = room.on_workers(2)
    doomed.say("/nick zed")
    bob.expect(f"* {doomed.nick} is now known as zed")
    victim = room.worker_pid(doomed)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in room.server.worker_pids(), what="the worker to die")
    bob.expect_room(bob.nick)  # the dead worker's nicks are not listed, swept or not
    bob.say("/nick zed")
    skipped = bob.expect(f"* {bob.nick} is now known as zed")
    assert skipped.count("* zed left (connection lost)\n") <= 1
