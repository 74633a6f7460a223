"""The seed's second example: per-connection state in a ``sessions`` table indexed by ``conn``."""

sessions = {}


class my_listener:
    def onconnect(conn):
        sessions[conn] = {}
        conn.write("Hello!\n")

    def onincoming(conn, data):
        session = sessions[conn]
        last_said = session.get("last_said")
        session["last_said"] = data  # Save for next time
        if last_said:
            conn.write(b"But last time you said " + last_said + b"\n")
        else:
            conn.write("Ok.\n")

    def ondisconnect(conn, err):
        sessions.pop(conn, None)  # Don't forget this!
        module.log("info", "Connection closed: %s", err or "no error")


module.provides("net", {"default_port": 5433, "listener": my_listener})
