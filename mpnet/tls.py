"""TLS server contexts from the config's ``[ssl]`` / ``<service>_ssl`` tables.

Built in the checker (so a missing or broken certificate stops a start or a reload with a clear
message) and again in every new worker (so a reload picks up renewed certificate files for new
connections). TLS 1.2 is the minimum; the rest are Python's server defaults.
"""

from __future__ import annotations

import ssl
from typing import Any

from .config import Config, ConfigError

SSL_KEYS = {"certificate", "key", "password", "ciphers", "alpn"}


def server_context(
    config: Config, service: str, alpn: list[str] | None = None
) -> ssl.SSLContext | None:
    """The TLS context for *service*, or None when no ``ssl`` table applies to it."""
    table = config.service_option(service, "ssl")
    if not table:
        return None
    key_name = f"{service}_ssl" if config.service_key_is_set(service, "ssl") else "ssl"
    where = f"{config.path}: key {key_name!r}"
    unknown = set(table) - SSL_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: "
            f"{', '.join(sorted(SSL_KEYS))}"
        )
    certificate = _path(config, table, "certificate", where, required=True)
    key = _path(config, table, "key", where, required=False)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(certificate, key, _string(table, "password", where))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load certificate {certificate}: {exc}") from None
    ciphers = _string(table, "ciphers", where)
    if ciphers:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError as exc:
            raise ConfigError(f"{where}: ciphers: {exc}") from None
    protocols = list(table.get("alpn", [])) + list(alpn or [])
    if protocols:
        context.set_alpn_protocols(protocols)
    return context


def _string(table: dict[str, Any], name: str, where: str) -> str | None:
    value = table.get(name)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: {name} must be a string")
    return value


def _path(
    config: Config, table: dict[str, Any], name: str, where: str, required: bool
) -> str | None:
    value = _string(table, name, where)
    if value is None:
        if required:
            raise ConfigError(f"{where}: {name} is required")
        return None
    path = config.resolve_path(value)
    if not path.is_file():
        raise ConfigError(f"{where}: {name} file {str(path)!r} not found")
    return str(path)
