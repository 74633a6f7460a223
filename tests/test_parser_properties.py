"""Property tests (hypothesis) for the pure parsers a hostile peer or a careless admin feeds:
channel frames, RESP, PROXY headers and the config. Each asserts both halves of the contract:
everything valid is accepted with the same result however the bytes are split, and anything
else raises the parser's own error, never another exception."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import tomllib
from pathlib import Path
from typing import Any

from harness import resp_outcome
from hypothesis import given, settings
from hypothesis import strategies as st

from mpnet.pure.config import ConfigError, parse_config
from mpnet.pure.frames import ChannelError, FrameDecoder, decode_payload, encode
from mpnet.pure.proxyproto import ProxyHeaderParser, ProxyProtocolError, build_v1, build_v2
from mpnet.pure.resp import encode_array

# -- shared strategies --------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
plain_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4)
    ),
    max_leaves=16,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# -- channel frames -----------------------------------------------------------------------------


@given(st.lists(plain_values, min_size=1, max_size=5), st.lists(st.integers(0, 4000), max_size=6))
def test_frames_of_plain_values_decode_to_themselves_however_split(
    values: list[Any], cuts: list[int]
) -> None:
    stream = b"".join(encode(value) for value in values)
    decoder = FrameDecoder()
    decoded: list[Any] = []
    for chunk in split(stream, cuts):
        decoded.extend(decoder.feed(chunk))
    assert decoded == values and decoder.pending == 0


@given(st.binary(max_size=300))
def test_any_payload_decodes_to_plain_data_or_raises_channel_error(payload: bytes) -> None:
    try:
        value = decode_payload(payload)
    except ChannelError:
        return
    assert decode_payload(encode(value)[4:]) == value or value != value  # NaN is not equal


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=4))
def test_any_stream_gives_messages_or_channel_error(stream: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame=128)
    try:
        for chunk in split(stream, cuts):
            decoder.feed(chunk)
    except ChannelError:
        pass


# -- RESP ---------------------------------------------------------------------------------------

commands = st.lists(
    st.lists(st.binary(max_size=30), min_size=1, max_size=5), min_size=1, max_size=4
)


def resp_run(chunks: list[bytes]) -> tuple[list[list[bytes]], str | None]:
    return resp_outcome(chunks, max_inline_length=64, max_bulk_length=64, max_multibulk_length=8)


@given(commands, st.lists(st.integers(0, 2000), max_size=6))
def test_resp_multibulk_commands_are_parsed_back_however_split(
    cmds: list[list[bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_array(list(cmd)) for cmd in cmds)
    assert resp_run(split(stream, cuts)) == (cmds, None)


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=4))
def test_resp_any_bytes_give_the_same_outcome_however_split(stream: bytes, cuts: list[int]) -> None:
    whole = resp_run([stream])  # only RespProtocolError may escape the parser
    assert resp_run(split(stream, cuts)) == whole
    assert resp_run([stream[i : i + 1] for i in range(len(stream))]) == whole


# -- PROXY --------------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)


@st.composite
def address_pairs(draw: Any) -> tuple[tuple[str, int], tuple[str, int]]:
    kind = draw(st.sampled_from([ipv4, ipv6]))
    return (draw(kind), draw(ports)), (draw(kind), draw(ports))


def proxy_run(chunks: list[bytes]) -> Any:
    parser = ProxyHeaderParser()
    for chunk in chunks:
        result = parser.feed(chunk)
        if result is not None:
            return result
    return None


@given(
    address_pairs(),
    st.booleans(),
    st.binary(max_size=20),
    st.lists(st.integers(0, 300), max_size=4),
)
def test_proxy_headers_are_parsed_back_however_split(
    pair: Any, v2: bool, tail: bytes, cuts: list[int]
) -> None:
    source, destination = pair
    header = build_v2(source, destination) if v2 else build_v1(source, destination)
    result = proxy_run(split(header + tail, cuts))
    assert result is not None and result.version == (2 if v2 else 1)
    assert ipaddress.ip_address(result.source[0]) == ipaddress.ip_address(source[0])
    assert ipaddress.ip_address(result.destination[0]) == ipaddress.ip_address(destination[0])
    assert (result.source[1], result.destination[1]) == (source[1], destination[1])
    assert result.remaining == tail[: len(result.remaining)]


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=4))
def test_proxy_any_bytes_give_a_result_none_or_the_parsers_error(
    data: bytes, cuts: list[int]
) -> None:
    def outcome(chunks: list[bytes]) -> Any:
        try:
            result = proxy_run(chunks)
        except ProxyProtocolError as exc:
            return "error", str(exc)
        return "result", None if result is None else (result.source, result.destination)

    assert outcome(split(data, cuts)) == outcome([data])


# -- config -------------------------------------------------------------------------------------

KNOWN_KEYS = [
    "workers",
    "modules",
    "interfaces",
    "graceful_timeout",
    "worker_timeout",
    "backlog",
    "log_level",
    "max_worker_memory",
    "allow_root",
    "state_fsync",
    "read_timeout",
    "echo_ports",
    "echo_interfaces",
    "echo_max_connections",
    "max_send_buffer_size",
]
toml_scalars = (
    st.booleans()
    | st.integers(-5, 10**6)
    | st.floats(-10, 1e6, allow_nan=False)
    | st.sampled_from(["auto", "info", "*", "127.0.0.1", "64MB", "always", "x", ""])
)
toml_values = toml_scalars | st.lists(toml_scalars, max_size=3)


def toml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    return repr(value)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(KNOWN_KEYS) | st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
        toml_values,
        max_size=6,
    )
)
def test_any_config_parses_or_raises_config_error(keys: dict[str, Any]) -> None:
    text = 'modules = ["echo"]\n' + "".join(
        f"{key} = {toml_text(value)}\n" for key, value in keys.items() if key != "modules"
    )
    tomllib.loads(text)  # the strategy only writes valid TOML
    base = Path("/nonexistent-mpnet-test")
    try:
        config = parse_config(text, "mpnet.toml", base)
    except ConfigError as exc:
        assert str(exc).startswith("mpnet.toml")
        return
    assert config["modules"] == ["echo"]


@given(st.text(max_size=200))
def test_any_text_as_config_parses_or_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(text, "mpnet.toml", Path("/nonexistent-mpnet-test"))


def test_valid_configs_are_accepted() -> None:
    for text in (
        'modules = ["echo"]\nworkers = 2\n',
        'modules = ["echo"]\nworkers = "auto"\nlog_level = "debug"\n',
        'modules = ["echo"]\necho_ports = [5000, 5001]\necho_interfaces = ["127.0.0.1"]\n',
    ):
        parse_config(text, "mpnet.toml", Path("/nonexistent-mpnet-test"))
