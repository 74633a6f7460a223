"""Tests for mpnet.pure.metrics (a worker's report, checked and added up) and mpnet.metrics (the
master's book: retired totals, so that counters never go backwards), without processes."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mpnet.channel import MasterChannel
from mpnet.exposition import render
from mpnet.handle import WorkerHandle
from mpnet.metrics import MetricsBook, to_json
from mpnet.pure import metrics as m
from mpnet.pure.messages import ChannelError, Metrics, from_wire, to_wire


def report(accepted: int = 3, received: int = 100, cpu: float = 0.5, **extra: Any) -> Metrics:
    service = {
        "accepted": accepted,
        "open": 1,
        "received": received,
        "sent": 2 * received,
        "tls_failures": 0,
        "refused": {"max_connections": 2},
        "errors": {"onincoming": 1},
        "durations": {"onincoming": [1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2.5]},
    }
    service.update(extra)
    return Metrics({"echo": service}, {"cpu": cpu, "rss": 4096, "lag": 0.01}, {})


def test_a_report_crosses_the_channel_and_flattens() -> None:
    message = from_wire(to_wire(report()))
    assert isinstance(message, Metrics)
    counters, gauges = m.flatten(*message, slot=1)
    assert counters[(m.ACCEPTED, ("echo",))] == 3
    assert counters[(m.SENT, ("echo",))] == 200
    assert counters[(m.REFUSED, ("echo", "max_connections"))] == 2
    assert counters[(m.ERRORS, ("echo", "onincoming"))] == 1
    assert counters[(m.CPU, ("1",))] == 0.5
    assert gauges == {(m.OPEN, ("echo",)): 1, (m.RSS, ("1",)): 4096, (m.LAG, ("1",)): 0.01}
    histogram = m.histograms(counters)[("echo", "onincoming")]
    assert histogram == ([1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4], 2.5)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"accepted": -1}, "accepted must be a count"),
        ({"received": 1.5}, "received must be a count"),
        ({"sent": True}, "sent must be a count"),
        ({"refused": {"": 1}}, "bad name"),
        ({"refused": {"x" * 300: 1}}, "bad name"),
        ({"errors": {"onincoming": "1"}}, "errors onincoming must be a count"),
        ({"errors": {str(i): 1 for i in range(m.MAX_ENTRIES + 1)}}, "at most"),
        ({"durations": {"onincoming": [1, 2]}}, "bad shape"),
        ({"durations": {"onincoming": [0] * 11 + [-1.0]}}, "sum must be a number"),
        ({"durations": {"onincoming": [0] * 11 + [float("nan")]}}, "sum must be a number"),
    ],
)
def test_a_malformed_report_names_what_is_wrong(bad: dict[str, Any], words: str) -> None:
    with pytest.raises(ChannelError, match=words):
        m.flatten(*report(**bad), slot=0)


def test_a_malformed_process_section_is_refused() -> None:
    with pytest.raises(ChannelError, match="process rss"):
        m.flatten({}, {"rss": "lots"}, slot=0)
    with pytest.raises(ChannelError, match="services must be a table"):
        m.flatten([], {}, slot=0)


def test_histogram_buckets_take_values_at_their_upper_bound() -> None:
    histogram = m.DurationHistogram()
    for seconds in (0.0, 0.0001, 0.00011, 5.0, 7.0):
        histogram.observe(seconds)
    row = histogram.row()
    assert row[0] == 2 and row[1] == 1 and row[len(m.DURATION_BUCKETS) - 1] == 1
    assert row[len(m.DURATION_BUCKETS)] == 1  # above the last bound
    assert row[-1] == pytest.approx(12.00021)


_CHANNELS: list[MasterChannel] = []


@pytest.fixture(autouse=True)
def _close_channels() -> Iterator[None]:
    yield
    while _CHANNELS:
        _CHANNELS.pop().close()


def handle(slot: int, pid: int) -> WorkerHandle:
    a, b = socket.socketpair()
    b.close()
    channel = MasterChannel(a)
    _CHANNELS.append(channel)
    return WorkerHandle(slot=slot, pid=pid, generation=1, channel=channel, started=0.0)


def scrape(book: MetricsBook, workers: list[WorkerHandle]) -> dict[str, dict[tuple, float]]:
    page, _ = render(book.families(workers, {"success": 0, "failure": 0}, {"incr": 4}), "")
    result: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(page.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            result.setdefault(sample.name, {})[labels] = sample.value
    return result


def test_counters_keep_what_a_gone_worker_reported() -> None:
    book = MetricsBook()
    first, second = handle(0, 100), handle(1, 101)
    for h, accepted in ((first, 3), (second, 4)):
        h.on_message(report(accepted=accepted))
    assert scrape(book, [first, second])["mpnet_connections_accepted_total"] == {
        (("service", "echo"),): 7
    }
    book.retire(first, cpu_seconds=2.0)  # the kernel knew better than the last report
    successor = handle(0, 102)
    successor.on_message(report(accepted=1, cpu=0.25))
    figures = scrape(book, [second, successor])
    assert figures["mpnet_connections_accepted_total"] == {(("service", "echo"),): 8}
    assert figures["mpnet_connections_open"] == {(("service", "echo"),): 2}  # live ones only
    assert figures["mpnet_worker_cpu_seconds_total"][(("slot", "0"),)] == 2.25
    assert (
        figures["mpnet_callback_duration_seconds_count"][
            (("callback", "onincoming"), ("service", "echo"))
        ]
        == 12
    )
    assert figures["mpnet_shared_operations_total"] == {(("op", "incr"),): 4}
    json_figures = to_json(book.families([second, successor], {}, {}))
    assert json_figures["mpnet_connections_accepted_total"] == [{"service": "echo", "value": 8}]


def test_openmetrics_is_written_when_asked_for() -> None:
    page, content_type = render(MetricsBook().families([], {}, {}), "application/openmetrics-text")
    assert content_type.startswith("application/openmetrics-text")
    assert page.endswith(b"# EOF\n")


def redis_report(state: str, lost: int) -> Metrics:
    base = report()
    shared = {"state": state, "since": 1700000000.5, "error": "x" * 500, "lost": lost}
    return Metrics(base.services, base.process, shared)


def test_the_redis_state_of_each_worker_is_counted_and_kept() -> None:
    book = MetricsBook()
    up, down = handle(0, 100), handle(1, 101)
    up.on_message(from_wire(to_wire(redis_report("connected", 2))))
    down.on_message(redis_report("unavailable", 1))
    assert down.redis is not None and len(down.redis["error"]) == m.MAX_ERROR
    assert down.status(0.0)["redis"]["state"] == "unavailable"
    figures = scrape(book, [up, down])
    assert figures["mpnet_redis_workers"] == {
        (("state", "connected"),): 1,
        (("state", "unavailable"),): 1,
    }
    assert figures["mpnet_redis_connections_lost_total"] == {(): 3}
    book.retire(down)
    figures = scrape(book, [up])
    assert figures["mpnet_redis_workers"][(("state", "unavailable"),)] == 0  # said, not absent
    assert figures["mpnet_redis_connections_lost_total"] == {(): 3}


def test_the_local_backend_says_nothing_about_redis() -> None:
    local = handle(0, 100)
    local.on_message(report())
    assert "redis" not in local.status(0.0)
    assert not {"mpnet_redis_workers", "mpnet_redis_connections_lost"} & set(
        scrape(MetricsBook(), [local])
    )


@pytest.mark.parametrize(
    ("shared", "words"),
    [
        ({"state": "maybe"}, "shared state must be one of"),
        ({"state": "connected", "lost": -1}, "shared lost must be a count"),
        ({"state": "connected", "since": "now"}, "shared since must be a number"),
        ({"state": "connected", "error": 3}, "shared error must be a string"),
    ],
)
def test_a_malformed_redis_state_names_what_is_wrong(shared: dict[str, Any], words: str) -> None:
    with pytest.raises(ChannelError, match=words):
        m.flatten({}, {}, shared, slot=0)
