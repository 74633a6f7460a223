"""The master: a small, boring loop that keeps the right workers running.

Like gunicorn's arbiter, signal handlers only queue the signal and wake the loop; everything
happens in one place, :meth:`Master._handle_signal`, between waits. The master never loads user
modules (a :mod:`checker` process does, see :mod:`mpnet.checker`), so a broken module cannot take
it down.

Each pass of the loop reconciles the workers with the desired state: for every slot one *ready*
worker of the current generation. A crashed worker is replaced in its slot (with back-off if it
keeps crashing); after a reload the next generation's worker starts in a slot, and only once it is
ready is the previous one told to drain; slots beyond the wanted count are drained and removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import log as mpnet_log
from .channel import ChannelError, MasterChannel
from .checker import CheckFailed, check_modules
from .config import Config, ConfigError
from .portmanager import PortConflict, PortLedger, ServicePlan, plan_services
from .shared import SharedMaster
from .worker import EXIT_BOOT_ERROR, worker_process

log = logging.getLogger("mpnet.master")

HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGCHLD,
)
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
HEALTHY_AFTER = 10.0  # a worker that ran this long resets its slot's crash back-off


class StartError(Exception):
    """The service cannot start; the message says why."""


@dataclass
class WorkerHandle:
    """The master's view of one worker process."""

    slot: int
    pid: int
    generation: int
    channel: MasterChannel
    started: float
    state: str = "booting"  # booting -> ready -> draining (or stopping)
    ready_at: float | None = None
    last_heartbeat: float = 0.0
    connections: int = 0
    served: int = 0
    boot_error: str | None = None
    kill_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Master:
    """Owns the listening sockets, the worker processes and the shared state."""

    def __init__(self, config: Config, reload_config: Any = None) -> None:
        self.config = config
        self._reload_config = reload_config  # callable returning a fresh Config, for SIGHUP
        self.slots = config.worker_count
        self.generation = 0
        self.ledger = PortLedger(config["backlog"])
        self.workers: dict[int, WorkerHandle] = {}
        self.state = "starting"
        self.stop_mode: str | None = None
        self.stop_deadline = 0.0
        self.start_error: str | None = None
        self.signal_queue: deque[int] = deque()
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._respawn_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self.shared = SharedMaster(config)
        self.notifier: Any = None  # systemd notifier, set by the CLI when running under systemd
        self.started_at = time.time()

    # -- public entry -------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until stopped, return the process exit code."""
        self._install_signals()
        try:
            try:
                self._start()
            except StartError as exc:
                log.error("cannot start: %s", exc)
                self._stop_workers_now()
                return 1
            self._notify_ready()
            while self.state != "stopped":
                self._loop_once()
            log.info("stopped")
            return 0
        finally:
            self.ledger.close_all()
            self.shared.close()

    # -- start-up -----------------------------------------------------------------------------

    def _prepare(self, config: Config) -> list[ServicePlan]:
        """Load the modules in a checker process and plan their endpoints (binds nothing)."""
        try:
            report = check_modules(config, float(config["boot_timeout"]))
            return plan_services(config, report["services"])
        except (CheckFailed, ConfigError) as exc:
            raise StartError(str(exc)) from None

    def _start(self) -> None:
        plans = self._prepare(self.config)
        try:
            self.ledger.apply(plans, self.slots)
        except PortConflict as exc:
            raise StartError(str(exc)) from None
        self.shared.open()
        for line in self.ledger.describe():
            log.info("service %s", line)
        self.generation = 1
        deadline = time.monotonic() + float(self.config["boot_timeout"])
        while not self._all_ready():
            if self.start_error:
                raise StartError(self.start_error)
            if self.state == "stopped" or self.stop_mode:
                raise StartError("stopped during start-up")
            if time.monotonic() > deadline:
                raise StartError("workers did not become ready within boot_timeout")
            self._loop_once()
        self.state = "running"
        log.info(
            "ready: %d worker(s), pid %d, %s",
            self.slots,
            os.getpid(),
            "uvloop" if _has_uvloop() else "asyncio",
        )

    def _all_ready(self) -> bool:
        ready = {
            h.slot
            for h in self.workers.values()
            if h.generation == self.generation and h.state == "ready"
        }
        return len(ready) >= self.slots

    # -- the loop -----------------------------------------------------------------------------

    def _loop_once(self) -> None:
        self._wait(self._next_timeout())
        while self.signal_queue:
            self._handle_signal(self.signal_queue.popleft())
        self._reap()
        if self.stop_mode:
            self._progress_stop()
        else:
            self._reconcile()
            self._check_health()
        self.shared.tick()

    def _next_timeout(self) -> float:
        timeout = 1.0
        now = time.monotonic()
        for when in self._respawn_at.values():
            timeout = min(timeout, max(0.0, when - now))
        return timeout

    def _wait(self, timeout: float) -> None:
        try:
            events = self.selector.select(timeout)
        except InterruptedError:
            return
        for key, mask in events:
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                continue
            handle: WorkerHandle = key.data
            if mask & selectors.EVENT_WRITE:
                handle.channel.flush()
            if mask & selectors.EVENT_READ:
                self._read_channel(handle)
            self._update_interest(handle)

    def _update_interest(self, handle: WorkerHandle) -> None:
        channel = handle.channel
        if channel.closed:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(channel)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if channel.wants_write else 0)
        with contextlib.suppress(KeyError):
            if self.selector.get_key(channel).events != events:
                self.selector.modify(channel, events, handle)

    def _read_channel(self, handle: WorkerHandle) -> None:
        try:
            messages = handle.channel.receive()
        except ChannelError as exc:
            self._cut_off(handle, f"sent a malformed message ({exc})")
            return
        if messages is None:
            self._close_channel(handle)
            return
        for message in messages:
            try:
                self._on_message(handle, message)
            except (ChannelError, TypeError, ValueError, IndexError, KeyError) as exc:
                self._cut_off(handle, f"sent an invalid message {str(message)[:80]!r} ({exc})")
                return

    def _close_channel(self, handle: WorkerHandle) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(handle.channel)
        handle.channel.close()

    def _cut_off(self, handle: WorkerHandle, reason: str) -> None:
        """A worker broke the channel protocol: end it; the master and the others carry on."""
        log.error("worker %d (pid %d) %s; killing it", handle.slot, handle.pid, reason)
        self._close_channel(handle)
        self._kill(handle, signal.SIGKILL)

    def _on_message(self, handle: WorkerHandle, message: list[Any]) -> None:
        kind = message[0]
        now = time.monotonic()
        if kind == "heartbeat":
            handle.last_heartbeat = now
            handle.connections, handle.served = int(message[1]), int(message[2])
        elif kind == "ready":
            handle.state = "ready" if handle.state == "booting" else handle.state
            handle.ready_at = handle.last_heartbeat = now
            log.info(
                "worker %d (pid %d, generation %d) ready",
                handle.slot,
                handle.pid,
                handle.generation,
            )
            self._on_worker_ready(handle)
        elif kind == "boot_error":
            handle.boot_error = str(message[1])
        elif kind == "stopped":
            handle.served = int(message[1])
        elif not self.shared.handle(handle, message, self._live_channels()):
            raise ChannelError(f"unknown message kind {kind!r}")

    def _live_channels(self) -> list[tuple[WorkerHandle, MasterChannel]]:
        return [
            (h, h.channel)
            for h in self.workers.values()
            if not h.channel.closed and h.state != "stopping"
        ]

    def _on_worker_ready(self, handle: WorkerHandle) -> None:
        """Hook for reloads and health bookkeeping (the next slot may be replaced)."""

    # -- signals ------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        signal.set_wakeup_fd(self._wake_w)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signal_queue.append(signum)

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # _reap runs every pass
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM:
            self.begin_stop("graceful", name)
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            self.begin_stop("quick", name)
        elif signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGTTIN:
            self.set_worker_count(self.slots + 1, name)
        elif signum == signal.SIGTTOU:
            self.set_worker_count(self.slots - 1, name)
        elif signum == signal.SIGUSR1:
            self.reopen_logs()

    # -- workers ------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> WorkerHandle:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sockets = self.ledger.slot_sockets(slot)
        self.shared.before_fork()
        pid = os.fork()
        if pid == 0:  # the child: drop everything of the master's, then become the worker
            try:
                parent_sock.close()
                self._forget_in_child(slot)
            except BaseException:
                os._exit(1)
            worker_process(
                slot, self.generation, self.config, child_sock, sockets, self.shared.tables
            )
        child_sock.close()
        handle = WorkerHandle(
            slot=slot,
            pid=pid,
            generation=self.generation,
            channel=MasterChannel(parent_sock),
            started=time.monotonic(),
        )
        self.workers[pid] = handle
        self.selector.register(handle.channel, selectors.EVENT_READ, handle)
        self._update_interest(handle)
        log.debug("worker %d started (pid %d, generation %d)", slot, pid, self.generation)
        return handle

    def _forget_in_child(self, slot: int) -> None:
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for handle in self.workers.values():
            handle.channel.sock.close()
        keep = {
            id(sock)
            for binding_sockets in self.ledger.slot_sockets(slot).values()
            for _, sock in binding_sockets
        }
        for sock in self.ledger.all_sockets():
            if id(sock) not in keep:
                sock.close()
        self.shared.forget_in_child()

    def _kill(self, handle: WorkerHandle, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signum)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if pid == 0:
                return
            handle = self.workers.pop(pid, None)
            if handle is None:
                continue
            self._close_channel(handle)
            self._on_worker_exit(handle, status)

    def _on_worker_exit(self, handle: WorkerHandle, status: int) -> None:
        how = describe_exit(status)
        if handle.state in ("draining", "stopping"):
            log.info("worker %d (pid %d) stopped (%s)", handle.slot, handle.pid, how)
            return
        if self.state == "starting":
            reason = handle.boot_error or f"worker {handle.slot} {how} before it was ready"
            self.start_error = self.start_error or reason
            return
        code = os.waitstatus_to_exitcode(status)
        if handle.boot_error or code == EXIT_BOOT_ERROR:
            log.error(
                "worker %d (pid %d) could not start: %s",
                handle.slot,
                handle.pid,
                handle.boot_error or how,
            )
        else:
            log.error("worker %d (pid %d) %s; replacing it", handle.slot, handle.pid, how)
        self._schedule_respawn(handle)

    def _schedule_respawn(self, handle: WorkerHandle) -> None:
        now = time.monotonic()
        lived = now - (handle.ready_at or handle.started)
        if handle.ready_at is not None and lived >= HEALTHY_AFTER:
            self._backoff.pop(handle.slot, None)
            return  # replaced at once by _reconcile
        delay = min(self._backoff.get(handle.slot, BACKOFF_START / 2) * 2, BACKOFF_MAX)
        self._backoff[handle.slot] = delay
        self._respawn_at[handle.slot] = now + delay
        log.warning("worker %d crashed soon after start; next attempt in %.1fs", handle.slot, delay)

    def _reconcile(self) -> None:
        """Bring the workers to the desired state (see the module docstring)."""
        now = time.monotonic()
        current: dict[int, WorkerHandle] = {}
        for handle in self.workers.values():
            if handle.generation == self.generation and handle.state in ("booting", "ready"):
                current[handle.slot] = handle
        replacing = (
            any(h.state == "booting" and h.generation == self.generation for h in current.values())
            and self._has_old_workers()
        )
        for slot in range(self.slots):
            if slot in current or self.start_error:
                continue
            when = self._respawn_at.get(slot)
            if when is not None and when > now:
                continue
            if replacing and self._old_worker(slot) is not None:
                continue  # a reload replaces one slot at a time
            self._respawn_at.pop(slot, None)
            current[slot] = self._spawn(slot)
            if self._old_worker(slot) is not None:
                replacing = True
        for handle in list(self.workers.values()):
            if handle.state not in ("booting", "ready"):
                continue
            if handle.slot >= self.slots:
                self._retire(handle, "worker count lowered")
            elif handle.generation < self.generation:
                successor = current.get(handle.slot)
                if successor is not None and successor.state == "ready":
                    self._retire(handle, f"replaced by generation {self.generation}")
        self._finish_transitions()

    def _old_worker(self, slot: int) -> WorkerHandle | None:
        for handle in self.workers.values():
            if (
                handle.slot == slot
                and handle.generation < self.generation
                and handle.state in ("booting", "ready")
            ):
                return handle
        return None

    def _has_old_workers(self) -> bool:
        return any(
            h.generation < self.generation and h.state in ("booting", "ready")
            for h in self.workers.values()
        )

    def _retire(self, handle: WorkerHandle, why: str) -> None:
        """Graceful: stop accepting, drain up to graceful_timeout, exit."""
        log.info("worker %d (pid %d) draining: %s", handle.slot, handle.pid, why)
        handle.state = "draining"
        handle.kill_at = time.monotonic() + float(self.config["graceful_timeout"]) + 10
        self._kill(handle, signal.SIGTERM)

    def _finish_transitions(self) -> None:
        """Close what no worker needs any more once the workers using it are gone."""
        busy_slots = {h.slot for h in self.workers.values()}
        if all(slot < self.slots for slot in busy_slots):
            self.ledger.shrink_slots(self.slots)
        if not self._has_old_workers() and not any(
            h.state == "draining" and h.generation < self.generation for h in self.workers.values()
        ):
            for binding in self.ledger.release_unplanned():
                log.info(
                    "closed %s (service %s no longer listens there)",
                    binding.address,
                    binding.service,
                )

    def _check_health(self) -> None:
        """Drain timeouts: a draining worker past its deadline is killed."""
        now = time.monotonic()
        for handle in list(self.workers.values()):
            if handle.kill_at is not None and now > handle.kill_at:
                log.warning(
                    "worker %d (pid %d) did not stop in time; killing it", handle.slot, handle.pid
                )
                handle.kill_at = None
                self._kill(handle, signal.SIGKILL)

    # -- operations ---------------------------------------------------------------------------

    def set_worker_count(self, count: int, why: str = "") -> None:
        if count < 1:
            log.warning("%s: keeping the last worker (at least one is needed)", why or "workers")
            return
        if count > self.slots:
            self.ledger.ensure_slots(count)
        log.info("worker count %d -> %d%s", self.slots, count, f" ({why})" if why else "")
        self.slots = count

    def reload(self) -> bool:
        """Re-read config and modules; if valid, replace the workers slot by slot."""
        log.info("reloading")
        if self._reload_config is None:
            log.error("reload failed: no config source to re-read")
            return False
        try:
            config: Config = self._reload_config()
            if config.values["workers"] != self.config.values["workers"]:
                self.slots = config.worker_count
            plans = self._prepare(config)
            self.ledger.apply(plans, self.slots)
        except (ConfigError, StartError, PortConflict) as exc:
            log.error("reload failed, still serving the previous configuration: %s", exc)
            return False
        mpnet_log.setup(config["log_level"], config["log_file"])
        self.config = config
        self.generation += 1
        for line in self.ledger.describe():
            log.info("service %s", line)
        log.info("reload accepted: starting generation %d", self.generation)
        return True

    def reopen_logs(self) -> None:
        mpnet_log.reopen()
        for handle in self.workers.values():
            self._kill(handle, signal.SIGUSR1)

    def begin_stop(self, mode: str, why: str) -> None:
        if self.stop_mode == "quick" or (self.stop_mode == mode):
            return
        log.info("%s stop (%s)", mode, why)
        self.stop_mode = mode
        timeout = (
            self.config["graceful_timeout"] if mode == "graceful" else self.config["quick_timeout"]
        )
        self.stop_deadline = time.monotonic() + float(timeout) + 5.0
        for handle in self.workers.values():
            handle.state = "stopping"
            self._kill(handle, signal.SIGTERM if mode == "graceful" else signal.SIGQUIT)
        self.ledger.close_all()
        if self.notifier is not None:
            self.notifier.stopping()

    def _progress_stop(self) -> None:
        if not self.workers:
            self.state = "stopped"
            return
        if time.monotonic() > self.stop_deadline:
            for handle in self.workers.values():
                log.warning(
                    "worker %d (pid %d) did not stop in time; killing it", handle.slot, handle.pid
                )
                self._kill(handle, signal.SIGKILL)
            self.stop_deadline = time.monotonic() + 5.0

    def _stop_workers_now(self) -> None:
        """After a failed start: kill what was started and wait for it."""
        for handle in self.workers.values():
            self._kill(handle, signal.SIGKILL)
        for pid in list(self.workers):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.workers.pop(pid, None)

    def _notify_ready(self) -> None:
        if self.notifier is not None:
            self.notifier.ready(f"{self.slots} workers")


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
