"""The records that travel between master and workers, by name instead of by position.

Each message is a :class:`typing.NamedTuple`; on the wire it is ``[tag, *fields]`` (a plain list,
which msgpack packs without help). :func:`to_wire` and :func:`from_wire` are the only places that
know the tags; :func:`from_wire` checks the tag, the number of fields and each field's type, so
a handler receives a well-formed record or the sender is cut off with a message naming what was
wrong. Semantic checks (a known table operation, plain-data arguments) stay with the handlers.

Worker -> master: :class:`Ready`, :class:`Heartbeat`, :class:`Metrics`, :class:`NotAccepting`,
:class:`BootError`, :class:`Stopped`, :class:`SharedWrite`, :class:`AtomicRequest`,
:class:`Broadcast`, :class:`Barrier`.
Master -> worker: :class:`SequencedWrite`, :class:`AtomicResult`, :class:`BroadcastEvent`,
:class:`BarrierPassed`.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class ChannelError(Exception):
    """A frame or message that breaks the channel protocol; the peer that sent it is cut off."""


# -- worker -> master: the worker's own life ------------------------------------------------------


class Ready(NamedTuple):
    """The worker's loop runs and its sockets accept."""

    pid: int
    generation: int


class Heartbeat(NamedTuple):
    """Sent every heartbeat interval; its absence is how the master sees a blocked loop."""

    connections: int
    served: int
    refused: int
    tls_failures: int


class Metrics(NamedTuple):
    """The worker's figures since it started, sent with each heartbeat and once more before
    :class:`Stopped` (shape and checks: :mod:`mpnet.pure.metrics`). *shared* is the shared
    backend's state as the worker sees it (empty for the local backend; Redis: connected or
    not)."""

    services: dict[str, Any]
    process: dict[str, Any]
    shared: dict[str, Any]


class NotAccepting(NamedTuple):
    """The worker has closed its listening sockets (a reload completes only after this)."""


class BootError(NamedTuple):
    """The worker could not start (a module, a certificate, a socket); the master stops retrying
    the same generation and reports *reason*."""

    reason: str


class Stopped(NamedTuple):
    """The worker finished its graceful stop; *served* is its final count of connections."""

    served: int


# -- worker -> master: shared state ---------------------------------------------------------------


class SharedWrite(NamedTuple):
    """A plain write already applied to the worker's replica (``set``, ``del``, ``clear``,
    ``update``), for the master to order and fan out."""

    table: str
    op: str
    args: list[Any]


class AtomicRequest(NamedTuple):
    """An atomic operation (``incr``, ``setdefault``, ``cas``, ``pop``, ``delete_if``) for the
    master to decide; answered by an :class:`AtomicResult` with the same *request* number."""

    request: int
    table: str
    op: str
    args: list[Any]


class Broadcast(NamedTuple):
    """A module's ``module.broadcast(topic, payload)``, for the master to order and fan out."""

    topic: str
    payload: Any


class Barrier(NamedTuple):
    """Answer me once everything before this message is ordered (and journaled as
    ``state_fsync`` says): the worker's ``flush()`` and ``sync()``. Answered by a
    :class:`BarrierPassed` with the same *request* number, queued after every write the master
    sequenced before it, so it also tells the worker its replica holds those writes."""

    request: int


# -- master -> worker -----------------------------------------------------------------------------


class SequencedWrite(NamedTuple):
    """A write in the master's order. *origin* is the writing worker's pid (0 for an atomic's
    effect, which is never one of a worker's pending plain writes)."""

    origin: int
    table: str
    op: str
    args: list[Any]


class AtomicResult(NamedTuple):
    """The answer to an :class:`AtomicRequest`: *value* is the result, or the error text when
    *ok* is false."""

    request: int
    ok: bool
    value: Any


class BroadcastEvent(NamedTuple):
    """A broadcast in the master's order, delivered to every worker's hooks."""

    topic: str
    payload: Any


class BarrierPassed(NamedTuple):
    """The answer to a :class:`Barrier`."""

    request: int


Message = (
    Ready
    | Heartbeat
    | Metrics
    | NotAccepting
    | BootError
    | Stopped
    | SharedWrite
    | AtomicRequest
    | Broadcast
    | Barrier
    | SequencedWrite
    | AtomicResult
    | BroadcastEvent
    | BarrierPassed
)

_ANY = object
_SPEC: dict[type[Any], tuple[str, tuple[type, ...]]] = {
    Ready: ("ready", (int, int)),
    Heartbeat: ("heartbeat", (int, int, int, int)),
    Metrics: ("metrics", (dict, dict, dict)),
    NotAccepting: ("not_accepting", ()),
    BootError: ("boot_error", (str,)),
    Stopped: ("stopped", (int,)),
    SharedWrite: ("sw", (str, str, list)),
    AtomicRequest: ("sx", (int, str, str, list)),
    Broadcast: ("bc", (str, _ANY)),
    SequencedWrite: ("sa", (int, str, str, list)),
    AtomicResult: ("sr", (int, bool, _ANY)),
    BroadcastEvent: ("be", (str, _ANY)),
    Barrier: ("sb", (int,)),
    BarrierPassed: ("sp", (int,)),
}
_TAG = {kind: tag for kind, (tag, _) in _SPEC.items()}
_BY_TAG = {tag: (kind, types) for kind, (tag, types) in _SPEC.items()}


def to_wire(message: Message) -> list[Any]:
    """The plain list a record is sent as: ``[tag, *fields]``."""
    return [_TAG[type(message)], *message]


def from_wire(raw: Any) -> Message:
    """The record a decoded frame holds. Raises :class:`ChannelError` naming the problem for an
    unknown tag, a wrong number of fields or a field of the wrong type."""
    if type(raw) is not list or not raw:
        raise ChannelError(f"a message is a non-empty list, not {type(raw).__name__}")
    entry = _BY_TAG.get(raw[0]) if type(raw[0]) is str else None
    if entry is None:
        raise ChannelError(f"unknown message kind {raw[0]!r}")
    kind, types = entry
    fields = raw[1:]
    if len(fields) != len(types):
        raise ChannelError(f"{kind.__name__} takes {len(types)} field(s), got {len(fields)}")
    for name, value, expected in zip(kind._fields, fields, types, strict=True):
        if not isinstance(value, expected) or (expected is int and type(value) is bool):
            raise ChannelError(
                f"{kind.__name__}.{name} must be {expected.__name__}, not {type(value).__name__}"
            )
    return kind(*fields)
