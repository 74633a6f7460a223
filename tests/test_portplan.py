"""Tests for mpnet.pure.portplan and mpnet.portmanager: host normalising, endpoint overlaps,
port plans, conflicts, and the PortLedger with real sockets on loopback.

Sockets are only ever bound to loopback (plus, in one clearly marked test, the wildcard address
for a few milliseconds); nothing connects anywhere but to them.
"""

from __future__ import annotations

import os
import re
import select
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mpnet.portmanager import PortConflict, PortLedger, family, normalise_host, plan_services
from mpnet.pure.config import Config, ConfigError, parse_config
from mpnet.pure.portplan import Endpoint, ServicePlan, find_conflicts

PATH = "/etc/mpnet/ports.toml"
V4 = socket.AF_INET
V6 = socket.AF_INET6


def config(text: str = "") -> Config:
    return parse_config('modules = ["m"]\n' + text, PATH, Path("/etc/mpnet"))


def info(name: str, *ports: int, module: str = "m") -> dict[str, object]:
    return {"name": name, "module": module, "default_ports": list(ports), "encryption": None}


def plan(service: str, *endpoints: Endpoint, interfaces_key: str = "interfaces") -> ServicePlan:
    return ServicePlan(service, "m", list(endpoints), f"{service}_ports", interfaces_key)


def ep(host: str, port: int) -> Endpoint:
    return Endpoint(host, port)


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(V6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- normalise_host ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        ("*", "0.0.0.0"),
        ("localhost", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "0.0.0.0"),
        ("10.1.2.3", "10.1.2.3"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("::", "::"),
        ("[::]", "::"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("[2001:db8::0:1]", "2001:db8::1"),
    ],
)
def test_normalise_host(host: str, normal: str) -> None:
    assert normalise_host(host) == normal


# -- Endpoint ------------------------------------------------------------------------------------


def test_endpoint_family_wildcard_and_text() -> None:
    assert family(ep("0.0.0.0", 1)) == V4 and ep("0.0.0.0", 1).wildcard
    assert family(ep("::", 1)) == V6 and ep("::", 1).wildcard
    assert family(ep("127.0.0.1", 1)) == V4 and not ep("127.0.0.1", 1).wildcard
    assert family(ep("::1", 1)) == V6 and not ep("::1", 1).wildcard
    assert str(ep("127.0.0.1", 5432)) == "127.0.0.1:5432"
    assert str(ep("::1", 5432)) == "[::1]:5432"
    assert str(ep("::", 0)) == "[::]:0"


def test_endpoints_are_hashable_values_and_sortable() -> None:
    assert ep("127.0.0.1", 1) == ep("127.0.0.1", 1)
    assert len({ep("127.0.0.1", 1), ep("127.0.0.1", 1), ep("127.0.0.1", 2)}) == 2
    assert sorted([ep("b", 2), ep("a", 9), ep("a", 1)]) == [ep("a", 1), ep("a", 9), ep("b", 2)]


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        (ep("127.0.0.1", 80), ep("127.0.0.1", 80), True),
        (ep("0.0.0.0", 80), ep("127.0.0.1", 80), True),
        (ep("0.0.0.0", 80), ep("0.0.0.0", 80), True),
        (ep("0.0.0.0", 80), ep("10.0.0.1", 80), True),
        (ep("::", 80), ep("::1", 80), True),
        (ep("::", 80), ep("::", 80), True),
        (ep("::1", 80), ep("::1", 80), True),
        (ep("127.0.0.1", 80), ep("127.0.0.2", 80), False),
        (ep("127.0.0.1", 80), ep("127.0.0.1", 81), False),
        (ep("0.0.0.0", 80), ep("0.0.0.0", 81), False),
        (ep("0.0.0.0", 80), ep("::", 80), False),
        (ep("0.0.0.0", 80), ep("::1", 80), False),
        (ep("127.0.0.1", 80), ep("::", 80), False),
        (ep("127.0.0.1", 80), ep("::1", 80), False),
        (ep("127.0.0.1", 0), ep("127.0.0.1", 0), False),
        (ep("0.0.0.0", 0), ep("127.0.0.1", 0), False),
        (ep("0.0.0.0", 0), ep("0.0.0.0", 0), False),
        (ep("::", 0), ep("::1", 0), False),
    ],
)
def test_endpoint_overlaps(a: Endpoint, b: Endpoint, overlap: bool) -> None:
    assert a.overlaps(b) is overlap
    assert b.overlaps(a) is overlap


# -- plan_services -------------------------------------------------------------------------------


def test_plan_with_default_ports_and_default_interfaces() -> None:
    (only,) = plan_services(config(), [info("echo", 5432)])
    assert only.service == "echo"
    assert only.module == "m"
    assert only.endpoints == [ep("0.0.0.0", 5432)]
    assert only.ports_key == "echo_ports"
    assert only.interfaces_key == "interfaces"
    assert only.info == info("echo", 5432)


def test_plan_every_interface_times_every_port() -> None:
    (only,) = plan_services(
        config('interfaces = ["127.0.0.1", "[::1]"]\n'), [info("echo", 5000, 5001)]
    )
    assert only.endpoints == [
        ep("127.0.0.1", 5000),
        ep("127.0.0.1", 5001),
        ep("::1", 5000),
        ep("::1", 5001),
    ]


def test_plan_config_overrides() -> None:
    plans = plan_services(
        config('interfaces = "127.0.0.1"\necho_ports = [6000, 6001]\nchat_interfaces = "::1"\n'),
        [info("echo", 5432), info("chat", 7000, module="chatmod"), info("kv", 6379)],
    )
    echo, chat, kv = plans
    assert echo.endpoints == [ep("127.0.0.1", 6000), ep("127.0.0.1", 6001)]
    assert (echo.ports_key, echo.interfaces_key) == ("echo_ports", "interfaces")
    assert chat.endpoints == [ep("::1", 7000)]
    assert chat.module == "chatmod"
    assert (chat.ports_key, chat.interfaces_key) == ("chat_ports", "chat_interfaces")
    assert kv.endpoints == [ep("127.0.0.1", 6379)]


def test_plan_removes_duplicate_endpoints() -> None:
    (only,) = plan_services(
        config('echo_interfaces = ["localhost", "127.0.0.1"]\necho_ports = [1, 1, 2]\n'),
        [info("echo", 5432)],
    )
    assert only.endpoints == [ep("127.0.0.1", 1), ep("127.0.0.1", 2)]


def test_plan_port_zero() -> None:
    (only,) = plan_services(config('interfaces = ["127.0.0.1"]\n'), [info("echo", 0)])
    assert only.endpoints == [ep("127.0.0.1", 0)]


def test_plan_missing_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        plan_services(config(), [info("echo", 5432), info("portless", module="pm")])
    message = str(caught.value)
    assert "\n" not in message
    for part in (PATH, "'portless'", "module 'pm'", "no default port", "portless_ports"):
        assert part in message


def test_plan_missing_default_port_filled_in_by_config() -> None:
    (only,) = plan_services(config("portless_ports = 7777\n"), [info("portless")])
    assert [e.port for e in only.endpoints] == [7777]


def test_plan_empty_input() -> None:
    assert plan_services(config(), []) == []


# -- find_conflicts ------------------------------------------------------------------------------


def test_no_conflicts() -> None:
    plans = [
        plan("a", ep("127.0.0.1", 80), ep("0.0.0.0", 81)),
        plan("b", ep("127.0.0.2", 80), ep("::", 81)),
        plan("c", ep("127.0.0.1", 0)),
        plan("d", ep("127.0.0.1", 0), ep("0.0.0.0", 0)),
    ]
    assert find_conflicts(plans) == []


def test_conflict_wildcard_against_specific_names_everything() -> None:
    plans = plan_services(
        config('echo_interfaces = "*"\nchat_interfaces = "127.0.0.1"\n'),
        [info("echo", 5000), info("chat", 5000)],
    )
    (message,) = find_conflicts(plans)
    assert "\n" not in message
    assert message.startswith("port conflict on 127.0.0.1:5000")
    for part in (
        "'echo' (0.0.0.0:5000)",
        "'chat' (127.0.0.1:5000)",
        "chat_ports",
        "chat_interfaces",
    ):
        assert part in message


def test_conflict_same_endpoint_from_defaults() -> None:
    plans = plan_services(config(), [info("echo", 5432), info("other", 5432)])
    (message,) = find_conflicts(plans)
    assert "0.0.0.0:5432" in message
    assert "'echo'" in message and "'other'" in message
    assert "change other_ports or interfaces in the config" in message


def test_conflict_ipv6() -> None:
    (message,) = find_conflicts([plan("a", ep("::", 9)), plan("b", ep("::1", 9))])
    assert "[::1]:9" in message and "[::]:9" in message


def test_every_conflicting_pair_is_reported() -> None:
    plans = [plan(name, ep("127.0.0.1", 1)) for name in ("a", "b", "c")]
    messages = find_conflicts(plans)
    assert len(messages) == 3
    pairs = {(m.split("'")[1], m.split("'")[3]) for m in messages}
    assert pairs == {("a", "b"), ("a", "c"), ("b", "c")}


def test_conflict_within_one_service_is_not_reported() -> None:
    assert find_conflicts([plan("a", ep("0.0.0.0", 1), ep("127.0.0.1", 1))]) == []


# -- PortLedger with real sockets ----------------------------------------------------------------


@pytest.fixture
def ledger() -> Iterator[PortLedger]:
    ledger = PortLedger(backlog=16)
    try:
        yield ledger
    finally:
        ledger.close_all()


@pytest.fixture
def other_sockets() -> Iterator[Callable[..., socket.socket]]:
    """Listening sockets that play "another process" (opened and closed by the test)."""
    opened: list[socket.socket] = []

    def listen(host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False) -> socket.socket:
        sock = socket.socket(V6 if ":" in host else V4, socket.SOCK_STREAM)
        opened.append(sock)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(4)
        return sock

    try:
        yield listen
    finally:
        for sock in opened:
            sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_closed(sock: socket.socket) -> bool:
    return sock.fileno() == -1


def test_apply_binds_one_socket_per_slot_on_one_port(ledger: PortLedger) -> None:
    plans = [plan("echo", ep("127.0.0.1", 0))]
    added = ledger.apply(plans, 3)
    assert len(added) == 1
    binding = added[0]
    assert binding.service == "echo"
    assert binding.endpoint == ep("127.0.0.1", 0)
    assert binding.port != 0
    assert binding.address == f"127.0.0.1:{binding.port}"
    assert not binding.adopted
    assert len(binding.sockets) == 3
    assert len({sock.fileno() for sock in binding.sockets}) == 3
    for sock in binding.sockets:
        assert sock.getsockname() == ("127.0.0.1", binding.port)
        assert sock.family == V4
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert not sock.get_inheritable()
    for slot in range(3):
        assert ledger.slot_sockets(slot) == {"echo": [(binding, binding.sockets[slot])]}
    assert ledger.slot_sockets(3) == {}
    assert ledger.all_sockets() == binding.sockets
    assert ledger.plans == plans
    assert ledger.describe() == [f"echo (module m) -> 127.0.0.1:{binding.port}"]


def test_applied_sockets_accept_connections(ledger: PortLedger) -> None:
    (binding,) = ledger.apply([plan("echo", ep("127.0.0.1", 0))], 2)
    with socket.create_connection(("127.0.0.1", binding.port), timeout=5):
        readable, _, _ = select.select(binding.sockets, [], [], 5)
        assert len(readable) == 1
        conn, _ = readable[0].accept()
        conn.close()


def test_apply_on_a_free_port(ledger: PortLedger) -> None:
    port = free_port()
    (binding,) = ledger.apply([plan("echo", ep("127.0.0.1", port))], 2)
    assert binding.port == port
    assert [sock.getsockname()[1] for sock in binding.sockets] == [port, port]


def test_apply_twice_keeps_the_sockets(ledger: PortLedger) -> None:
    port = free_port()
    plans = [plan("echo", ep("127.0.0.1", port)), plan("chat", ep("127.0.0.1", 0))]
    first = ledger.apply(plans, 2)
    sockets = ledger.all_sockets()
    assert ledger.apply(plans, 2) == []  # its own sockets are no conflict
    assert ledger.all_sockets() == sockets
    assert all(not is_closed(sock) for sock in sockets)
    assert len(first) == 2


def test_ensure_and_shrink_slots(ledger: PortLedger) -> None:
    (binding,) = ledger.apply([plan("echo", ep("127.0.0.1", 0))], 2)
    first_two = list(binding.sockets)
    ledger.ensure_slots(5)
    assert len(binding.sockets) == 5
    assert binding.sockets[:2] == first_two
    assert {sock.getsockname()[1] for sock in binding.sockets} == {binding.port}
    assert ledger.slot_sockets(4)["echo"] == [(binding, binding.sockets[4])]
    ledger.ensure_slots(3)  # never shrinks
    assert len(binding.sockets) == 5

    dropped = binding.sockets[2:]
    ledger.shrink_slots(2)
    assert binding.sockets == first_two
    assert all(is_closed(sock) for sock in dropped)
    assert all(not is_closed(sock) for sock in first_two)
    assert ledger.slot_sockets(2) == {}

    ledger.shrink_slots(0)  # slot 0 always stays
    assert binding.sockets == first_two[:1]
    assert is_closed(first_two[1])
    assert not is_closed(first_two[0])


def test_two_services_on_port_zero_get_their_own_ports(ledger: PortLedger) -> None:
    added = ledger.apply([plan("a", ep("127.0.0.1", 0)), plan("b", ep("127.0.0.1", 0))], 2)
    assert [b.service for b in added] == ["a", "b"]
    a, b = added
    assert a.port != b.port
    slot = ledger.slot_sockets(1)
    assert slot == {"a": [(a, a.sockets[1])], "b": [(b, b.sockets[1])]}
    assert ledger.describe() == [
        f"a (module m) -> 127.0.0.1:{a.port}",
        f"b (module m) -> 127.0.0.1:{b.port}",
    ]


def test_release_unplanned_after_plan_change(ledger: PortLedger) -> None:
    old_port, new_port = free_port(), free_port()
    ledger.apply(
        [plan("a", ep("127.0.0.1", old_port)), plan("b", ep("127.0.0.1", 0))],
        2,
    )
    a_old = list(ledger.slot_sockets(0)["a"][0][0].sockets)
    b_binding = ledger.slot_sockets(0)["b"][0][0]
    b_sockets = list(b_binding.sockets)

    # New plan: "a" moves to another port, "b" is gone.
    new_plans = [plan("a", ep("127.0.0.1", new_port))]
    added = ledger.apply(new_plans, 2)
    assert [binding.port for binding in added] == [new_port]
    # Until release_unplanned, the old sockets stay open (old workers may be draining).
    assert all(not is_closed(sock) for sock in a_old + b_sockets)

    released = ledger.release_unplanned()
    assert sorted((b.service, b.endpoint.port) for b in released) == [("a", old_port), ("b", 0)]
    assert all(is_closed(sock) for sock in a_old + b_sockets)
    assert ledger.slot_sockets(0) == {"a": [(added[0], added[0].sockets[0])]}
    assert ledger.release_unplanned() == []


def test_endpoint_moving_to_another_service_keeps_its_sockets(ledger: PortLedger) -> None:
    port = free_port()
    endpoint = ep("127.0.0.1", port)
    (binding,) = ledger.apply([plan("old", endpoint)], 2)
    sockets = list(binding.sockets)
    assert ledger.apply([plan("new", endpoint)], 2) == []
    assert ledger.slot_sockets(0) == {"new": [(binding, sockets[0])]}
    assert ledger.release_unplanned() == []
    assert all(not is_closed(sock) for sock in sockets)


def test_check_refuses_a_port_held_by_a_plain_socket(
    ledger: PortLedger, other_sockets: Callable[..., socket.socket]
) -> None:
    other = other_sockets()
    port = other.getsockname()[1]
    plans = [plan("echo", ep("127.0.0.1", port))]
    with pytest.raises(PortConflict) as caught:
        ledger.check(plans)
    message = str(caught.value)
    assert "\n" not in message
    for part in (
        f"'echo' cannot listen on 127.0.0.1:{port}",
        f"port {port} is already in use",
        f"pid {os.getpid()}",
        "echo_ports",
        "interfaces",
    ):
        assert part in message, (part, message)
    assert ledger.bindings == {}  # check() binds nothing


def test_check_refuses_a_port_shared_with_so_reuseport(
    ledger: PortLedger, other_sockets: Callable[..., socket.socket]
) -> None:
    """The "second mpnet" case: the other socket uses SO_REUSEPORT too, so the kernel would let
    us bind beside it and silently share its traffic; the ledger must refuse."""
    other = other_sockets(reuse_port=True)
    port = other.getsockname()[1]
    # What the ledger must not fall for: the kernel lets a second SO_REUSEPORT socket in.
    beside = other_sockets(port=port, reuse_port=True)
    assert beside.getsockname()[1] == port
    plans = [plan("echo", ep("127.0.0.1", port))]
    with pytest.raises(PortConflict) as caught:
        ledger.apply(plans, 1)
    message = str(caught.value)
    assert f"port {port} is already in use" in message
    assert f"pid {os.getpid()}" in message
    assert ledger.bindings == {}  # nothing stays bound after a refusal
    assert ledger.all_sockets() == []


def test_check_reports_plan_conflicts_first(ledger: PortLedger) -> None:
    plans = [plan("a", ep("0.0.0.0", 1)), plan("b", ep("127.0.0.1", 1))]
    with pytest.raises(PortConflict, match=re.escape("port conflict on 127.0.0.1:1: services 'a'")):
        ledger.check(plans)
    with pytest.raises(PortConflict):
        ledger.apply(plans, 1)
    assert ledger.bindings == {}


def test_check_no_such_local_address(ledger: PortLedger) -> None:
    plans = [plan("echo", ep("192.0.2.1", free_port()), interfaces_key="echo_interfaces")]
    with pytest.raises(PortConflict) as caught:
        ledger.check(plans)
    message = str(caught.value)
    assert "192.0.2.1" in message and "no such local address" in message
    assert "echo_interfaces" in message


def test_check_binds_nothing(ledger: PortLedger) -> None:
    port = free_port()
    ledger.check([plan("echo", ep("127.0.0.1", port))])
    assert ledger.bindings == {}
    with socket.socket() as sock:  # the probe left the port free
        sock.bind(("127.0.0.1", port))


def test_ipv6_loopback(ledger: PortLedger) -> None:
    if not ipv6_loopback_works():
        pytest.skip("no IPv6 loopback")
    (binding,) = ledger.apply([plan("echo", ep("::1", 0))], 2)
    assert binding.address == f"[::1]:{binding.port}"
    for sock in binding.sockets:
        assert sock.family == V6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getsockname()[1] == binding.port


def test_describe_before_binding() -> None:
    ledger = PortLedger()
    ledger.plans = [plan("echo", ep("127.0.0.1", 5432), ep("::1", 5432))]
    assert ledger.describe() == ["echo (module m) -> 127.0.0.1:5432, [::1]:5432"]


def test_close_all(ledger: PortLedger) -> None:
    ledger.apply([plan("a", ep("127.0.0.1", 0)), plan("b", ep("127.0.0.1", 0))], 3)
    sockets = ledger.all_sockets()
    assert len(sockets) == 6
    ledger.close_all()
    assert all(is_closed(sock) for sock in sockets)
    assert ledger.bindings == {}


def test_reload_from_loopback_to_wildcard_on_the_same_port(ledger: PortLedger) -> None:
    """Binds the wildcard address for a moment (nothing connects to it), on a port the kernel
    found free on every address: one free on 127.0.0.1 alone may be held on another (a
    connection from 127.0.0.2 in TIME_WAIT does it), which refuses the wildcard for good reason."""
    with socket.socket() as wildcard:
        wildcard.bind(("0.0.0.0", 0))
        port = wildcard.getsockname()[1]
    (binding,) = ledger.apply([plan("echo", ep("127.0.0.1", port))], 1)
    widened = [plan("echo", ep("0.0.0.0", binding.port))]
    ledger.apply(widened, 1)
    assert ledger.slot_sockets(0)["echo"][0][0].endpoint == ep("0.0.0.0", binding.port)
