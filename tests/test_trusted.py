"""mpnet.pure.trusted: ``<service>_proxy_trusted`` networks and the peer check."""

from __future__ import annotations

import pytest

from mpnet.pure.trusted import TrustedNetworks, parse_networks, plain_address


def test_parse_networks_accepts_networks_and_single_addresses() -> None:
    nets = parse_networks(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])
    assert [str(n) for n in nets] == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]


@pytest.mark.parametrize(
    ("value", "why"),
    [("10.0.0.1/8", "has host bits set"), ("nonsense", "does not appear to be"), ("", "")],
)
def test_parse_networks_names_the_bad_entry(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"{value!r} is not a network.*{why}"):
        parse_networks(["10.0.0.0/8", value])


def test_membership() -> None:
    trusted = TrustedNetworks(parse_networks(["10.0.0.0/8", "2001:db8::/32"]))
    assert "10.1.2.3" in trusted
    assert "11.0.0.1" not in trusted
    assert "2001:db8::5" in trusted
    assert "2001:db9::5" not in trusted
    assert "::ffff:10.9.9.9" in trusted  # a dual-stack socket's view of an IPv4 peer
    assert "::ffff:11.9.9.9" not in trusted
    assert "" not in trusted and "/run/sock" not in trusted and None not in trusted
    assert "10.1.2.3" in trusted  # cached answers are the same


def test_plain_address() -> None:
    assert str(plain_address("::ffff:192.0.2.1")) == "192.0.2.1"
    assert str(plain_address("fe80::1%eth0")) == "fe80::1"
    assert plain_address("not an ip") is None
