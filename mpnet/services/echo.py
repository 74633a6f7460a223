"""The seed's first example: greet, then answer every piece of data with "You said ...".

As on the Prosody page, ``data`` is passed on raw: a line typed in ``nc`` keeps its newline, so
``hi`` is answered with ``You said hi`` plus that newline and the one the module adds.
"""


class my_listener:  # Listener object: any object (or dict) with on* callables
    def onconnect(conn):
        conn.write("Hello!\n")

    def onincoming(conn, data):
        conn.write(b"You said " + data + b"\n")

    def ondisconnect(conn, err):
        module.log("info", "Connection closed: %s", err or "no error")


module.provides(
    "net",
    {
        "default_port": 5432,  # Default port, can be overridden by config
        "listener": my_listener,
    },
)
