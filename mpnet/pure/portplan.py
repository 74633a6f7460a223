"""Port planning, free of I/O: which service listens where, and which plans collide.

The master turns the providers' declarations into :class:`ServicePlan` objects and checks them
centrally (:func:`find_conflicts`) before anything is bound; :mod:`mpnet.portmanager` binds them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import Config, ConfigError


@dataclass(frozen=True, order=True)
class Endpoint:
    """A listening address as configured (``port`` 0 means "any free port, chosen at bind")."""

    host: str  # normalised: "0.0.0.0", "::", or a literal address
    port: int

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    @property
    def wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    def overlaps(self, other: Endpoint) -> bool:
        """Would both endpoints receive the same connections? (``*`` covers every address.)"""
        if self.port != other.port or self.port == 0 or self.ipv6 != other.ipv6:
            return False
        return self.host == other.host or self.wildcard or other.wildcard

    def __str__(self) -> str:
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def literal_host(host: str) -> str | None:
    """``*`` → ``0.0.0.0``; ``localhost`` → ``127.0.0.1``; a literal address in canonical form;
    None for a name that needs resolving."""
    if host == "*":
        return "0.0.0.0"
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


@dataclass
class ServicePlan:
    """Where one service listens, and which config key decided it (for error messages)."""

    service: str
    module: str
    endpoints: list[Endpoint]
    ports_key: str
    interfaces_key: str
    info: dict[str, Any] = field(default_factory=dict)


def plan_endpoints(
    config: Config, services: Iterable[dict[str, Any]], resolve: Callable[[str], str]
) -> list[ServicePlan]:
    """Turn the providers' declarations (plain data from the checker) into endpoint plans,
    applying ``<service>_ports`` / ``<service>_interfaces`` / ``interfaces`` from the config.

    *resolve* turns a configured interface into a canonical address (``ValueError`` if it
    cannot); name resolution is I/O, so the caller supplies it."""
    plans = []
    for info in services:
        name = info["name"]
        if config.service_key_is_set(name, "ports"):
            ports, ports_key = config.service_options[name]["ports"], f"{name}_ports"
        else:
            ports, ports_key = info["default_ports"], f"{name}_ports"
        if not ports and info.get("optional"):
            continue  # a framework service (multiplex) that the config does not ask for
        if not ports:
            raise ConfigError(
                f"{config.path}: service {name!r} (module {info['module']!r}) has no default "
                f"port; set {name}_ports"
            )
        if config.service_key_is_set(name, "interfaces"):
            interfaces_key = f"{name}_interfaces"
        else:
            interfaces_key = "interfaces"
        interfaces = config.service_option(name, "interfaces")
        endpoints = []
        for host in interfaces:
            try:
                normal = resolve(host)
            except ValueError as exc:
                raise ConfigError(f"{config.path}: key {interfaces_key!r}: {exc}") from None
            for port in ports:
                endpoint = Endpoint(normal, port)
                if endpoint not in endpoints:
                    endpoints.append(endpoint)
        plans.append(
            ServicePlan(name, info["module"], endpoints, ports_key, interfaces_key, dict(info))
        )
    return plans


def find_conflicts(plans: list[ServicePlan]) -> list[str]:
    """Every pair of services whose endpoints overlap (Prosody compares strings only; this
    also catches ``*`` against a specific address on the same port)."""
    problems = []
    for index, first in enumerate(plans):
        for second in plans[index + 1 :]:
            for a in first.endpoints:
                for b in second.endpoints:
                    if a.overlaps(b):
                        problems.append(
                            f"port conflict on {b}: services {first.service!r} ({a}) and "
                            f"{second.service!r} ({b}) both want it; change {second.ports_key} "
                            f"or {second.interfaces_key} in the config"
                        )
    return problems
