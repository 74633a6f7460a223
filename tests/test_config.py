"""Tests for mpnet.pure.config: parsing, validation, defaults, per-service keys and error messages.

Every error must be one line that names the file and the key, fit to be all a user sees.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mpnet.pure.config import (
    GLOBAL_KEYS,
    SERVICE_ONLY_KEYS,
    Config,
    ConfigError,
    load_config,
    parse_config,
    with_overrides,
)

PATH = "/srv/mpnet/conf/mpnet.toml"
BASE = Path("/srv/mpnet/conf")
MODULES = 'modules = ["echo"]\n'
PER_SERVICE = sorted(k for k, spec in GLOBAL_KEYS.items() if spec.per_service)


def parse(text: str, with_modules: bool = True) -> Config:
    return parse_config((MODULES if with_modules else "") + text, PATH, BASE)


def error_of(text: str, with_modules: bool = True) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, with_modules)
    return str(info.value)


def assert_one_line(message: str, *parts: str) -> None:
    assert "\n" not in message and "\r" not in message, message
    for part in parts:
        assert part in message, (part, message)


# -- defaults ------------------------------------------------------------------------------------


def test_defaults_are_filled_in() -> None:
    config = parse("")
    assert config.path == PATH
    assert config.base_dir == BASE
    assert config.service_options == {}
    assert config.module_tables == {}
    assert set(config.values) == set(GLOBAL_KEYS)
    for key, spec in GLOBAL_KEYS.items():
        if key == "modules":
            assert config[key] == ["echo"]
        else:
            assert config[key] == spec.default, key


def test_specific_defaults() -> None:
    config = parse("")
    assert config["workers"] == "auto"
    assert config["interfaces"] == ["*"]
    assert config["module_paths"] == []
    assert config["log_level"] == "info"
    assert config["read_timeout"] == 0
    assert config["state_file"] is None
    assert config["allow_root"] is False


def test_embedded_default_config() -> None:
    config = load_config(None)
    assert config.path == "<default config>"
    assert config["modules"] == ["echo", "lastsaid"]
    assert config["interfaces"] == ["127.0.0.1"]
    assert config.base_dir == Path.cwd()
    assert set(config.values) == set(GLOBAL_KEYS)


def test_set_values_are_kept() -> None:
    config = parse(
        'workers = 3\nmodule_paths = ["mods", "/opt/mods"]\ngraceful_timeout = 2.5\n'
        'log_level = "debug"\nlog_file = "mpnet.log"\nbacklog = 16\nallow_root = true\n'
        'state_file = "state.bin"\nstate_fsync = "always"\nmax_worker_memory = 1000000\n'
        'read_timeout = false\nsend_timeout = 10\nssl = { certificate = "c.pem" }\n'
    )
    assert config["workers"] == 3
    assert config.worker_count == 3
    assert config["module_paths"] == ["mods", "/opt/mods"]
    assert config["graceful_timeout"] == 2.5
    assert config["log_level"] == "debug"
    assert config["log_file"] == "mpnet.log"
    assert config["backlog"] == 16
    assert config["allow_root"] is True
    assert config["state_fsync"] == "always"
    assert config["max_worker_memory"] == 1000000
    assert config["read_timeout"] is False
    assert config["send_timeout"] == 10
    assert config["ssl"] == {"certificate": "c.pem"}


# -- workers -------------------------------------------------------------------------------------


def test_workers_auto_uses_the_cpus_we_may_run_on() -> None:
    config = parse('workers = "auto"\n')
    assert config["workers"] == "auto"
    assert config.worker_count == max(1, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("count", [1, 2, 17, 1024])
def test_workers_int(count: int) -> None:
    assert parse(f"workers = {count}\n").worker_count == count


@pytest.mark.parametrize(
    "value", ["0", "-1", "1025", '"many"', '"4"', "2.5", "true", '"AUTO"', "[2]", '""']
)
def test_workers_invalid(value: str) -> None:
    message = error_of(f"workers = {value}\n")
    assert_one_line(message, PATH, "'workers'", "from 1 to 1024", '"auto"')


# -- unknown keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("worker", "workers"),
        ("graceful_timout", "graceful_timeout"),
        ("interface", "interfaces"),
        ("module_path", "module_paths"),
        ("loglevel", "log_level"),
        ("max_connection", "max_connections"),
    ],
)
def test_unknown_key_names_it_and_suggests_the_closest(key: str, suggestion: str) -> None:
    message = error_of(f"{key} = 1\n")
    assert_one_line(message, PATH, f"unknown key {key!r}", f"did you mean {suggestion!r}?")


def test_unknown_key_without_a_close_match_lists_the_per_service_keys() -> None:
    message = error_of("zzqqxx = 1\n")
    assert_one_line(message, PATH, "'zzqqxx'", "<service>_<key>", "[<module>]", "ports")
    assert "did you mean" not in message
    for key in PER_SERVICE:
        assert key in message


def test_unknown_service_suffix_is_an_unknown_key() -> None:
    message = error_of("echo_port = 5000\n")
    assert_one_line(message, PATH, "'echo_port'")


# -- wrong types ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(GLOBAL_KEYS))
def test_wrong_type_for_every_global_key(key: str) -> None:
    message = error_of(f"{key} = [true]\n", with_modules=key != "modules")
    assert_one_line(message, PATH, f"key {key!r}", "expected", "got [True]")


@pytest.mark.parametrize("suffix", PER_SERVICE + sorted(SERVICE_ONLY_KEYS))
def test_wrong_type_for_every_per_service_key(suffix: str) -> None:
    message = error_of(f"echo_{suffix} = [true]\n")
    assert_one_line(message, PATH, f"key 'echo_{suffix}'", "expected")


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ("graceful_timeout = -1", "graceful_timeout", "seconds"),
        ('graceful_timeout = "10s"', "graceful_timeout", "seconds"),
        ("quick_timeout = nan", "quick_timeout", "seconds"),
        ("worker_timeout = true", "worker_timeout", "seconds"),
        ("read_timeout = true", "read_timeout", "seconds"),
        ("read_timeout = -0.5", "read_timeout", "seconds"),
        ("backlog = 0", "backlog", "positive integer"),
        ("backlog = 1.5", "backlog", "positive integer"),
        ('log_level = "verbose"', "log_level", "one of"),
        ('log_file = ""', "log_file", "non-empty string"),
        ("log_file = 3", "log_file", "non-empty string"),
        ("max_worker_memory = 0", "max_worker_memory", "size in bytes"),
        ('max_worker_memory = "1G"', "max_worker_memory", "size in bytes"),
        ('allow_root = "yes"', "allow_root", "true or false"),
        ("allow_root = 1", "allow_root", "true or false"),
        ('state_fsync = "sometimes"', "state_fsync", '"always"'),
        ('ssl = "on"', "ssl", "a table"),
        ('interfaces = ""', "interfaces", "address"),
        ("interfaces = 127", "interfaces", "address"),
        ('interfaces = ["127.0.0.1", 1]', "interfaces", "address"),
        ('interfaces = ["127.0.0.1", ""]', "interfaces", "address"),
        ('modules = "echo"', "modules", "list of strings"),
        ('modules = ["echo", 3]', "modules", "list of strings"),
        ('module_paths = "mods"', "module_paths", "list of strings"),
        ("max_connections = 0", "max_connections", "positive integer"),
        ("echo_max_connections_per_ip = -3", "echo_max_connections_per_ip", "positive integer"),
        ('echo_proxy_protocol = "yes"', "echo_proxy_protocol", "true or false"),
        ("echo_ssl_handshake_timeout = -1", "echo_ssl_handshake_timeout", "seconds"),
        ("echo_max_send_buffer_size = 0", "echo_max_send_buffer_size", "size in bytes"),
    ],
)
def test_invalid_values(line: str, key: str, expected: str) -> None:
    message = error_of(line + "\n", with_modules=key != "modules")
    assert_one_line(message, PATH, f"key {key!r}", expected)


def test_value_with_newline_is_quoted_on_one_line() -> None:
    message = error_of('log_level = """two\nlines"""\n')
    assert_one_line(message, PATH, "'log_level'", "\\n")


@pytest.mark.parametrize(
    "line",
    [
        "read_timeout = false",
        "read_timeout = 0",
        "read_timeout = 0.0",
        "read_timeout = 30",
        "graceful_timeout = 0",
        "graceful_timeout = inf",
        'log_level = "warn"',
        'log_level = "warning"',
        'state_fsync = "never"',
        'state_fsync = "everysec"',
        'interfaces = "::1"',
        "ssl = {}",
        "echo_ssl = { certificate = 'c.pem', key = 'k.pem' }",
        "echo_proxy_protocol = true",
        "echo_ports = 0",
    ],
)
def test_valid_values(line: str) -> None:
    parse(line + "\n")


# -- ports and interfaces ------------------------------------------------------------------------


def test_service_ports_as_int_become_a_list() -> None:
    config = parse("echo_ports = 5000\n")
    assert config.service_options == {"echo": {"ports": [5000]}}
    assert config.service_option("echo", "ports") == [5000]
    assert config.service_key_is_set("echo", "ports")


def test_service_ports_as_list() -> None:
    config = parse("echo_ports = [5000, 5001, 0]\n")
    assert config.service_option("echo", "ports") == [5000, 5001, 0]


@pytest.mark.parametrize(
    "value", ["70000", "65536", "-1", "[]", '"80"', "[80, 70000]", '[80, "81"]', "true", "8.0"]
)
def test_service_ports_invalid(value: str) -> None:
    message = error_of(f"echo_ports = {value}\n")
    assert_one_line(message, PATH, "key 'echo_ports'", "0-65535")


def test_port_70000_names_the_value() -> None:
    message = error_of("chat_ports = 70000\n")
    assert_one_line(message, PATH, "'chat_ports'", "got 70000")


def test_service_interfaces_string_and_list() -> None:
    config = parse('echo_interfaces = "127.0.0.1"\nchat_interfaces = ["::1", "localhost"]\n')
    assert config.service_option("echo", "interfaces") == ["127.0.0.1"]
    assert config.service_option("chat", "interfaces") == ["::1", "localhost"]
    assert config.service_option("other", "interfaces") == ["*"]
    assert config.service_key_is_set("echo", "interfaces")
    assert not config.service_key_is_set("other", "interfaces")


def test_global_interfaces_string_becomes_a_list() -> None:
    config = parse('interfaces = "127.0.0.1"\n')
    assert config["interfaces"] == ["127.0.0.1"]
    assert config.service_option("echo", "interfaces") == ["127.0.0.1"]


# -- per-service overrides -----------------------------------------------------------------------


def test_per_service_override_and_fallback() -> None:
    config = parse("read_timeout = 60\necho_read_timeout = 5\necho_max_connections = 10\n")
    assert config.service_options == {"echo": {"read_timeout": 5, "max_connections": 10}}
    assert config.service_option("echo", "read_timeout") == 5
    assert config.service_option("chat", "read_timeout") == 60
    assert config.service_option("echo", "max_connections") == 10
    assert config.service_option("chat", "max_connections") is None
    assert config.service_option("chat", "ssl_handshake_timeout") == 60.0


def test_service_only_keys_fall_back_to_their_defaults() -> None:
    config = parse("echo_proxy_protocol = true\n")
    assert config.service_option("echo", "proxy_protocol") is True
    assert config.service_option("chat", "proxy_protocol") is False
    assert config.service_option("chat", "ports") is None
    assert not config.service_key_is_set("chat", "ports")


@pytest.mark.parametrize(
    ("line", "service", "suffix"),
    [
        ("echo_read_timeout = 1", "echo", "read_timeout"),
        ("my_chat_ports = 7000", "my_chat", "ports"),
        ("a_b_c_interfaces = '::1'", "a_b_c", "interfaces"),
        ("web_max_connections_per_ip = 3", "web", "max_connections_per_ip"),
        ("web_max_connections = 3", "web", "max_connections"),
        ("web_ssl_handshake_timeout = 3", "web", "ssl_handshake_timeout"),
        ("web_ssl = {}", "web", "ssl"),
        ("tls_ssl_ssl = {}", "tls_ssl", "ssl"),
        ("x_proxy_protocol = false", "x", "proxy_protocol"),
        ("ports_ports = 1", "ports", "ports"),
    ],
)
def test_service_key_split(line: str, service: str, suffix: str) -> None:
    config = parse(line + "\n")
    assert list(config.service_options) == [service]
    assert list(config.service_options[service]) == [suffix]


def test_several_services() -> None:
    config = parse("echo_ports = 1\nchat_ports = 2\necho_read_timeout = 3\n")
    assert config.service_options == {
        "echo": {"ports": [1], "read_timeout": 3},
        "chat": {"ports": [2]},
    }


# -- module tables -------------------------------------------------------------------------------


def test_module_tables() -> None:
    config = parse('[echo]\ngreeting = "hi"\nlimit = 3\n\n[chat.rooms]\nlobby = true\n')
    assert config.module_tables == {
        "echo": {"greeting": "hi", "limit": 3},
        "chat": {"rooms": {"lobby": True}},
    }
    assert config.service_options == {}


def test_inline_module_table() -> None:
    config = parse('kv = { max_keys = 10, name = "x" }\n')
    assert config.module_tables == {"kv": {"max_keys": 10, "name": "x"}}


# -- check_names ---------------------------------------------------------------------------------


def test_check_names_accepts_known_names() -> None:
    config = parse("echo_ports = 1\n[echo]\nx = 1\n[chat]\ny = 2\n")
    config.check_names(["echo", "chat"], ["echo"])  # a table may name a service too


def test_check_names_unknown_service_suggests() -> None:
    config = parse("echoo_ports = 5000\n")
    with pytest.raises(ConfigError) as info:
        config.check_names(["echo", "lastsaid"], ["echo", "lastsaid"])
    assert_one_line(
        str(info.value),
        PATH,
        "key 'echoo_ports'",
        "no service named 'echoo'",
        "did you mean 'echo'?",
        "services: echo, lastsaid",
    )


def test_check_names_unknown_service_without_services() -> None:
    config = parse("ghost_read_timeout = 5\n")
    with pytest.raises(ConfigError) as info:
        config.check_names([], ["echo"])
    assert_one_line(str(info.value), PATH, "'ghost_read_timeout'", "(services: none)")
    assert "did you mean" not in str(info.value)


def test_check_names_unknown_module_table_suggests() -> None:
    config = parse("[lastsiad]\nx = 1\n")
    with pytest.raises(ConfigError) as info:
        config.check_names(["echo", "lastsaid"], ["echo", "lastsaid"])
    assert_one_line(
        str(info.value),
        PATH,
        "table [lastsiad]",
        "no loaded module named 'lastsiad'",
        "did you mean 'lastsaid'?",
    )


# -- syntax and files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["workers = = 3\n", "[echo\n", 'modules = ["echo"\n', "a = 1\na = 2\n", "x = 'unterminated\n"],
)
def test_toml_syntax_error_is_one_line_naming_the_file(text: str) -> None:
    message = error_of(text, with_modules=False)
    assert_one_line(message, PATH, "invalid TOML")
    assert message.startswith(PATH + ": ")
    assert "line" in message or "end of document" in message  # says where


def test_load_config_from_file(tmp_path: Path) -> None:
    file = tmp_path / "conf" / "mpnet.toml"
    file.parent.mkdir()
    file.write_text('modules = ["echo"]\nworkers = 2\nstate_file = "state/db"\n')
    config = load_config(file)
    assert config.path == str(file)
    assert config.base_dir == file.parent.resolve()
    assert config["workers"] == 2
    assert config.resolve_path(config["state_file"]) == file.parent.resolve() / "state/db"
    assert config.resolve_path("/abs/path") == Path("/abs/path")
    assert config.resolve_path("~/x") == Path("~/x").expanduser()


def test_load_config_accepts_a_str_path(tmp_path: Path) -> None:
    file = tmp_path / "m.toml"
    file.write_text(MODULES)
    assert load_config(str(file)).path == str(file)


def test_load_config_syntax_error_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "broken.toml"
    file.write_text('modules = ["echo"]\nworkers = \n')
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert_one_line(str(info.value), str(file), "invalid TOML", "line 2")


def test_load_config_error_names_the_file_and_key(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text('modules = ["echo"]\nbacklog = -5\n')
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert_one_line(str(info.value), str(file), "'backlog'", "got -5")


def test_missing_file(tmp_path: Path) -> None:
    file = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert_one_line(str(info.value), str(file), "not found")


def test_unreadable_file_is_one_line(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'modules = ["\xe9cho"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(latin1)
    assert_one_line(str(info.value), str(latin1), "cannot read")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)  # a directory
    assert_one_line(str(info.value), str(tmp_path), "cannot read")


def test_empty_modules_list() -> None:
    for text in ("", "modules = []\n", "workers = 2\n"):
        message = error_of(text, with_modules=False)
        assert_one_line(message, PATH, "'modules'", "no modules")


# -- overrides -----------------------------------------------------------------------------------


def test_with_overrides() -> None:
    config = parse("echo_ports = 5\n[echo]\nx = 1\n")
    changed = with_overrides(config, workers=3)
    assert changed["workers"] == 3
    assert changed.worker_count == 3
    assert config["workers"] == "auto"  # the original is untouched
    assert changed.path == config.path
    assert changed.base_dir == config.base_dir
    assert changed.service_options == config.service_options
    assert changed.module_tables == config.module_tables
    assert changed["modules"] == ["echo"]


def test_with_overrides_ignores_none() -> None:
    config = parse("workers = 4\n")
    assert with_overrides(config, workers=None)["workers"] == 4
    assert with_overrides(config)["workers"] == 4


@pytest.mark.parametrize("value", [0, 1025, "many", -2])
def test_with_overrides_checks_values(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(parse(""), workers=value)
    assert_one_line(str(info.value), "command line", "--workers", "from 1 to 1024")


def test_proxy_trusted_networks() -> None:
    config = parse('echo_proxy_protocol = true\necho_proxy_trusted = ["10.0.0.0/8", "::1"]\n')
    assert config.service_option("echo", "proxy_trusted") == ["10.0.0.0/8", "::1"]
    one = parse('echo_proxy_protocol = true\necho_proxy_trusted = "10.0.0.0/8"\n')
    assert one.service_option("echo", "proxy_trusted") == ["10.0.0.0/8"]
    assert parse("").service_option("echo", "proxy_trusted") is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('echo_proxy_trusted = ["10.0.0.1/8"]', "expected .*'10.0.0.1/8' is not a network .*bits"),
        ('echo_proxy_trusted = ["ten"]', "expected .*'ten' is not a network"),
        ("echo_proxy_trusted = [10]", "expected a list of networks"),
        ("echo_proxy_trusted = []", "expected a list of networks"),
    ],
)
def test_proxy_trusted_invalid(line: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=f"{PATH}: key 'echo_proxy_trusted': {expected}"):
        parse("echo_proxy_protocol = true\n" + line + "\n")


def test_proxy_trusted_needs_proxy_protocol() -> None:
    with pytest.raises(ConfigError, match="'echo_proxy_trusted': only means something with "
                       "echo_proxy_protocol = true"):  # fmt: skip
        parse('echo_proxy_trusted = ["10.0.0.0/8"]\n')


@pytest.mark.parametrize(
    ("line", "suggestion"),
    [
        ("echo_port = 7000", "echo_ports"),
        ("my_chat_port = 7000", "my_chat_ports"),
        ('echo_interface = "::1"', "echo_interfaces"),
        ("echo_read_timout = 3", "echo_read_timeout"),
    ],
)
def test_near_miss_of_a_service_key_suggests_it(line: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown key .* \\(did you mean '{suggestion}'\\?\\)"):
        parse(line + "\n")
