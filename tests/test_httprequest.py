"""Tests for mpnet.pure.httprequest: the metrics endpoint's request parser, without sockets.

Every request is also fed split at every position (and, with hypothesis, at random positions of
random input): the outcome must never depend on how the bytes arrived.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpnet.pure.httprequest import (
    MAX_HEAD,
    HttpError,
    Request,
    RequestParser,
    parse_head,
    route,
)

SCRAPE = (
    b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9150\r\n"
    b"Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n"
    b"User-Agent: Prometheus/2.42.0\r\nX-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n"
)


def outcome(chunks: list[bytes]) -> Request | int | None:
    """What the parser makes of *chunks*: the request, the error status, or None (waiting)."""
    parser = RequestParser()
    try:
        for chunk in chunks:
            request = parser.feed(chunk)
            if request is not None:
                return request
    except HttpError as exc:
        return exc.status
    return None


def splits(data: bytes) -> list[list[bytes]]:
    return [[data]] + [[data[:i], data[i:]] for i in range(1, len(data))]


def test_a_prometheus_scrape_is_parsed() -> None:
    request = outcome([SCRAPE])
    assert isinstance(request, Request)
    assert (request.method, request.target, request.version) == ("GET", "/metrics", "HTTP/1.1")
    assert request.headers["accept"].startswith("application/openmetrics-text")
    assert request.headers["host"] == "127.0.0.1:9150"
    assert route(request) is None


def test_the_outcome_is_the_same_at_every_split_and_byte_by_byte() -> None:
    whole = outcome([SCRAPE])
    for chunks in splits(SCRAPE):
        assert outcome(chunks) == whole
    assert outcome([bytes([b]) for b in SCRAPE]) == whole


def test_bare_line_feeds_repeated_headers_and_a_query_string() -> None:
    request = outcome([b"GET /metrics?x=1 HTTP/1.0\nA: 1\na:  2 \n\n"])
    assert isinstance(request, Request)
    assert request.path == "/metrics" and request.headers == {"a": "1, 2"}


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"get /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n folded: x\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", 400),  # TLS on the plain port
    ],
)
def test_malformed_requests_get_their_status(data: bytes, status: int) -> None:
    for chunks in splits(data):
        assert outcome(chunks) == status


def test_a_bad_request_line_is_refused_before_the_head_ends() -> None:
    assert outcome([b"BREW /pot HTCPCP/1.0\r\n"]) == 400


def test_a_head_larger_than_the_bound_is_refused_without_waiting_for_its_end() -> None:
    line = b"GET /metrics HTTP/1.1\r\n"
    huge = line + b"X: " + b"a" * MAX_HEAD
    assert outcome([huge]) == 431
    assert outcome([huge + b"\r\n\r\n"]) == 431
    assert outcome([line + b"X: " + b"a" * (MAX_HEAD - len(line) - 10) + b"\r\n\r\n"]) != 431
    assert outcome([b"G" * (MAX_HEAD + 3)]) == 431  # no line end at all


def test_an_incomplete_head_waits() -> None:
    assert outcome([SCRAPE[:-2]]) is None


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1", 404),
        (b"GET /metrics/ HTTP/1.1", 404),
        (b"GET /favicon.ico HTTP/1.1", 404),
        (b"POST /metrics HTTP/1.1", 405),
        (b"HEAD /metrics HTTP/1.1", 405),
        (b"DELETE /other HTTP/1.1", 404),
    ],
)
def test_anything_but_get_metrics_is_routed_to_an_error(head: bytes, status: int) -> None:
    error = route(parse_head(head))
    assert error is not None and error.status == status


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_any_bytes_any_split_same_outcome(data: bytes, cuts: list[int]) -> None:
    positions = sorted({min(cut, len(data)) for cut in cuts})
    chunks = [data[a:b] for a, b in zip([0, *positions], [*positions, len(data)], strict=True)]
    assert outcome(chunks) == outcome([data])


@given(
    st.sampled_from(["GET", "POST", "PUT"]),
    st.sampled_from(["/metrics", "/", "/metrics?a=b"]),
    st.dictionaries(
        st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
        st.from_regex(r"[ -~]{0,40}", fullmatch=True).map(str.strip),
        max_size=5,
    ),
    st.integers(1, 50),
)
def test_generated_requests_round_trip(
    method: str, target: str, headers: dict[str, str], step: int
) -> None:
    data = f"{method} {target} HTTP/1.1\r\n".encode()
    data += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
    request = outcome([data[i : i + step] for i in range(0, len(data), step)])
    assert isinstance(request, Request)
    assert (request.method, request.target) == (method, target)
    expected: dict[str, list[str]] = {}
    for key, value in headers.items():
        expected.setdefault(key.lower(), []).append(value)
    assert request.headers == {k: ", ".join(v) for k, v in expected.items()}
