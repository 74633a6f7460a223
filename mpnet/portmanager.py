"""The port ledger: which service gets which endpoint, conflicts, and the listening sockets.

Like Prosody's ``core/portmanager.lua`` this is the one place that knows about ports, but it runs in
the master only and checks centrally. Planning is pure (:mod:`mpnet.pure.portplan`);
:class:`PortLedger` owns the sockets: one ``SO_REUSEPORT`` socket per endpoint per worker slot,
kept open for the life of the service so a replacement worker accepts on the very socket its
predecessor used and connections queued in the kernel are never reset.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from .pure.config import Config
from .pure.portplan import (
    Endpoint,
    ServicePlan,
    find_conflicts,
    format_address,
    literal_host,
    plan_endpoints,
)

log = logging.getLogger("mpnet.ports")


class PortConflict(Exception):
    """An endpoint that cannot be had, with a message naming it, the claimants and the fix."""


def family(endpoint: Endpoint) -> socket.AddressFamily:
    return socket.AF_INET6 if endpoint.ipv6 else socket.AF_INET


def normalise_host(host: str) -> str:
    """A configured interface as a canonical address: literals as :func:`literal_host` says,
    names resolved (the first address ``getaddrinfo`` gives)."""
    literal = literal_host(host)
    if literal is not None:
        return literal
    try:
        info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve interface {host!r}: {exc.strerror}") from None
    return str(info[0][4][0])


def plan_services(config: Config, services: Iterable[dict[str, Any]]) -> list[ServicePlan]:
    """:func:`~mpnet.pure.portplan.plan_endpoints` with names resolved by the system."""
    return plan_endpoints(config, services, normalise_host)


def describe_holder(endpoint: Endpoint) -> str | None:
    """Name the process listening on the endpoint's port, if psutil can see it.

    psutil reports one process per socket, and a socket shared by a server and its forked
    workers may be reported under a worker; so the name given is that of the eldest ancestor
    running the same command line (the master of a pre-forking server).
    """
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.status != psutil.CONN_LISTEN or not conn.laddr:
                continue
            if conn.laddr.port != endpoint.port:
                continue
            if not Endpoint(normalise_host(conn.laddr.ip), conn.laddr.port).overlaps(endpoint):
                continue
            if conn.pid is None:
                return "another process (not visible to this user)"
            process = psutil.Process(conn.pid)
            command = process.cmdline()
            parent = process.parent()
            while parent is not None and parent.cmdline() == command:
                process, parent = parent, parent.parent()
            return f"pid {process.pid} ({' '.join(command) or process.name()})"
    except Exception:  # best effort: the refusal stands without a name
        return None
    return None


def describe_activated(activated: Any) -> str:
    """``passed fd 3 (127.0.0.1:5432, name 'mpnet.socket')`` for a systemd-passed socket."""
    try:
        address = activated.local_address()
        where = format_address(*address) if address else str(activated.socket.getsockname())
    except OSError as exc:
        where = f"unknown address: {exc}"
    return f"passed fd {activated.fd} ({where}, name {activated.name!r})"


def _new_socket(endpoint: Endpoint, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family(endpoint), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if endpoint.ipv6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def probe(endpoint: Endpoint, plan: ServicePlan) -> None:
    """Refuse an endpoint another process holds, even with ``SO_REUSEPORT``.

    A bind *without* ``SO_REUSEPORT`` fails if any socket owns the port, so it detects a second
    mpnet (or anything else) that the kernel would otherwise let share our traffic silently.
    """
    sock = _new_socket(endpoint, reuse_port=False)
    try:
        sock.bind((endpoint.host, endpoint.port))
    except OSError as exc:
        raise PortConflict(_bind_error(endpoint, plan, exc)) from None
    finally:
        sock.close()


def _bind_error(endpoint: Endpoint, plan: ServicePlan, exc: OSError) -> str:
    where = f"service {plan.service!r} cannot listen on {endpoint}"
    fix = f"change {plan.ports_key} or {plan.interfaces_key} in the config"
    if exc.errno == errno.EADDRINUSE:
        holder = describe_holder(endpoint)
        who = f" by {holder}" if holder else " by another process"
        return f"{where}: port {endpoint.port} is already in use{who}; {fix} or stop it"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no such local address; {fix}"
    return f"{where}: {exc.strerror or exc}; {fix}"


@dataclass
class Binding:
    """The sockets of one endpoint: ``sockets[slot]`` for each worker slot."""

    endpoint: Endpoint
    service: str
    port: int  # the real port (differs from endpoint.port when that is 0)
    sockets: list[socket.socket] = field(default_factory=list)
    adopted: bool = False  # came from systemd socket activation: never closed by us

    @property
    def address(self) -> str:
        return format_address(self.endpoint.host, self.port)


def binding_key(service: str, endpoint: Endpoint) -> tuple[Endpoint, str]:
    """Ledger key: the endpoint, except that every ``port 0`` endpoint is its service's own."""
    return (endpoint, service if endpoint.port == 0 else "")


class PortLedger:
    """Owns every listening socket of the master, keyed by :func:`binding_key`.

    An endpoint that moves from one service to another on reload keeps its sockets (and its
    queued connections): old workers drain the old service while new ones serve the new.
    """

    def __init__(self, backlog: int = 1024) -> None:
        self.backlog = backlog
        self.bindings: dict[tuple[Endpoint, str], Binding] = {}
        self.plans: list[ServicePlan] = []
        self.adoptable: list[Any] = []  # systemd-activated sockets not yet claimed

    def check(self, plans: list[ServicePlan], held_by_us: Collection[str] = ()) -> None:
        """Raise PortConflict unless every endpoint of *plans* can be had (nothing is bound).
        *held_by_us*: addresses (``127.0.0.1:5432``) the running mpnet of this config holds,
        not probed."""
        problems = find_conflicts(plans)
        if problems:
            raise PortConflict(problems[0])
        for plan in plans:
            for endpoint in plan.endpoints:
                held = self.bindings.get(binding_key(plan.service, endpoint))
                if held is not None or endpoint.port == 0 or self._activated(endpoint):
                    continue
                if str(endpoint) in held_by_us:
                    continue
                if self._holds_overlapping(endpoint):
                    continue  # our own SO_REUSEPORT sockets: a plain-bind probe would fail on them
                probe(endpoint, plan)

    def apply(self, plans: list[ServicePlan], slots: int) -> list[Binding]:
        """Bind what *plans* add, for *slots* worker slots. Endpoints no longer planned stay
        open until :meth:`release_unplanned` (old workers may still be draining on them).

        Returns the new bindings. On failure, what this call bound is closed again.
        """
        self.check(plans)
        added: list[Binding] = []
        try:
            for plan in plans:
                for endpoint in plan.endpoints:
                    key = binding_key(plan.service, endpoint)
                    binding = self.bindings.get(key)
                    if binding is None:
                        binding = self._bind_first(endpoint, plan)
                        added.append(binding)
                        self.bindings[key] = binding
                    binding.service = plan.service
                    self._grow(binding, plan, slots)
        except BaseException:
            for binding in added:
                self._close(binding)
                self.bindings.pop(binding_key(binding.service, binding.endpoint), None)
            raise
        self.plans = plans
        return added

    def _holds_overlapping(self, endpoint: Endpoint) -> bool:
        return any(
            Endpoint(binding.endpoint.host, binding.port).overlaps(endpoint)
            for binding in self.bindings.values()
        )

    def check_activated(self, plans: list[ServicePlan]) -> None:
        """At start: log the sockets systemd passed, and raise PortConflict naming any that no
        endpoint of *plans* matches (it would sit bound and unserved, its clients hanging)."""
        if not self.adoptable:
            return
        endpoints = [(plan, endpoint) for plan in plans for endpoint in plan.endpoints]
        unmatched = []
        for activated in self.adoptable:
            users = [p.service for p, e in endpoints if activated.matches(e)]
            if users:
                log.info("socket activation: %s serves %s", describe_activated(activated),
                         ", ".join(dict.fromkeys(users)))  # fmt: skip
            else:
                unmatched.append(describe_activated(activated))
        if unmatched:
            wanted = ", ".join(f"{p.service} {e}" for p, e in endpoints) or "none"
            raise PortConflict(
                f"socket activation: {'; '.join(unmatched)} matches no service endpoint "
                f"(endpoints: {wanted}); add its address to a service's <service>_ports / "
                "<service>_interfaces, or remove it from the socket unit"
            )

    def _activated(self, endpoint: Endpoint) -> Any:
        for activated in self.adoptable:
            if activated.matches(endpoint):
                return activated
        return None

    def _bind_first(self, endpoint: Endpoint, plan: ServicePlan) -> Binding:
        activated = self._activated(endpoint)
        if activated is not None:
            self.adoptable.remove(activated)
            sock = activated.socket
            port = sock.getsockname()[1]
            binding = Binding(endpoint, plan.service, port, [sock], adopted=True)
            return binding
        sock = self._bind_one(endpoint, endpoint.port, plan)
        return Binding(endpoint, plan.service, sock.getsockname()[1], [sock])

    def _bind_one(self, endpoint: Endpoint, port: int, plan: ServicePlan) -> socket.socket:
        sock = _new_socket(endpoint, reuse_port=True)
        try:
            sock.bind((endpoint.host, port))
            sock.listen(self.backlog)
        except OSError as exc:
            sock.close()
            raise PortConflict(_bind_error(endpoint, plan, exc)) from None
        sock.set_inheritable(False)
        return sock

    def _grow(self, binding: Binding, plan: ServicePlan, slots: int) -> None:
        if binding.adopted:
            return  # one systemd socket serves every slot (see slot_sockets)
        while len(binding.sockets) < slots:
            binding.sockets.append(self._bind_one(binding.endpoint, binding.port, plan))

    def ensure_slots(self, slots: int) -> None:
        """Make sure every binding has a socket for slots ``0..slots-1`` (more workers)."""
        plans = {plan.service: plan for plan in self.plans}
        for binding in self.bindings.values():
            self._grow(binding, plans[binding.service], slots)

    def shrink_slots(self, slots: int) -> list[int]:
        """Close the sockets of slots ``>= slots`` (after their workers are gone); return
        the slots closed."""
        closed: set[int] = set()
        for binding in self.bindings.values():
            if binding.adopted:
                continue
            keep = max(slots, 1)
            for index, sock in enumerate(binding.sockets[keep:], start=keep):
                sock.close()
                closed.add(index)
            del binding.sockets[keep:]
        return sorted(closed)

    def release_unplanned(self) -> list[Binding]:
        """Close endpoints that the current plans no longer name."""
        wanted = {binding_key(p.service, e) for p in self.plans for e in p.endpoints}
        released = [key for key in self.bindings if key not in wanted]
        for key in released:
            self._close(self.bindings[key])
        return [self.bindings.pop(key) for key in released]

    def slot_sockets(self, slot: int) -> dict[str, list[tuple[Binding, socket.socket]]]:
        """The sockets a worker in *slot* accepts on, grouped by service."""
        result: dict[str, list[tuple[Binding, socket.socket]]] = {}
        wanted = {binding_key(p.service, e) for p in self.plans for e in p.endpoints}
        for key, binding in self.bindings.items():
            if key not in wanted:
                continue  # being released: only workers of an older generation still use it
            # An adopted systemd socket is a single socket shared by every slot.
            index = 0 if binding.adopted else slot
            if index < len(binding.sockets):
                result.setdefault(binding.service, []).append((binding, binding.sockets[index]))
        return result

    def reset_queued(self, slot: int) -> int:
        """Reset the connections waiting in *slot*'s accept queues (none of its workers runs);
        return how many. For a slot whose workers keep dying on what they accept: the queue may
        hold more of the requests that kill them, one replacement each. Sockets shared by every
        slot (systemd's) are left alone. Never blocks: accepts only what is queued now."""
        reset = 0
        for sockets in self.slot_sockets(slot).values():
            for binding, sock in sockets:
                if binding.adopted:
                    continue
                poller = select.poll()  # select() would fail on a descriptor above 1023
                poller.register(sock, select.POLLIN)
                for _ in range(max(self.backlog, 1)):
                    if not poller.poll(0):
                        break
                    try:
                        conn, _ = sock.accept()
                    except OSError:
                        break
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    reset += 1
        return reset

    def all_sockets(self) -> list[socket.socket]:
        return [sock for binding in self.bindings.values() for sock in binding.sockets]

    def _close(self, binding: Binding) -> None:
        if binding.adopted:
            return
        for sock in binding.sockets:
            sock.close()
        binding.sockets.clear()

    def close_all(self) -> None:
        for binding in self.bindings.values():
            if binding.adopted:
                for sock in binding.sockets:
                    sock.close()
                binding.sockets.clear()
            else:
                self._close(binding)
        self.bindings.clear()

    def services(self) -> list[tuple[str, str, list[str]]]:
        """(service, module, bound addresses) for every planned service."""
        result = []
        for plan in self.plans:
            addresses = []
            for endpoint in plan.endpoints:
                binding = self.bindings.get(binding_key(plan.service, endpoint))
                addresses.append(binding.address if binding else str(endpoint))
            result.append((plan.service, plan.module, addresses))
        return result

    def describe(self) -> list[str]:
        """One line per service: ``echo (module echo) -> 127.0.0.1:5432, [::1]:5432``."""
        return [
            f"{service} (module {module}) -> {', '.join(addresses)}"
            for service, module, addresses in self.services()
        ]
