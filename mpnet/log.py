"""Logging: one line per event on stderr (or ``log_file``), tagged with the process role.

A line reads ``2026-11-26 10:00:00,123 worker 1 [echo] info: Connection closed: no error``: the
role (``master``, ``worker N``, ``checker``) says which process wrote it, the bracket names the
service module (or ``mpnet`` for the framework itself).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

_role = "master"
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING}
LEVELS.update({"warning": logging.WARNING, "error": logging.ERROR})


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        source = name[len("mpnet.module.") :] if name.startswith("mpnet.module.") else "mpnet"
        message = record.getMessage()
        line = (
            f"{self.formatTime(record)} {_role} [{source}] "
            f"{_LEVEL_NAMES.get(record.levelno, 'info')}: {message}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_handler: logging.Handler | None = None
_log_file: str | None = None


def setup(level: str = "info", log_file: str | None = None, role: str | None = None) -> None:
    """Configure the ``mpnet`` logger tree; safe to call again (e.g. after a reload)."""
    global _handler, _log_file
    if role is not None:
        set_role(role)
    root = logging.getLogger("mpnet")
    root.setLevel(LEVELS.get(level, logging.INFO))
    root.propagate = False
    if _handler is None or log_file != _log_file:
        new = _open_handler(log_file)
        if _handler is not None:
            root.removeHandler(_handler)
            _handler.close()
        _handler, _log_file = new, log_file
        root.addHandler(new)


def _open_handler(log_file: str | None) -> logging.Handler:
    stream: TextIO
    if log_file:
        handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        stream = sys.stderr
        handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter())
    return handler


def stream() -> TextIO:
    """The file the log goes to (for faulthandler, which writes to a file descriptor)."""
    if isinstance(_handler, logging.StreamHandler):
        return _handler.stream
    return sys.stderr


def flush() -> None:
    """Flush the handler (before a fork, so the child does not write the parent's buffer)."""
    if _handler is not None:
        _handler.flush()


def reopen() -> int | None:
    """Reopen the log file (after logrotate moved it away: SIGUSR1); return the descriptor now
    writing to it, or None (logging to stderr, or the file cannot be opened: the old one stays).

    The new file takes the old one's descriptor number (dup2), so whatever in this process holds
    that number (faulthandler) follows, and workers forked from now on inherit it. Running
    workers may not be allowed to open the path (``user``): the master hands them this
    descriptor and they :func:`adopt` it.
    """
    if not isinstance(_handler, logging.FileHandler) or _handler.stream is None:
        return None
    try:
        fd = os.open(
            _handler.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666
        )
    except OSError as exc:
        _handler.stream.write(f"cannot reopen log file {_log_file}: {exc}\n")
        _handler.flush()
        return None
    adopt(fd)
    return _handler.stream.fileno()


def adopt(fd: int) -> None:
    """Write the log to *fd* from now on (a descriptor passed by the master); closes *fd*."""
    handler = _handler
    if not isinstance(handler, logging.StreamHandler) or handler.stream in (None, sys.stderr):
        os.close(fd)  # not logging to a file here (a reload changed log_file meanwhile)
        return
    handler.acquire()
    try:
        handler.flush()
        os.dup2(fd, handler.stream.fileno(), inheritable=False)
    finally:
        handler.release()
        os.close(fd)


def role() -> str:
    """Which process this is, as log lines show it: ``master``, ``worker <slot>``, ``checker``."""
    return _role


def set_role(name: str) -> None:
    global _role
    _role = name
