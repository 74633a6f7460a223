"""Worker health: blocked event loops, drain deadlines, the memory limit, the watchdog's condition.

The master judges its workers between loop passes, from their heartbeats and from what the kernel
says about their memory. It acts on a worker only through signals and two fields of its handle:
``kill_at`` (SIGKILL after this time) and ``recycle`` (replace it with a fresh worker). Replacing
a worker is the master's reconcile, as for any worker that exits.

Heartbeats that arrived while the master itself was busy are still unread: a loop pass that took
longer than :data:`STALL_GRACE` judges no worker's silence.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable, Sequence

from .handle import WorkerHandle
from .pure.config import Config

log = logging.getLogger("mpnet.health")

TRACEBACK_GRACE = 1.0  # time a blocked worker gets to write its traceback before SIGKILL
MEMORY_CHECK_EVERY = 5.0
STALL_GRACE = 0.5


class Health:
    """Checks the workers on each housekeeping pass (:meth:`check`) and answers systemd's
    watchdog question (:meth:`healthy`). *polled_at* is when the master's loop last read the
    workers' channels."""

    def __init__(self) -> None:
        self._next_memory_check = 0.0

    def check(self, workers: Sequence[WorkerHandle], config: Config, polled_at: float) -> None:
        """Blocked event loops, drain deadlines and the memory limit."""
        now = time.monotonic()
        worker_timeout = float(config["worker_timeout"])
        boot_timeout = float(config["boot_timeout"])
        stalled = now - polled_at > STALL_GRACE
        for handle in workers:
            if handle.kill_at is not None:
                if now > handle.kill_at:
                    log.warning(
                        "worker %d (pid %d) did not stop in time; killing it",
                        handle.slot,
                        handle.pid,
                    )
                    handle.kill_at = float("inf")  # reaped soon; judged no more
                    handle.kill(signal.SIGKILL)
                continue
            if stalled or not handle.active:
                continue
            if handle.state == "booting":
                silent, limit, what = now - handle.started, boot_timeout, "boot_timeout"
            else:
                silent, limit, what = now - handle.last_heartbeat, worker_timeout, "worker_timeout"
            if worker_timeout and silent > limit:
                log.error(
                    "worker %d (pid %d): event loop blocked for %.1fs (%s %gs); "
                    "its traceback follows, then it is killed and replaced",
                    handle.slot,
                    handle.pid,
                    silent,
                    what,
                    limit,
                )
                handle.kill(signal.SIGUSR2)  # faulthandler dumps every thread's stack
                handle.kill_at = now + TRACEBACK_GRACE
        memory_limit = config["max_worker_memory"]
        if memory_limit and now >= self._next_memory_check:
            self._next_memory_check = now + MEMORY_CHECK_EVERY
            self._check_memory(workers, int(memory_limit))

    def healthy(self, workers: Iterable[WorkerHandle], config: Config, polled_at: float) -> bool:
        """Every ready worker's loop answered within worker_timeout (the watchdog's condition)."""
        now = time.monotonic()
        if now - polled_at > STALL_GRACE:
            return False  # heartbeats may wait unread: decide on the next pass
        limit = float(config["worker_timeout"]) or float("inf")
        return all(now - h.last_heartbeat < limit for h in workers if h.state == "ready")

    def _check_memory(self, workers: Sequence[WorkerHandle], limit: int) -> None:
        import psutil

        for handle in workers:
            if handle.state != "ready" or handle.recycle:
                continue
            try:
                rss = psutil.Process(handle.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                log.warning(
                    "worker %d (pid %d) uses %d bytes (max_worker_memory %d): recycling it",
                    handle.slot,
                    handle.pid,
                    rss,
                    limit,
                )
                handle.recycle = True
