"""Tests for mpnet.pure.resp: the RESP2 request parser and the reply encoders.

The parser's central promise is that the commands (and the error, if any) depend only on the
byte stream, never on how TCP split it, so every stream here is checked whole, one byte at a
time, at every two-way split and, for short streams, at every three-way split.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from harness import resp_outcome

from mpnet.pure.resp import (
    DEFAULT_MAX_BULK_LENGTH,
    DEFAULT_MAX_INLINE_LENGTH,
    DEFAULT_MAX_MULTIBULK_LENGTH,
    RespParser,
    RespProtocolError,
    RespRequestTooLarge,
    encode_array,
    encode_bulk,
    encode_error,
    encode_integer,
    encode_simple,
)

run = resp_outcome  # feed chunks, drain commands; (commands, error)


def splittings(data: bytes, three_way_max: int = 80) -> Iterator[list[bytes]]:
    """Whole, byte by byte, every 2-way split, and every 3-way split for short inputs."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    if len(data) <= three_way_max:
        for i in range(len(data) + 1):
            for j in range(i, len(data) + 1):
                yield [data[:i], data[i:j], data[j:]]


def assert_stream(
    data: bytes, commands: list[list[bytes]], error: str | None = None, **limits: int
) -> None:
    for chunks in splittings(data):
        assert run(chunks, **limits) == (commands, error), chunks


def mb(*args: bytes) -> bytes:
    """A multibulk request, written out by hand (independent of the encoders under test)."""
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


# -- valid streams ---------------------------------------------------------------------------

VALID_STREAMS: list[tuple[str, bytes, list[list[bytes]]]] = [
    ("multibulk", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", [[b"GET", b"k"]]),
    ("inline_crlf", b"PING\r\n", [[b"PING"]]),
    ("inline_lf", b"SET a b\n", [[b"SET", b"a", b"b"]]),
    (
        "inline_whitespace",
        b"  SET\ta \x0b b\x0c c  \r\n",
        [[b"SET", b"a", b"b", b"c"]],
    ),
    ("inline_binary", b"ECHO \xff\x00\x01\r\n", [[b"ECHO", b"\xff\x00\x01"]]),
    (
        "pipeline_multibulk",
        mb(b"SET", b"k", b"v") + mb(b"GET", b"k") + mb(b"DEL", b"k", b"x", b"y"),
        [[b"SET", b"k", b"v"], [b"GET", b"k"], [b"DEL", b"k", b"x", b"y"]],
    ),
    (
        "pipeline_mixed",
        b"PING\r\n" + mb(b"GET", b"k") + b"SET a b\n" + mb(b"INCR", b"n") + b"QUIT\r\n",
        [[b"PING"], [b"GET", b"k"], [b"SET", b"a", b"b"], [b"INCR", b"n"], [b"QUIT"]],
    ),
    (
        "empty_lines_ignored",
        b"\r\n\n   \r\n\t\nPING\r\n\r\n\nECHO x\n \n",
        [[b"PING"], [b"ECHO", b"x"]],
    ),
    ("empty_multibulk_ignored", b"*0\r\n*-1\r\n*-7\r\nPING\r\n*0\r\n", [[b"PING"]]),
    ("empty_bulk", mb(b"SET", b"k", b""), [[b"SET", b"k", b""]]),
    (
        "binary_safe_bulk",
        mb(b"SET", b"k", b"a\r\nb\r\n\r\n*1\r\n$1\r\nx\r\n\x00\xff"),
        [[b"SET", b"k", b"a\r\nb\r\n\r\n*1\r\n$1\r\nx\r\n\x00\xff"]],
    ),
    ("bulk_only_crlf", mb(b"\r\n"), [[b"\r\n"]]),
    ("bulk_with_lf_and_cr", mb(b"\n", b"\r"), [[b"\n", b"\r"]]),
    ("star_inside_inline", b"ECHO *3\r\n", [[b"ECHO", b"*3"]]),
    ("many_args", mb(*[b"%d" % i for i in range(20)]), [[b"%d" % i for i in range(20)]]),
    ("multidigit_lengths", mb(b"x" * 12, b"y" * 100), [[b"x" * 12, b"y" * 100]]),
]


@pytest.mark.parametrize(
    ("data", "commands"),
    [(d, c) for _, d, c in VALID_STREAMS],
    ids=[name for name, _, _ in VALID_STREAMS],
)
def test_valid_stream_every_split(data: bytes, commands: list[list[bytes]]) -> None:
    assert_stream(data, commands)


def test_all_valid_streams_pipelined_every_split() -> None:
    data = b"".join(d for _, d, _ in VALID_STREAMS)
    commands = [c for _, _, cs in VALID_STREAMS for c in cs]
    for chunks in splittings(data, three_way_max=0):
        assert run(chunks) == (commands, None)


@pytest.mark.parametrize(
    ("data", "commands"),
    [(d, c) for _, d, c in VALID_STREAMS],
    ids=[name for name, _, _ in VALID_STREAMS],
)
def test_every_prefix_gives_a_prefix_of_the_commands(
    data: bytes, commands: list[list[bytes]]
) -> None:
    """A truncated stream is never an error: it just yields the commands completed so far."""
    for i in range(len(data) + 1):
        got, error = run([data[:i]])
        assert error is None
        assert got == commands[: len(got)]
    assert run([data]) == (commands, None)


def test_random_splits_of_random_pipelines() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        commands: list[list[bytes]] = []
        data = b""
        for _ in range(rng.randrange(1, 6)):
            if rng.random() < 0.3:
                words = [b"w%d" % rng.randrange(1000) for _ in range(rng.randrange(1, 4))]
                data += b" ".join(words) + rng.choice([b"\r\n", b"\n"])
                commands.append(words)
            else:
                args = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 5))]
                data += mb(*args)
                commands.append(args)
        cuts = sorted(rng.sample(range(len(data) + 1), k=min(5, len(data) + 1)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert run(chunks) == (commands, None)


def test_large_bulk_arriving_in_chunks() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB, with every byte value
    data = mb(b"SET", b"big", payload) + b"PING\r\n"
    expected = [[b"SET", b"big", payload], [b"PING"]]
    for size in (1000, 4096, 65536, len(data)):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert run(chunks) == (expected, None)
    for cut in (0, 1, 10, 20, len(data) // 2, len(data) - 7, len(data) - 1):
        assert run([data[:cut], data[cut:]]) == (expected, None)


def test_next_command_and_iteration() -> None:
    parser = RespParser()
    assert parser.next_command() is None
    parser.feed(b"*1\r\n$4\r\nPI")
    assert parser.next_command() is None
    assert list(parser) == []
    parser.feed(b"NG\r\nECHO a\r\nECHO")
    assert parser.next_command() == [b"PING"]
    assert list(parser) == [[b"ECHO", b"a"]]
    parser.feed(b" b\n")
    assert [cmd for cmd in parser] == [[b"ECHO", b"b"]]
    assert parser.next_command() is None


def test_feed_accepts_bytearray_and_memoryview() -> None:
    parser = RespParser()
    parser.feed(bytearray(b"PI"))
    parser.feed(memoryview(b"NG\r\n"))
    assert list(parser) == [[b"PING"]]


def test_arguments_are_bytes() -> None:
    parser = RespParser()
    parser.feed(b"SET a b\r\n" + mb(b"GET", b"k"))
    for command in parser:
        assert all(type(arg) is bytes for arg in command)


def test_buffered_bytes() -> None:
    parser = RespParser()
    assert parser.buffered_bytes == 0
    parser.feed(b"*2\r\n$3\r\nGET\r\n$1\r")
    assert parser.next_command() is None
    assert parser.buffered_bytes > 0
    parser.feed(b"\nk\r\n")
    assert parser.next_command() == [b"GET", b"k"]
    assert parser.buffered_bytes == 0


# -- errors ----------------------------------------------------------------------------------


def test_max_request_size_counts_the_bulks_of_one_request() -> None:
    too_big = "Protocol error: request larger than max_request_size (10 bytes)"
    ok = mb(b"SET", b"k", b"123456")  # 3 + 1 + 6 = 10 bytes of bulks: at the limit
    assert_stream(ok + ok, [[b"SET", b"k", b"123456"]] * 2, max_request_size=10)
    over = mb(b"SET", b"k", b"1234567")
    assert_stream(ok + over + ok, [[b"SET", b"k", b"123456"]], too_big, max_request_size=10)


def test_max_request_size_refuses_before_the_bytes_arrive() -> None:
    """A request that announces 200 bulks of 16 MB fails at the "$" line that crosses the
    limit: the parser never waits for (or buffers) the bulks beyond it."""
    parser = RespParser(max_request_size=64 * 2**20)
    parser.feed(b"*200\r\n")
    bulk = b"$16000000\r\n" + b"x" * 16_000_000 + b"\r\n"
    with pytest.raises(RespRequestTooLarge, match="max_request_size"):
        for _ in range(5):
            parser.feed(bulk)
            assert parser.next_command() is None
            assert parser.buffered_bytes <= 64 * 2**20
    with pytest.raises(RespRequestTooLarge):
        parser.feed(b"*1\r\n$4\r\nPING\r\n")  # no resynchronisation after the error
    assert parser.buffered_bytes == 0


BAD_MBULK = "Protocol error: invalid multibulk length"
BAD_BULK = "Protocol error: invalid bulk length"

ERROR_STREAMS: list[tuple[bytes, str]] = [
    # multibulk count
    (b"*abc\r\n", BAD_MBULK),
    (b"*\r\n", BAD_MBULK),
    (b"*1x\r\n", BAD_MBULK),
    (b"*+1\r\n", BAD_MBULK),
    (b"*01\r\n", BAD_MBULK),
    (b"*-0\r\n", BAD_MBULK),
    (b"*--1\r\n", BAD_MBULK),
    (b"* 1\r\n", BAD_MBULK),
    (b"*1 \r\n", BAD_MBULK),
    (b"*1_0\r\n", BAD_MBULK),
    (b"*1\rX", BAD_MBULK),
    (b"*1\n$1\r\na\r\n", BAD_MBULK),  # LF alone does not end a "*" line
    (b"*\xd9\xa1\r\n", BAD_MBULK),  # a non-ASCII digit
    (b"*%d\r\n" % (DEFAULT_MAX_MULTIBULK_LENGTH + 1), BAD_MBULK),
    (b"*99999999999999999999999999\r\n", BAD_MBULK),
    (b"*" + b"9" * 5000 + b"\r\n", BAD_MBULK),  # would trip int()'s digit limit
    # bulk header
    (b"*1\r\nx", "Protocol error: expected '$', got 'x'"),
    (b"*2\r\n$1\r\na\r\n:1\r\n", "Protocol error: expected '$', got ':'"),
    (b"*1\r\n\r\n", "Protocol error: expected '$', got '\\x0d'"),
    (b"*1\r\n\x00", "Protocol error: expected '$', got '\\x00'"),
    (b"*1\r\n\xff", "Protocol error: expected '$', got '\\xff'"),
    (b"*1\r\n*1\r\n", "Protocol error: expected '$', got '*'"),
    (b"*1\r\n$-1\r\n", BAD_BULK),
    (b"*1\r\n$-5\r\n", BAD_BULK),
    (b"*1\r\n$\r\n", BAD_BULK),
    (b"*1\r\n$abc\r\n", BAD_BULK),
    (b"*1\r\n$01\r\n0\r\n", BAD_BULK),
    (b"*1\r\n$+1\r\na\r\n", BAD_BULK),
    (b"*1\r\n$1 \r\na\r\n", BAD_BULK),
    (b"*1\r\n$1\rXa\r\n", BAD_BULK),
    (b"*1\r\n$%d\r\n" % (DEFAULT_MAX_BULK_LENGTH + 1), BAD_BULK),
    (b"*1\r\n$99999999999999999999999\r\n", BAD_BULK),
    # bulk data
    (b"*1\r\n$3\r\nabcX\r\n", "Protocol error: bulk data not terminated by CRLF"),
    (b"*1\r\n$3\r\nabc\rX", "Protocol error: bulk data not terminated by CRLF"),
    (b"*1\r\n$3\r\nabcd\r\n", "Protocol error: bulk data not terminated by CRLF"),
    (b"*1\r\n$3\r\nab\r\nX", "Protocol error: bulk data not terminated by CRLF"),
]


ERROR_IDS = [f"{i}-{data[:16]!r}" for i, (data, _) in enumerate(ERROR_STREAMS)]


@pytest.mark.parametrize(("data", "message"), ERROR_STREAMS, ids=ERROR_IDS)
def test_error_every_split(data: bytes, message: str) -> None:
    assert_stream(data, [], message)


@pytest.mark.parametrize(("data", "message"), ERROR_STREAMS, ids=ERROR_IDS)
def test_commands_before_an_error_are_returned(data: bytes, message: str) -> None:
    prefix = b"PING\r\n" + mb(b"GET", b"k")
    for chunks in splittings(prefix + data, three_way_max=0):
        assert run(chunks) == ([[b"PING"], [b"GET", b"k"]], message)


def test_parser_is_unusable_after_an_error() -> None:
    parser = RespParser()
    parser.feed(b"PING\r\n*x\r\nPING\r\n")
    assert parser.next_command() == [b"PING"]
    with pytest.raises(RespProtocolError, match="invalid multibulk length"):
        parser.next_command()
    with pytest.raises(RespProtocolError, match="invalid multibulk length"):
        parser.next_command()
    with pytest.raises(RespProtocolError, match="invalid multibulk length"):
        parser.feed(b"PING\r\n")
    with pytest.raises(RespProtocolError):
        list(parser)
    assert parser.buffered_bytes == 0  # the buffer was released


def test_error_message_attribute_and_reply() -> None:
    parser = RespParser()
    parser.feed(b"*1\r\n\n")
    with pytest.raises(RespProtocolError) as info:
        parser.next_command()
    assert info.value.message == str(info.value) == "Protocol error: expected '$', got '\\x0a'"
    reply = encode_error("ERR " + str(info.value))
    assert reply == b"-ERR Protocol error: expected '$', got '\\x0a'\r\n"
    assert reply.count(b"\r\n") == 1 and b"\n" not in reply[:-1]


# -- limits ----------------------------------------------------------------------------------


def test_default_limits() -> None:
    assert DEFAULT_MAX_INLINE_LENGTH == 64 * 1024
    assert DEFAULT_MAX_BULK_LENGTH == 512 * 1024 * 1024
    assert DEFAULT_MAX_MULTIBULK_LENGTH == 1024 * 1024


def test_default_inline_limit_boundary() -> None:
    line = b"A" * DEFAULT_MAX_INLINE_LENGTH
    assert run([line + b"\n"]) == ([[line]], None)
    assert run([line, b"\n"]) == ([[line]], None)
    too_long = line + b"B"
    message = "Protocol error: too big inline request"
    assert run([too_long]) == ([], message)
    assert run([too_long + b"\n"]) == ([], message)
    assert run([line, b"B", b"\n"]) == ([], message)
    # "\r" counts: "A"*64K + "\r\n" is a 64K+1 byte line, as in Redis.
    assert run([line + b"\r\n"]) == ([], message)


def test_default_bulk_and_multibulk_limits_accept_the_maximum() -> None:
    parser = RespParser()
    parser.feed(b"*%d\r\n" % DEFAULT_MAX_MULTIBULK_LENGTH)
    parser.feed(b"$%d\r\n" % DEFAULT_MAX_BULK_LENGTH)
    assert parser.next_command() is None  # waiting for 512 MiB of data, not an error


@pytest.mark.parametrize(
    ("data", "commands", "message"),
    [
        (b"12345678\n", [[b"12345678"]], None),
        (b"1234567\r\n", [[b"1234567"]], None),
        (b"12345678\r\n", [], "Protocol error: too big inline request"),
        (b"123456789\r\n", [], "Protocol error: too big inline request"),
        (b"12345678\n123456789", [[b"12345678"]], "Protocol error: too big inline request"),
        (b"*1234567\r\n", [], "Protocol error: invalid multibulk length"),
        (b"*12345678\r\n", [], "Protocol error: too big mbulk count string"),
        (b"*" + b"1" * 50, [], "Protocol error: too big mbulk count string"),
        (b"*1\r\n$1234567\r\n", [], None),  # a 7-digit "$" line is fine; data pending
        (b"*1\r\n$12345678\r\n", [], "Protocol error: too big bulk count string"),
        (b"*1\r\n$" + b"1" * 50, [], "Protocol error: too big bulk count string"),
    ],
)
def test_small_line_limits(data: bytes, commands: list[list[bytes]], message: str | None) -> None:
    assert_stream(data, commands, message, max_inline_length=8)


def test_bulk_and_multibulk_limits_configurable() -> None:
    ok = mb(b"abcd", b"efgh")
    assert_stream(ok, [[b"abcd", b"efgh"]], max_bulk_length=4, max_multibulk_length=2)
    assert_stream(mb(b"abcde"), [], BAD_BULK, max_bulk_length=4)
    assert_stream(mb(b"a", b"b", b"c"), [], BAD_MBULK, max_multibulk_length=2)
    assert_stream(mb(b""), [[b""]], max_bulk_length=0)


@pytest.mark.parametrize(
    ("start", "message"),
    [
        (b"", "Protocol error: too big inline request"),
        (b"*", "Protocol error: too big mbulk count string"),
        (b"*1\r\n$", "Protocol error: too big bulk count string"),
    ],
)
def test_unterminated_lines_fail_once_over_the_limit(start: bytes, message: str) -> None:
    """Memory stays bounded: a line that never ends is rejected as soon as it is too long."""
    limit = 100
    parser = RespParser(max_inline_length=limit)
    parser.feed(start)
    assert parser.next_command() is None
    fed = len(start)
    with pytest.raises(RespProtocolError, match=message):
        while True:
            parser.feed(b"1")
            fed += 1
            assert parser.next_command() is None
    assert fed == len(start) - (1 if start.endswith((b"*", b"$")) else 0) + limit + 1


def test_one_byte_at_a_time_stays_linear() -> None:
    """The line-end search resumes where it stopped; quadratic rescans would take minutes."""
    parser = RespParser()
    line = b"x" * DEFAULT_MAX_INLINE_LENGTH
    for i in range(len(line)):
        parser.feed(line[i : i + 1])
        assert parser.next_command() is None
    parser.feed(b"\n")
    assert parser.next_command() == [line]


def test_constructor_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        RespParser(max_inline_length=0)
    with pytest.raises(ValueError):
        RespParser(max_multibulk_length=0)
    with pytest.raises(ValueError):
        RespParser(max_bulk_length=-1)


# -- encoders --------------------------------------------------------------------------------


def test_encode_simple() -> None:
    assert encode_simple("OK") == b"+OK\r\n"
    assert encode_simple("") == b"+\r\n"
    assert encode_simple("héllo") == "+héllo\r\n".encode()
    for bad in ("a\rb", "a\nb", "OK\r\n"):
        with pytest.raises(ValueError):
            encode_simple(bad)


def test_encode_error() -> None:
    assert encode_error("ERR unknown command 'FOO'") == b"-ERR unknown command 'FOO'\r\n"
    assert encode_error("WRONGTYPE Operation") == b"-WRONGTYPE Operation\r\n"
    assert encode_error("ERR bad\r\nkey\n") == b"-ERR bad  key \r\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, b":0\r\n"),
        (1, b":1\r\n"),
        (-1, b":-1\r\n"),
        (2**63 - 1, b":9223372036854775807\r\n"),
        (-(2**63), b":-9223372036854775808\r\n"),
        (True, b":1\r\n"),
    ],
)
def test_encode_integer(value: int, expected: bytes) -> None:
    assert encode_integer(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"$-1\r\n"),
        (b"", b"$0\r\n\r\n"),
        (b"foo", b"$3\r\nfoo\r\n"),
        (b"a\r\nb", b"$4\r\na\r\nb\r\n"),
        (b"\x00\xff", b"$2\r\n\x00\xff\r\n"),
        ("é", b"$2\r\n\xc3\xa9\r\n"),
        (bytearray(b"ba"), b"$2\r\nba\r\n"),
        (memoryview(b"mv"), b"$2\r\nmv\r\n"),
    ],
)
def test_encode_bulk(value: bytes | str | None, expected: bytes) -> None:
    assert encode_bulk(value) == expected


def test_encode_array() -> None:
    assert encode_array(None) == b"*-1\r\n"
    assert encode_array([]) == b"*0\r\n"
    assert encode_array([b"a", "é", 42, None]) == (
        b"*4\r\n$1\r\na\r\n$2\r\n\xc3\xa9\r\n:42\r\n$-1\r\n"
    )
    assert encode_array([[b"x", [1, []]], (b"t",), bytearray(b"b"), memoryview(b"m")]) == (
        b"*4\r\n*2\r\n$1\r\nx\r\n*2\r\n:1\r\n*0\r\n*1\r\n$1\r\nt\r\n$1\r\nb\r\n$1\r\nm\r\n"
    )
    assert encode_array([True, False, -3]) == b"*3\r\n:1\r\n:0\r\n:-3\r\n"


@pytest.mark.parametrize("bad", [1.5, {"a": 1}, object(), {b"x"}])
def test_encode_array_rejects_other_types(bad: object) -> None:
    with pytest.raises(TypeError):
        encode_array([b"ok", bad])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        encode_array([[bad]])  # type: ignore[list-item]


def test_encoded_arrays_parse_back() -> None:
    """A request encoded as an array of bulks (what clients send) parses to the same args."""
    rng = random.Random(99)
    commands = [
        [rng.randbytes(rng.randrange(0, 30)) for _ in range(rng.randrange(1, 6))]
        for _ in range(100)
    ]
    data = b"".join(encode_array(cmd) for cmd in commands)
    assert data == b"".join(mb(*cmd) for cmd in commands)
    assert run([data]) == (commands, None)
    assert run([data[i : i + 7] for i in range(0, len(data), 7)]) == (commands, None)


# -- fuzz ------------------------------------------------------------------------------------


def test_fuzz_mutated_streams_split_independent() -> None:
    """Mutated pipelines: only RespProtocolError ever escapes, and the commands and error are
    the same whole, byte by byte and at random splits (small limits so they are hit too)."""
    rng = random.Random(31337)
    limits = {"max_inline_length": 20, "max_bulk_length": 30, "max_multibulk_length": 5}
    base = [data for _, data, _ in VALID_STREAMS]
    errors = 0
    for _ in range(1500):
        data = bytearray(b"".join(rng.sample(base, k=rng.randrange(1, 4))))
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data) + 1)
            op = rng.randrange(4)
            if op == 0 and data:
                data[min(i, len(data) - 1)] = rng.choice(b"*$\r\n-01 " + rng.randbytes(1))
            elif op == 1:
                data[i:i] = rng.randbytes(rng.randrange(1, 4))
            elif op == 2:
                del data[i : i + rng.randrange(1, 4)]
            else:
                data[i:i] = rng.choice([b"\r\n", b"*", b"$", b"-1", b"\n"])
        stream = bytes(data)
        expected = run([stream], **limits)
        errors += expected[1] is not None
        assert run([stream[i : i + 1] for i in range(len(stream))], **limits) == expected
        cuts = sorted(rng.sample(range(len(stream) + 1), k=min(4, len(stream) + 1)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert run(chunks, **limits) == expected, chunks
    assert 300 < errors < 1400  # both outcomes well represented
