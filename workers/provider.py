"""What a service module declares, as plain declarations: the provider record and the listener's
callbacks. Nothing here imports the worker runtime, so the checker and the connection code can
both use it without importing each other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .connection import Connection
    from .module import Module

CALLBACK_NAMES = (
    "onconnect",
    "onincoming",
    "ondisconnect",
    "ondrain",
    "onreadtimeout",
    "onstarttls",
)
PROVIDER_FIELDS = frozenset(
    {"name", "listener", "default_port", "default_ports", "encryption", "multiplex"}
)
SERVICE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*$")


class Listener(Protocol):
    """The callbacks a listener may offer, for type checkers. A listener defines any subset of
    them (mpnet looks each one up by name and skips those it lacks) as plain functions of a
    class, methods of an instance, or entries of a dict. Any of them may be ``async def``: the
    connection then stops reading until it returns, so the order below still holds.

    Per connection: ``onconnect [-> onincoming | ondrain | onreadtimeout | onstarttls]* ->
    ondisconnect``, ``ondisconnect`` exactly once.
    """

    def onconnect(self, conn: Connection) -> object: ...

    def onincoming(self, conn: Connection, data: bytes) -> object: ...

    def ondisconnect(self, conn: Connection, err: str | None) -> object: ...

    def ondrain(self, conn: Connection) -> object: ...

    def onreadtimeout(self, conn: Connection) -> object:
        """Return true to keep the idle connection open."""

    def onstarttls(self, conn: Connection) -> object: ...


class ModuleError(Exception):
    """A module that cannot be found, does not load, or declares something invalid."""


@dataclass
class Provider:
    """One ``module.provides("net", ...)`` declaration."""

    name: str
    module: Module
    listener: Any
    default_ports: list[int]
    callbacks: dict[str, Callable[..., Any]]
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Plain data about this provider, as the checker reports it to the master."""
        return {
            "name": self.name,
            "module": self.module.name,
            "default_ports": list(self.default_ports),
            "encryption": self.options.get("encryption"),
            "multiplex": "multiplex" in self.options,
        }


def listener_callbacks(listener: Any, where: str) -> dict[str, Callable[..., Any]]:
    """The ``on*`` callbacks a listener offers. A listener is any object (class, instance,
    namespace) or a dict; missing callbacks are skipped, non-callable ones are an error."""
    found: dict[str, Callable[..., Any]] = {}
    for name in CALLBACK_NAMES:
        if isinstance(listener, dict):
            callback = listener.get(name)
        else:
            callback = getattr(listener, name, None)
        if callback is None:
            continue
        if not callable(callback):
            raise ModuleError(f"{where}: listener.{name} is not callable")
        found[name] = callback
    if not found:
        raise ModuleError(
            f"{where}: listener has none of the callbacks {', '.join(CALLBACK_NAMES)}"
        )
    return found
