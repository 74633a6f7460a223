"""What a ``redis_url`` may be, checked with the configuration (before any worker connects)."""

from __future__ import annotations

from urllib.parse import urlsplit

URL_SCHEMES = ("redis", "rediss", "unix")


def check_url(url: str) -> str | None:
    """What is wrong with a ``redis_url`` (None if nothing): the scheme, host and port."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in URL_SCHEMES:
        return "a URL starting redis://, rediss:// or unix://"
    if parts.scheme == "unix":
        return None if parts.path else "unix:// with a socket path"
    if not parts.hostname:
        return f"{parts.scheme}://host[:port][/db]"
    del port
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        return f"a database number after the host, not {db!r}"
    return None


def redacted(url: str) -> str:
    """*url* without its password, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()
