"""systemd integration for the mpnet master process, without libsystemd.

Two independent pieces, used by the master:

* :class:`Notifier` speaks the ``sd_notify`` protocol: one ``KEY=value``
  datagram per state change to the ``AF_UNIX`` socket named by
  ``$NOTIFY_SOCKET``.  It lets ``Type=notify`` units know when mpnet is
  really ready, reloading or stopping, and feeds the service watchdog.
* :func:`listen_fds` implements ``sd_listen_fds`` / ``sd_listen_fds_with_names``
  for socket activation: the listening sockets systemd (or
  ``systemd-socket-activate``) bound for us arrive as fds 3, 4, ...

Everything here targets Linux (abstract sockets, systemd) but imports on any Unix and
degrades to no-ops elsewhere: a :class:`Notifier` without ``$NOTIFY_SOCKET`` is
disabled and :func:`listen_fds` without ``$LISTEN_PID`` returns ``[]``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import stat
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "LISTEN_FDS_START",
    "ActivatedSocket",
    "HostPort",
    "Notifier",
    "listen_fds",
    "match_endpoint",
]

logger = logging.getLogger(__name__)

#: First file descriptor passed by socket activation (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3

_NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def _environ(environ: MutableMapping[str, str] | None) -> MutableMapping[str, str]:
    return os.environ if environ is None else environ


# --------------------------------------------------------------------------
# sd_notify
# --------------------------------------------------------------------------


class Notifier:
    """Sends service state notifications to the service manager.

    Build it once in the master with :meth:`from_environ`, before any worker
    is forked: that removes ``$NOTIFY_SOCKET`` and the watchdog variables from
    the environment, so workers cannot talk to systemd (``NotifyAccess=main``
    would drop their messages anyway, with a log line per message).

    Every :meth:`send` opens a fresh, close-on-exec datagram socket and closes
    it again, as ``sd_notify`` does.  The object therefore holds no descriptor:
    nothing leaks into forked workers and nothing goes stale when the master
    forks; a ping every few seconds makes the extra ``socket()`` call
    irrelevant.

    Sending never raises on OS errors (socket gone, queue full, permission
    denied): the result is ``False`` and a debug log line, because a lost
    notification must never take the master down.  Without ``$NOTIFY_SOCKET``
    the notifier is disabled and every method returns ``False`` at once.

    Supported addresses are absolute paths and ``@name`` (Linux abstract
    namespace).  ``vsock:`` addresses (systemd >= 253, for VMs) are not
    supported; the notifier is then disabled and says so in a warning.
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        timeout: float = 1.0,
    ) -> None:
        """Create a notifier for ``address`` (a ``$NOTIFY_SOCKET`` value).

        ``address=None`` gives a disabled notifier.  ``watchdog_usec`` is the
        watchdog timeout that applies to this process, already checked against
        ``$WATCHDOG_PID`` (see :meth:`from_environ`).  ``timeout`` bounds how
        long one send may block when the manager's queue is full; the master
        calls this from its event loop, so it must stay short.
        """
        self._address = address
        self._sockaddr = _notify_sockaddr(address) if address else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._timeout = timeout

    @classmethod
    def from_environ(
        cls,
        environ: MutableMapping[str, str] | None = None,
        unset: bool = True,
    ) -> Notifier:
        """Build a notifier from ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC``, ``$WATCHDOG_PID``.

        ``environ`` defaults to :data:`os.environ`.  With ``unset=True`` the
        three variables are removed from it (for :data:`os.environ` that also
        means from the environment inherited by child processes), whatever
        their values were, like ``sd_notify(unset_environment=1)``.

        The watchdog applies when ``$WATCHDOG_USEC`` is a positive integer and
        ``$WATCHDOG_PID`` is unset or equals :func:`os.getpid` now.
        """
        env = _environ(environ)
        values = {name: env.get(name) for name in _NOTIFY_VARS}
        if unset:
            for name in _NOTIFY_VARS:
                env.pop(name, None)
        address = values["NOTIFY_SOCKET"] or None
        return cls(address, watchdog_usec=_parse_watchdog(values))

    @property
    def enabled(self) -> bool:
        """True when there is a supported ``$NOTIFY_SOCKET`` to send to."""
        return self._sockaddr is not None

    @property
    def address(self) -> str | None:
        """The ``$NOTIFY_SOCKET`` value this notifier was built from."""
        return self._address

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._address!r}, enabled={self.enabled})"

    def send(self, state: str) -> bool:
        """Send ``state`` (newline-separated ``KEY=value`` lines) in one datagram.

        Returns True when the datagram was handed to the kernel, False when
        the notifier is disabled or sending failed.  Never raises ``OSError``.
        """
        if self._sockaddr is None:
            return False
        data = state.encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(self._timeout)
                sock.sendto(data, self._sockaddr)
        except OSError as exc:
            logger.debug("sd_notify to %r failed: %s (state %r)", self._address, exc, state)
            return False
        return True

    def notify(self, **fields: str | int | float | bool) -> bool:
        """Send the given fields in one datagram: ``notify(READY=1, STATUS="up")``.

        Field names must be upper-case ``sd_notify`` variable names; booleans
        become ``1``/``0``.  Raises ``ValueError`` for a malformed name or a
        value containing a newline (which would inject another field): those
        are programming errors, not delivery failures.
        """
        if not fields:
            raise ValueError("notify() needs at least one field")
        lines = []
        for name, value in fields.items():
            if not _FIELD_NAME.match(name):
                raise ValueError(f"invalid sd_notify field name: {name!r}")
            text = str(int(value)) if isinstance(value, bool) else str(value)
            if "\n" in text:
                raise ValueError(f"sd_notify field {name} contains a newline")
            lines.append(f"{name}={text}")
        return self.send("\n".join(lines))

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that start-up (or a reload) finished: ``READY=1``.

        Send it once the listeners are bound and the first workers run; for a
        ``Type=notify`` unit, ``systemctl start`` returns only then.
        """
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=_one_line(status))

    def reloading(self) -> bool:
        """Announce a configuration reload: ``RELOADING=1`` + ``MONOTONIC_USEC``.

        Send ``ready()`` when the reload is complete.  ``MONOTONIC_USEC`` (the
        CLOCK_MONOTONIC time of the reload request) is required by
        ``Type=notify-reload`` (systemd >= 253) and ignored by older versions.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self, status: str | None = None) -> bool:
        """Announce that the master is shutting down: ``STOPPING=1``."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=_one_line(status))

    def status(self, text: str) -> bool:
        """Set the free-form status line shown by ``systemctl status``.

        Newlines are replaced by spaces: the protocol is line based.
        """
        return self.notify(STATUS=_one_line(text))

    def watchdog(self) -> bool:
        """Ping the service watchdog: ``WATCHDOG=1``.

        Call it every :meth:`watchdog_interval` seconds from the master's
        event loop, so a wedged loop stops the pings and systemd restarts us.
        """
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start/stop/reload timeout fires.

        ``EXTEND_TIMEOUT_USEC``: the deadline becomes now + ``seconds``, not
        the old deadline + ``seconds``; repeat it while a long graceful stop
        or a slow start is still making progress.
        """
        if seconds < 0:
            raise ValueError("extend_timeout() needs a non-negative duration")
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def mainpid(self, pid: int) -> bool:
        """Tell systemd that ``pid`` is now the main process: ``MAINPID=``.

        Needed only if the master is ever replaced by another process (for
        example a re-exec'ed master during a binary upgrade); with
        ``NotifyAccess=main`` only the current main process may send it.
        """
        return self.notify(MAINPID=int(pid))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings, or None when no watchdog applies.

        Half of ``$WATCHDOG_USEC``, as ``sd_watchdog_enabled(3)`` recommends,
        when that was a positive integer and ``$WATCHDOG_PID`` was unset or
        named this process.  Also None when the notifier is disabled, since
        pings could not be delivered.
        """
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2 / 1_000_000


def _notify_sockaddr(address: str) -> bytes | None:
    if address.startswith("@"):
        # Linux abstract namespace: the name starts with a NUL byte.
        return b"\0" + os.fsencode(address[1:])
    if address.startswith("/"):
        return os.fsencode(address)
    if address.startswith("vsock:"):
        logger.warning("NOTIFY_SOCKET=%r: vsock is not supported, notifications disabled", address)
    else:
        logger.warning("NOTIFY_SOCKET=%r is not a path or @name, notifications disabled", address)
    return None


def _parse_watchdog(values: dict[str, str | None]) -> int | None:
    raw_usec = values["WATCHDOG_USEC"]
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        logger.warning("ignoring malformed WATCHDOG_USEC=%r", raw_usec)
        return None
    if usec <= 0:
        return None
    raw_pid = values["WATCHDOG_PID"]
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            logger.warning("ignoring watchdog: malformed WATCHDOG_PID=%r", raw_pid)
            return None
        if pid != os.getpid():
            return None
    return usec


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


# --------------------------------------------------------------------------
# sd_listen_fds
# --------------------------------------------------------------------------


class HostPort(Protocol):
    """Anything with ``host`` and ``port``, such as a configured endpoint."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


_AddressFamily = socket.AddressFamily  # the dataclass field below is called "socket"
_SocketKind = socket.SocketKind


@dataclass(frozen=True, eq=False)
class ActivatedSocket:
    """One listening socket received through socket activation.

    ``socket`` owns ``fd``: closing it (or letting it be garbage collected)
    closes the descriptor, so the master must keep these objects for as long
    as it serves from them.  ``name`` is the ``FileDescriptorName=`` of the
    socket unit (``"unknown"`` when the manager passed no names).

    Serve every worker from this one socket (inherited across fork).  The
    service manager usually bound it as root, and the kernel lets a socket
    join a port with ``SO_REUSEPORT`` only under the same effective UID as
    the first binder, so an unprivileged master cannot clone it per worker.
    """

    fd: int
    name: str
    socket: socket.socket

    @property
    def family(self) -> _AddressFamily:
        """Address family detected from the descriptor."""
        return self.socket.family

    @property
    def type(self) -> _SocketKind:
        """Socket type (``SOCK_STREAM``, ``SOCK_DGRAM``, ...) detected from the descriptor."""
        return self.socket.type

    @property
    def listening(self) -> bool:
        """True for a stream socket on which ``listen()`` was called."""
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def local_address(self) -> tuple[str, int] | None:
        """``(host, port)`` the socket is bound to, or None if not AF_INET/AF_INET6.

        IPv6 addresses come without flow info and scope id, e.g. ``("::1", 80)``.
        """
        if self.socket.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        host, port = self.socket.getsockname()[:2]
        return host, port

    def matches(self, endpoint: HostPort) -> bool:
        """:func:`match_endpoint` for any object with ``host`` and ``port`` attributes."""
        return match_endpoint(self, endpoint.host, endpoint.port)


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
    unset: bool = True,
) -> list[ActivatedSocket]:
    """Take the sockets passed by socket activation, in the order they were passed.

    Semantics of ``sd_listen_fds_with_names(3)``: nothing was passed (``[]``)
    unless ``$LISTEN_PID`` equals :func:`os.getpid` — the variables may have
    been inherited from a parent they were meant for.  Then ``$LISTEN_FDS``
    descriptors start at fd 3 and ``$LISTEN_FDNAMES`` holds their
    colon-separated names.

    Each descriptor gets ``FD_CLOEXEC`` so it does not leak into programs the
    master executes; forked workers still inherit it, which is how they serve
    from it.  With ``unset=True`` (the default) the three variables are
    removed from ``environ`` (default :data:`os.environ`) whether or not the
    call succeeds, so a second call, or a child process, sees nothing.

    Raises ``ValueError`` for malformed variables (``$LISTEN_FDS`` not a
    number, or a different number of names than descriptors).  Descriptors
    that are not sockets (``ListenFIFO=`` and friends) are skipped with a
    warning: mpnet only serves sockets.
    """
    env = _environ(environ)
    values = {name: env.get(name) for name in _LISTEN_VARS}
    if unset:
        for name in _LISTEN_VARS:
            env.pop(name, None)

    raw_pid, raw_count, raw_names = (values[name] for name in _LISTEN_VARS)
    if not raw_pid:
        return []
    try:
        pid = int(raw_pid)
        count = int(raw_count or "")
    except ValueError:
        raise ValueError(
            "malformed socket activation variables: "
            f"LISTEN_PID={raw_pid!r} LISTEN_FDS={raw_count!r}"
        ) from None
    if pid != os.getpid():
        logger.debug("LISTEN_PID=%d is not us (%d): ignoring passed fds", pid, os.getpid())
        return []
    if count < 0:
        raise ValueError(f"malformed socket activation variables: LISTEN_FDS={raw_count!r}")
    if count == 0:
        return []
    names = raw_names.split(":") if raw_names is not None else ["unknown"] * count
    if len(names) != count:
        raise ValueError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}")

    # Check every descriptor before taking ownership of any, so an error
    # leaves all of them open and untouched.
    modes = []
    for fd, name in enumerate(names, start=LISTEN_FDS_START):
        try:
            modes.append(os.fstat(fd).st_mode)
        except OSError as exc:
            raise ValueError(f"socket activation: fd {fd} ({name!r}) is not open") from exc

    result = []
    for fd, (name, mode) in enumerate(zip(names, modes, strict=True), start=LISTEN_FDS_START):
        os.set_inheritable(fd, False)
        if not stat.S_ISSOCK(mode):
            logger.warning("socket activation: fd %d (%r) is not a socket, skipped", fd, name)
            continue
        result.append(ActivatedSocket(fd=fd, name=name, socket=socket.socket(fileno=fd)))
    return result


def match_endpoint(activated: ActivatedSocket, host: str, port: int) -> bool:
    """True when ``activated`` can serve the configured endpoint ``(host, port)``.

    This is how the master pairs passed sockets with configured listeners
    when names do not identify them (a socket unit names all its fds alike).
    An endpoint that matches no passed socket is bound by mpnet as usual.

    * Only AF_INET/AF_INET6 sockets can match, and the ports must be equal.
    * ``"*"`` or ``""`` (any address) matches a socket bound to ``0.0.0.0``
      or ``::``.
    * ``"0.0.0.0"`` matches a socket bound to ``0.0.0.0``, and also a
      dual-stack ``::`` socket (``IPV6_V6ONLY`` off), which accepts IPv4 too:
      that is what ``ListenStream=80`` binds by default.
    * Anything else must equal the bound address, compared as IP addresses:
      ``"::1"`` equals ``"[0:0::1]"``, an IPv4-mapped ``"::ffff:127.0.0.1"``
      equals ``"127.0.0.1"``.  Host names are never resolved, so
      ``"localhost"`` matches nothing: normalise it before calling.
    """
    local = activated.local_address()
    if local is None or local[1] != port:
        return False
    bound = _normalize_host(local[0])
    wanted = _normalize_host(host)
    if wanted in ("", "*"):
        return bound in ("0.0.0.0", "::")
    if bound == wanted:
        return True
    return wanted == "0.0.0.0" and bound == "::" and _dual_stack(activated.socket)


def _dual_stack(sock: socket.socket) -> bool:
    try:
        return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except OSError:
        return False


def _normalize_host(host: str) -> str:
    text = host.strip("[]")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text  # a name: compared literally, never resolved
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)
