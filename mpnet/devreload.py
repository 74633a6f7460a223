"""``mpnet serve --reload``: reload when the config or a module file changes (development).

The master polls the files' metadata (``os.stat``: mtime, size, inode) every
``POLL_INTERVAL`` seconds from its own loop, and asks for the same reload as SIGHUP. Polling
rather than inotify (``watchfiles``): a handful of ``stat`` calls twice a second cost a few
microseconds (README, Development), need no dependency and no thread beside the master's select
loop, and work where inotify does not (network and container-mounted filesystems, editors that
replace a file by renaming another over it).

A change is acted on once the file has stayed the same for one more poll, so an editor's save in
several steps makes one reload, never one of a half-written file. A reload that fails (say a
syntax error) logs its error once and the previous code serves on; the next change tries again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .pure.config import Config

log = logging.getLogger("mpnet.reload")

POLL_INTERVAL = 0.5

Signature = tuple[int, int, int] | None  # (mtime_ns, size, inode), None while missing


def watched_files(config: Config) -> list[Path]:
    """The config file and the file of every module it lists (those that can be found: one
    that cannot is the reload's error to report, not the watcher's)."""
    from .workers.module import find_module
    from .workers.provider import ModuleError

    files = []
    if not config.path.startswith("<"):  # not the embedded default config
        files.append(Path(config.path).resolve())
    for spec in config["modules"]:
        try:
            files.append(find_module(spec, config)[1].resolve())
        except ModuleError:
            continue
    return files


def _signature(path: Path) -> Signature:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class FileWatcher:
    """Tells the master when a watched file has changed and settled."""

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self.interval = interval
        self.next_poll = 0.0
        self._known: dict[Path, Signature] = {}  # as of the last reload (or the start)
        self._seen: dict[Path, Signature] = {}  # as of the last poll
        self._config: Config | None = None
        self._files: list[Path] = []

    def check(self, config: Config, now: float) -> list[Path]:
        """:meth:`poll` the files of *config* (found again only when the config changes)."""
        if config is not self._config:
            self._config, self._files = config, watched_files(config)
        return self.poll(lambda: self._files, now)

    def poll(self, files: Callable[[], list[Path]], now: float) -> list[Path]:
        """If a poll is due at *now*: which of *files()* changed since the last reload and have
        settled (unchanged since the previous poll). A file seen the first time is no change."""
        if now < self.next_poll:
            return []
        self.next_poll = now + self.interval
        changed, new = [], []
        for path in files():
            current = _signature(path)
            if path not in self._known:
                self._known[path] = self._seen[path] = current
                new.append(path)
                continue
            settled = self._seen.get(path) == current
            self._seen[path] = current
            if current != self._known[path] and settled:
                changed.append(path)
        for path in changed:
            self._known[path] = self._seen[path]
        if new:
            log.info("--reload: watching %s for changes", ", ".join(map(str, new)))
        return changed
