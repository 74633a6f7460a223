"""Unit-test a service module in-process: no sockets, no fork, no real time.

::

    from mpnet.testing import load

    svc = load("mymodule.py")           # a path, or a bundled module's name ("echo")
    c = svc.connect()                   # runs onconnect
    assert c.received() == b"Hello!\\n"  # what the module wrote since the last call
    c.send(b"hi\\n")                     # runs onincoming to completion (async callbacks too)
    c.close()                           # the client hangs up: ondisconnect(conn, None)

Why it can be trusted: the kit runs the real worker code, not a model of it. Modules are loaded
by the worker's loader (:func:`mpnet.workers.module.load_modules`), each connection is the
worker's own :class:`~mpnet.workers.connection.Connection` (so callback order, ``ondisconnect``
exactly once, async callbacks, ``pause``/``resume``, limits and timeouts are the worker's), and
shared tables are the worker's replicas talking, through msgpack frames, to the master's own
:class:`~mpnet.shared.SharedMaster` held in-process. Only the edges are replaced: a transport in
memory instead of a socket (a client can also stop reading, to test backpressure and
``ondrain``), and an event loop whose clock moves only when the test says so
(:meth:`LocalServer.advance`), so ``module.add_timer``, ``asyncio.sleep`` and ``read_timeout``
are tested without waiting. ``on_ready`` hooks run once the modules are loaded, ``on_unload``
hooks at :meth:`LocalServer.stop`, as in a worker (:mod:`mpnet.workers.lifecycle`).

Every call (``connect``, ``send``, ``close``, ``advance``) returns once the loop is idle: all
callbacks, tasks and shared-table messages it set off have run, except those waiting for a later
time. A callback that raises is logged, as in a worker, and (unless ``strict=False``) re-raised
from the call that set it off as :class:`ModuleFailed`.

Not covered: TLS (a service with ``encryption = "ssl"`` is served in the clear, ``starttls``
raises), multiplexing (connect to the service by name), and ``module.connect`` (it needs a real
network; use the ``mpnet_server`` pytest fixture for that, :mod:`mpnet.pytest_plugin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
import itertools
import logging
import sys
from collections import deque
from pathlib import Path
from typing import Any

from mpnet.fdlimit import default_max_connections
from mpnet.pure.config import Config, parse_config
from mpnet.pure.frames import FrameDecoder, encode
from mpnet.pure.messages import Broadcast, Message, from_wire, to_wire
from mpnet.pure.tomlvalue import toml_value
from mpnet.shared import SharedMaster
from mpnet.workers.connection import Connection, Service, WorkerCounters
from mpnet.workers.lifecycle import run_ready_hooks, run_unload_hooks
from mpnet.workers.module import LoadedModules, find_module, load_modules
from mpnet.workers.shared import SharedState
from mpnet.workers.worker import SHUTDOWN_REASON, SWEEP_INTERVAL, service_settings

__all__ = ["Client", "LocalServer", "ModuleFailed", "load"]

MAX_PASSES = 100_000  # passes of the loop in one call before the module is deemed to spin
# The virtual clock starts at a fixed time, so every run of a test computes the same instants:
# from a real clock's reading, a timer's chain of additions (now + 1 + 1 ...) and advance()'s
# target could round apart whenever the sum crossed a power of two.
CLOCK_START = float(2**20)


class ModuleFailed(AssertionError):
    """A module's callback (or hook, or task) raised; the message holds its traceback."""


def load(
    *modules: str | Path,
    options: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    shared: dict[str, dict[Any, Any]] | None = None,
    workers: int = 1,
    strict: bool = True,
) -> LocalServer:
    """Load service modules as a worker would and return a :class:`LocalServer`.

    *modules*: paths to ``.py`` files (relative to the current directory) or names of bundled
    modules, loaded in order into the same worker(s), so their hooks and broadcasts meet.
    *options*: the module's ``[<module>]`` table (what ``module.get_option`` reads); with several
    modules give each its table in *config* instead. *config*: any other config keys, as in
    ``mpnet.toml`` (``{"read_timeout": 30, "chat": {"max_line": 80}}``). *shared*: initial shared
    tables. *workers*: how many workers load the modules (each has its own module globals and
    replicas; :meth:`LocalServer.connect` picks one with ``worker=``). *strict*: raise
    :class:`ModuleFailed` when a callback fails instead of only logging it.
    """
    if not modules:
        raise TypeError("load() needs at least one module: a path or a bundled module's name")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    specs = [str(spec) for spec in modules]
    keys = dict(config or {})
    if options is not None:
        if len(specs) != 1:
            raise TypeError(
                "options= is for one module; with several, give each its table in config="
            )
        probe = parse_config(f"modules = {toml_value(specs)}\n", "<mpnet.testing>", Path.cwd())
        keys[find_module(specs[0], probe)[0]] = dict(options)
    keys.pop("modules", None)
    text = f"modules = {toml_value(specs)}\n" + "".join(
        f"{key} = {toml_value(value)}\n" for key, value in keys.items()
    )
    parsed = parse_config(text, "<mpnet.testing config>", Path.cwd())
    return LocalServer(parsed, workers, copy.deepcopy(shared or {}), strict)


class LocalServer:
    """Loaded modules in one or more in-process workers, with an in-process master for the
    shared tables. Use as a context manager, or call :meth:`stop` at the end."""

    def __init__(
        self, config: Config, workers: int, tables: dict[str, dict[Any, Any]], strict: bool
    ) -> None:
        self.config = config
        self.strict = strict
        self.errors: list[str] = []  # every callback failure logged so far
        self._reported = 0
        self.loop = _VirtualClockLoop()
        self._recorder = _ErrorRecorder(self.errors, self.loop)
        logging.getLogger("mpnet.module").addHandler(self._recorder)
        self.loop.set_exception_handler(self._loop_exception)
        values = {**config.values, "state_file": None}  # the test's tables are never persisted
        self._master = SharedMaster(
            Config(config.path, config.base_dir, values, config.service_options)
        )
        self._master.tables = tables
        self.workers: list[_LocalWorker] = []
        self._stopped = False
        try:
            for slot in range(workers):
                worker = _LocalWorker(self, slot, copy.deepcopy(tables))
                self.workers.append(worker)
                self._run(worker.boot())
        except BaseException:
            self.stop()
            raise
        self._raise_new_errors()

    # -- what a test does -----------------------------------------------------------------------

    @property
    def services(self) -> list[str]:
        """The names of the services the modules provide."""
        return list(self.workers[0].services)

    def connect(
        self,
        service: str | None = None,
        *,
        ip: str = "127.0.0.1",
        port: int | None = None,
        worker: int = 0,
    ) -> Client:
        """A client connects to *service* (optional when there is one) of worker *worker*
        from *ip*:*port*; ``onconnect`` has run when this returns."""
        self._check_running()
        local = self.workers[worker]
        if service is None:
            if len(local.services) != 1:
                raise TypeError(
                    f"connect(): name the service, one of {', '.join(local.services) or 'none'}"
                )
            service = next(iter(local.services))
        if service not in local.services:
            raise KeyError(
                f"no service {service!r}; the modules provide {', '.join(local.services)}"
            )
        client = Client(
            self,
            local.services[service],
            (ip, port or next(_client_ports)),
            ("127.0.0.1", local.server_ports[service]),
        )
        self.settle()
        return client

    def advance(self, seconds: float) -> None:
        """Move the clock *seconds* forward, running every timer due on the way, in order (a
        timer set by a timer runs too if it falls due within the interval)."""
        self._check_running()
        if seconds < 0:
            raise ValueError("time only moves forward")
        loop = self.loop
        target = loop.now + seconds
        self.settle()
        while True:
            due = loop.next_timer()
            if due is None or due > target:
                break
            loop.now = max(loop.now, due)
            self.settle()
        loop.now = target
        self.settle()

    def settle(self) -> None:
        """Run the loop until nothing is ready to run (timers in the future wait)."""
        self._check_running()
        self.loop.run_until_idle()
        self._raise_new_errors()

    def broadcast(self, topic: str, payload: Any = None) -> None:
        """A broadcast as if another worker's module had sent it: every worker's hooks run."""
        self._check_running()
        self._master.handle(_OUTSIDE, Broadcast(topic, payload), self._channels())
        self._master.flush()
        self.settle()

    def shared(self, name: str) -> dict[Any, Any]:
        """A copy of the master's (authoritative) copy of shared table *name*."""
        self.settle()
        return copy.deepcopy(self._master.tables.get(name, {}))

    def module_globals(self, module: str, worker: int = 0) -> dict[str, Any]:
        """The namespace of a loaded module (its globals), to inspect its state."""
        return self.workers[worker].namespaces[module]

    def stop(self) -> None:
        """Stop as a worker does: ``on_unload`` hooks (connections still open; async ones get
        up to ``graceful_timeout`` of the test's clock), timers stopped, then every open
        connection closed (``ondisconnect(conn, "server shutting down")``), the modules' tasks
        cancelled, the loop closed."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if not self.loop.is_closed():
                timeout = float(self.config["graceful_timeout"])
                for worker in self.workers:
                    if worker.modules is not None:
                        hooks = worker.modules.unload_hooks()
                        self._run_until_done(run_unload_hooks(hooks, timeout), timeout)
                        worker.modules.stop_timers()
                for worker in self.workers:
                    for service in worker.services.values():
                        for conn in service.connections:  # a snapshot
                            self.loop.call_soon(conn.close, SHUTDOWN_REASON)
                self.loop.run_until_idle()
                self.loop.cancel_tasks()
        finally:
            logging.getLogger("mpnet.module").removeHandler(self._recorder)
            self.loop.close()
        self._raise_new_errors()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- plumbing -------------------------------------------------------------------------------

    def _settle_unless_stopped(self) -> None:
        """Before reading a result: settle, unless stopped (what was written stays readable)."""
        if not self._stopped:
            self.settle()

    def _check_running(self) -> None:
        if self._stopped:
            raise RuntimeError("this LocalServer is stopped")

    def _run(self, coroutine: Any) -> Any:
        task = self.loop.create_task(coroutine)
        self.loop.run_until_idle()
        if not task.done():
            task.cancel()
            self.loop.run_until_idle()
            raise RuntimeError("loading the modules waits for a timer; load without one")
        return task.result()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A task of a module failed and nobody awaited it: logged, and a failure in strict
        mode."""
        loop.default_exception_handler(context)
        exception = context.get("exception")
        if exception is not None:
            self.errors.append(f"{context.get('message', '')}: {exception!r}")

    def _run_until_done(self, coroutine: Any, limit: float) -> None:
        """Run *coroutine* to its end, moving the clock from timer to timer (*limit* seconds
        at most: past that the coroutine must have timed out by itself)."""
        task = self.loop.create_task(coroutine)
        deadline = self.loop.now + limit
        self.loop.run_until_idle()
        while not task.done():
            due = self.loop.next_timer()
            if due is None or due > deadline + 1:
                break
            self.loop.now = max(self.loop.now, due)
            self.loop.run_until_idle()

    def _raise_new_errors(self) -> None:
        new = self.errors[self._reported :]
        self._reported = len(self.errors)
        if new and self.strict:
            raise ModuleFailed("\n".join(new))

    def _channels(self) -> list[tuple[Any, Any]]:
        return [(worker.handle, worker.handle.channel) for worker in self.workers]

    def _to_master(self, worker: _LocalWorker, frame: bytes) -> None:
        for raw in worker.master_decoder.feed(frame):
            self._master.handle(worker.handle, from_wire(raw), self._channels())
        self._master.flush()


class Client:
    """The client end of one in-memory connection (see :meth:`LocalServer.connect`)."""

    def __init__(
        self,
        server: LocalServer,
        service: Service,
        peer: tuple[str, int],
        local: tuple[str, int],
    ) -> None:
        self._server = server
        self.conn: Connection = service.protocol_factory()
        self._transport = _MemoryTransport(server.loop, self.conn, peer, local)
        server.loop.call_soon(self.conn.connection_made, self._transport)

    def received(self) -> bytes:
        """Everything the module wrote to this connection since the last call."""
        self._server._settle_unless_stopped()
        data = bytes(self._transport.written)
        self._transport.written.clear()
        return data

    def send(self, data: bytes | str) -> None:
        """Send *data* (str as UTF-8) as one chunk: ``onincoming`` has run (unless the module
        paused reading: then it waits, as in a socket's buffer, until ``resume``)."""
        if self._transport.lost:
            raise ConnectionError(f"the connection is closed ({self.close_reason or 'no error'})")
        self._transport.feed(data.encode() if isinstance(data, str) else bytes(data))
        self._server.settle()

    def close(self) -> None:
        """The client closes its end (EOF): the module gets ``ondisconnect(conn, None)``."""
        if not self._transport.lost:
            self._transport.feed(None)
        self._server.settle()

    def reset(self) -> None:
        """The connection breaks: ``ondisconnect(conn, "Connection reset by peer")``."""
        self._transport.break_off(ConnectionResetError(104, "Connection reset by peer"))
        self._server.settle()

    def stop_reading(self) -> None:
        """The client stops reading: what the module writes queues up (``conn.buffered()``),
        past 64 KiB the module's writes are paused, past ``max_send_buffer_size`` the
        connection is dropped, as with a real slow peer."""
        self._transport.peer_reading = False

    def start_reading(self) -> None:
        """The client reads again: the queue drains (then ``ondrain`` runs, if paused)."""
        self._transport.peer_reading = True
        self._transport.drain()
        self._server.settle()

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (by either side) and ``ondisconnect`` has run."""
        self._server._settle_unless_stopped()
        return self._transport.lost

    @property
    def close_reason(self) -> str | None:
        """The ``err`` the module's ``ondisconnect`` got (None for a clean close)."""
        self._server._settle_unless_stopped()
        return self._transport.reason

    @property
    def paused(self) -> bool:
        """Whether the server side stopped reading (``conn.pause()``, or a callback running)."""
        return not self._transport.is_reading()


# -- the edges: transport, loop, worker, master -------------------------------------------

_client_ports = itertools.cycle(range(40000, 60000))
_OUTSIDE = type("Outside", (), {"pid": -1, "channel": None})()


class _MemoryTransport(asyncio.Transport):
    """A socket's place: what the module writes is kept for the test; what the test sends is
    delivered as a real transport does (one chunk per read, none while reading is paused, the
    peer's EOF after its data; ``close`` and ``abort`` end in ``connection_lost`` on a later
    pass of the loop)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.Protocol,
        peer: tuple[str, int],
        local: tuple[str, int],
    ) -> None:
        super().__init__({"peername": peer, "sockname": local})
        self._loop = loop
        self._protocol = protocol
        self.written = bytearray()  # read by the peer, not yet taken by Client.received()
        self.unsent = bytearray()  # queued while the peer does not read
        self.peer_reading = True
        self._high, self._low = 64 * 1024, 16 * 1024  # asyncio's defaults
        self._writing_paused = False
        self._inbox: deque[bytes | None] = deque()  # None: the peer's EOF
        self._reading = True
        self._closing = False
        self.lost = False
        self.reason: str | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        if self.peer_reading and not self.unsent:
            self.written += data
            return
        self.unsent += data
        if len(self.unsent) > self._high and not self._writing_paused:
            self._writing_paused = True
            self._protocol.pause_writing()

    def drain(self) -> None:
        """The peer read everything queued."""
        self.written += self.unsent
        self.unsent.clear()
        if self._writing_paused:
            self._writing_paused = False
            self._loop.call_soon(self._protocol.resume_writing)
        if self._closing and not self.lost:
            self._loop.call_soon(self._lose, None)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return len(self.unsent)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._loop.call_soon(self._deliver)

    def close(self) -> None:
        """Close once the queue is sent, as a real transport does."""
        if not self._closing:
            self._closing = True
            if not self.unsent:
                self._loop.call_soon(self._lose, None)

    def abort(self) -> None:
        self.unsent.clear()
        self._closing = False
        self.break_off(None)

    def feed(self, data: bytes | None) -> None:
        self._inbox.append(data)
        self._loop.call_soon(self._deliver)

    def break_off(self, exc: Exception | None) -> None:
        if not self._closing:
            self._closing = True
            self.unsent.clear()
            self._loop.call_soon(self._lose, exc)

    def _deliver(self) -> None:
        while self._inbox and self._reading and not self._closing:
            data = self._inbox.popleft()
            if data is None:
                if not self._protocol.eof_received():
                    self.close()
                return
            self._protocol.data_received(data)

    def _lose(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._inbox.clear()
        self._protocol.connection_lost(exc)
        conn = self._protocol
        reason = getattr(conn, "_close_reason", None)
        if reason is None and exc is not None:
            reason = str(exc) or type(exc).__name__
        self.reason = reason


class _NoSelector:
    """The loop's I/O poll: there is no I/O (and never a wait: the clock is virtual)."""

    def select(self, timeout: float | None = None) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class _VirtualClockLoop(asyncio.BaseEventLoop):
    """An event loop without I/O whose clock moves only by :meth:`LocalServer.advance`."""

    def __init__(self) -> None:
        super().__init__()
        self._selector = _NoSelector()
        self.now = CLOCK_START

    def time(self) -> float:
        return self.now

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    def next_timer(self) -> float | None:
        """When the next pending timer is due."""
        scheduled = self._scheduled  # type: ignore[attr-defined]
        while scheduled and scheduled[0]._cancelled:
            heapq.heappop(scheduled)._scheduled = False
        return scheduled[0]._when if scheduled else None

    def run_until_idle(self) -> None:
        """Run passes of the loop until nothing is ready and no timer is due."""
        for _ in range(MAX_PASSES):
            self.stop()
            self.run_forever()  # one pass: stop() before run_forever() polls once
            if not self._ready:  # type: ignore[attr-defined]
                due = self.next_timer()
                if due is None or due > self.now:
                    return
        raise RuntimeError(
            f"the loop was still busy after {MAX_PASSES} passes: does a module keep "
            "rescheduling itself without waiting (asyncio.sleep(0) in a loop)?"
        )

    def cancel_tasks(self) -> None:
        tasks = [task for task in asyncio.all_tasks(self) if not task.done()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(RuntimeError):
            self.run_until_idle()


class _LocalChannel:
    """The master's end of one worker's channel: frames reach the worker on the next pass."""

    def __init__(self, loop: asyncio.AbstractEventLoop, worker: _LocalWorker) -> None:
        self._loop = loop
        self._worker = worker

    def send_frame(self, frame: bytes) -> None:
        self._loop.call_soon(self._worker.from_master, frame)


class _Handle:
    """What the master knows of a worker: its origin id (a pid in a real master) and channel."""

    def __init__(self, pid: int, channel: _LocalChannel) -> None:
        self.pid = pid
        self.channel = channel


class _LocalWorker:
    """One worker's modules, services and replicas, booted as :class:`~mpnet.workers.worker.
    Worker` boots (the same loader, settings and connection classes)."""

    def __init__(self, server: LocalServer, slot: int, tables: dict[str, dict[Any, Any]]) -> None:
        self.server = server
        self.slot = slot
        self.label = f"w{slot}."
        origin = slot + 1  # never 0: that is the master's own origin (atomic effects)
        self.shared = SharedState(self._send, tables, origin=origin)
        self.handle = _Handle(origin, _LocalChannel(server.loop, self))
        self.master_decoder = FrameDecoder()
        self._decoder = FrameDecoder()
        self.modules: LoadedModules | None = None
        self.services: dict[str, Service] = {}
        self.server_ports: dict[str, int] = {}
        self.namespaces: dict[str, dict[str, Any]] = {}

    async def boot(self) -> None:
        config = self.server.config
        self.modules = load_modules(config, self.shared)
        counters = WorkerCounters(config["max_connections"] or default_max_connections())
        for provider in self.modules.providers:
            settings = service_settings(config, provider.name)
            service = Service(provider, self.label, settings, counters)
            ports = config.service_option(provider.name, "ports") or provider.default_ports
            self.server_ports[provider.name] = ports[0] if ports else 0
            self.services[provider.name] = service
        for module in self.modules.modules:
            namespace = sys.modules.get(f"mpnet.services.{module.name}")
            if namespace is not None:
                self.namespaces[module.name] = namespace.__dict__
        self._sweeper = asyncio.ensure_future(self._sweep())
        self._ready_tasks = run_ready_hooks(self.modules.ready_hooks())

    async def _sweep(self) -> None:
        """The worker's once-a-second sweep (read_timeout, send_timeout), on the test's clock."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            for service in self.services.values():
                service.sweep(loop.time())

    def _send(self, message: Message) -> None:
        frame = encode(to_wire(message))  # raises here, at the module's call, as in a worker
        self.server.loop.call_soon(self.server._to_master, self, frame)

    def from_master(self, frame: bytes) -> None:
        for raw in self._decoder.feed(frame):
            self.shared.receive(from_wire(raw))


class _ErrorRecorder(logging.Handler):
    """Keeps every error a module's logger reports with a traceback (a failed callback, hook
    or task) while *loop* runs: this server's modules, not those of another one alive."""

    def __init__(self, sink: list[str], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.ERROR)
        self._sink = sink
        self._loop = loop
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            ours = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            ours = False
        if record.exc_info and ours:
            self._sink.append(self.format(record))
