"""The figures a worker reports and how the master adds them up, without I/O.

A worker sends a :class:`~mpnet.pure.messages.Metrics` record every heartbeat: cumulative counts
since it started (per service, plus its own CPU time) and a few gauges (open connections, memory,
event-loop lag). :func:`flatten` checks such a report and turns it into flat samples keyed by
``(metric name, label values)``; the master keeps each live worker's latest flat report and,
when a worker goes (crash, reload, fewer workers), adds its counters to a retired total
(:func:`add_into`), so that no counter ever goes backwards.

The report's shape (plain data, for msgpack)::

    services: {name: {"accepted": int, "open": int, "received": int, "sent": int,
                      "tls_failures": int, "refused": {reason: int}, "errors": {callback: int},
                      "durations": {callback: [count per bucket of DURATION_BUCKETS..., count
                                               above the last bucket, sum in seconds]}}}
    process:  {"cpu": seconds, "rss": bytes, "lag": seconds}
    shared:   {} (local backend) or, on Redis, {"state": "connected" | "unavailable",
               "since": wall-clock seconds of the last change, "error": the last error seen,
               "lost": times the connection was lost}
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from .messages import ChannelError

DURATION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
MAX_LABEL = 200
MAX_ENTRIES = 1000

Key = tuple[str, tuple[str, ...]]
Samples = dict[Key, float]

ACCEPTED = "mpnet_connections_accepted_total"
OPEN = "mpnet_connections_open"
REFUSED = "mpnet_connections_refused_total"
RECEIVED = "mpnet_received_bytes_total"
SENT = "mpnet_sent_bytes_total"
ERRORS = "mpnet_callback_errors_total"
TLS_FAILURES = "mpnet_tls_handshake_failures_total"
RSS = "mpnet_worker_resident_memory_bytes"
CPU = "mpnet_worker_cpu_seconds_total"
LAG = "mpnet_event_loop_lag_seconds"
DURATION = "mpnet_callback_duration_seconds"
DURATION_BUCKET = DURATION + "_bucket"  # labels: service, callback, bucket index
DURATION_SUM = DURATION + "_sum"
REDIS_WORKERS = "mpnet_redis_workers"  # labels: state
REDIS_LOST = "mpnet_redis_connections_lost_total"
REDIS_STATES = ("connected", "unavailable")
MAX_ERROR = 300

_SERVICE_COUNTERS = {"accepted": ACCEPTED, "received": RECEIVED, "sent": SENT}
_SERVICE_COUNTERS["tls_failures"] = TLS_FAILURES


def _count(value: Any, where: str) -> int:
    if type(value) is not int or value < 0:
        raise ChannelError(f"metrics: {where} must be a count (int >= 0), not {value!r:.40}")
    return value


def _number(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not value >= 0:
        raise ChannelError(f"metrics: {where} must be a number >= 0, not {value!r:.40}")
    return float(value)


def _table(value: Any, where: str) -> dict[str, Any]:
    if type(value) is not dict or len(value) > MAX_ENTRIES:
        raise ChannelError(f"metrics: {where} must be a table of at most {MAX_ENTRIES} entries")
    for key in value:
        if type(key) is not str or not 0 < len(key) <= MAX_LABEL:
            raise ChannelError(f"metrics: {where} has a bad name {key!r:.40}")
    return value


def redis_state(shared: Any) -> dict[str, Any] | None:
    """The Redis part of a report, checked (None for the local backend): raises
    :class:`ChannelError` naming the first thing wrong; a long error is cut to MAX_ERROR."""
    if shared is None or shared == {}:
        return None
    shared = _table(shared, "shared")
    state = shared.get("state")
    if state not in REDIS_STATES:
        raise ChannelError(
            f"metrics: shared state must be one of {REDIS_STATES}, not {state!r:.40}"
        )
    error = shared.get("error", "")
    if type(error) is not str:
        raise ChannelError("metrics: shared error must be a string")
    return {
        "state": state,
        "since": _number(shared.get("since", 0), "shared since"),
        "error": error[:MAX_ERROR],
        "lost": _count(shared.get("lost", 0), "shared lost"),
    }


def flatten(
    services: Any, process: Any, shared: Any = None, slot: int = 0
) -> tuple[Samples, Samples]:
    """A worker's report as (counters, gauges), checked: raises :class:`ChannelError` naming
    the first thing wrong. *slot* (the master's, not the worker's word) labels the process's
    figures."""
    counters: Samples = {}
    gauges: Samples = {}
    redis = redis_state(shared)
    if redis is not None:
        gauges[(REDIS_WORKERS, (redis["state"],))] = 1
        counters[(REDIS_LOST, ())] = redis["lost"]
    for service, figures in _table(services, "services").items():
        where = f"service {service!r}"
        figures = _table(figures, where)
        for field, name in _SERVICE_COUNTERS.items():
            counters[(name, (service,))] = _count(figures.get(field, 0), f"{where} {field}")
        gauges[(OPEN, (service,))] = _count(figures.get("open", 0), f"{where} open")
        for reason, n in _table(figures.get("refused", {}), f"{where} refused").items():
            counters[(REFUSED, (service, reason))] = _count(n, f"{where} refused {reason}")
        for callback, n in _table(figures.get("errors", {}), f"{where} errors").items():
            counters[(ERRORS, (service, callback))] = _count(n, f"{where} errors {callback}")
        durations = _table(figures.get("durations", {}), f"{where} durations")
        for callback, row in durations.items():
            if type(row) is not list or len(row) != len(DURATION_BUCKETS) + 2:
                raise ChannelError(f"metrics: {where} durations {callback!r} has a bad shape")
            for index, n in enumerate(row[:-1]):
                key = (DURATION_BUCKET, (service, callback, str(index)))
                counters[key] = _count(n, f"{where} durations {callback}")
            counters[(DURATION_SUM, (service, callback))] = _number(row[-1], f"{where} sum")
    process = _table(process, "process")
    label = (str(slot),)
    counters[(CPU, label)] = _number(process.get("cpu", 0), "process cpu")
    gauges[(RSS, label)] = _count(process.get("rss", 0), "process rss")
    gauges[(LAG, label)] = _number(process.get("lag", 0), "process lag")
    return counters, gauges


def add_into(total: Samples, samples: Samples) -> None:
    """Add *samples* to *total*, key by key."""
    for key, value in samples.items():
        total[key] = total.get(key, 0) + value


def merge_gauges(total: Samples, samples: Samples) -> None:
    """Gauges of several workers: connections and memory add up; lag is the worst one."""
    for key, value in samples.items():
        if key[0] == LAG:
            total[key] = max(total.get(key, 0.0), value)
        else:
            total[key] = total.get(key, 0) + value


def histograms(counters: Samples) -> dict[tuple[str, str], tuple[list[int], float]]:
    """The callback-duration histograms in *counters*: ``(service, callback) -> (cumulative
    counts, one per bucket of DURATION_BUCKETS and one for +Inf; sum)``."""
    result: dict[tuple[str, str], tuple[list[int], float]] = {}
    size = len(DURATION_BUCKETS) + 1
    for (name, labels), value in counters.items():
        if name == DURATION_BUCKET:
            service, callback, bucket = labels
            counts = result.setdefault((service, callback), ([0] * size, 0.0))[0]
            counts[int(bucket)] += int(value)
    for (service, callback), (counts, _) in list(result.items()):
        for index in range(1, size):
            counts[index] += counts[index - 1]
        result[(service, callback)] = (counts, counters.get((DURATION_SUM, (service, callback)), 0))
    return result


class DurationHistogram:
    """One callback's durations in a worker: a count per bucket and the sum (the report's row)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1  # the first bound >= seconds
        self.total += seconds

    def row(self) -> list[Any]:
        return [*self.counts, self.total]
