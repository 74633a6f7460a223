"""The control socket's protocol (mpnet.pure.controlproto): every request and reply survives
the wire; any other line gets a ControlProtocolError naming the problem, never another
exception (the master answers with it and carries on)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpnet.pure.controlproto import (
    ControlProtocolError,
    ControlReply,
    ReloadRequest,
    StatusRequest,
    StopRequest,
    WorkersRequest,
    parse_reply,
    parse_request,
    request_to_json,
)

REQUESTS = [
    StatusRequest(),
    ReloadRequest(),
    StopRequest(),
    StopRequest("quick"),
    WorkersRequest(3),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=repr)
def test_requests_survive_the_wire(request_: Any) -> None:
    line = request_to_json(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_request(line) == request_


@pytest.mark.parametrize(
    "reply",
    [
        ControlReply(True, message="graceful stop started"),
        ControlReply(True, message="reloading", generation=4),
        ControlReply.failure("stopping"),
    ],
)
def test_replies_survive_the_wire(reply: ControlReply) -> None:
    assert parse_reply(reply.to_json()) == reply


def test_a_status_reply_keeps_its_document() -> None:
    status = {"pid": 1, "workers": [{"slot": 0}]}
    assert parse_reply(ControlReply(True, status=status).to_json()).status == status


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"[" * 50_000, "nested too deeply"),
        (b"{" * 50_000, "bad request"),
        (b"not json", "bad request: Expecting value"),
        (b"\xff\xfe", "bad request"),
        (b"[1, 2]", "expected a JSON object, not an array"),
        (b'"status"', "expected a JSON object, not a string"),
        (b"{}", "no 'command'; known: status, reload, stop, workers"),
        (b'{"command": "STATUS"}', "unknown command 'STATUS'; known: status, reload"),
        (b'{"command": ["status"]}', "unknown command"),
        (b'{"command": "stop", "mode": "now"}', "mode must be 'graceful' or 'quick'"),
        (b'{"command": "workers"}', "expected a count from 1 to 1024"),
        (b'{"command": "workers", "count": 0}', "expected a count from 1 to 1024"),
        (b'{"command": "workers", "count": true}', "expected a count from 1 to 1024"),
        (b'{"command": "workers", "count": 2.0}', "expected a count from 1 to 1024"),
    ],
)
def test_bad_requests_are_named(line: bytes, error: str) -> None:
    with pytest.raises(ControlProtocolError, match=error.replace("(", r"\(")):
        parse_request(line)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"", "bad answer"),
        (b"[]", "expected a JSON object"),
        (b'{"ok": 1}', "'ok' must be true or false"),
        (b'{"ok": true, "status": []}', "'status' has the wrong type"),
        (b'{"ok": false, "error": 5}', "'error' has the wrong type"),
        (b"]" * 10 + b"[" * 50_000, "bad answer"),
    ],
)
def test_bad_replies_are_named(line: bytes, error: str) -> None:
    with pytest.raises(ControlProtocolError, match=error):
        parse_reply(line)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
commands = st.fixed_dictionaries(
    {"command": st.sampled_from(["status", "reload", "stop", "workers", "x"])},
    optional={"mode": json_values | st.sampled_from(["graceful", "quick"]), "count": json_values},
)


@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_line_is_a_request_or_a_named_error(line: bytes) -> None:
    try:
        parse_request(line)
    except ControlProtocolError as exc:
        assert str(exc)


@given(commands)
def test_well_formed_commands_round_trip_or_are_refused(fields: dict[str, Any]) -> None:
    try:
        parsed = parse_request(json.dumps(fields))
    except ControlProtocolError:
        return
    assert parse_request(request_to_json(parsed)) == parsed
    assert request_to_json(parsed) == request_to_json(parse_request(request_to_json(parsed)))


@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_line_is_a_reply_or_a_named_error(line: bytes) -> None:
    try:
        parse_reply(line)
    except ControlProtocolError as exc:
        assert str(exc)
