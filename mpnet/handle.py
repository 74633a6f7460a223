"""The master's view of one worker process: its state, what its channel messages say about it,
how to signal it, and how it ended.

A worker goes ``booting -> ready -> draining`` (or ``stopping`` when the service stops). The
master decides every transition except ``ready``, which the worker announces itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from .channel import MasterChannel
from .pure.messages import BootError, Heartbeat, Message, Metrics, NotAccepting, Ready, Stopped
from .pure.metrics import Samples, flatten, redis_state

log = logging.getLogger("mpnet.handle")


@dataclass
class WorkerHandle:
    """The master's view of one worker process."""

    slot: int
    pid: int
    generation: int
    channel: MasterChannel
    started: float
    state: str = "booting"  # booting -> ready -> draining; or stopping when the service stops
    ready_at: float | None = None
    last_heartbeat: float = 0.0
    connections: int = 0
    served: int = 0
    refused: int = 0  # connections refused by a limit (max_connections, ..._per_ip)
    tls_failures: int = 0  # failed or timed-out TLS handshakes
    boot_error: str | None = None
    recycle: bool = False  # to be replaced by a fresh worker (memory limit)
    accepting: bool = True  # False once it closed its listening sockets (when stopping)
    kill_at: float | None = None  # SIGKILL after this time (drain deadline, traceback grace)
    log_sock: socket.socket | None = None  # SIGUSR1 hands the reopened log file over here
    # Its latest Metrics report, checked and flattened (mpnet.pure.metrics).
    metric_counters: Samples = field(default_factory=dict)
    metric_gauges: Samples = field(default_factory=dict)
    redis: dict[str, Any] | None = None  # its latest view of Redis (mpnet.pure.metrics)

    @property
    def active(self) -> bool:
        return self.state in ("booting", "ready")

    def kill(self, signum: int) -> None:
        """Send *signum* to the worker, unless it is gone already."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def on_message(self, message: Message) -> bool:
        """Take in a message about the worker itself; False if it is of another kind (shared
        state)."""
        if type(message) is Heartbeat:
            self.last_heartbeat = time.monotonic()
            self.connections, self.served = message.connections, message.served
            self.refused, self.tls_failures = message.refused, message.tls_failures
        elif type(message) is Metrics:
            self.metric_counters, self.metric_gauges = flatten(*message, self.slot)
            self.redis = redis_state(message.shared)
        elif type(message) is Ready:
            if self.state == "booting":
                self.state = "ready"
            self.ready_at = self.last_heartbeat = time.monotonic()
            log.info(
                "worker %d (pid %d, generation %d) ready",
                self.slot,
                self.pid,
                self.generation,
            )
        elif type(message) is NotAccepting:
            self.accepting = False
        elif type(message) is BootError:
            self.boot_error = message.reason
        elif type(message) is Stopped:
            self.served = message.served
        else:
            return False
        return True

    def status(self, now: float) -> dict[str, Any]:
        """The worker's row in ``mpnet status`` (CPU and memory as the kernel reports them;
        ``redis`` only on the Redis backend, once the worker reported)."""
        import psutil

        cpu = rss = None
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(self.pid)
            with process.oneshot():
                times = process.cpu_times()
                lifetime = max(now - self.started, 1e-3)
                cpu = 100.0 * (times.user + times.system) / lifetime
                rss = process.memory_info().rss
        row = {
            "slot": self.slot,
            "pid": self.pid,
            "generation": self.generation,
            "state": self.state,
            "connections": self.connections,
            "served": self.served,
            "refused": self.refused,
            "tls_failures": self.tls_failures,
            "cpu_percent": cpu,
            "rss": rss,
            "uptime": now - self.started,
        }
        if self.redis is not None:  # Redis backend: its last report, and for how long
            row["redis"] = {**self.redis, "for": max(0.0, time.time() - self.redis["since"])}
        return row


def describe_exit(status: int) -> str:
    """A wait status in words: ``exited with code 3``, ``killed by signal SIGKILL``."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
