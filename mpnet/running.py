"""The mpnet already serving a config, as ``mpnet check`` sees it through the control socket.

``mpnet check -c X`` beside the running server of X would find every port of X taken; the
ports held by that server are not a conflict (a reload would keep them), so the check asks the
config's control socket who runs there and which endpoints it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .control import default_socket_path
from .controlclient import ControlError, request
from .pure.config import Config
from .pure.controlproto import StatusRequest


@dataclass(frozen=True)
class RunningInstance:
    """The master answering on the config's control socket: its pid and bound endpoints
    (``127.0.0.1:5432``, ``[::1]:5432``, as :func:`~mpnet.pure.portplan.format_address`)."""

    pid: int
    endpoints: frozenset[str]


def running_instance(config: Config, timeout: float = 3.0) -> RunningInstance | None:
    """The mpnet serving on *config*'s control socket, or None if none answers status."""
    configured = config["control_socket"]
    path = config.resolve_path(configured) if configured else default_socket_path()
    try:
        status = request(path, StatusRequest(), timeout=timeout).status
    except ControlError:
        return None
    if not isinstance(status, dict) or not isinstance(status.get("pid"), int):
        return None
    endpoints = {
        address
        for service in status.get("services") or ()
        if isinstance(service, dict)
        for address in service.get("endpoints") or ()
        if isinstance(address, str)
    }
    return RunningInstance(status["pid"], frozenset(endpoints))
