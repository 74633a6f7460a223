"""Load the modules in a throwaway process and report what they provide.

The master must know every service's ports before it binds and forks, but it must never run user
code (a module that crashes, hangs or leaks on import must not take the master with it). So it forks
a short-lived *checker* that loads the modules exactly as a worker would and writes back, as JSON on
a pipe, either the providers' declarations or the one-line error. ``mpnet check``, start-up and
every reload use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from . import log as mpnet_log
from .privileges import become_service_user
from .pure.config import Config, ConfigError
from .workers.module import load_modules
from .workers.provider import ModuleError
from .workers.tls import tls_contexts


class CheckFailed(Exception):
    """The modules could not be loaded; the message is the reason, fit to show as is."""


def _child(config: Config, write_fd: int, redis_required: bool) -> None:
    mpnet_log.set_role("checker")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    try:
        loaded = load_modules(config, before_run=lambda: become_service_user(config))
        tls_contexts(config, loaded)  # a missing or broken certificate fails here, early
        for module in loaded.modules:  # warned here once, not by every worker
            if not module.providers:
                module.logger.warning(
                    "module %s provides nothing: no module.provides('net', ...) ran, so it "
                    "serves no port (fine for a module that only hooks, shares or runs timers)",
                    module.name,
                )
        result: dict[str, Any] = {
            "ok": True,
            "services": loaded.describe(),
            "modules": [module.name for module in loaded.modules],
        }
        if config["shared_backend"] == "redis":
            from mpnet.workers.redis_shared import RedisUnreachable, probe

            try:
                result["redis"] = probe(config)
            except RedisUnreachable as exc:
                if redis_required:
                    raise
                result["redis_unreachable"] = str(exc)
    except (ModuleError, ConfigError) as exc:
        result = {"ok": False, "error": str(exc)}
    except BaseException as exc:
        result = {"ok": False, "error": f"loading modules failed: {type(exc).__name__}: {exc}"}
    data = json.dumps(result).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(write_fd, view) :]


class Check:
    """A running checker process: read :attr:`fd` until :meth:`read` reports the end, then
    take :meth:`result`. The master polls ``fd`` in its own select loop (a reload's check must
    not stop it serving); ``mpnet check`` and start-up simply wait (:func:`check_modules`)."""

    def __init__(self, pid: int, fd: int, timeout: float) -> None:
        self.pid = pid
        self.fd = fd
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._chunks: list[bytes] = []

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bool:
        """Read what the checker wrote so far (never blocks); True once it closed the pipe."""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return False
            if not chunk:
                return True
            self._chunks.append(chunk)

    def result(self) -> dict[str, Any]:
        """The report, once :meth:`read` returned True; raises :class:`CheckFailed`."""
        try:
            result = json.loads(b"".join(self._chunks))
        except ValueError:
            raise CheckFailed("the module checker died without an answer") from None
        if not result.get("ok"):
            raise CheckFailed(result.get("error", "unknown error"))
        return result

    def timed_out(self) -> CheckFailed:
        return CheckFailed(f"loading the modules took longer than {self.timeout:g}s")

    def close(self, kill: bool = False) -> None:
        """Close the pipe; with *kill*, SIGKILL the checker first. The caller reaps it."""
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.fd != -1:
            os.close(self.fd)
            self.fd = -1


def start_check(
    config: Config,
    timeout: float,
    child_setup: Callable[[], None] | None = None,
    redis_required: bool = True,
) -> Check:
    """Fork a checker for *config* and return at once. *child_setup* runs first in the child
    (the master closes its sockets there: a checker must not hold them while it loads).
    *redis_required* False (a reload): an unreachable Redis is reported (the result's
    ``redis_unreachable``: why), not an error, since workers serve through an outage; only the
    first start and ``mpnet check`` insist."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_fd)
            if child_setup is not None:
                child_setup()
            _child(config, write_fd, redis_required)
        except BaseException:
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    return Check(pid, read_fd, timeout)


def check_modules(config: Config, timeout: float) -> dict[str, Any]:
    """Fork a checker for *config*, wait for it; return ``{"services": [...], "modules": [...]}``.

    Raises :class:`CheckFailed` with the reason when a module is missing, broken, raises on
    load, declares something invalid, or does not finish loading within *timeout* seconds.
    """
    check = start_check(config, timeout)
    try:
        while not check.read():
            remaining = check.deadline - time.monotonic()
            if remaining <= 0:
                check.close(kill=True)
                raise check.timed_out()
            with contextlib.suppress(InterruptedError):
                select.select([check.fd], [], [], min(remaining, 0.5))
    finally:
        check.close()
        _reap(check.pid)
    return check.result()


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            pass
        return
