"""``mpnet new NAME``: a service module, its tests and a config, ready to run and to grow.

The generated test passes as written (``pytest`` in that directory): one test drives the module
in-process with :mod:`mpnet.testing`, one through a real server with the ``mpnet_server``
fixture (:mod:`mpnet.pytest_plugin`).
"""

from __future__ import annotations

from pathlib import Path

from .pure.config import ConfigError

MODULE = '''\
"""{name}: a service module for mpnet.

Run it:  mpnet serve -c mpnet.toml    (then: nc 127.0.0.1 {port})
Test it: pytest
"""

# Options come from the [{name}] table of mpnet.toml (module.get_option(name, default)).
GREETING = module.get_option("greeting", "Hello!")

# Per-connection state lives in a plain dict keyed by conn. Each worker process has its own
# copy; for data every worker sees, use module.shared("table") (see mpnet's README).
sessions = {{}}


class listener:
    def onconnect(conn):
        """A client connected. conn.ip() and conn.port() say who it is."""
        sessions[conn] = {{"lines": 0}}
        conn.write(GREETING + "\\n")

    def onincoming(conn, data):
        """data is bytes exactly as they came off the socket: part of a line, or several.
        A callback may also be `async def`: the connection waits for it, in order."""
        session = sessions[conn]
        session["lines"] += data.count(b"\\n")
        if data.strip() == b"quit":
            conn.write("Bye!\\n")
            conn.close()  # ondisconnect follows, with err None
            return
        conn.write(b"You said " + data)

    def ondisconnect(conn, err):
        """Once per connection; err is None for a clean close, else the reason."""
        session = sessions.pop(conn, None)  # don't forget this!
        module.log("info", "closed after %d line(s): %s", session["lines"], err or "no error")


module.provides("net", listener=listener, default_port={port})
'''

TEST = '''\
"""Tests for {name}.py: in-process with mpnet.testing, then over TCP with the mpnet_server
fixture (both come with mpnet)."""

from pathlib import Path

from mpnet.testing import load

MODULE = Path(__file__).with_name("{name}.py")


def test_greets_answers_and_forgets_the_connection():
    with load(MODULE, options={{"greeting": "Hi there"}}) as svc:
        c = svc.connect(ip="192.0.2.1")
        assert c.received() == b"Hi there\\n"
        c.send(b"hello\\n")
        assert c.received() == b"You said hello\\n"
        c.send(b"quit\\n")
        assert c.received() == b"Bye!\\n"
        assert c.closed and c.close_reason is None
        assert svc.module_globals("{name}")["sessions"] == {{}}


def test_serves_over_tcp(mpnet_server):
    srv = mpnet_server(modules=[MODULE], workers=2)
    with srv.connect("{name}") as client:
        assert client.recv_until(b"\\n") == b"Hello!\\n"
        client.send(b"hello\\n")
        assert client.recv_until(b"\\n") == b"You said hello\\n"
'''

CONFIG = """\
# mpnet serve -c mpnet.toml     (mpnet serve --reload -c mpnet.toml while developing)
workers = "auto"
modules = ["./{name}.py"]
interfaces = ["127.0.0.1"]
{name}_ports = [{port}]
# As root, workers need an account to run as: user = "nobody" (or allow_root = true).

[{name}]
greeting = "Hello!"
"""


def create_project(name: str, directory: Path, port: int = 7000) -> list[Path]:
    """Write ``NAME.py``, ``test_NAME.py`` and ``mpnet.toml`` into *directory*; refuse to
    overwrite anything. Returns the files written."""
    from mpnet.workers.provider import SERVICE_NAME

    if not SERVICE_NAME.fullmatch(name) or name.startswith("test_"):
        raise ConfigError(
            f"mpnet new: {name!r} is not a module name: use letters, digits and single "
            "underscores, starting with a letter (and not test_)"
        )
    if not 0 < port < 65536:
        raise ConfigError(f"mpnet new: --port {port}: expected 1-65535")
    files = {
        directory / f"{name}.py": MODULE.format(name=name, port=port),
        directory / f"test_{name}.py": TEST.format(name=name),
        directory / "mpnet.toml": CONFIG.format(name=name, port=port),
    }
    existing = [str(path) for path in files if path.exists()]
    if existing:
        raise ConfigError(f"mpnet new: {', '.join(existing)} already exist(s); nothing written")
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    return list(files)
