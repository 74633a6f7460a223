"""mpnet: Prosody-style network service modules served by a pre-forked pool of workers.

A service module is a Python file that mpnet loads with a ``module`` global in its namespace::

    class listener:
        def onconnect(conn):
            conn.write("Hello!\\n")

        def onincoming(conn, data):
            conn.write(b"You said " + data + b"\\n")

    module.provides("net", {"default_port": 5432, "listener": listener})

For editors and type checkers, annotate the injected name: ``module: mpnet.Module``.

The public names are imported on first use, so that ``import mpnet.pure.resp`` (or the master's
own modules) does not pull in the worker runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "ConfigError": "mpnet.pure.config",
    "Connection": "mpnet.workers.connection",
    "Listener": "mpnet.workers.provider",
    "Module": "mpnet.workers.module",
    "ModuleError": "mpnet.workers.provider",
    "RESYNC": "mpnet.pure.replica",
    "SharedError": "mpnet.pure.replica",
    "SharedUnavailable": "mpnet.pure.replica",
    "SharedValueTooLarge": "mpnet.pure.replica",
    "SharedTable": "mpnet.workers.shared",
}

if TYPE_CHECKING:
    from .pure.config import ConfigError
    from .pure.replica import RESYNC, SharedError, SharedUnavailable, SharedValueTooLarge
    from .workers.connection import Connection
    from .workers.module import Module
    from .workers.provider import Listener, ModuleError
    from .workers.shared import SharedTable

__all__ = [
    "RESYNC",
    "ConfigError",
    "Connection",
    "Listener",
    "Module",
    "ModuleError",
    "SharedError",
    "SharedTable",
    "SharedUnavailable",
    "SharedValueTooLarge",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mpnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
