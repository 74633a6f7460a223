"""A worker process: one event loop that loads the modules and serves its slot's sockets.

The master forks a worker into a *slot*; the worker inherits that slot's listening sockets (bound
by the master, see :mod:`mpnet.portmanager`) and its end of the channel. It loads the service
modules itself — user code runs here, never in the master — and reports ``ready`` once every
service accepts. A heartbeat that only the running loop can send tells the master it is healthy.

Stopping: SIGTERM (or a ``stop`` message) is graceful: stop accepting, let connections finish up to
``graceful_timeout``, then close them with ``ondisconnect(conn, "server shutting down")``.
SIGQUIT/SIGINT are quick: close every connection now.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import time
from typing import TYPE_CHECKING, Any

from mpnet import log as mpnet_log
from mpnet.fdlimit import default_max_connections
from mpnet.privileges import become_service_user
from mpnet.pure.config import Config, ConfigError
from mpnet.pure.frames import MAX_FRAME, MAX_RELAYED_FRAME
from mpnet.pure.messages import (
    AtomicRequest,
    BootError,
    Broadcast,
    ChannelError,
    Heartbeat,
    Message,
    Metrics,
    NotAccepting,
    Ready,
    SharedWrite,
    Stopped,
    from_wire,
    to_wire,
)
from mpnet.pure.trusted import TrustedNetworks, parse_networks

from .channel import WorkerChannel
from .connection import Service, ServiceSettings, WorkerCounters
from .lifecycle import run_ready_hooks, run_unload_hooks
from .module import LoadedModules, ModuleError, load_modules
from .multiplex import MULTIPLEX_SERVICES, MultiplexService, Rules
from .shared import SharedState
from .tls import tls_contexts

if TYPE_CHECKING:
    from mpnet.portmanager import Binding

uvloop: Any
try:  # imported in the master, before workers fork and maybe lose the right to read it
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency, but asyncio works too
    uvloop = None

log = logging.getLogger("mpnet.worker")

EXIT_OK = 0
EXIT_BOOT_ERROR = 3
HEARTBEAT_INTERVAL = 1.0
SWEEP_INTERVAL = 1.0
SHUTDOWN_REASON = "server shutting down"
UNLOAD_TIMEOUT_QUICK = 1.0  # what on_unload hooks get in a quick stop (graceful_timeout otherwise)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (measured cheaper per message and per accept), else asyncio."""
    if uvloop is None:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Worker:
    """One worker process's life: boot, serve, stop. :meth:`run` returns the exit code."""

    def __init__(
        self,
        slot: int,
        generation: int,
        config: Config,
        channel_sock: socket.socket,
        sockets: dict[str, list[tuple[Binding, socket.socket]]],
        shared_tables: dict[str, dict[Any, Any]],
        *,
        log_sock: socket.socket | None = None,
    ) -> None:
        self.slot = slot
        self.generation = generation
        self.config = config
        self.label = f"w{slot}."
        self._channel_sock = channel_sock
        self._log_sock = log_sock  # the master passes a reopened log file here (SIGUSR1)
        self._sockets = sockets
        self.channel: WorkerChannel | None = None
        self.services: dict[str, Service] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self.modules: LoadedModules | None = None
        self.shared = SharedState(self.send, shared_tables, flush=self.write_channel_now)
        self._stop: asyncio.Future[str] | None = None
        self._tasks: list[asyncio.Future[Any]] = []
        # Several heartbeats per worker_timeout, so a healthy idle loop is never taken for stuck.
        # Also several per stall_timeout, so the master steers around a stuck loop soon.
        self._heartbeat_interval = min(
            HEARTBEAT_INTERVAL,
            (float(config["worker_timeout"]) or HEARTBEAT_INTERVAL) / 4,
            (float(config["stall_timeout"]) or HEARTBEAT_INTERVAL) / 4,
        )
        self.counters = WorkerCounters()
        self._lag = 0.0  # how late the last heartbeat woke up (event-loop lag)
        self._graceful_timeout = float(config["graceful_timeout"])

    # -- process entry ------------------------------------------------------------------------

    def run(self) -> int:
        mpnet_log.set_role(f"worker {self.slot}")
        # The master sends SIGUSR2 to a worker whose loop stopped answering, before killing it.
        faulthandler.register(signal.SIGUSR2, file=mpnet_log.stream(), all_threads=True)
        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._main())
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        _, self.channel = await loop.create_unix_connection(  # type: ignore[type-var]
            lambda: WorkerChannel(self._on_message, self._on_channel_lost),
            sock=self._channel_sock,
        )
        for signum, mode in (
            (signal.SIGTERM, "graceful"),
            (signal.SIGQUIT, "quick"),
            (signal.SIGINT, "quick"),
        ):
            loop.add_signal_handler(signum, self.request_stop, mode)
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)  # the master's signals, not ours
        if self._log_sock is not None:
            self._log_sock.setblocking(False)
            loop.add_reader(self._log_sock.fileno(), self._on_log_fd)
        try:
            await self._boot()
        except (ModuleError, ConfigError) as exc:
            log.error("%s", exc)
            self.send(BootError(str(exc)))
            await self._flush_channel()
            return EXIT_BOOT_ERROR
        self._tasks.append(asyncio.ensure_future(self._heartbeat()))
        mode = await self._stop
        for task in self._tasks:
            task.cancel()
        await self._shutdown(mode)
        self.send(self.metrics())  # the final figures, so a graceful stop loses none
        close_shared = getattr(self.shared, "close", None)  # the Redis backend's connections
        if close_shared is not None:
            await close_shared()
        self.send(Stopped(self.served()))
        await self._flush_channel()
        return EXIT_OK

    async def _boot(self) -> None:
        if self.config["shared_backend"] == "redis":  # else the master's tables (the default)
            from .redis_shared import from_config

            self.shared = from_config(self.config)  # type: ignore[assignment]
            await self.shared.start(required=False)  # type: ignore[attr-defined]
        self.modules = load_modules(
            self.config, self.shared, before_run=lambda: become_service_user(self.config)
        )
        loop = asyncio.get_running_loop()
        self.counters = WorkerCounters(
            self.config["max_connections"] or default_max_connections(),
            self.config["max_unadmitted_connections"],
        )
        contexts = tls_contexts(self.config, self.modules)
        services: dict[str, Any] = {}
        for provider in self.modules.providers:
            settings = service_settings(self.config, provider.name, contexts.get(provider.name))
            settings.direct_tls = provider.options.get("encryption") == "ssl"
            services[provider.name] = Service(provider, self.label, settings, self.counters)
        for name in MULTIPLEX_SERVICES:
            if name in self._sockets:
                services[name] = MultiplexService(
                    name,
                    multiplex_rules(self.modules, services),
                    float(self.config.service_option(name, "ssl_handshake_timeout")),
                    contexts.get(name) if name == "multiplex_ssl" else None,
                )
        for name in self._sockets:
            if name not in services:
                raise ModuleError(f"service {name!r} is in the port plan but no module provides it")
        for name, service in services.items():
            sockets = self._sockets.get(name)
            if not sockets:
                if name in MULTIPLEX_SERVICES:
                    continue
                raise ModuleError(
                    f"service {name!r} is not in the port plan (did its module change since "
                    f"the configuration was checked?)"
                )
            self.services[name] = service
            # Always plain: direct TLS starts once accepted (mpnet/tls.py ServerHandshake).
            for _binding, sock in sockets:
                server = await loop.create_server(
                    service.protocol_factory, sock=sock, backlog=self.config["backlog"]
                )
                self.servers.append(server)
        loop.set_exception_handler(_exception_handler)
        # What exists now (inherited from the master, the modules) lives as long as the worker:
        # frozen, the cyclic collector no longer walks it, so it neither pays for that on every
        # full collection nor writes to those pages, which then stay shared with the master
        # instead of being copied into this process (bench/bench_idle.py measures it).
        gc.freeze()
        self._tasks.append(asyncio.ensure_future(self._sweep()))
        self.send(Ready(os.getpid(), self.generation))
        log.debug("serving %s", ", ".join(self.services) or "nothing")
        self._tasks.extend(run_ready_hooks(self.modules.ready_hooks()))

    async def _sweep(self) -> None:
        """Timeouts, found once a second rather than by a timer per connection."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for service in self.services.values():
                service.sweep(now)

    # -- channel ------------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        if self.channel is not None:
            relayed = isinstance(message, (SharedWrite, AtomicRequest, Broadcast))
            self.channel.send(to_wire(message), MAX_RELAYED_FRAME if relayed else MAX_FRAME)

    def write_channel_now(self) -> None:
        """Write the queued channel messages now rather than at the end of the loop pass."""
        if self.channel is not None:
            self.channel.flush()

    async def _flush_channel(self) -> None:
        """Give queued channel messages (``boot_error``, ``stopped``) a moment to leave."""
        if self.channel is not None:
            self.channel.flush()
        transport = self.channel.transport if self.channel else None
        deadline = time.monotonic() + 2.0
        while transport and transport.get_write_buffer_size() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _on_message(self, raw: Any) -> None:
        try:
            self.shared.receive(from_wire(raw))
        except ChannelError as exc:
            log.error("unexpected message from master (%s): %.80r", exc, raw)

    def _on_channel_lost(self, reason: str) -> None:
        self.shared.fail_pending(reason)  # nobody will answer the atomics in flight
        if self._stop is not None and not self._stop.done():
            log.error("%s; stopping", reason)
            self.request_stop("graceful")

    def _on_log_fd(self) -> None:
        """The master reopened the log file (SIGUSR1) and sent its descriptor: write there.
        The master opens it because a worker running as ``user`` may not open the path."""
        assert self._log_sock is not None
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._log_sock, 16, 8)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("log descriptor channel failed: %s", exc)
                asyncio.get_running_loop().remove_reader(self._log_sock.fileno())
                return
            if not data and not fds:
                return
            for fd in fds[:-1]:
                os.close(fd)  # several reopens queued up: the last one counts
            if fds:
                mpnet_log.adopt(fds[-1])

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.send(Heartbeat(self.open_connections(), self.served(), *self.refusals()))
            self.send(self.metrics())
            before = loop.time()
            await asyncio.sleep(self._heartbeat_interval)
            self._lag = max(0.0, loop.time() - before - self._heartbeat_interval)

    def metrics(self) -> Metrics:
        """This worker's figures since it started (see :mod:`mpnet.pure.metrics`)."""
        services: dict[str, Any] = {}
        for name, service in self.services.items():
            if not isinstance(service, Service):  # multiplexing: its services count the rest
                services[name] = {"tls_failures": service.handshake_failures}
                continue
            services[name] = {
                "accepted": service.served,
                "open": len(service.connections),
                "received": service.received_bytes,
                "sent": service.sent_bytes,
                "tls_failures": service.handshake_failures,
                "refused": dict(service.refused_by),
                "errors": dict(service.errors),
                "durations": {cb: h.row() for cb, h in service.durations.items()},
            }
        process = {"cpu": time.process_time(), "rss": _resident_bytes(), "lag": self._lag}
        return Metrics(services, process, self.shared.report())

    # -- stopping -----------------------------------------------------------------------------

    def request_stop(self, mode: str) -> None:
        """Stop ``graceful`` or ``quick``; ``quick`` during a graceful stop hurries it up."""
        if self._stop is None:
            return
        if not self._stop.done():
            self._stop.set_result(mode)
        elif mode == "quick":
            self._graceful_timeout = 0

    def open_connections(self) -> int:
        return sum(len(service.connections) for service in self.services.values())

    def served(self) -> int:
        return sum(service.served for service in self.services.values())

    def refusals(self) -> tuple[int, int]:
        """Connections refused by a limit, and TLS handshakes that failed, since the start."""
        services = self.services.values()
        return (
            sum(getattr(service, "refused", 0) for service in services),
            sum(getattr(service, "handshake_failures", 0) for service in services),
        )

    async def _shutdown(self, mode: str) -> None:
        for server in self.servers:
            server.close()
        await _accepted_connections_announced()
        self.send(NotAccepting())  # a reload is complete only once old workers stop accepting
        if self.modules is not None:
            timeout = self._graceful_timeout if mode == "graceful" else UNLOAD_TIMEOUT_QUICK
            await run_unload_hooks(self.modules.unload_hooks(), timeout)
            self.modules.stop_timers()
        if mode == "graceful" and self.open_connections():
            log.info(
                "stopping: waiting up to %gs for %d connection(s)",
                self._graceful_timeout,
                self.open_connections(),
            )
            deadline = time.monotonic() + self._graceful_timeout
            while self.open_connections() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        for service in self.services.values():
            for conn in service.connections:  # a snapshot: closing may remove them
                conn.close(SHUTDOWN_REASON)
        deadline = time.monotonic() + 1.0
        while self.open_connections() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for service in self.services.values():
            for conn in service.connections:  # a snapshot: closing may remove them
                conn.abort(SHUTDOWN_REASON)
        await asyncio.sleep(0)


async def _accepted_connections_announced() -> None:
    """Let connections accepted before the servers closed reach ``connection_made``.

    The loop pass that handled the stop may also have accepted connections whose
    ``connection_made`` is still queued (uvloop: one callback; asyncio: a task, then a
    callback). Counted now, they are drained like the others; missed, they were still open when
    the process exited, and their clients got a reset after the greeting (the rare
    ConnectionResetError of the reload-under-load test). A few passes of the ready queue: no
    timer, and nothing new can be accepted any more.
    """
    for _ in range(3):
        await asyncio.sleep(0)


def service_settings(
    config: Config, name: str, context: ssl.SSLContext | None = None
) -> ServiceSettings:
    """The transport settings of one service, from ``<service>_<key>`` or the global key."""

    def option(key: str) -> Any:
        return config.service_option(name, key)

    message = option("limit_message")
    return ServiceSettings(
        read_timeout=float(option("read_timeout") or 0),
        send_timeout=float(option("send_timeout") or 0),
        ssl_handshake_timeout=float(option("ssl_handshake_timeout")),
        max_send_buffer_size=int(option("max_send_buffer_size")),
        max_connections=(
            option("max_connections")
            if config.service_key_is_set(name, "max_connections")
            else None
        ),
        max_connections_per_ip=option("max_connections_per_ip"),
        limit_message=message.encode() if message else None,
        proxy_protocol=bool(option("proxy_protocol")),
        proxy_trusted=(
            TrustedNetworks(parse_networks(option("proxy_trusted")))
            if option("proxy_trusted")
            else None
        ),
        ssl_context=context,
        time_callbacks=bool(config["metrics_callback_durations"]),
    )


def _resident_bytes() -> int:
    """This process's resident memory (Linux: /proc/self/statm; elsewhere 0)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def multiplex_rules(loaded: LoadedModules, services: dict[str, Any]) -> Rules:
    rules = Rules()
    for provider in loaded.providers:
        rule = provider.options.get("multiplex_rule")
        if rule is None:
            continue
        pattern, protocol = rule
        if pattern is not None:
            rules.patterns.append((pattern, services[provider.name]))
        if protocol is not None:
            rules.protocols[protocol] = services[provider.name]
    return rules


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Failed TLS handshakes are the peer's business: debug level, never the module's."""
    exception = context.get("exception")
    message = context.get("message", "")
    if isinstance(exception, (ssl.SSLError, ConnectionError, TimeoutError)) or (
        "handshake" in message.lower()
    ):
        log.debug("%s: %s", message, exception)
        return
    loop.default_exception_handler(context)


def worker_process(worker: Worker) -> None:
    """Run *worker* in the forked child, then exit: never returns into the master's code."""
    code = 1
    try:
        code = worker.run()
    except BaseException:
        log.exception("worker %d crashed", worker.slot)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
