"""Which peers may send a PROXY header: ``<service>_proxy_trusted = ["10.0.0.0/8", ...]``.

A PROXY header lets its sender choose the client address every limit and log line uses, so only
the load balancers should be allowed to send one, as HAProxy's ``accept-proxy`` with an ACL on
``src`` does. :func:`parse_networks` validates the config value; :class:`TrustedNetworks` answers
whether a connection's real peer is one of them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> list[Network]:
    """The networks in *values* (``"10.0.0.0/8"``, ``"2001:db8::/32"``, or a single address);
    ValueError naming the bad entry otherwise (host bits set, not an address)."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=True))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a network ({exc})") from None
    return networks


def plain_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """*text* as an address, an IPv4-mapped IPv6 one (a dual-stack socket's view of an IPv4
    peer) as IPv4; None if it is no IP address (a Unix socket peer, say)."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedNetworks:
    """The peers allowed to send PROXY headers. Contract: ``ip in trusted`` is true only for an
    IP address inside one of the networks; answers are cached per address (a balancer has
    few), at most :attr:`CACHE_SIZE` of them."""

    CACHE_SIZE = 4096

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str):
            return False
        answer = self._cache.get(ip)
        if answer is None:
            address = plain_address(ip)
            answer = address is not None and any(address in net for net in self.networks)
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[ip] = answer
        return answer

    def __repr__(self) -> str:
        return f"TrustedNetworks({', '.join(map(str, self.networks))})"
