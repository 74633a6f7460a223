"""Worker health: blocked event loops, drain deadlines, the memory limits, the watchdog's condition.

The master judges its workers between loop passes, from their heartbeats and from what the kernel
says about their memory. It acts on a worker only through signals and two fields of its handle:
``kill_at`` (SIGKILL after this time) and ``recycle`` (replace it with a fresh worker). Replacing
a worker is the master's reconcile, as for any worker that exits.

Memory has two limits: above ``max_worker_memory`` a worker is recycled (a successor starts, then
it drains for up to ``graceful_timeout``); above ``max_worker_memory_hard`` (default 1.5 times the
other) it is killed at once, draining or not, so a worker that keeps allocating while it drains
cannot take the machine's memory. Memory is read once a second, and every
:data:`MEMORY_CHECK_CLOSE` seconds while a worker is above :data:`CLOSE_FRACTION` of a limit.

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
MEMORY_CHECK_EVERY = 1.0
MEMORY_CHECK_CLOSE = 0.1
CLOSE_FRACTION = 0.8
HARD_FACTOR = 1.5  # max_worker_memory_hard, unless set: this times max_worker_memory
STALL_GRACE = 0.5


class Health:
    """Checks the workers on each housekeeping pass (:meth:`check`) and answers systemd's
    watchdog question (:meth:`healthy`). *polled_at* is when the master's loop last read the
    workers' channels."""

    def __init__(self) -> None:
        self.next_memory_check = 0.0  # the master's loop wakes up for it

    @staticmethod
    def memory_limits(config: Config) -> tuple[int | None, int | None]:
        """(soft, hard) memory limits in bytes, each None when off."""
        soft, hard = config["max_worker_memory"], config["max_worker_memory_hard"]
        if hard is None and soft:
            hard = int(soft * HARD_FACTOR)
        return (int(soft) if soft else None), (int(hard) if hard else None)

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
        soft, hard = self.memory_limits(config)
        if (soft or hard) and now >= self.next_memory_check:
            close = self._check_memory(workers, soft, hard)
            self.next_memory_check = now + (MEMORY_CHECK_CLOSE if close else MEMORY_CHECK_EVERY)
        elif not (soft or hard):
            self.next_memory_check = now + MEMORY_CHECK_EVERY  # a reload may set a limit

    def healthy(self, workers: Iterable[WorkerHandle], config: Config, polled_at: float) -> bool:
        """Every ready worker's loop answered within worker_timeout (the watchdog's condition)."""
        now = time.monotonic()
        if now - polled_at > STALL_GRACE:
            return False  # heartbeats may wait unread: decide on the next pass
        limit = float(config["worker_timeout"]) or float("inf")
        return all(now - h.last_heartbeat < limit for h in workers if h.state == "ready")

    def _check_memory(
        self, workers: Sequence[WorkerHandle], soft: int | None, hard: int | None
    ) -> bool:
        """Recycle workers above *soft*, kill those above *hard*; True if one is close to a
        limit it may still cross (then the next check comes sooner)."""
        import psutil

        close = False
        for handle in workers:
            if handle.kill_at == float("inf"):
                continue  # killed already
            try:
                rss = psutil.Process(handle.pid).memory_info().rss
            except psutil.Error:
                continue
            if hard and rss > hard:
                log.error(
                    "worker %d (pid %d) uses %d bytes, above max_worker_memory_hard (%d): "
                    "killing it now (SIGKILL)",
                    handle.slot,
                    handle.pid,
                    rss,
                    hard,
                )
                if handle.state == "ready":  # replaced at once, without crash back-off
                    handle.state = "draining"  # (one that boots into it backs off as a crash)
                handle.kill_at = float("inf")
                handle.kill(signal.SIGKILL)
                continue
            recyclable = handle.state == "ready" and not handle.recycle
            if soft and recyclable and rss > soft:
                log.warning(
                    "worker %d (pid %d) uses %d bytes (max_worker_memory %d): recycling it",
                    handle.slot,
                    handle.pid,
                    rss,
                    soft,
                )
                handle.recycle = True
            limit = soft if soft and recyclable else hard
            close = close or bool(limit and rss > CLOSE_FRACTION * limit)
        return close
