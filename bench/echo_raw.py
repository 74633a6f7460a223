# ruff: noqa: F821
# mpnet service module for bench/bench_echo.py: echo every chunk back unchanged, with no
# prefix, so it measures mpnet's own cost against bench/baseline_echo.py.  The loader
# injects `module`, as in Prosody.


class listener:
    def onincoming(conn, data):
        conn.write(data)


module.provides("net", name="echo_raw", listener=listener, default_port=0)
