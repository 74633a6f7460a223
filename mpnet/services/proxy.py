"""A TCP proxy: forwards every connection on its port to ``target``, with backpressure both ways.

Config::

    modules = ["proxy"]
    proxy_ports = [8000]

    [proxy]
    target = "127.0.0.1:8080"    # where to forward (required)
    connect_timeout = 10          # seconds

When one side does not read, the other side is paused (``pause()``) once the slow side has more
than HIGH_WATER bytes queued, and resumed when that queue drains (``ondrain``), so memory stays
bounded whatever the peers do.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the loader injects ``module``, as Prosody does; this is for type checkers
    from mpnet import Module

    module: Module

HIGH_WATER = 64 * 1024  # the framework's own write high-water mark: ondrain fires after it

target = module.get_option_string("target")
if target is None or ":" not in target:
    raise ValueError('set [proxy] target = "host:port" in the config')
target_host, _, port_text = target.rpartition(":")
target_host = target_host.strip("[]")
target_port = int(port_text)
connect_timeout = module.get_option_number("connect_timeout", 10, min=0)

peers: dict[Any, Any] = {}  # client <-> upstream, both directions


def forward(source, sink, data):
    sink.write(data)
    if sink.buffered() > HIGH_WATER:
        source.pause()  # resumed by the sink's ondrain


def resume_peer(conn):
    peer = peers.get(conn)
    if peer is not None:
        peer.resume()


def close_peer(conn, err):
    peer = peers.pop(conn, None)
    if peer is not None:
        peers.pop(peer, None)
        peer.close(err)


class upstream:
    def onconnect(up):
        resume_peer(up)  # the client was paused while we connected

    def onincoming(up, data):
        client = peers.get(up)
        if client is not None:
            forward(up, client, data)

    def ondrain(up):
        resume_peer(up)

    def ondisconnect(up, err):
        if err:
            module.log("info", "upstream %s:%d closed: %s", target_host, target_port, err)
        close_peer(up, err)


class listener:
    def onconnect(client):
        client.pause()
        up = module.connect(target_host, target_port, upstream, timeout=connect_timeout)
        peers[client] = up
        peers[up] = client

    def onincoming(client, data):
        up = peers.get(client)
        if up is not None:
            forward(client, up, data)

    def ondrain(client):
        resume_peer(client)

    def ondisconnect(client, err):
        close_peer(client, err)


module.provides("net", default_port=5435, listener=listener)
