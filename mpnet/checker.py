"""Load the modules in a throwaway process and report what they provide.

The master must know every service's ports before it binds and forks, but it must never run user
code (a module that crashes, hangs or leaks on import must not take the master with it). So it forks
a short-lived *checker* that loads the modules exactly as a worker would and writes back, as JSON on
a pipe, either the providers' declarations or the one-line error. ``mpnet check``, start-up and
every reload use it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import time
from typing import Any

from . import log as mpnet_log
from .config import Config, ConfigError
from .module import ModuleError, load_modules


class CheckFailed(Exception):
    """The modules could not be loaded; the message is the reason, fit to show as is."""


def _child(config: Config, write_fd: int) -> None:
    mpnet_log.set_role("checker")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    try:
        from .worker import drop_privileges

        loaded = load_modules(config, before_run=lambda: drop_privileges(config))
        from .worker import tls_contexts

        tls_contexts(config, loaded)  # a missing or broken certificate fails here, early
        result: dict[str, Any] = {
            "ok": True,
            "services": loaded.describe(),
            "modules": [module.name for module in loaded.modules],
        }
    except (ModuleError, ConfigError) as exc:
        result = {"ok": False, "error": str(exc)}
    except BaseException as exc:
        result = {"ok": False, "error": f"loading modules failed: {type(exc).__name__}: {exc}"}
    data = json.dumps(result).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(write_fd, view) :]


def check_modules(config: Config, timeout: float) -> dict[str, Any]:
    """Fork a checker for *config*; return ``{"services": [...], "modules": [...]}``.

    Raises :class:`CheckFailed` with the reason when a module is missing, broken, raises on
    load, declares something invalid, or does not finish loading within *timeout* seconds.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_fd)
            _child(config, write_fd)
        except BaseException:
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                raise CheckFailed(f"loading the modules took longer than {timeout:g}s")
            try:
                ready, _, _ = select.select([read_fd], [], [], min(remaining, 0.5))
            except InterruptedError:
                continue
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _reap(pid)
    try:
        result = json.loads(b"".join(chunks))
    except ValueError:
        raise CheckFailed("the module checker died without an answer") from None
    if not result.get("ok"):
        raise CheckFailed(result.get("error", "unknown error"))
    return result


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            pass
        return
