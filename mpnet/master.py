"""The master: a small, boring loop that keeps the right workers running.

Like gunicorn's arbiter, signal handlers only queue the signal and wake the loop; everything
happens in one place, :meth:`Master._handle_signal`, between waits. The master never loads user
modules (a checker process does, see :mod:`mpnet.checker`), so a broken module cannot take it down.

Each pass of the loop reconciles the workers with the desired state: for every slot one *ready*
worker of the current generation. A crashed worker is replaced in its slot (with back-off if it
keeps crashing). After a reload, or for a worker to be recycled, a successor starts in the slot and
only once it is ready is the predecessor told to drain; a reload replaces one slot at a time. Slots
beyond the wanted count are drained and removed.

Beside it, each in its own module: a reload's check, commit and rollback (:mod:`mpnet.reload`,
which asks things of the master only through :class:`~mpnet.reload.ReloadHost`), the judging of
worker health (:mod:`mpnet.health`) and the master's view of one worker (:mod:`mpnet.handle`).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import log as mpnet_log
from .channel import MasterChannel
from .checker import Check, CheckFailed, check_modules, start_check
from .control import ControlServer, Deferred, default_socket_path, service_uids
from .devreload import FileWatcher
from .handle import WorkerHandle, describe_exit
from .health import STALL_GRACE, Health
from .heap import trim_heap
from .iplimit import IPCountTable
from .journal import StateFileError
from .metrics import MetricsBook, to_json
from .metricsserver import MetricsClient, MetricsServer
from .portmanager import PortConflict, PortLedger, plan_services
from .pure.config import Config, ConfigError, parse_listen_address
from .pure.controlproto import (
    ControlReply,
    ControlRequest,
    ReloadRequest,
    StatusRequest,
    StopRequest,
)
from .pure.messages import ChannelError, from_wire
from .pure.portplan import ServicePlan
from .reload import Reloads
from .shared import SharedMaster
from .steering import LOAD_HORIZON, ArrivalRate, Steering, healthy_slots, load_shares
from .workers.worker import EXIT_BOOT_ERROR, Worker, uvloop, worker_process

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
MASTER_ONLY = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
# A worker that was ready and then crashed most likely died of something it served (a poison
# request): its replacement may meet the next one in the accept queue, and the slot's clients
# wait in that queue meanwhile, so its back-off stays short. Boot failures wait up to BACKOFF_MAX.
BACKOFF_MAX_SERVING = 2.0
HEALTHY_AFTER = 10.0  # a worker that ran this long resets its slot's crash back-off
STATUS_EVERY = 5.0
HOUSEKEEPING_EVERY = 0.05
TCP_MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


class StartError(Exception):
    """The service cannot start; the message says why."""


class Master:
    """Owns the listening sockets, the worker processes, the shared state and the control socket."""

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.slots = config.worker_count
        self.generation = 0
        self.ledger = PortLedger(config["backlog"])
        self.workers: dict[int, WorkerHandle] = {}
        self.state = "starting"  # starting -> running -> stopped
        self.stop_mode: str | None = None
        self.stop_deadline = 0.0
        self.start_error: str | None = None
        self.reloads = Reloads(self, self.ledger, reload_config)
        self.health = Health()
        self.steering = Steering()
        self.load_shares: dict[int, int] | None = None  # slot -> jump-table entries, if skewed
        self.arrivals = ArrivalRate()
        self.signal_queue: deque[int] = deque()
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._respawn_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._reset_queue: set[int] = set()  # slots whose accept queue is reset before respawn
        self.shared = SharedMaster(config)
        self.ip_counts = IPCountTable.for_workers(config.worker_count)  # a row per live worker
        self.control: ControlServer | None = None
        self.metrics = MetricsBook()
        self.metrics_server: MetricsServer | None = None
        self.notifier: Any = None  # systemd notifier, set by the CLI when running under systemd
        self.watcher: FileWatcher | None = None  # serve --reload: set by the CLI
        self.started_at = time.time()
        self._next_housekeeping = 0.0
        self._channels: list[tuple[WorkerHandle, MasterChannel]] | None = None
        self._next_status = 0.0
        self._next_watchdog = 0.0
        self._polled_at = time.monotonic()  # when the loop last looked at the channels

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
            self.notify_ready()
            while self.state != "stopped":
                self._loop_once()
            log.info("stopped")
            return 0
        finally:
            self.reloads.close()
            self.ledger.close_all()
            if self.control is not None:
                self.control.close()
            if self.metrics_server is not None:
                self.metrics_server.close()
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
            self.ledger.check_activated(plans)
            self.ledger.apply(plans, self.slots)
            self.shared.open()
        except (PortConflict, StateFileError, OSError) as exc:
            raise StartError(str(exc)) from None
        self._open_control()
        self._open_metrics()
        for line in self.ledger.describe():
            log.info("service %s", line)
        self.generation = 1
        deadline = time.monotonic() + float(self.config["boot_timeout"])
        while not self._all_ready():
            if self.start_error:
                raise StartError(self.start_error)
            if self.stop_mode:
                raise StartError("stopped during start-up")
            if time.monotonic() > deadline:
                raise StartError("workers did not become ready within boot_timeout")
            self._loop_once()
        self.state = "running"
        log.info(
            "ready: %d worker(s), pid %d, %s",
            self.slots,
            os.getpid(),
            "uvloop" if uvloop is not None else "asyncio",
        )

    def _open_control(self) -> None:
        configured = self.config["control_socket"]
        path = self.config.resolve_path(configured) if configured else default_socket_path()
        try:
            self.control = ControlServer(
                path, self.handle_request, service_uids(self.config["user"]), log
            )
        except OSError as exc:
            if configured:
                raise StartError(f"control socket {path}: {exc}") from None
            log.warning("no control socket (%s); mpnet status/reload/stop will not work", exc)
            return
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        log.debug("control socket at %s", path)

    def _open_metrics(self) -> None:
        addresses = self.config["metrics_listen"]
        if not addresses:
            return
        from . import exposition  # noqa: F401  (imported now, not in the first scrape)

        try:
            server = MetricsServer(
                [parse_listen_address(a) for a in addresses], self.metrics_page, log
            )
        except OSError as exc:
            raise StartError(str(exc)) from None
        self.metrics_server = server
        for sock in server.listeners:
            self.selector.register(sock, selectors.EVENT_READ, "metrics")
        log.info("metrics on %s", ", ".join(f"http://{e}/metrics" for e in server.endpoints()))

    def _all_ready(self) -> bool:
        ready = {h.slot for h in self._current() if h.state == "ready"}
        return len(ready) >= self.slots

    def _current(self) -> list[WorkerHandle]:
        """Workers of the current generation that are neither draining nor to be recycled."""
        return [
            h
            for h in self.workers.values()
            if h.generation == self.generation and h.active and not h.recycle
        ]

    def _outdated(self, handle: WorkerHandle) -> bool:
        return handle.active and (handle.generation < self.generation or handle.recycle)

    # -- the loop -----------------------------------------------------------------------------

    def _loop_once(self) -> None:
        self._wait(self._next_timeout())
        self.shared.tick()  # answers first: housekeeping must not delay them
        signalled = bool(self.signal_queue)
        while self.signal_queue:
            self._handle_signal(self.signal_queue.popleft())
        now = time.monotonic()
        # Channel traffic (shared-table operations) wakes the loop often; the bookkeeping below
        # runs on a signal (SIGCHLD included) or at most every HOUSEKEEPING_EVERY seconds.
        if signalled or now >= self._next_housekeeping or self.state == "starting":
            self._next_housekeeping = now + HOUSEKEEPING_EVERY
            self._housekeeping()
        for handle in self.workers.values():
            if handle.channel.wants_write:
                self._update_interest(handle)  # filled while serving another worker

    def _housekeeping(self) -> None:
        self._reap()
        for handle in list(self.workers.values()):
            if handle.channel.failed and not handle.channel.closed:
                self._cut_off(handle, handle.channel.failed)
        if self.stop_mode:
            self._progress_stop()
        else:
            self.reloads.tick(running=self.state == "running")
            self._steer()
            if self.watcher is not None and self.state == "running":
                self._watch_files()
            self._reconcile()
            self.health.check(list(self.workers.values()), self.config, self._polled_at)
            self._systemd_tick()
        if self.control is not None:
            for client in self.control.expire():
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(client)
        if self.metrics_server is not None:
            for scraper in self.metrics_server.expired():
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(scraper)
                self.metrics_server.drop(scraper)

    def _steer(self) -> None:
        """New connections only to slots whose worker accepts and answers (mpnet/steering.py).
        Not judged after a pass of the master's own loop that was late: heartbeats may wait
        unread."""
        now = time.monotonic()
        if now - self._polled_at > STALL_GRACE:
            return
        stall_timeout = float(self.config["stall_timeout"])
        healthy = healthy_slots(self.workers.values(), self.slots, stall_timeout, now)
        held = dict.fromkeys(healthy, 0)
        for handle in self.workers.values():
            if handle.slot in held and handle.state == "ready" and handle.accepting:
                held[handle.slot] += handle.connections
        served = {handle.pid: handle.served for handle in self.workers.values()}
        arriving = self.arrivals.update(served, now) * LOAD_HORIZON
        margin = int(self.config["load_margin"])
        shares = load_shares(held, arriving, margin, self.load_shares is not None)
        if (shares is None) != (self.load_shares is None):
            log.debug("new connections %s", f"shared out by load: {shares}" if shares else "even")
        self.load_shares = shares
        self.steering.update(self.ledger.bindings.values(), healthy, shares)
        self.steering.keep_drains_below(self.slots)

    def _watch_files(self) -> None:
        """``serve --reload``: a changed config or module file starts the SIGHUP reload."""
        assert self.watcher is not None
        changed = self.watcher.check(self.config, time.monotonic())
        if changed:
            log.info("%s changed: reloading", ", ".join(str(path) for path in changed))
            self.reload()

    def _next_timeout(self) -> float:
        """Sleep until the next thing due: a respawn, a SIGKILL deadline, a watchdog ping."""
        timeout = 1.0
        now = time.monotonic()
        deadlines = list(self._respawn_at.values())
        deadlines += [h.kill_at for h in self.workers.values() if h.kill_at is not None]
        deadlines.append(self.health.next_memory_check)
        if self.notifier is not None and self.notifier.watchdog_interval():
            deadlines.append(self._next_watchdog)
        if self.reloads.deadline is not None:
            deadlines.append(self.reloads.deadline)
        if self.watcher is not None:
            deadlines.append(self.watcher.next_poll)
        for when in deadlines:
            timeout = min(timeout, max(0.0, when - now))
        return timeout

    def _wait(self, timeout: float) -> None:
        try:
            events = self.selector.select(timeout)
        except InterruptedError:
            return
        self._polled_at = time.monotonic()
        for key, mask in events:
            data = key.data
            if data is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            elif data == "control":
                assert self.control is not None
                for client in self.control.accept():
                    self._register(client, selectors.EVENT_READ, client)
            elif isinstance(data, WorkerHandle):
                if mask & selectors.EVENT_WRITE:
                    data.channel.flush()
                if mask & selectors.EVENT_READ:
                    self._read_channel(data)
                self._update_interest(data)
            elif data == "checker":
                self.reloads.on_readable()
            elif data == "metrics":
                assert self.metrics_server is not None
                for scraper in self.metrics_server.accept(key.fileobj):  # type: ignore[arg-type]
                    self._register(scraper, selectors.EVENT_READ, scraper)
            elif isinstance(data, MetricsClient):
                self._metrics_client_event(data, mask)
            else:
                self._control_client_event(data, mask)

    def _control_client_event(self, client: Any, mask: int) -> None:
        assert self.control is not None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client)
        if mask & selectors.EVENT_READ:
            self.control.on_readable(client)
        elif mask & selectors.EVENT_WRITE:
            self.control.on_writable(client)
        if client.sock.fileno() != -1:  # still talking: wait for more in or room out
            events = selectors.EVENT_WRITE if client.outbox else selectors.EVENT_READ
            self._register(client, events, client)

    def _metrics_client_event(self, scraper: MetricsClient, mask: int) -> None:
        assert self.metrics_server is not None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(scraper)
        if mask & selectors.EVENT_READ:
            self.metrics_server.on_readable(scraper)
        elif mask & selectors.EVENT_WRITE:
            self.metrics_server.on_writable(scraper)
        if not scraper.closed:  # wait for the rest of the request, or room for the answer
            events = selectors.EVENT_WRITE if scraper.outbox else selectors.EVENT_READ
            self._register(scraper, events, scraper)

    def _register(self, fileobj: Any, events: int, data: Any) -> None:
        """Register a new socket. A channel closed by a failed write is still keyed by its old
        fd number until the master forgets it; a new socket may have that number by now."""
        stale = self.selector.get_map().get(fileobj.fileno())
        if stale is not None and isinstance(stale.data, WorkerHandle) and stale.data.channel.closed:
            self.selector.unregister(stale.fileobj)
        self.selector.register(fileobj, events, data)

    def _control_answered(self, client: Any) -> None:
        """A deferred control answer went out: keep the selector in step with that client."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client)
        if client.sock.fileno() != -1:  # the answer did not fit in the socket at once
            self._register(client, selectors.EVENT_WRITE, client)

    def _unregister_channel(self, handle: WorkerHandle) -> None:
        """Forget a worker's channel in the selector, but only its own registration: a closed
        channel's fileno() is its old fd number, which may belong to a new socket now (a control
        client, another worker's channel) that must stay registered."""
        with contextlib.suppress(KeyError, ValueError):
            if self.selector.get_key(handle.channel).data is handle:
                self.selector.unregister(handle.channel)

    def _update_interest(self, handle: WorkerHandle) -> None:
        channel = handle.channel
        if channel.closed:
            self._unregister_channel(handle)
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
        self._unregister_channel(handle)
        handle.channel.close()
        if handle.log_sock is not None:
            handle.log_sock.close()

    def _cut_off(self, handle: WorkerHandle, reason: str) -> None:
        """A worker broke the channel protocol: end it; the master and the others carry on."""
        log.error("worker %d (pid %d) %s; killing it", handle.slot, handle.pid, reason)
        self._close_channel(handle)
        handle.kill(signal.SIGKILL)

    def _on_message(self, handle: WorkerHandle, raw: Any) -> None:
        message = from_wire(raw)
        if handle.on_message(message):
            return
        if not self.shared.handle(handle, message, self._live_channels()):
            raise ChannelError(f"{type(message).__name__} is not a message a worker sends")

    def _live_channels(self) -> list[tuple[WorkerHandle, MasterChannel]]:
        """Every worker's channel, for fan-out. Built once per change of the worker set, not
        per shared-table message (a closed channel ignores what is sent to it)."""
        if self._channels is None:
            self._channels = [(h, h.channel) for h in self.workers.values()]
        return self._channels

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
        elif self.stop_mode:
            log.info("%s ignored: stopping", name)
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
        # Descriptors cannot pass through the worker's end of the channel (an asyncio
        # transport): the reopened log file takes a datagram pair of its own.
        log_parent, log_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        sockets = self.ledger.slot_sockets(slot)
        self._before_fork()
        trim_heap()  # the worker allocates into fresh pages, not copies of free ones (heap.py)
        ip_row = self.ip_counts.acquire()
        pid = os.fork()
        if pid == 0:  # the child: drop everything of the master's, then become the worker
            try:
                parent_sock.close()
                log_parent.close()
                self._forget_in_child(slot)
                self.ip_counts.attach(ip_row)
                worker = Worker(
                    slot,
                    self.generation,
                    self.config,
                    child_sock,
                    sockets,
                    self.shared.tables,
                    log_sock=log_child,
                )
            except BaseException:
                os._exit(1)
            worker_process(worker)
        child_sock.close()
        self.ip_counts.assign(pid, ip_row)
        log_child.close()
        log_parent.setblocking(False)
        handle = WorkerHandle(
            slot=slot,
            pid=pid,
            generation=self.generation,
            channel=MasterChannel(parent_sock),
            started=time.monotonic(),
            log_sock=log_parent,
        )
        self.workers[pid] = handle
        self._channels = None
        self._register(handle.channel, selectors.EVENT_READ, handle)
        log.debug("worker %d started (pid %d, generation %d)", slot, pid, self.generation)
        return handle

    def _forget_in_child(self, slot: int | None) -> None:
        """In a forked worker (or, with *slot* None, a checker): close what is the master's.
        The master's own signals (a group-wide ``kill``, ``systemctl kill``) are ignored."""
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN if signum in MASTER_ONLY else signal.SIG_DFL)
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for handle in self.workers.values():
            handle.channel.sock.close()
            if handle.log_sock is not None:
                handle.log_sock.close()
        self.reloads.forget_in_child()
        if self.control is not None:
            self.control.sock.close()
            for client in self.control.clients.values():
                client.sock.close()
        if self.metrics_server is not None:
            for sock in self.metrics_server.listeners:
                sock.close()
            for scraper in self.metrics_server.clients.values():
                scraper.sock.close()
        slot_sockets = self.ledger.slot_sockets(slot) if slot is not None else {}
        keep = {id(sock) for pairs in slot_sockets.values() for _, sock in pairs}
        for sock in self.ledger.all_sockets():
            if id(sock) not in keep:
                sock.close()
        self.shared.forget_in_child()

    def _before_fork(self) -> None:
        """What a fork (worker or checker) must not inherit half-done: buffered journal bytes
        and log lines the child would write a second time."""
        self.shared.before_fork()
        mpnet_log.flush()

    def _forget_in_checker(self) -> None:
        """In a reload's checker: keep none of the master's sockets (a port released while it
        loads must not stay bound by it)."""
        self._forget_in_child(None)

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if pid == 0:
                return
            handle = self.workers.pop(pid, None)
            self.ip_counts.release(pid)  # its per-IP counts end with it, even after kill -9
            if handle is None:
                continue
            self._channels = None
            if not handle.channel.closed:
                self._read_channel(handle)  # a last boot_error may still be in the socket
            self._close_channel(handle)
            self.metrics.retire(handle, usage.ru_utime + usage.ru_stime)
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
        if (
            self.reloads.can_roll_back
            and handle.generation == self.generation
            and handle.ready_at is None
        ):
            reason = handle.boot_error or f"worker {handle.slot} {how} before it was ready"
            self.reloads.roll_back(f"worker {handle.slot} (pid {handle.pid}): {reason}")
            return
        code = os.waitstatus_to_exitcode(status)
        if handle.boot_error or code == EXIT_BOOT_ERROR:
            self.metrics.restarted("boot_error")
        elif handle.kill_at is not None:  # killed by the health check: its loop was blocked
            self.metrics.restarted("unresponsive")
        else:
            self.metrics.restarted("crashed")
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
        if handle.ready_at is not None and now - handle.ready_at >= HEALTHY_AFTER:
            self._backoff.pop(handle.slot, None)
            self._reset_queue.discard(handle.slot)
            return  # replaced at once by _reconcile
        if handle.ready_at is not None and handle.slot not in self._backoff:
            # A worker that was serving dies young: replace it at once, but arm the back-off
            # so that a second quick failure in this slot waits.
            self._backoff[handle.slot] = BACKOFF_START / 2
            return
        cap = BACKOFF_MAX if handle.ready_at is None else BACKOFF_MAX_SERVING
        if handle.ready_at is not None:
            self._reset_queue.add(handle.slot)  # crashed again while serving: see _reconcile
        delay = min(self._backoff.get(handle.slot, BACKOFF_START / 2) * 2, cap)
        self._backoff[handle.slot] = delay
        self._respawn_at[handle.slot] = now + delay
        log.warning(
            "worker %d failed soon after starting; next attempt in %.1fs (crash back-off)",
            handle.slot,
            delay,
        )

    def _reconcile(self) -> None:
        """Bring the workers to the desired state (see the module docstring)."""
        now = time.monotonic()
        current = {h.slot: h for h in self._current()}
        # A reload replaces one slot at a time: no new successor while one is still booting.
        replacing = any(
            h.state == "booting" and self._predecessor(h.slot) is not None for h in current.values()
        )
        for slot in range(self.slots):
            if slot in current or self.start_error:
                continue
            when = self._respawn_at.get(slot)
            if when is not None and when > now:
                continue
            has_predecessor = self._predecessor(slot) is not None
            if replacing and has_predecessor:
                continue
            self._respawn_at.pop(slot, None)
            if slot in self._reset_queue:
                self._reset_queue.discard(slot)
                reset = self.ledger.reset_queued(slot)
                if reset:
                    log.warning(
                        "worker %d crashed again soon after serving: reset the %d connection(s) "
                        "queued for its slot (they may carry the request that crashes it)",
                        slot,
                        reset,
                    )
            current[slot] = self._spawn(slot)
            replacing = replacing or has_predecessor
        for handle in list(self.workers.values()):
            if not handle.active:
                continue
            if handle.slot >= self.slots:
                # Steered away from already: it accepts what is queued on its sockets first.
                if self.steering.drained(handle.slot, self.ledger.bindings.values()):
                    self._retire(handle, "worker count lowered")
            elif self._outdated(handle):
                successor = current.get(handle.slot)
                if successor is not None and successor.state == "ready":
                    if handle.recycle:
                        self.metrics.restarted("memory")
                    why = (
                        "recycled"
                        if handle.recycle
                        else f"replaced by generation {self.generation}"
                    )
                    self._retire(handle, why)
        self._finish_transitions()

    def _predecessor(self, slot: int) -> WorkerHandle | None:
        for handle in self.workers.values():
            if handle.slot == slot and self._outdated(handle):
                return handle
        return None

    def _retire(self, handle: WorkerHandle, why: str) -> None:
        """Graceful: stop accepting, drain up to graceful_timeout, exit."""
        log.info("worker %d (pid %d) draining: %s", handle.slot, handle.pid, why)
        handle.state = "draining"
        handle.kill_at = time.monotonic() + float(self.config["graceful_timeout"]) + 10
        handle.kill(signal.SIGTERM)

    def _finish_transitions(self) -> None:
        """Close what no worker accepts on any more, once the workers that did were told to drain.

        A draining worker has stopped accepting (it closes its own copy of the listening sockets
        first thing), so the master's copy is then the only thing keeping such a socket open:
        kept until the drain ends, it would queue connections that nobody accepts for up to
        graceful_timeout, then reset them. Closed now, the kernel moves them to the other
        sockets of the port (net.ipv4.tcp_migrate_req = 1) and new ones go elsewhere or are
        refused (a port no longer served).
        """
        if all(h.slot < self.slots for h in self.workers.values() if h.active):
            for slot in self.ledger.shrink_slots(self.slots):
                log.debug("closed the sockets of slot %d", slot)
        old_active = any(h.generation < self.generation and h.active for h in self.workers.values())
        if not old_active:
            for binding in self.ledger.release_unplanned():
                log.info(
                    "closed %s (service %s no longer listens there)",
                    binding.address,
                    binding.service,
                )
        # Complete once the new generation serves every slot; old workers may still drain
        # their connections (up to graceful_timeout) without holding up the next reload.
        old_accepting = any(
            h.generation < self.generation and h.accepting for h in self.workers.values()
        )
        if self.reloads.replacing and not old_active and not old_accepting and self._all_ready():
            self.reloads.complete()

    def _systemd_tick(self) -> None:
        notifier = self.notifier
        if notifier is None:
            return
        now = time.monotonic()
        interval = notifier.watchdog_interval()
        if interval and now >= self._next_watchdog:
            if self.health.healthy(self.workers.values(), self.config, self._polled_at):
                notifier.watchdog()
                self._next_watchdog = now + interval
            else:  # look again soon, without spinning
                self._next_watchdog = now + interval / 4
        if now >= self._next_status:
            notifier.status(self._status_line())
            self._next_status = now + STATUS_EVERY

    def _status_line(self) -> str:
        ready = sum(1 for h in self.workers.values() if h.state == "ready")
        connections = sum(h.connections for h in self.workers.values())
        return f"{ready}/{self.slots} workers ready, {connections} connections"

    # -- operations ---------------------------------------------------------------------------

    def set_worker_count(self, count: int, why: str = "") -> str:
        if count < 1:
            message = "keeping the last worker (at least one is needed)"
            log.warning("%s: %s", why or "workers", message)
            return message
        if count > self.slots:
            try:
                self.ledger.ensure_slots(count)
            except PortConflict as exc:
                log.error("cannot add workers: %s", exc)
                return f"cannot add workers: {exc}"
        elif count < self.slots and self.steering.available:
            log.info(
                "removing slots: new connections steered away from them; each retiring worker "
                "accepts what is queued on its sockets, then stops"
            )
        elif count < self.slots and not _migrates_queued_connections():
            log.warning(
                "removing slots: connections still queued on their sockets may be reset; "
                "set net.ipv4.tcp_migrate_req = 1 so the kernel moves them to other workers"
            )
        message = f"worker count {self.slots} -> {count}" + (f" ({why})" if why else "")
        log.info("%s", message)
        self.slots = count
        return message

    def reload(self, waiter: Deferred | None = None) -> None:
        """Re-read config and modules; if valid, replace the workers slot by slot (see
        :mod:`mpnet.reload`). *waiter* (a control client) gets the check's outcome."""
        self.reloads.request(waiter, running=self.state == "running")

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the log file here (the master keeps its privileges) and hand the
        new descriptor to every worker: one running as ``user`` could not open the path."""
        fd = mpnet_log.reopen()
        if fd is None:
            log.debug("SIGUSR1: no log file reopened")
            return
        log.info("log file reopened")
        for handle in self.workers.values():
            if handle.log_sock is None or handle.log_sock.fileno() == -1:
                continue
            try:
                socket.send_fds(handle.log_sock, [b"log"], [fd])
            except OSError as exc:
                log.warning(
                    "worker %d (pid %d) keeps the old log file: %s", handle.slot, handle.pid, exc
                )

    def begin_stop(self, mode: str, why: str) -> None:
        if self.stop_mode == "quick" or self.stop_mode == mode:
            return
        log.info("%s stop (%s)", mode, why)
        self.stop_mode = mode
        self.reloads.cancel()
        key = "graceful_timeout" if mode == "graceful" else "quick_timeout"
        self.stop_deadline = time.monotonic() + float(self.config[key]) + 5.0
        for handle in self.workers.values():
            handle.state = "stopping"
            handle.kill(signal.SIGTERM if mode == "graceful" else signal.SIGQUIT)
        self.ledger.close_all()
        if self.notifier is not None:
            self.notifier.stopping()
            if mode == "graceful" and self.workers:
                self.notifier.extend_timeout(float(self.config[key]) + 10.0)

    def _progress_stop(self) -> None:
        if not self.workers:
            self.state = "stopped"
            return
        if time.monotonic() > self.stop_deadline:
            for handle in self.workers.values():
                log.warning(
                    "worker %d (pid %d) did not stop in time; killing it", handle.slot, handle.pid
                )
                handle.kill(signal.SIGKILL)
            self.stop_deadline = time.monotonic() + 5.0

    def _stop_workers_now(self) -> None:
        """After a failed start: kill what was started and wait for it."""
        for handle in self.workers.values():
            handle.kill(signal.SIGKILL)
        for pid in list(self.workers):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.workers.pop(pid, None)

    # -- what mpnet.reload asks of the master (ReloadHost) ------------------------------------

    def start_checker(self, config: Config) -> Check:
        self._before_fork()
        check = start_check(
            config, float(config["boot_timeout"]), self._forget_in_checker, redis_required=False
        )
        self._register(check, selectors.EVENT_READ, "checker")
        return check

    def stop_watching(self, check: Check) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(check)

    def adopt(self, config: Config, slots: int, generation: int) -> None:
        if config["metrics_listen"] != self.config["metrics_listen"]:
            log.warning("metrics_listen changed: it takes effect when mpnet restarts")
        mpnet_log.setup(
            config["log_level"],
            config["log_file"],
            log_format=config["log_format"],
            module_levels=config["log_levels"],
        )
        self.config, self.slots, self.generation = config, slots, generation

    def retire_generation(self, generation: int, why: str) -> None:
        for handle in list(self.workers.values()):
            if handle.generation == generation and handle.active:
                self._retire(handle, why)

    def has_outdated(self) -> bool:
        return any(self._outdated(h) for h in self.workers.values())

    def notify_reloading(self) -> None:
        if self.notifier is not None:
            self.notifier.reloading()

    def notify_ready(self, failure: str | None = None) -> None:
        if self.notifier is not None:
            line = self._status_line()
            self.notifier.ready(line if failure is None else f"{line}; reload failed: {failure}")

    # -- control socket -----------------------------------------------------------------------

    def handle_request(self, request: ControlRequest) -> ControlReply | Deferred:
        """One control-socket request (see :mod:`mpnet.control`)."""
        if isinstance(request, StatusRequest):
            return ControlReply(True, status=self.status())
        if isinstance(request, ReloadRequest):
            if self.stop_mode:
                return ControlReply.failure("stopping")
            # Answered once the modules are checked (maybe after a reload already checking).
            waiter = Deferred(2 * float(self.config["boot_timeout"]) + 10)
            waiter.on_resolve = self._control_answered
            self.reload(waiter)
            return waiter
        if isinstance(request, StopRequest):
            self.begin_stop(request.mode, "control socket")
            return ControlReply(True, message=f"{request.mode} stop started")
        return ControlReply(True, message=self.set_worker_count(request.count, "control socket"))

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = [
            h.status(now)
            for h in sorted(self.workers.values(), key=lambda h: (h.slot, h.generation))
        ]
        services = [
            {"name": name, "module": module, "endpoints": endpoints}
            for name, module, endpoints in self.ledger.services()
        ]
        return {
            "pid": os.getpid(),
            "state": "stopping" if self.stop_mode else self.state,
            "generation": self.generation,
            "slots": self.slots,
            "reloading": self.reloads.replacing,
            "checking": self.reloads.checking,
            "reload_failed": self.reloads.failed,
            "uptime": time.time() - self.started_at,
            "config": self.config.path,
            "workers": workers,
            "steering": {
                "available": self.steering.available,
                "load_shares": {str(slot): n for slot, n in (self.load_shares or {}).items()},
            },
            "services": services,
            "metrics_endpoints": self.metrics_server.endpoints() if self.metrics_server else [],
            "metrics": to_json(self.metric_families()),
        }

    def metric_families(self) -> list[Any]:
        """Every figure now (see :mod:`mpnet.metrics`)."""
        return self.metrics.families(
            self.workers.values(), self.reloads.outcomes, self.shared.operations
        )

    def metrics_page(self, accept: str) -> tuple[bytes, str]:
        """The ``GET /metrics`` page for a scraper whose Accept header is *accept*."""
        from .exposition import render

        return render(self.metric_families(), accept)


def _migrates_queued_connections() -> bool:
    try:
        return TCP_MIGRATE_REQ.read_text().strip() == "1"
    except OSError:
        return False
