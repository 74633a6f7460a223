"""What may cross a process boundary: the plain-data rule, checked where a module writes.

Shared tables, broadcasts and channel messages carry plain data only (None, bool, int, float,
str, bytes, list, dict). The check lives apart from the msgpack codec so that pure code (the
replica rules, the master's validation) can use it without importing msgpack.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 64
"""Deepest nesting of lists/dicts a module may write (``check_plain``); the master checks what
workers send against it, since msgpack alone decodes deeper values."""

KEY_TYPES = (str, bytes, int, float, bool)
"""Types a dict key (and a shared-table key) may have."""


def check_plain(value: Any, depth: int = 0) -> None:
    """Raise ``TypeError`` unless *value* is plain data the channel (and shared tables) can carry.

    Called where a module writes, so the mistake surfaces at the write, in the writing module,
    rather than later in another process.
    """
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, float, str, bytes):
        return
    if kind in (list, tuple):
        for item in value:
            check_plain(item, depth + 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) not in KEY_TYPES and key is not None:
                raise TypeError(f"dict key of type {type(key).__name__} is not plain data")
            check_plain(item, depth + 1)
        return
    raise TypeError(
        f"{kind.__name__} is not plain data "
        "(allowed: None, bool, int, float, str, bytes, list, dict)"
    )
