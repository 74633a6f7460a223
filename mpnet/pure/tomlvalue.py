"""Writing TOML values (the standard library only reads TOML): for configs that tests, the test
kit and ``mpnet new`` generate."""

from __future__ import annotations

import json
from typing import Any


def toml_value(value: Any) -> str:
    """*value* (bool, int, float, str, list, dict of those) as a TOML value; dicts become inline
    tables. Anything else raises ``TypeError`` naming it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"config value {value!r} ({type(value).__name__}) is not a TOML value")
