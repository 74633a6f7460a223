"""The control socket's protocol, free of I/O: one JSON object per line each way.

A request is one of the records below (``{"command": "status"}`` and so on on the wire); the
master answers with a :class:`ControlReply`. Both directions are parsed here, so the master
turns *any* line into either a request or a one-line error (a control client must never be able
to crash the master, whatever it sends), and the command line turns any answer into a reply or
a :class:`ControlProtocolError` it can print.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_REQUEST = 64 * 1024
"""Longest request line the master reads."""

MAX_WORKERS = 1024


class ControlProtocolError(ValueError):
    """A line that is not a valid request or reply; the message says what is wrong."""


@dataclass(frozen=True)
class StatusRequest:
    """``mpnet status``: the master's state, its workers and services."""


@dataclass(frozen=True)
class ReloadRequest:
    """``mpnet reload``: check the modules, then replace the workers (answered after the check)."""


@dataclass(frozen=True)
class StopRequest:
    """``mpnet stop``: a graceful stop (connections finish) or a quick one."""

    mode: Literal["graceful", "quick"] = "graceful"


@dataclass(frozen=True)
class WorkersRequest:
    """``mpnet workers N``: run *count* worker slots."""

    count: int


ControlRequest = StatusRequest | ReloadRequest | StopRequest | WorkersRequest


@dataclass(frozen=True)
class ControlReply:
    """The master's answer: *ok*, and an *error* or a *message*; ``status`` carries the
    ``mpnet status`` document, ``generation`` the generation a reload started."""

    ok: bool
    error: str | None = None
    message: str | None = None
    status: dict[str, Any] | None = field(default=None, compare=False)
    generation: int | None = None

    @classmethod
    def failure(cls, error: str) -> ControlReply:
        return cls(False, error=error)

    def to_json(self) -> bytes:
        fields = {"ok": self.ok}
        for name in ("error", "message", "status", "generation"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return json.dumps(fields).encode() + b"\n"


_COMMANDS = ("status", "reload", "stop", "workers")


def request_to_json(request: ControlRequest) -> bytes:
    if isinstance(request, StatusRequest):
        fields: dict[str, Any] = {"command": "status"}
    elif isinstance(request, ReloadRequest):
        fields = {"command": "reload"}
    elif isinstance(request, StopRequest):
        fields = {"command": "stop", "mode": request.mode}
    else:
        fields = {"command": "workers", "count": request.count}
    return json.dumps(fields).encode() + b"\n"


def _json_object(line: bytes | str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except RecursionError:
        raise ControlProtocolError(f"bad {what}: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ControlProtocolError(f"bad {what}: {exc}") from None
    if not isinstance(value, dict):
        raise ControlProtocolError(f"bad {what}: expected a JSON object, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number"
    )


def parse_request(line: bytes | str) -> ControlRequest:
    """The request one line holds; :class:`ControlProtocolError` naming the problem otherwise."""
    fields = _json_object(line, "request")
    command = fields.get("command")
    if command == "status":
        return StatusRequest()
    if command == "reload":
        return ReloadRequest()
    if command == "stop":
        mode = fields.get("mode", "graceful")
        if mode not in ("graceful", "quick"):
            raise ControlProtocolError(f"stop: mode must be 'graceful' or 'quick', not {mode!r}")
        return StopRequest(mode)
    if command == "workers":
        count = fields.get("count")
        if type(count) is not int or not 1 <= count <= MAX_WORKERS:
            raise ControlProtocolError(f"workers: expected a count from 1 to {MAX_WORKERS}")
        return WorkersRequest(count)
    if command is None:
        raise ControlProtocolError(f"bad request: no 'command'; known: {', '.join(_COMMANDS)}")
    shown = command if isinstance(command, str) else json.dumps(command)[:40]
    raise ControlProtocolError(f"unknown command {shown!r}; known: {', '.join(_COMMANDS)}")


def parse_reply(line: bytes | str) -> ControlReply:
    """The reply one line holds; :class:`ControlProtocolError` naming the problem otherwise."""
    fields = _json_object(line, "answer")
    ok = fields.get("ok")
    if type(ok) is not bool:
        raise ControlProtocolError("bad answer: 'ok' must be true or false")
    checks: dict[str, type | tuple[type, ...]] = {
        "error": str,
        "message": str,
        "status": dict,
        "generation": int,
    }
    for name, kind in checks.items():
        value = fields.get(name)
        if value is not None and not isinstance(value, kind):
            raise ControlProtocolError(f"bad answer: {name!r} has the wrong type")
    return ControlReply(
        ok,
        error=fields.get("error"),
        message=fields.get("message"),
        status=fields.get("status"),
        generation=fields.get("generation"),
    )
