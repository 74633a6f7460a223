"""The Redis backend's pure parts: stored forms of keys and values, events, URLs, config keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpnet.pure.config import ConfigError, parse_config
from mpnet.pure.frames import ChannelError
from mpnet.pure.redisshared import (
    BroadcastMessage,
    Change,
    Keys,
    ScriptCall,
    atomic_answer,
    command,
    decode_event,
    decode_key,
    decode_value,
    encode_broadcast,
    encode_key,
    encode_value,
    error_message,
    netstrings,
    write_args,
)
from mpnet.pure.redisurl import check_url, redacted

keys = st.one_of(st.text(), st.binary(), st.integers(), st.booleans())
plain = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False),
        st.text(),
        st.binary(),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@given(plain)
def test_every_plain_value_comes_back_as_it_was_stored(value):
    assert decode_value(encode_value(value)) == value


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_64_bit_ints_are_stored_as_decimal_digits_for_hincrby(value):
    assert encode_value(value) == str(value).encode()


@given(keys)
def test_keys_round_trip_and_types_stay_apart(key):
    assert decode_key(encode_key(key)) == key
    assert type(decode_key(encode_key(key))) is type(key)


def test_a_key_of_the_wrong_type_is_refused_at_the_write():
    with pytest.raises(TypeError, match="shared table keys must be"):
        encode_key([1])
    with pytest.raises(TypeError, match="not plain data"):
        encode_value(object())


def test_a_value_mpnet_did_not_write_is_a_clear_error():
    with pytest.raises(ChannelError, match="not one mpnet wrote"):
        decode_value(b"hello")


def event(*items):
    return netstrings([b"%d" % item if type(item) is int else item for item in items])


def test_events_decode_into_replica_writes():
    set_event = event(7, b"o", b"t", b"set", encode_key("k"), encode_value([1, "x"]))
    assert decode_event(set_event) == Change(7, b"o", "t", "set", ["k", [1, "x"]])
    update = event(8, b"", b"t", b"update", *write_args("update", [{"a": 1, b"b": None}]))
    assert decode_event(update) == Change(8, b"", "t", "update", [{"a": 1, b"b": None}])
    assert decode_event(event(9, b"o", b"t", b"clear")).args == []
    assert decode_event(encode_broadcast("room", {"x": 1})) == BroadcastMessage("room", {"x": 1})


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",
        b"5:abc",
        b"x:abc",
        b"1:a1:b",
        event(1, b"o", b"t", b"set", encode_key("k")),
        event(1, b"o", b"t", b"explode", encode_key("k")),
        event(b"one", b"o", b"t", b"del", encode_key("k")),
        event(1, b"o", b"t", b"set", encode_key("k"), b"not ours"),
    ],
)
def test_foreign_messages_on_the_channel_are_refused(raw):
    with pytest.raises(ChannelError):
        decode_event(raw)


def test_atomic_answers():
    assert atomic_answer("incr", ["k", 1], [5, b"12"]) == (5, 12)
    assert atomic_answer("pop", ["k", "dflt"], [5]) == (5, "dflt")
    assert atomic_answer("pop", ["k", "dflt"], [6, encode_value("v")]) == (6, "v")
    assert atomic_answer("cas", ["k", 1, 2], [6, 0]) == (6, False)
    assert "not an integer" in error_message("incr", "k", "ERR hash value is not an integer")


def test_names_under_the_prefix():
    names = Keys("app*1:")
    assert names.table("chat") == "app*1:t:chat"
    assert names.table_name(b"app*1:t:chat") == "chat"
    assert names.table_name(b"other:t:chat") is None
    assert names.all_tables == "app\\*1:t:*"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:6379/0", None),
        ("rediss://user:pw@cache.example:6380/2", None),
        ("unix:///run/redis/redis.sock", None),
        ("http://127.0.0.1/0", "a URL starting redis://"),
        ("redis://:6379/0", "redis://host[:port][/db]"),
        ("redis://127.0.0.1:99999/0", "not a valid URL"),
        ("redis://127.0.0.1/zero", "a database number"),
        ("unix://", "unix:// with a socket path"),
    ],
)
def test_redis_urls(url, problem):
    result = check_url(url)
    assert (result is None) if problem is None else (problem in result)


def test_passwords_stay_out_of_the_log():
    assert redacted("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert redacted("redis://h:1/0") == "redis://h:1/0"


def parse(text: str):
    return parse_config('modules = ["kv"]\n' + text, "mpnet.toml", Path("."))


def test_config_keys():
    config = parse('shared_backend = "redis"\nredis_prefix = "app:"\n')
    assert config["shared_backend"] == "redis"
    assert config["redis_url"] == "redis://127.0.0.1:6379/0"
    assert config["redis_prefix"] == "app:"
    assert parse("")["shared_backend"] == "local"
    with pytest.raises(ConfigError, match='key \'shared_backend\': expected "local" or "redis"'):
        parse('shared_backend = "etcd"\n')
    with pytest.raises(ConfigError, match="key 'redis_url': expected a URL starting redis://"):
        parse('redis_url = "localhost:6379"\n')
    with pytest.raises(ConfigError, match="key 'redis_timeout'"):
        parse("redis_timeout = 0\n")


def test_commands_are_resp_multibulk():
    assert command("SET", b"k", 5) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n"
    call = ScriptCall(b"abc", Keys("p:"), b"o", "t", "incr")
    fixed = ["EVALSHA", b"abc", 2, "p:t:t", "p:seq", "p:events", b"o", "t", "incr"]
    assert call.command([b"f", 3]) == command(*fixed, b"f", 3)
