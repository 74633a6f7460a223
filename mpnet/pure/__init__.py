"""Protocol and planning logic free of I/O (h11's sans-IO style): bytes or plain data in,
results out. No module here imports asyncio, socket, ssl or selectors (a test enforces it), so
each can be tested with bytes split at every position and fuzzed without a server.

``config`` (the TOML schema), ``portplan`` (who listens where), ``resp`` (Redis protocol),
``proxyproto`` (PROXY v1/v2), ``values`` (what may cross a process boundary), ``replica`` (the
shared tables' merge rules), ``frames`` (the channel's wire format; the one module here that
uses msgpack), ``messages`` (the named records sent on the channel) and ``controlproto`` (the
control socket's requests and replies).
"""
