"""Logging: one line per event on stderr (or ``log_file``), tagged with the process role.

A text line reads ``2026-11-26 10:00:00,123 worker 1 [echo] info: Connection closed: no error``:
the role (``master``, ``worker N``, ``checker``) says which process wrote it, the bracket names
the service module (or ``mpnet`` for the framework itself). ``log_format = "json"`` writes one
JSON object per line instead (:class:`JsonFormatter`). When stderr is systemd's journal stream
(``JOURNAL_STREAM`` names it), every line starts with its syslog priority, ``<3>`` to ``<7>``,
which journald strips and records, so ``journalctl -p warning`` selects by level.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import datetime
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
MODULE_LOGGER = "mpnet.module."
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def _module(record: logging.LogRecord) -> str | None:
    name = record.name
    return name[len(MODULE_LOGGER) :] if name.startswith(MODULE_LOGGER) else None


def _level_name(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelno, "info")


class TextFormatter(logging.Formatter):
    """``<time> <role> [<module or mpnet>] <level>: <message>``, then the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{self.formatTime(record)} {_role} [{_module(record) or 'mpnet'}] "
            f"{_level_name(record)}: {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601 with the UTC offset), ``level``, ``pid``,
    ``role``, ``module`` (only when a service module logged it), ``message``, and ``exc_info``
    (the whole traceback as one string) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).astimezone()
        entry: dict[str, object] = {
            "time": when.isoformat("T", "milliseconds"),
            "level": _level_name(record),
            "pid": record.process,
            "role": _role,
        }
        module = _module(record)
        if module is not None:
            entry["module"] = module
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class JournalPrefix(logging.Formatter):
    """Wraps a formatter for systemd's journal stream: every line of an entry (a traceback's
    too) starts with the entry's ``<N>`` syslog priority."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        level = max((n for n in _SYSLOG_PRIORITY if n <= record.levelno), default=logging.DEBUG)
        prefix = f"<{_SYSLOG_PRIORITY[level] if record.levelno < logging.CRITICAL else 2}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def is_journal_stream(stream: TextIO) -> bool:
    """Whether *stream* is the journal stream systemd names in ``JOURNAL_STREAM`` (``dev:ino``
    of the very file: a child whose stderr was redirected elsewhere must not use the prefix)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(stream.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


_handler: logging.Handler | None = None
_log_file: str | None = None
_module_levels: set[str] = set()


def setup(
    level: str = "info",
    log_file: str | None = None,
    role: str | None = None,
    log_format: str = "text",
    module_levels: Mapping[str, str] | None = None,
) -> None:
    """Configure the ``mpnet`` logger tree; safe to call again (e.g. after a reload).
    *module_levels* (``log_levels``) gives some modules' loggers a level of their own."""
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
    _handler.setFormatter(_formatter(log_format, _handler))
    _set_module_levels(module_levels or {})


def _formatter(log_format: str, handler: logging.Handler) -> logging.Formatter:
    inner = JsonFormatter() if log_format == "json" else TextFormatter()
    stream = getattr(handler, "stream", None)
    journal = stream is not None and is_journal_stream(stream)
    if journal and not isinstance(handler, logging.FileHandler):
        return JournalPrefix(inner)
    return inner


def _set_module_levels(levels: Mapping[str, str]) -> None:
    global _module_levels
    for name in _module_levels - set(levels):
        logging.getLogger(MODULE_LOGGER + name).setLevel(logging.NOTSET)
    for name, level in levels.items():
        logging.getLogger(MODULE_LOGGER + name).setLevel(LEVELS[level])
    _module_levels = set(levels)


def _open_handler(log_file: str | None) -> logging.Handler:
    if log_file:
        return logging.FileHandler(log_file, encoding="utf-8")
    return logging.StreamHandler(sys.stderr)


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
