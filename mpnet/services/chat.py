"""A line-based chat room spread over every worker (try it with ``nc 127.0.0.1 5434``).

On connect a client gets a free guest nick (``guest1``, ``guest2``...) and everyone is told it
joined. Lines starting with ``/`` are commands:

* ``/nick NAME``  take a nick (unique across all workers, case-insensitively);
* ``/who``        list everyone in the room, whichever worker holds them;
* ``/quit``       say bye and close;
* ``/help``       list the commands.

Anything else goes to everyone as ``<nick> text`` (the sender included). Room events read
``* guest1 joined``, ``* guest1 is now known as alice``, ``* alice left``; errors start with ``!``.

How it spans workers: the room is the ``chat`` broadcast topic (every worker delivers each event
to its own connections, all in the master's order), and the nicks live in the shared table
``chat_nicks``: casefolded nick -> ``[nick, pid, process start time, connection id, host]``.
Taking a nick is atomic in the master (``setdefault``, or ``cas`` to take over a stale entry), so
two clients on two workers can never both get one. Releasing one (on /nick, /quit or disconnect) is
``delete_if`` on the exact entry, so it never removes a nick someone else holds by then.

Stale nicks (a worker killed with SIGKILL cannot release its clients' nicks): an entry belongs to
a process (pid *and* start time, so a recycled pid does not keep it alive). An entry whose
process is gone is *stale*: ``/who`` does not list it, ``/nick`` may take it over at once, and a
sweep in every worker (at start, then every ``stale_sweep`` seconds, default 5) deletes it and
announces ``* NICK left (connection lost)`` exactly once (only the worker whose ``delete_if``
succeeds announces). So a killed worker's users vanish from /who immediately and their leave is
announced within one sweep period, typically at once, by the worker that replaces it.

Input: ``data`` is whatever TCP delivered, so lines are buffered and split here; ``\\r\\n`` and
``\\n`` both end a line; bytes that are not UTF-8 (and control characters) are replaced by
U+FFFD; a line longer than ``max_line`` bytes (default 1024) is dropped with a ``!`` message,
however it arrives. A client that does not read what it is sent, so that more than
``max_buffered`` bytes (default 1 MiB) wait for it, is disconnected rather than buffered forever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the loader injects ``module``, as Prosody does; this is for type checkers
    from mpnet import Module

    module: Module

import os
import re
import socket
import time
import traceback
from typing import Any

import psutil

MAX_LINE = module.get_option_number("max_line", 1024, min=1)
MAX_BUFFERED = module.get_option_number("max_buffered", 1024 * 1024, min=1)
STALE_SWEEP = module.get_option_number("stale_sweep", 5.0, min=0.01)
MAX_NICK = 32

TOPIC = "chat"
nicks = module.shared("chat_nicks")
counters = module.shared("chat_counters")

NICK = re.compile(r"[\w\-\[\]{}|^`]{1," + str(MAX_NICK) + "}")
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
HELP = "* commands: /nick NAME, /who, /quit, /help; anything else is said to the room\n"


def process_tag(pid: int) -> float | None:
    """When process *pid* started (None if it is gone): with the pid, it names one process."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return round(process.create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


PID = os.getpid()
STARTED = process_tag(PID)
HOST = socket.gethostname()
hosts = module.shared("chat_hosts")  # host -> wall-clock time its sweeper last ran


def alive(entry: list[Any], cache: dict[int, float | None]) -> bool:
    """Whether the process that took this nick entry still runs. A process of another host
    (shared_backend = "redis") cannot be looked at: its host counts as alive while its sweeper
    has run within the last three sweep periods."""
    pid, started = entry[1], entry[2]
    if len(entry) > 4 and entry[4] != HOST:
        return hosts.get(entry[4], 0) > time.time() - 3 * STALE_SWEEP
    if pid == PID:
        return started == STARTED
    if pid not in cache:
        cache[pid] = process_tag(pid)
    return cache[pid] == started


class Session:
    __slots__ = ("buffer", "conn", "discarding", "entry", "nick", "quitting")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.buffer = bytearray()
        self.discarding = False  # inside an over-long line: drop until its newline
        self.nick: str | None = None  # set once joined
        self.entry: list[Any] | None = None  # our entry in the nicks table
        self.quitting = False


sessions: dict[Any, Session] = {}


def say(session: Session, line: str) -> None:
    """Write to one client, unless it stopped reading (then it is disconnected)."""
    conn = session.conn
    if session.quitting:
        return
    if conn.buffered() > MAX_BUFFERED:
        session.quitting = True
        module.log("info", "%s does not read; disconnecting it", session.nick)
        conn.close("too slow")
        return
    conn.write(line)


# -- nicks --------------------------------------------------------------------------------------


def entry_of(nick: str, conn: Any) -> list[Any]:
    return [nick, PID, STARTED, conn.id, HOST]


async def claim(session: Session, nick: str) -> bool:
    """Take *nick* for *session* atomically; True if it is ours now."""
    key = nick.casefold()
    mine = entry_of(nick, session.conn)
    while True:
        current = await nicks.setdefault(key, mine)
        if current == mine:
            return True
        if current[1:] == mine[1:]:  # ours already, spelt differently: respell it
            if await nicks.cas(key, current, mine):
                return True
            continue
        if alive(current, {}):
            return False
        if await nicks.cas(key, current, mine):  # a stale nick: take it over
            announce_lost(current)
            return True


async def release(session: Session) -> bool:
    """Give our nick back; True if it was still ours."""
    entry = session.entry
    if entry is None:
        return False
    session.entry = None
    return await nicks.delete_if(entry[0].casefold(), entry)


def announce_lost(entry: list[Any]) -> None:
    module.log("info", "%s left (connection lost with pid %d)", entry[0], entry[1])
    module.broadcast(TOPIC, ["leave", entry[0], "connection lost"])


async def guest_nick(session: Session) -> str:
    while True:
        nick = f"guest{await counters.incr('guest')}"
        if await claim(session, nick):
            return nick


async def sweep_stale() -> None:
    """Delete the nick entries of processes that are gone (see the module docstring)."""
    cache: dict[int, float | None] = {}
    for key, entry in list(nicks.items()):
        if not alive(entry, cache) and await nicks.delete_if(key, entry):
            announce_lost(entry)


async def sweeper() -> float:
    try:
        hosts[HOST] = time.time()
        await sweep_stale()
    except Exception:
        module.log("error", "stale nick sweep failed:\n%s", traceback.format_exc())
    return STALE_SWEEP  # run again after that long


# -- room events --------------------------------------------------------------------------------


def deliver(payload: list[Any]) -> None:
    """A room event, in every worker, in the master's order: tell the local clients."""
    kind = payload[0]
    if kind == "msg":
        line = f"<{payload[1]}> {payload[2]}\n"
    elif kind == "join":
        line = f"* {payload[1]} joined\n"
    elif kind == "leave":
        line = f"* {payload[1]} left" + (f" ({payload[2]})" if payload[2] else "") + "\n"
    elif kind == "nick":
        line = f"* {payload[1]} is now known as {payload[2]}\n"
    else:
        return
    for session in list(sessions.values()):
        if session.nick is not None:
            say(session, line)


module.hook(TOPIC, deliver)


# -- input --------------------------------------------------------------------------------------


def split_lines(session: Session, data: bytes) -> list[bytes]:
    """Complete lines from what arrived (see the module docstring for long lines)."""
    buffer = session.buffer
    buffer += data
    lines: list[bytes] = []
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) > MAX_LINE + 1:  # (+1: room for the CR of a CRLF)
                if not session.discarding:
                    say(session, f"! line too long (more than {MAX_LINE} bytes), dropped\n")
                    session.discarding = True
                buffer.clear()
            return lines
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if session.discarding:  # the end of a line already reported as too long
            session.discarding = False
            continue
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_LINE:
            say(session, f"! line too long (more than {MAX_LINE} bytes), dropped\n")
            continue
        lines.append(line)


def text_of(line: bytes) -> str:
    return CONTROL.sub("\ufffd", line.decode("utf-8", "replace")).strip()


async def handle_nick(session: Session, arg: str) -> None:
    if not NICK.fullmatch(arg):
        say(session, f"! invalid nick; use 1-{MAX_NICK} letters, digits or -_[]{{}}|^`\n")
        return
    old = session.nick
    if old == arg:
        return
    if not await claim(session, arg):
        say(session, f"! nick {arg} is already taken; choose another with /nick NAME\n")
        return
    previous = session.entry
    session.entry = entry_of(arg, session.conn)
    if previous is not None and previous[0].casefold() != arg.casefold():
        await nicks.delete_if(previous[0].casefold(), previous)
    session.nick = arg
    module.broadcast(TOPIC, ["nick", old, arg])


def handle_who(session: Session) -> None:
    cache: dict[int, float | None] = {}
    names = sorted((e[0] for e in nicks.values() if alive(e, cache)), key=str.casefold)
    say(session, f"* in the room ({len(names)}): {', '.join(names)}\n")


def handle_line(session: Session, line: bytes) -> Any:
    """One complete line; returns an awaitable for /nick (the only command with a round trip)."""
    text = text_of(line)
    if not text:
        return None
    if text.startswith("/"):
        command, _, arg = text.partition(" ")
        command = command.lower()
        arg = arg.strip()
        if command == "/nick":
            return handle_nick(session, arg)
        if command == "/who":
            handle_who(session)
        elif command == "/quit":
            say(session, "* Bye!\n")
            session.quitting = True
            session.conn.close()
        elif command == "/help":
            say(session, HELP)
        else:
            say(session, f"! unknown command {command}; try /help\n")
        return None
    module.broadcast(TOPIC, ["msg", session.nick, text])
    return None


async def handle_rest(session: Session, pending: Any, lines: list[bytes]) -> None:
    """Finish the lines of one chunk once a round trip is involved, in order."""
    await pending
    for line in lines:
        if session.quitting:
            return
        result = handle_line(session, line)
        if result is not None:
            await result


def leave_reason(session: Session, err: str | None) -> str:
    """What the room is told: "quit", nothing for a plain close, else a short reason."""
    if err is None:
        return "quit" if session.quitting else ""
    if err in ("too slow", "server shutting down"):
        return err
    return "connection lost"


class listener:
    async def onconnect(conn):
        session = Session(conn)
        sessions[conn] = session
        nick = await guest_nick(session)
        session.entry = entry_of(nick, conn)
        session.nick = nick
        say(session, f"* welcome, you are {nick}; /help lists the commands\n")
        module.log("info", "%s joined from %s:%d", nick, conn.ip(), conn.port())
        module.broadcast(TOPIC, ["join", nick])

    def onincoming(conn, data):
        session = sessions[conn]
        lines = split_lines(session, data)
        for index, line in enumerate(lines):
            if session.quitting:
                return None
            result = handle_line(session, line)
            if result is not None:
                return handle_rest(session, result, lines[index + 1 :])
        return None

    async def ondisconnect(conn, err):
        session = sessions.pop(conn, None)
        if session is None or session.nick is None:
            return
        nick = session.nick
        session.nick = None
        if await release(session):
            module.broadcast(TOPIC, ["leave", nick, leave_reason(session, err)])
        module.log("info", "%s left (%s)", nick, err or "closed")


module.provides("net", name="chat", listener=listener, default_port=5434)
module.add_timer(0, sweeper)
