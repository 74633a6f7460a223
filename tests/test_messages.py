"""The channel's named records (mpnet.pure.messages): every kind survives the wire, and anything
else is refused with ChannelError naming the problem, never another exception."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpnet.pure import messages as m
from mpnet.pure.frames import decode_payload, encode

EXAMPLES: list[m.Message] = [
    m.Ready(1234, 2),
    m.Heartbeat(3, 100, 1, 0),
    m.Metrics({"echo": {"accepted": 3, "refused": {"max_connections": 1}}}, {"cpu": 0.5}, {}),
    m.NotAccepting(),
    m.BootError("module 'x' failed to load"),
    m.Stopped(7),
    m.SharedWrite("t", "set", ["k", {"v": [1, 2]}]),
    m.AtomicRequest(9, "t", "incr", ["n", 1]),
    m.Broadcast("room", {"text": "hi"}),
    m.SequencedWrite(0, "t", "del", ["k"]),
    m.AtomicResult(9, True, 10),
    m.AtomicResult(9, False, "incr: value of 'n' is not an integer"),
    m.BroadcastEvent("room", None),
    m.Barrier(4),
    m.BarrierPassed(4),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda x: type(x).__name__)
def test_every_record_survives_the_wire(message: m.Message) -> None:
    raw = decode_payload(encode(m.to_wire(message))[4:])
    back = m.from_wire(raw)
    assert type(back) is type(message) and back == message


def test_every_kind_has_an_example() -> None:
    assert {type(x) for x in EXAMPLES} == set(m.Message.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("heartbeat", "non-empty list, not str"),
        ([], "non-empty list"),
        (["nope"], "unknown message kind 'nope'"),
        ([5, 1], "unknown message kind 5"),
        (["heartbeat", 1, 2, 3], "Heartbeat takes 4 field"),
        (["ready", 1, 2, 3], "Ready takes 2 field"),
        (["heartbeat", "1", 2, 3, 4], "Heartbeat.connections must be int, not str"),
        (["heartbeat", True, 2, 3, 4], "Heartbeat.connections must be int, not bool"),
        (["sw", "t", "set", "k"], "SharedWrite.args must be list, not str"),
        (["sr", 1, 1, 2], "AtomicResult.ok must be bool, not int"),
        (["bc", b"room", 1], "Broadcast.topic must be str, not bytes"),
    ],
)
def test_malformed_messages_are_refused_by_name(raw: Any, error: str) -> None:
    with pytest.raises(m.ChannelError, match=error.replace("(", r"\(")):
        m.from_wire(raw)


plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
tags = st.sampled_from(["ready", "heartbeat", "not_accepting", "sw", "sx", "bc", "sa", "sr", "be"])


@given(st.one_of(plain, st.tuples(tags, st.lists(plain, max_size=5)).map(lambda t: [t[0], *t[1]])))
def test_from_wire_takes_any_plain_value_without_crashing(raw: Any) -> None:
    try:
        message = m.from_wire(raw)
    except m.ChannelError:
        return
    assert m.to_wire(message) == raw  # what is accepted is exactly what would be sent


@given(st.sampled_from(EXAMPLES), plain)
def test_a_valid_record_with_any_payload_is_accepted(message: m.Message, value: Any) -> None:
    if isinstance(message, (m.Broadcast, m.BroadcastEvent)):
        message = type(message)(message.topic, value)
    elif isinstance(message, m.AtomicResult):
        message = m.AtomicResult(message.request, message.ok, value)
    assert m.from_wire(m.to_wire(message)) == message
