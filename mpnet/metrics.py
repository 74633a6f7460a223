"""The master's figures: what its workers reported, plus its own counts (restarts, reloads,
shared-table operations), as metric families for ``GET /metrics`` and ``mpnet status --json``.

Workers report cumulative counts since they started (:mod:`mpnet.pure.metrics`). When a worker
goes, whatever the reason (``kill -9``, a reload, fewer workers), :meth:`MetricsBook.retire` adds
its last report to a retired total, so a counter is the retired total plus every live worker's
latest report and never goes backwards. Its CPU time is the kernel's figure from ``wait4``,
exact even after a ``kill -9``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .handle import WorkerHandle
from .pure import metrics as m

WORKER_STATES = ("booting", "ready", "draining", "stopping")
RESTART_REASONS = ("crashed", "unresponsive", "memory", "boot_error")
RELOAD_RESULTS = ("success", "failure")

_HELP = {
    m.ACCEPTED: "Connections admitted to a service (onconnect ran or will run).",
    m.OPEN: "Connections open now.",
    m.REFUSED: "Connections refused by a limit; reason is the config key of the limit.",
    m.RECEIVED: "Bytes received from clients (after TLS).",
    m.SENT: "Bytes written to clients by the service (before TLS).",
    m.ERRORS: "Callbacks that raised.",
    m.TLS_FAILURES: "Direct-TLS handshakes that failed or timed out.",
    m.RSS: "Resident memory of the worker(s) in a slot.",
    m.CPU: "CPU time (user + system) of the workers that ran in a slot.",
    m.LAG: "How late the worker's heartbeat timer fired, at its last report.",
    m.DURATION: "Time a callback ran (an async one until it finished).",
    "mpnet_workers": "Worker processes by state.",
    "mpnet_worker_restarts_total": "Workers replaced because they failed.",
    "mpnet_reloads_total": "Reloads by outcome.",
    "mpnet_shared_operations_total": "Shared-table operations and broadcasts the master ordered.",
    m.REDIS_WORKERS: "Workers by the state of their Redis connection (shared_backend redis).",
    m.REDIS_LOST: "Times a worker's Redis connection was lost (shared_backend redis).",
}
_LABELS = {
    m.ACCEPTED: ("service",),
    m.OPEN: ("service",),
    m.REFUSED: ("service", "reason"),
    m.RECEIVED: ("service",),
    m.SENT: ("service",),
    m.ERRORS: ("service", "callback"),
    m.TLS_FAILURES: ("service",),
    m.RSS: ("slot",),
    m.CPU: ("slot",),
    m.LAG: ("slot",),
    m.REDIS_WORKERS: ("state",),
    m.REDIS_LOST: (),
}
_GAUGES = (m.OPEN, m.RSS, m.LAG, m.REDIS_WORKERS)


@dataclass
class Family:
    """One metric: ``samples`` maps label values to a number (a histogram: to its cumulative
    bucket counts, one per :data:`~mpnet.pure.metrics.DURATION_BUCKETS` bound then +Inf, and
    its sum)."""

    name: str
    kind: str  # counter, gauge or histogram
    help: str
    labels: tuple[str, ...]
    samples: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def to_json(self) -> list[dict[str, Any]]:
        rows = []
        for values, sample in sorted(self.samples.items()):
            row: dict[str, Any] = dict(zip(self.labels, values, strict=True))
            if self.kind == "histogram":
                counts, total = sample
                bounds = [*(f"{b:g}" for b in m.DURATION_BUCKETS), "+Inf"]
                row["buckets"] = dict(zip(bounds, counts, strict=True))
                row["count"], row["sum"] = counts[-1], total
            else:
                row["value"] = sample
            rows.append(row)
        return rows


class MetricsBook:
    """Retired totals and the master's own counts."""

    def __init__(self) -> None:
        self.retired: m.Samples = {}
        self.restarts = dict.fromkeys(RESTART_REASONS, 0)

    def retire(self, handle: WorkerHandle, cpu_seconds: float | None = None) -> None:
        """*handle*'s worker is gone: keep what it reported (its CPU time: the kernel's figure
        from ``wait4`` when known, the larger of the two)."""
        counters = dict(handle.metric_counters)
        if cpu_seconds is not None:
            key = (m.CPU, (str(handle.slot),))
            counters[key] = max(counters.get(key, 0.0), cpu_seconds)
        m.add_into(self.retired, counters)
        handle.metric_counters, handle.metric_gauges = {}, {}

    def restarted(self, reason: str) -> None:
        self.restarts[reason] = self.restarts.get(reason, 0) + 1

    def families(
        self,
        workers: Iterable[WorkerHandle],
        reloads: Mapping[str, int],
        shared_operations: Mapping[str, int],
    ) -> list[Family]:
        """Every metric now, from the retired totals, *workers*' latest reports and the
        master's counts."""
        workers = list(workers)
        counters = dict(self.retired)
        gauges: m.Samples = {}
        states = dict.fromkeys(WORKER_STATES, 0)
        for handle in workers:
            m.add_into(counters, handle.metric_counters)
            m.merge_gauges(gauges, handle.metric_gauges)
            states[handle.state] = states.get(handle.state, 0) + 1
        families = {
            name: Family(name, "gauge" if name in _GAUGES else "counter", _HELP[name], labels)
            for name, labels in _LABELS.items()
        }
        for source in (counters, gauges):
            for (name, values), value in source.items():
                if name in families:
                    families[name].samples[values] = value
        redis_states = families[m.REDIS_WORKERS].samples
        if redis_states or families[m.REDIS_LOST].samples:
            for state in m.REDIS_STATES:
                redis_states.setdefault((state,), 0)
        else:  # the local backend: nothing to say about Redis
            del families[m.REDIS_WORKERS], families[m.REDIS_LOST]
        result = list(families.values())
        histogram = Family(m.DURATION, "histogram", _HELP[m.DURATION], ("service", "callback"))
        for key, buckets in m.histograms(counters).items():
            histogram.samples[key] = buckets
        result.append(histogram)
        result.append(_simple("mpnet_workers", "gauge", "state", states))
        result.append(_simple("mpnet_worker_restarts_total", "counter", "reason", self.restarts))
        result.append(_simple("mpnet_reloads_total", "counter", "result", reloads))
        result.append(_simple("mpnet_shared_operations_total", "counter", "op", shared_operations))
        return result


def _simple(name: str, kind: str, label: str, values: Mapping[str, int]) -> Family:
    family = Family(name, kind, _HELP[name], (label,))
    family.samples = {(key,): value for key, value in values.items()}
    return family


def to_json(families: Iterable[Family]) -> dict[str, list[dict[str, Any]]]:
    """The figures for ``mpnet status --json``: metric name -> rows of labels and value."""
    return {family.name: family.to_json() for family in families}
