"""Tests for mpnet.pure.frames and mpnet.channel: the pure frame codec and the master's
non-blocking transport.

The codec's promises: every plain value survives a round trip with its exact type (tuples become
lists); the messages decoded from a stream depend only on its bytes, never on how they were split;
anything malformed raises ChannelError and nothing else (the master must survive any worker).
"""

from __future__ import annotations

import contextlib
import enum
import math
import random
import select
import socket
import struct
import types
from collections.abc import Iterator
from typing import Any

import pytest

from mpnet.channel import MasterChannel
from mpnet.pure.frames import MAX_FRAME, ChannelError, FrameDecoder, decode_payload, encode
from mpnet.pure.values import MAX_DEPTH, check_plain

LEN = struct.Struct(">I")

SAMPLES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    255,
    2**31,
    2**63 - 1,
    -(2**63),
    2**63,
    -(2**63) - 1,
    2**64,
    -(2**64),
    2**200 + 12345,
    -(10**100),
    0.0,
    1.5,
    -2.25e-300,
    1e308,
    math.inf,
    -math.inf,
    "",
    "plain ascii",
    "héllo wörld ✓ 日本語 🎉",
    "nul\x00inside",
    "\U0010ffff",
    b"",
    b"\x00",
    b"\x00nul\x00bytes\x00",
    bytes(range(256)),
    [],
    {},
    [[]],
    [{}],
    {"": {}},
    [None, True, False, 0, "", b"", [], {}],
    {"a": {"b": [1, 2, {"c": None}]}, "d": [[[["deep"]]]]},
    {None: 1, b"k": 2, 2.5: 3, False: 4, "s": 5, 7: 6, -(2**70): 8},
    {"list": [1, 2.0, "3", b"4"], "nested": {"x": {"y": {"z": []}}}},
    [2**100, -(2**100), {"big": 2**65}],
]


def roundtrip(value: Any) -> Any:
    return decode_payload(encode(value)[4:])


def assert_same(actual: Any, expected: Any) -> None:
    """Equal *and* of the same types all the way down (True must not come back as 1)."""
    if isinstance(expected, tuple):
        expected = list(expected)
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual)
    elif isinstance(expected, float):
        assert actual == expected
        assert math.copysign(1.0, actual) == math.copysign(1.0, expected)
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    else:
        assert actual == expected


def nest(depth: int) -> Any:
    """A value whose innermost item sits at nesting *depth* (the top level is depth 0)."""
    value: Any = None
    for index in range(depth):
        value = [value] if index % 2 else {"k": value}
    return value


def frame(payload: bytes) -> bytes:
    return LEN.pack(len(payload)) + payload


def feed_chunks(chunks: list[bytes], **kwargs: int) -> list[Any]:
    decoder = FrameDecoder(**kwargs)
    messages: list[Any] = []
    for chunk in chunks:
        messages.extend(decoder.feed(chunk))
    assert decoder.pending == 0
    return messages


def random_chunks(data: bytes, rng: random.Random) -> list[bytes]:
    chunks = []
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 1, 2, 3, 5, 8, 13, 64, 500))
        chunks.append(data[pos : pos + step])
        pos += step
    return chunks


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", SAMPLES, ids=[f"sample{i}" for i in range(len(SAMPLES))])
def test_roundtrip_keeps_value_and_type(value: Any) -> None:
    assert_same(roundtrip(value), value)


def test_roundtrip_of_every_sample_at_once() -> None:
    assert_same(roundtrip(SAMPLES), SAMPLES)
    keyed = {f"k{i}": value for i, value in enumerate(SAMPLES)}
    assert_same(roundtrip(keyed), keyed)


def test_nan_and_negative_zero() -> None:
    assert math.isnan(roundtrip(math.nan))
    zero = roundtrip(-0.0)
    assert zero == 0.0 and math.copysign(1.0, zero) == -1.0


def test_tuples_become_lists() -> None:
    assert_same(roundtrip((1, (2, "x"), ())), [1, [2, "x"], []])
    assert_same(roundtrip({"t": (None, (b"",))}), {"t": [None, [b""]]})


def test_bool_stays_bool_and_int_stays_int() -> None:
    decoded = roundtrip([True, 1, False, 0, {True: 1, 0: False}])
    assert [type(item) for item in decoded[:4]] == [bool, int, bool, int]
    assert [(type(k), type(v)) for k, v in decoded[4].items()] == [(bool, int), (int, bool)]


@pytest.mark.parametrize(
    "value", [2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64 + 1, 3**500, -(7**300)]
)
def test_integers_at_and_beyond_64_bits(value: int) -> None:
    decoded = roundtrip(value)
    assert type(decoded) is int and decoded == value


def test_frame_has_big_endian_length_prefix() -> None:
    for value in SAMPLES:
        data = encode(value)
        assert LEN.unpack(data[:4])[0] == len(data) - 4


def test_nesting_up_to_max_depth_round_trips() -> None:
    value = nest(MAX_DEPTH)
    assert_same(roundtrip(value), value)


def test_nesting_msgpack_cannot_take_is_refused_by_encode() -> None:
    with pytest.raises(TypeError, match="nested too deeply"):
        encode(nest(2000))


def test_self_referencing_value_is_refused_without_recursion_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="nested too deeply"):
        encode(loop)
    with pytest.raises(TypeError, match="nested too deeply"):
        check_plain(loop)


def test_huge_int_round_trips() -> None:
    value = 2**20000 + 1
    check_plain(value)
    assert roundtrip(value) == value


def test_encode_refuses_a_dict_key_the_decoder_would_reject() -> None:
    with pytest.raises(TypeError, match="tuple"):
        encode({(1, 2): "x"})


# -- streams -------------------------------------------------------------------------------------

STREAM_MESSAGES: list[Any] = [
    *SAMPLES,
    ["sa", 1234, "table", "set", ["key", {"v": [1, 2, 3]}]],
    ["hello", b"\x00\x00\x00\x04", "\x00\x00\x00"],
]
STREAM = b"".join(encode(m) for m in STREAM_MESSAGES)
SHORT_MESSAGES: list[Any] = [None, "é", b"\x00", [1, {"a": True}], 2**70]
SHORT_STREAM = b"".join(encode(m) for m in SHORT_MESSAGES)


def test_stream_whole() -> None:
    assert_same(feed_chunks([STREAM]), STREAM_MESSAGES)


def test_stream_byte_by_byte() -> None:
    chunks = [STREAM[i : i + 1] for i in range(len(STREAM))]
    assert_same(feed_chunks(chunks), STREAM_MESSAGES)


def test_stream_every_two_way_split() -> None:
    for cut in range(len(STREAM) + 1):
        assert_same(feed_chunks([STREAM[:cut], STREAM[cut:]]), STREAM_MESSAGES)


def test_short_stream_every_three_way_split() -> None:
    size = len(SHORT_STREAM)
    for first in range(size + 1):
        for second in range(first, size + 1):
            chunks = [SHORT_STREAM[:first], SHORT_STREAM[first:second], SHORT_STREAM[second:]]
            assert_same(feed_chunks(chunks), SHORT_MESSAGES)


def test_stream_random_chunkings() -> None:
    rng = random.Random(20240601)
    for _ in range(100):
        assert_same(feed_chunks(random_chunks(STREAM, rng)), STREAM_MESSAGES)


def test_feed_returns_messages_as_soon_as_complete() -> None:
    decoder = FrameDecoder()
    first, second = encode("one"), encode(["two"])
    assert decoder.feed(first[:3]) == []
    assert decoder.pending == 3
    assert decoder.feed(first[3:] + second[:5]) == ["one"]
    assert decoder.pending == 5
    assert decoder.feed(second[5:]) == [["two"]]
    assert decoder.pending == 0
    assert decoder.feed(b"") == []


def test_empty_payload_frame_is_an_error() -> None:
    with pytest.raises(ChannelError):
        FrameDecoder().feed(frame(b""))


# -- limits --------------------------------------------------------------------------------------


def test_oversized_length_prefix_raises_before_the_payload_arrives() -> None:
    with pytest.raises(ChannelError, match="exceeds"):
        FrameDecoder(max_frame=10).feed(LEN.pack(11))


def test_frame_at_the_limit_is_accepted() -> None:
    payload = encode(b"12345")[4:]
    limit = len(payload)
    assert FrameDecoder(max_frame=limit).feed(frame(payload)) == [b"12345"]
    with pytest.raises(ChannelError):
        FrameDecoder(max_frame=limit - 1).feed(frame(payload))


def test_default_limit_is_max_frame() -> None:
    with pytest.raises(ChannelError, match=str(MAX_FRAME)):
        FrameDecoder().feed(LEN.pack(MAX_FRAME + 1))
    with pytest.raises(ChannelError):
        FrameDecoder().feed(b"\xff\xff\xff\xff")
    # a length exactly at the limit only waits for more data
    decoder = FrameDecoder()
    assert decoder.feed(LEN.pack(MAX_FRAME) + b"N") == []
    assert decoder.pending == 5


def test_oversized_prefix_after_good_frames_fed_byte_by_byte() -> None:
    data = encode("ok") + LEN.pack(1000)
    decoder = FrameDecoder(max_frame=100)
    messages = []
    with pytest.raises(ChannelError):
        for byte in data:
            messages.extend(decoder.feed(bytes([byte])))
    assert messages == ["ok"]


# -- malformed payloads --------------------------------------------------------------------------


def u32(n: int) -> bytes:
    return LEN.pack(n)


MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "incomplete input"),
    ("reserved type byte", b"\xc1", "invalid type byte"),
    ("truncated int", b"\xcf\x00\x00", "incomplete input"),
    ("truncated float", b"\xcb\x00", "incomplete input"),
    ("truncated str body", b"\xa5abc", "incomplete input"),
    ("truncated bytes body", b"\xc4\x02a", "incomplete input"),
    ("huge str length", b"\xdb\xff\xff\xff\xff", "incomplete input"),
    ("stray bytes", b"\xc0\xc0", "extra data"),
    ("stray bytes after list", b"\x90\xc2\xc3", "extra data"),
    ("invalid utf-8", b"\xa2\xff\xfe", "UnicodeDecodeError"),
    ("surrogate utf-8", b"\xa3\xed\xa0\x80", "UnicodeDecodeError"),
    ("unknown extension", b"\xd4\x05\x01", "unknown extension type 5"),
    ("empty big int", b"\xc7\x00\x01", "invalid big integer"),
    ("big int that fits 64 bits", b"\xd4\x01\x05", "invalid big integer"),
    ("bad timestamp", b"\xc7\x03\xff\x00\x00\x00", "invalid timestamp"),
    ("list count beyond payload", b"\x95\xc0", "exceeds max_array_len"),
    ("list huge count", b"\xdd\xff\xff\xff\xff", "exceeds max_array_len"),
    ("list missing item", b"\x92\xc0", "incomplete input"),
    ("dict huge count", b"\xdf\xff\xff\xff\xff", "exceeds max_map_len"),
    ("dict missing value", b"\x81\xc0", "incomplete input"),
    ("dict list key", b"\x81\x90\xc0", "unhashable type: 'list'"),
    ("dict dict key", b"\x81\x80\xc0", "unhashable type: 'dict'"),
    ("too deep", b"\x91" * 2000 + b"\xc0", "nested too deeply"),
    ("deep unterminated", b"\x91" * 2000, "nested too deeply"),
]


@pytest.mark.parametrize(
    ("payload", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_payload_raises_channel_error(payload: bytes, message: str) -> None:
    with pytest.raises(ChannelError, match=message.replace("(", r"\(")):
        decode_payload(payload)
    with pytest.raises(ChannelError):
        FrameDecoder().feed(frame(payload))


def test_a_hand_made_timestamp_decodes_as_plain_data() -> None:
    # msgpack decodes extension -1 itself; it must come out as plain data, never an object.
    assert_same(decode_payload(b"\xd6\xff\x00\x00\x00\x01"), 1_000_000_000)


def test_malformed_frame_after_good_ones_is_still_an_error() -> None:
    data = encode(1) + encode("two") + frame(b"\xc1")
    with pytest.raises(ChannelError):
        FrameDecoder().feed(data)


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(7)
        if choice == 0 and buf:  # flip a byte
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif choice == 1 and buf:  # random byte value
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif choice == 2:  # insert
            buf.insert(rng.randrange(len(buf) + 1), rng.randrange(256))
        elif choice == 3 and buf:  # delete
            del buf[rng.randrange(len(buf))]
        elif choice == 4 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif choice == 5 and len(buf) > 5:  # overwrite 4 bytes with an interesting length
            at = rng.randrange(len(buf) - 4)
            buf[at : at + 4] = LEN.pack(rng.choice((0, 1, 2, 255, 2**31, 2**32 - 1)))
        elif choice == 6:  # splice a piece of itself
            start = rng.randrange(len(buf) + 1)
            buf[start:start] = buf[rng.randrange(len(buf) + 1) :][:16]
    return bytes(buf)


def test_fuzz_decode_payload_only_raises_channel_error() -> None:
    rng = random.Random(1234567)
    bases = [encode(value)[4:] for value in SAMPLES] + [encode(SAMPLES[-5:])[4:]]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(4000):
        payload = mutate(rng.choice(bases), rng)
        try:
            value = decode_payload(payload)
        except ChannelError:
            outcomes["error"] += 1
        else:
            outcomes["ok"] += 1
            check_plain(value)  # whatever decodes is plain data and encodes again
            if not has_nan(value):
                assert_same(roundtrip(value), value)
    assert outcomes["ok"] > 100 and outcomes["error"] > 100


def test_fuzz_random_bytes_only_raise_channel_error() -> None:
    rng = random.Random(99)
    accepted = 0
    for _ in range(3000):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        if rng.random() < 0.5:  # start with a valid tag more often
            payload = (
                rng.choice(
                    b"\xc0\xc2\xc3\xcb\xcf\xd3\xa3\xd9\xc4\xc7\xd4\x93\xdc\x82\xde"
                ).to_bytes(1, "big")
                + payload
            )
        with contextlib.suppress(ChannelError):
            check_plain(decode_payload(payload))
            accepted += 1
    assert 20 < accepted < 2900  # random bytes are sometimes a valid value, mostly not


def test_fuzz_frame_decoder_streams_only_raise_channel_error() -> None:
    rng = random.Random(424242)
    decoded = failed = 0
    for _ in range(600):
        data = mutate(SHORT_STREAM, rng)
        decoder = FrameDecoder(max_frame=256)
        try:
            for chunk in random_chunks(data, rng):
                for message in decoder.feed(chunk):
                    check_plain(message)
                    decoded += 1
        except ChannelError:
            failed += 1
    assert decoded > 600 and failed > 60  # mutations leave most frames intact, break some


def has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list):
        return any(has_nan(item) for item in value)
    if isinstance(value, dict):
        return any(has_nan(k) or has_nan(v) for k, v in value.items())
    return False


# -- check_plain ---------------------------------------------------------------------------------


class Custom:
    pass


class Colour(enum.IntEnum):
    RED = 1


class MyStr(str):
    pass


def a_function() -> None:
    pass


NOT_PLAIN: list[tuple[Any, str]] = [
    ({1, 2}, "set"),
    (frozenset(), "frozenset"),
    (object(), "object"),
    (a_function, "function"),
    (lambda: None, "function"),
    (print, "builtin_function_or_method"),
    (Custom(), "Custom"),
    (Custom, "type"),
    (Colour.RED, "Colour"),
    (MyStr("x"), "MyStr"),
    (bytearray(b"x"), "bytearray"),
    (memoryview(b"x"), "memoryview"),
    (1j, "complex"),
    (types.SimpleNamespace(), "SimpleNamespace"),
    (range(3), "range"),
    (iter([]), "list_iterator"),
    ([1, [2, {3}]], "set"),
    ({"k": Custom()}, "Custom"),
    ({"k": [None, object()]}, "object"),
]


@pytest.mark.parametrize(("value", "name"), NOT_PLAIN, ids=[n for _, n in NOT_PLAIN])
def test_check_plain_names_the_offending_type(value: Any, name: str) -> None:
    with pytest.raises(TypeError) as info:
        check_plain(value)
    assert f"{name} is not plain data" in str(info.value)
    if name in ("bytearray", "memoryview"):  # msgpack packs these as bytes: harmless below
        assert decode_payload(encode(value)[4:]) == bytes(value)
        return
    with pytest.raises(TypeError, match=name):
        encode(value)


@pytest.mark.parametrize(
    ("key", "name"),
    [((1, 2), "tuple"), (frozenset(), "frozenset"), (Custom(), "Custom"), (Colour.RED, "Colour")],
)
def test_check_plain_refuses_non_plain_dict_keys(key: Any, name: str) -> None:
    with pytest.raises(TypeError, match=f"dict key of type {name} is not plain data"):
        check_plain({key: 1})
    with pytest.raises(TypeError, match=name):
        check_plain([{"ok": {key: 1}}])


def test_check_plain_accepts_every_sample_and_tuples() -> None:
    for value in SAMPLES:
        check_plain(value)
    check_plain((1, ("a", b"b"), [()]))
    check_plain({None: 1, True: 2, 3: 4, 4.5: 5, "s": 6, b"b": 7})
    check_plain(nest(MAX_DEPTH))
    with pytest.raises(TypeError, match="nested too deeply"):
        check_plain(nest(MAX_DEPTH + 1))


# -- MasterChannel over a real socketpair --------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    master_end, worker_end = socket.socketpair()
    try:
        yield master_end, worker_end
    finally:
        master_end.close()
        worker_end.close()


def read_available(sock: socket.socket, decoder: FrameDecoder) -> list[Any]:
    sock.setblocking(False)
    messages = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return messages
        if not data:
            return messages
        messages.extend(decoder.feed(data))


def test_master_channel_send_reaches_the_peer(pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    channel = MasterChannel(master_end)
    assert channel.fileno() == master_end.fileno()
    assert not master_end.getblocking()
    for message in STREAM_MESSAGES:
        channel.send(message)
    channel.send_frame(encode(["pre", "encoded"]))
    assert not channel.wants_write
    decoder = FrameDecoder()
    assert_same(read_available(worker_end, decoder), [*STREAM_MESSAGES, ["pre", "encoded"]])


def test_master_channel_receive(pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    channel = MasterChannel(master_end)
    assert channel.receive() == []  # nothing yet: non-blocking, not "closed"
    worker_end.sendall(encode("one") + encode({"two": 2}))
    assert channel.receive() == ["one", {"two": 2}]
    data = encode([b"three", 3])
    worker_end.sendall(data[:6])
    assert channel.receive() == []
    worker_end.sendall(data[6:])
    assert channel.receive() == [[b"three", 3]]


def test_master_channel_peer_closed_gives_none(pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    channel = MasterChannel(master_end)
    worker_end.sendall(encode("last words"))
    worker_end.close()
    assert channel.receive() == ["last words"]
    assert channel.receive() is None


def test_master_channel_peer_closed_without_data(pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    channel = MasterChannel(master_end)
    worker_end.close()
    assert channel.receive() is None


def test_master_channel_malformed_input_raises(pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    channel = MasterChannel(master_end)
    worker_end.sendall(frame(b"\xc1"))
    with pytest.raises(ChannelError):
        channel.receive()


def test_master_channel_send_to_closed_peer_closes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    master_end, worker_end = pair
    channel = MasterChannel(master_end)
    fd = channel.fileno()
    worker_end.close()
    channel.send("anyone there?")
    assert channel.closed
    assert not channel.wants_write
    channel.send("still nothing")  # a closed channel drops messages quietly
    channel.close()  # idempotent
    assert channel.fileno() == fd  # still usable as a selector key


def test_master_channel_backlog_limit(pair: tuple[socket.socket, socket.socket]) -> None:
    """A worker that stops reading must not make the master's queue grow without bound: past
    max_backlog the channel reports it (ChannelError from send, or ``failed`` set)."""
    master_end, _worker_end = pair  # the worker end is never read
    channel = MasterChannel(master_end, max_backlog=64 * 1024)
    payload = b"x" * 4096
    reason = None
    sent = 0
    try:
        for index in range(10_000):  # bounded: 40 MB, far beyond any socket buffer
            channel.send([index, payload])
            sent += 1
            if getattr(channel, "failed", None):
                break
    except ChannelError as exc:
        reason = str(exc)
    else:
        reason = getattr(channel, "failed", None)
    assert reason is not None, "40 MB queued for a worker that never reads, and no error"
    assert "not reading" in reason
    assert 0 < sent < 10_000


def test_master_channel_queue_drains_in_order_when_peer_reads(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    master_end, worker_end = pair
    channel = MasterChannel(master_end)
    payload = b"y" * 8192
    count = 200  # 1.6 MB: more than the kernel buffer, so part of it waits in the queue
    for index in range(count):
        channel.send([index, payload])
    assert channel.wants_write
    decoder = FrameDecoder()
    received: list[Any] = []
    for _ in range(10_000):
        received.extend(read_available(worker_end, decoder))
        channel.flush()
        if len(received) == count:
            break
        select.select([worker_end], [], [], 1.0)
    assert not channel.wants_write
    assert [message[0] for message in received] == list(range(count))
    assert all(message[1] == payload for message in received)
