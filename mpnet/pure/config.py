"""Reading and validating the TOML configuration.

Validation happens in two steps because the master never loads user modules:

1. :func:`load_config` (in the master) checks the syntax, every framework key and the shape of
   every ``<service>_<key>`` and ``[module]`` table;
2. :meth:`Config.check_names` (once the service names are known from a throwaway loader process)
   checks that each ``<service>_...`` key and each module table names something that exists.

Every problem is a :class:`ConfigError` whose message names the file and the key, fit to be the
only line a user sees.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .redisurl import check_url
from .trusted import parse_networks

DEFAULT_CONFIG = """\
# The embedded default configuration: the seed's two examples on loopback.
workers = "auto"
modules = ["echo", "lastsaid"]
interfaces = ["127.0.0.1"]
# A loopback demo: started as root (say in a container) its workers keep root rather than refuse.
allow_root = true
"""

LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """A configuration problem, with a message that names the file and the key."""


def _positive_int(value: Any) -> str | None:
    if type(value) is not int or value < 1:
        return "a positive integer"
    return None


def _non_negative_int(value: Any) -> str | None:
    if type(value) is not int or value < 0:
        return "an integer (0 or more)"
    return None


def _workers(value: Any) -> str | None:
    if value == "auto" or (type(value) is int and 1 <= value <= 1024):
        return None
    return 'a number of workers from 1 to 1024, or "auto"'


def _seconds(value: Any) -> str | None:
    if type(value) in (int, float) and value >= 0:
        return None
    return "a number of seconds (0 or more)"


def _optional_seconds(value: Any) -> str | None:
    if value is False or value == 0:
        return None
    return _seconds(value)


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "a non-empty string"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _string_list(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(item, str) and item for item in value):
        return None
    return "a list of strings"


def _interfaces(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return None
    if value == []:
        return "at least one address"
    return _string_list(value) and "an address or a list of addresses"


def _ports(value: Any) -> str | None:
    items = value if isinstance(value, list) else [value]
    if items and all(type(port) is int and 0 <= port <= 65535 for port in items):
        return None
    return "a port number (0-65535) or a list of port numbers"


def _networks(value: Any) -> str | None:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) for item in items):
        return 'a list of networks, e.g. ["10.0.0.0/8", "2001:db8::/32"]'
    try:
        parse_networks(items)
    except ValueError as exc:
        return f'a list of networks, e.g. ["10.0.0.0/8"]: {exc}'
    return None


def _log_level(value: Any) -> str | None:
    return None if value in LOG_LEVELS else "one of " + ", ".join(repr(v) for v in LOG_LEVELS)


def _bytes_size(value: Any) -> str | None:
    if type(value) is int and value > 0:
        return None
    return "a size in bytes (a positive integer)"


def _fsync(value: Any) -> str | None:
    return None if value in ("always", "everysec", "never") else '"always", "everysec" or "never"'


def _shared_backend(value: Any) -> str | None:
    return None if value in ("local", "redis") else '"local" or "redis"'


def _redis_url(value: Any) -> str | None:
    if not isinstance(value, str):
        return "a redis://, rediss:// or unix:// URL"
    return check_url(value)


def _table(value: Any) -> str | None:
    return None if isinstance(value, dict) else "a table"


def _log_format(value: Any) -> str | None:
    return None if value in LOG_FORMATS else " or ".join(repr(v) for v in LOG_FORMATS)


def _log_levels(value: Any) -> str | None:
    if isinstance(value, dict) and all(level in LOG_LEVELS for level in value.values()):
        return None
    return "a table of module = level, each level one of " + ", ".join(repr(v) for v in LOG_LEVELS)


def parse_listen_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9150"`` -> ("127.0.0.1", 9150); ``"[::1]:9150"`` -> ("::1", 9150).
    Raises ValueError naming what is wrong."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} has no port (host:port, e.g. 127.0.0.1:9150 or [::1]:9150)")
    bracketed = host.startswith("[") and host.endswith("]")
    address = host[1:-1] if bracketed else host
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if parsed.version == 6 and not bracketed:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9150")
    return address, int(port)


def _listen_addresses(value: Any) -> str | None:
    items = value if isinstance(value, list) else [value]
    expected = 'an address host:port or a list of them (e.g. "127.0.0.1:9150")'
    if not items or not all(isinstance(item, str) for item in items):
        return expected
    for item in items:
        try:
            parse_listen_address(item)
        except ValueError as exc:
            return f"{expected}; {exc}"
    return None


@dataclass(frozen=True)
class Key:
    """One framework key: its check (returns what was expected, or None) and its default."""

    check: Callable[[Any], str | None]
    default: Any
    per_service: bool = False  # may also be set as <service>_<key>


GLOBAL_KEYS: dict[str, Key] = {
    "workers": Key(_workers, "auto"),
    "modules": Key(_string_list, []),
    "module_paths": Key(_string_list, []),
    "interfaces": Key(_interfaces, ["*"], per_service=True),
    "graceful_timeout": Key(_seconds, 30.0),
    "quick_timeout": Key(_seconds, 5.0),
    "worker_timeout": Key(_seconds, 30.0),
    "stall_timeout": Key(_seconds, 1.0),
    "load_margin": Key(_non_negative_int, 64),
    "boot_timeout": Key(_seconds, 60.0),
    "backlog": Key(_positive_int, 1024),
    "log_level": Key(_log_level, "info"),
    "log_file": Key(_string, None),
    "max_worker_memory": Key(_bytes_size, None),
    "max_worker_memory_hard": Key(_bytes_size, None),
    "control_socket": Key(_string, None),
    "user": Key(_string, None),
    "group": Key(_string, None),
    "allow_root": Key(_bool, False),
    "state_file": Key(_string, None),
    "state_fsync": Key(_fsync, "everysec"),
    "shared_backend": Key(_shared_backend, "local"),
    "redis_url": Key(_redis_url, "redis://127.0.0.1:6379/0"),
    "redis_prefix": Key(_string, "mpnet:"),
    "redis_timeout": Key(lambda v: _seconds(v) if v != 0 else "more than 0 seconds", 5.0),
    "read_timeout": Key(_optional_seconds, 0, per_service=True),
    "send_timeout": Key(_optional_seconds, 0, per_service=True),
    "ssl_handshake_timeout": Key(_seconds, 60.0, per_service=True),
    "max_send_buffer_size": Key(_bytes_size, 32 * 1024 * 1024, per_service=True),
    "max_connections": Key(_positive_int, None, per_service=True),
    "max_connections_per_ip": Key(_positive_int, None, per_service=True),
    "max_unadmitted_connections": Key(_positive_int, None),
    "ssl": Key(_table, None, per_service=True),
    "limit_message": Key(_string, None, per_service=True),
    "metrics_listen": Key(_listen_addresses, None),
    "metrics_callback_durations": Key(_bool, False),
    "log_format": Key(_log_format, "text"),
    "log_levels": Key(_log_levels, {}),
}

SERVICE_ONLY_KEYS: dict[str, Key] = {
    "ports": Key(_ports, None),
    "proxy_protocol": Key(_bool, False),
    "proxy_trusted": Key(_networks, None),
}


def service_key_check(suffix: str) -> Key | None:
    """The check for ``<service>_<suffix>``, or None if *suffix* is not a per-service key."""
    key = SERVICE_ONLY_KEYS.get(suffix)
    if key is not None:
        return key
    key = GLOBAL_KEYS.get(suffix)
    return key if key is not None and key.per_service else None


@dataclass
class Config:
    """A validated configuration. ``values`` holds every framework key (defaults filled in)."""

    path: str  # the file, or "<default config>"
    base_dir: Path  # relative paths (modules, module_paths, state_file...) start here
    values: dict[str, Any]
    service_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    module_tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def worker_count(self) -> int:
        workers = self.values["workers"]
        if workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return int(workers)

    def service_option(self, service: str, key: str) -> Any:
        """``<service>_<key>`` if set, else the global ``<key>`` (or its default)."""
        options = self.service_options.get(service)
        if options is not None and key in options:
            return options[key]
        if key in self.values:
            return self.values[key]
        return SERVICE_ONLY_KEYS[key].default

    def service_key_is_set(self, service: str, key: str) -> bool:
        return key in self.service_options.get(service, {})

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def check_names(self, services: list[str], modules: list[str]) -> None:
        """Second validation step: every ``<service>_...`` key and module table must name
        a service or module that was loaded."""
        for service, options in self.service_options.items():
            if service in services:
                continue
            key = f"{service}_{next(iter(options))}"
            hint = _suggest(service, services)
            known = ", ".join(services) or "none"
            raise ConfigError(
                f"{self.path}: key {key!r}: there is no service named {service!r}"
                f"{hint} (services: {known})"
            )
        for name in self["log_levels"]:
            if name not in modules:
                hint = _suggest(name, modules)
                raise ConfigError(
                    f"{self.path}: key 'log_levels': there is no loaded module named {name!r}{hint}"
                )
        for name in self.module_tables:
            if name not in modules and name not in services:
                hint = _suggest(name, modules)
                raise ConfigError(
                    f"{self.path}: table [{name}]: there is no loaded module named {name!r}{hint}"
                )


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _suggest_key(key: str) -> str:
    """A hint for an unknown key: a near miss of a global key (``max_connection``), else of a
    service key (``echo_port`` -> ``echo_ports``), else the closest global key."""
    close_global = difflib.get_close_matches(key, list(GLOBAL_KEYS), n=1, cutoff=0.85)
    if close_global:
        return f" (did you mean {close_global[0]!r}?)"
    parts = key.split("_")
    suffixes = [k for k in GLOBAL_KEYS if GLOBAL_KEYS[k].per_service] + list(SERVICE_ONLY_KEYS)
    for index in range(1, len(parts)):
        service, suffix = "_".join(parts[:index]), "_".join(parts[index:])
        close = difflib.get_close_matches(suffix, suffixes, n=1, cutoff=0.8)
        if close:
            return f" (did you mean '{service}_{close[0]}'?)"
    return _suggest(key, list(GLOBAL_KEYS))


def _split_service_key(key: str) -> tuple[str, str] | None:
    """Split ``echo_read_timeout`` into ("echo", "read_timeout"), trying the longest suffix."""
    parts = key.split("_")
    for index in range(1, len(parts)):
        service, suffix = "_".join(parts[:index]), "_".join(parts[index:])
        if service_key_check(suffix) is not None:
            return service, suffix
    return None


def parse_config(text: str, path: str, base_dir: Path) -> Config:
    """Validate TOML *text* (from *path*, for messages) into a :class:`Config`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    values: dict[str, Any] = {}
    service_options: dict[str, dict[str, Any]] = {}
    module_tables: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        spec = GLOBAL_KEYS.get(key)
        if spec is not None:
            expected = spec.check(value)
            if expected:
                raise ConfigError(f"{path}: key {key!r}: expected {expected}, got {value!r}")
            values[key] = value
            continue
        split = _split_service_key(key)
        if split is not None:
            service, suffix = split
            expected = service_key_check(suffix).check(value)  # type: ignore[union-attr]
            if expected:
                raise ConfigError(f"{path}: key {key!r}: expected {expected}, got {value!r}")
            service_options.setdefault(service, {})[suffix] = value
            continue
        if isinstance(value, dict):
            module_tables[key] = value
            continue
        hint = _suggest_key(key)
        raise ConfigError(
            f"{path}: unknown key {key!r}{hint}; per-service keys are <service>_<key> with <key> "
            f"one of: {', '.join(sorted(k for k in GLOBAL_KEYS if GLOBAL_KEYS[k].per_service))}"
            f", {', '.join(SERVICE_ONLY_KEYS)}; module options go in a [<module>] table"
        )
    for key, spec in GLOBAL_KEYS.items():
        values.setdefault(key, spec.default)
    for name in ("interfaces", "metrics_listen"):
        if isinstance(values[name], str):
            values[name] = [values[name]]
    for options in service_options.values():
        for name in ("ports", "interfaces", "proxy_trusted"):
            if name in options and not isinstance(options[name], list):
                options[name] = [options[name]]
    _check_stall_timeout(values, "stall_timeout" in raw, path)
    for service, options in service_options.items():
        if "proxy_trusted" in options and not options.get("proxy_protocol"):
            raise ConfigError(
                f"{path}: key '{service}_proxy_trusted': only means something with "
                f"{service}_proxy_protocol = true; set that too, or remove this key"
            )
    if not values["modules"]:
        raise ConfigError(f"{path}: key 'modules': no modules to load; list at least one")
    soft, hard = values["max_worker_memory"], values["max_worker_memory_hard"]
    if soft and hard and hard <= soft:
        raise ConfigError(
            f"{path}: key 'max_worker_memory_hard': {hard} must be above max_worker_memory "
            f"({soft}): the worker is recycled gracefully at the one, killed at the other"
        )
    return Config(
        path=path,
        base_dir=base_dir,
        values=values,
        service_options=service_options,
        module_tables=module_tables,
    )


def _check_stall_timeout(values: dict[str, Any], explicit: bool, path: str) -> None:
    """``stall_timeout`` (steer new connections away, mpnet/steering.py) must come before
    ``worker_timeout`` (kill the worker), or steering would never act. Unset, it follows a small
    ``worker_timeout`` down (half of it) rather than refuse a config that never named it."""
    stall, limit = float(values["stall_timeout"]), float(values["worker_timeout"])
    if not limit or not stall or stall < limit:
        return
    if explicit:
        raise ConfigError(
            f"{path}: key 'stall_timeout': must be below worker_timeout ({limit:g}s), got "
            f"{stall:g}; a stalled worker is steered around first and killed later (0 turns "
            f"steering around stalls off)"
        )
    values["stall_timeout"] = limit / 2


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read the config file at *path*, or the embedded default config when *path* is None."""
    if path is None:
        return parse_config(DEFAULT_CONFIG, "<default config>", Path.cwd())
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc}") from None
    return parse_config(text, str(file), file.resolve().parent)


def with_overrides(config: Config, **overrides: Any) -> Config:
    """A copy of *config* with command-line overrides (e.g. ``workers``) applied and checked."""
    values = dict(config.values)
    for key, value in overrides.items():
        if value is None:
            continue
        expected = GLOBAL_KEYS[key].check(value)
        if expected:
            raise ConfigError(f"command line: --{key}: expected {expected}, got {value!r}")
        values[key] = value
    return Config(
        config.path, config.base_dir, values, config.service_options, config.module_tables
    )
