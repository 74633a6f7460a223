"""mpnet: Prosody-style network service modules served by a pre-forked pool of workers.

A service module is a Python file that mpnet loads with a ``module`` global in its namespace::

    class listener:
        def onconnect(conn):
            conn.write("Hello!\\n")

        def onincoming(conn, data):
            conn.write(b"You said " + data + b"\\n")

    module.provides("net", {"default_port": 5432, "listener": listener})

For editors and type checkers, annotate the injected name: ``module: mpnet.Module``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import ConfigError
from .connection import Connection
from .module import Module, ModuleError
from .shared import SharedError, SharedTable

__all__ = [
    "ConfigError",
    "Connection",
    "Module",
    "ModuleError",
    "SharedError",
    "SharedTable",
    "__version__",
]
