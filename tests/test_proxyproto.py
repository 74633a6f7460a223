"""Tests for mpnet.pure.proxyproto: PROXY protocol v1/v2 parsing and the header builders.

Valid headers are built by hand here (not only with the builders under test), then fed whole,
one byte at a time and at every split position; malformed headers must be rejected with
ProxyProtocolError, early where the spec allows, and a seeded fuzz checks that mutated headers
never raise anything else nor make the parser wait past its maximum header size.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest

from mpnet.pure.proxyproto import (
    DEFAULT_MAX_V2_LENGTH,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeaderParser,
    ProxyProtocolError,
    ProxyResult,
    _crc32c,
    build_v1,
    build_v2,
)

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # from the spec, byte by byte
APP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def v2(ver_cmd: int, fam: int, payload: bytes) -> bytes:
    return SIG + bytes((ver_cmd, fam)) + struct.pack("!H", len(payload)) + payload


def tlv(tlv_type: int, value: bytes) -> bytes:
    return struct.pack("!BH", tlv_type, len(value)) + value


IPV4_BLOCK = bytes((192, 0, 2, 1, 198, 51, 100, 7)) + struct.pack("!HH", 56324, 443)
IPV6_BLOCK = (
    bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("fe800000000000000000000000000abc")
    + struct.pack("!HH", 65535, 0)
)
UNIX_BLOCK = b"/run/a.sock".ljust(108, b"\0") + b"\0abstract".ljust(108, b"\0")


def split_feeds(data: bytes, **options: object) -> Iterator[tuple[ProxyResult, bytes]]:
    """For each way of splitting ``data``, feed it and return (result, application bytes):
    the result's ``remaining`` followed by whatever was not fed yet."""
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    ways += [[data[:i], data[i:]] for i in range(len(data) + 1)]
    for chunks in ways:
        parser = ProxyHeaderParser(**options)  # type: ignore[arg-type]
        for index, chunk in enumerate(chunks):
            result = parser.feed(chunk)
            if result is not None:
                yield result, result.remaining + b"".join(chunks[index + 1 :])
                break
        else:
            raise AssertionError(f"no result after {chunks!r}")


def parse_every_split(header: bytes, **options: object) -> ProxyResult:
    """Parse ``header + APP`` at every split; all results must agree. Returns one of them."""
    first: ProxyResult | None = None
    for result, app in split_feeds(header + APP, **options):
        assert app == APP
        if first is None:
            first = result
        assert (result.version, result.command, result.family, result.transport) == (
            first.version,
            first.command,
            first.family,
            first.transport,
        )
        assert (result.source, result.destination, result.tlvs) == (
            first.source,
            first.destination,
            first.tlvs,
        )
        assert (result.source_path, result.destination_path) == (
            first.source_path,
            first.destination_path,
        )
    assert first is not None
    return first


def error_position(data: bytes, **options: object) -> tuple[int, str] | None:
    """Feed byte by byte; return (bytes fed when the error was raised, message), or None."""
    parser = ProxyHeaderParser(**options)  # type: ignore[arg-type]
    for i in range(len(data)):
        try:
            if parser.feed(data[i : i + 1]) is not None:
                return None
        except ProxyProtocolError as exc:
            return i + 1, str(exc)
    return None


def assert_rejected(data: bytes, match: str, at: int | None = None, **options: object) -> None:
    """Rejected whole, at every split, and byte by byte (at byte ``at`` if given)."""
    with pytest.raises(ProxyProtocolError, match=match):
        ProxyHeaderParser(**options).feed(data)  # type: ignore[arg-type]
    for i in range(len(data) + 1):
        parser = ProxyHeaderParser(**options)  # type: ignore[arg-type]
        with pytest.raises(ProxyProtocolError, match=match):
            assert parser.feed(data[:i]) is None
            parser.feed(data[i:])
    found = error_position(data, **options)
    assert found is not None
    if at is not None:
        assert found[0] == at, found


# -- valid v1 ----------------------------------------------------------------------------------


def test_signature_constant_matches_spec() -> None:
    assert V2_SIGNATURE == SIG
    assert V1_MAX_LENGTH == 107


@pytest.mark.parametrize(
    ("line", "family", "source", "destination"),
    [
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            "TCP4",
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
        ),
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            "TCP4",
            ("255.255.255.255", 65535),
            ("255.255.255.255", 65535),
        ),
        (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 1\r\n", "TCP4", ("0.0.0.0", 0), ("10.0.0.1", 1)),
        (
            b"PROXY TCP6 2001:db8::1 2001:DB8:0:0:0:0:0:2 4000 80\r\n",
            "TCP6",
            ("2001:db8::1", 4000),
            ("2001:db8::2", 80),
        ),
        (
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",  # 104 bytes, the max
            "TCP6",
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ),
        (b"PROXY TCP6 ::1 :: 1 2\r\n", "TCP6", ("::1", 1), ("::", 2)),
        (  # IPv4-mapped, as inet_ntop writes it: the client is the IPv4 address
            b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
            "TCP6",
            ("192.0.2.1", 1),  # shown as the IPv4 address it stands for
            ("::1", 2),
        ),
        (  # the same in hex groups, and on both sides
            b"PROXY TCP6 ::FFFF:c000:201 0:0:0:0:0:ffff:198.51.100.7 1 2\r\n",
            "TCP6",
            ("192.0.2.1", 1),
            ("198.51.100.7", 2),
        ),
        (  # not mapped: IPv4-compatible (deprecated) and NAT64 stay IPv6
            b"PROXY TCP6 ::c000:201 64:ff9b::c000:201 1 2\r\n",
            "TCP6",
            ("::c000:201", 1),
            ("64:ff9b::c000:201", 2),
        ),
    ],
)
def test_v1_tcp(line: bytes, family: str, source: tuple, destination: tuple) -> None:
    result = parse_every_split(line)
    assert (result.version, result.command, result.family, result.transport) == (
        1,
        "PROXY",
        family,
        "STREAM",
    )
    assert result.source == source
    assert result.destination == destination
    assert result.tlvs == ()
    assert result.source_path is None and not result.use_peer_address


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f::f ffff:f::f 65535 65535\r\n",
        b"PROXY UNKNOWN anything at all \x00\xff goes here\r\n",
        b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n",  # exactly 107 bytes
    ],
)
def test_v1_unknown(line: bytes) -> None:
    result = parse_every_split(line)
    assert (result.version, result.command, result.family) == (1, "PROXY", "UNKNOWN")
    assert result.source is None and result.destination is None
    assert result.use_peer_address


def test_v1_header_alone_and_remaining_empty() -> None:
    result = ProxyHeaderParser().feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    assert result is not None and result.remaining == b""


# -- valid v2 ----------------------------------------------------------------------------------


def test_v2_tcp4() -> None:
    result = parse_every_split(v2(0x21, 0x11, IPV4_BLOCK))
    assert (result.version, result.command, result.family, result.transport) == (
        2,
        "PROXY",
        "TCP4",
        "STREAM",
    )
    assert result.source == ("192.0.2.1", 56324)
    assert result.destination == ("198.51.100.7", 443)
    assert result.tlvs == ()


def test_v2_tcp6() -> None:
    result = parse_every_split(v2(0x21, 0x21, IPV6_BLOCK))
    assert result.family == "TCP6"
    assert result.source == ("2001:db8::1", 65535)
    assert result.destination == ("fe80::abc", 0)


def test_v2_ipv4_mapped_addresses_are_given_as_ipv4() -> None:
    block = (
        bytes.fromhex("00000000000000000000ffff") + bytes((192, 0, 2, 1))
        + bytes.fromhex("00000000000000000000ffff") + bytes((198, 51, 100, 7))
        + struct.pack("!HH", 56324, 443)
    )  # fmt: skip
    for fam, family in ((0x21, "TCP6"), (0x22, "UDP6")):
        result = parse_every_split(v2(0x21, fam, block))
        assert result.family == family
        assert result.source == ("192.0.2.1", 56324)
        assert result.destination == ("198.51.100.7", 443)


def test_v2_tcp6_ipv4_mapped_is_shown_as_ipv4() -> None:
    mapped = bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 7])
    block = mapped + bytes(15) + b"\x01" + struct.pack("!HH", 4444, 80)
    result = parse_every_split(v2(0x21, 0x21, block))
    assert result.family == "TCP6"
    assert result.source == ("203.0.113.7", 4444)
    assert result.destination == ("::1", 80)  # not mapped: unchanged


def test_v2_udp() -> None:
    assert parse_every_split(v2(0x21, 0x12, IPV4_BLOCK)).family == "UDP4"
    result = parse_every_split(v2(0x21, 0x22, IPV6_BLOCK))
    assert (result.family, result.transport) == ("UDP6", "DGRAM")
    assert result.source == ("2001:db8::1", 65535)


@pytest.mark.parametrize(("fam", "transport"), [(0x31, "STREAM"), (0x32, "DGRAM")])
def test_v2_unix(fam: int, transport: str) -> None:
    result = parse_every_split(v2(0x21, fam, UNIX_BLOCK))
    assert (result.family, result.transport) == ("UNIX", transport)
    assert result.source is None and result.destination is None
    assert result.source_path == b"/run/a.sock"
    assert result.destination_path == b"\0abstract"
    assert not result.use_peer_address


def test_v2_unix_path_cut_at_first_nul_and_full_length() -> None:
    block = b"/a\0junk".ljust(108, b"\0") + b"p" * 108
    result = parse_every_split(v2(0x21, 0x31, block))
    assert result.source_path == b"/a"
    assert result.destination_path == b"p" * 108


def test_v2_local() -> None:
    result = parse_every_split(v2(0x20, 0x00, b""))
    assert (result.version, result.command, result.family, result.transport) == (
        2,
        "LOCAL",
        "UNKNOWN",
        "UNSPEC",
    )
    assert result.source is None and result.destination is None and result.use_peer_address


@pytest.mark.parametrize(
    "fam_and_block",
    [
        (0x11, IPV4_BLOCK),  # addresses present: ignored
        (0x11, b"\x01\x02"),  # too short for the family: ignored too
        (0x77, b"whatever"),  # unknown family: "discard the protocol block including the family"
        (0x00, b"\x01\x00\x09 truncated TLV"),  # TLVs that do not parse: dropped
    ],
)
def test_v2_local_ignores_the_block(fam_and_block: tuple[int, bytes]) -> None:
    fam, block = fam_and_block
    result = parse_every_split(v2(0x20, fam, block))
    assert (result.command, result.family, result.source, result.tlvs) == (
        "LOCAL",
        "UNKNOWN",
        None,
        (),
    )


def test_v2_local_keeps_tlvs() -> None:
    result = parse_every_split(v2(0x20, 0x00, tlv(PP2_TYPE_AUTHORITY, b"example.com")))
    assert result.tlvs == ((PP2_TYPE_AUTHORITY, b"example.com"),)


def test_v2_proxy_unspec_is_unknown() -> None:
    result = parse_every_split(v2(0x21, 0x00, tlv(PP2_TYPE_ALPN, b"h2")))
    assert (result.command, result.family, result.source) == ("PROXY", "UNKNOWN", None)
    assert result.tlvs == ((PP2_TYPE_ALPN, b"h2"),)
    # Its address information is to be ignored, so a block that is not TLVs is no error.
    result = parse_every_split(v2(0x21, 0x00, b"\x01\x00"))
    assert (result.command, result.family, result.tlvs) == ("PROXY", "UNKNOWN", ())


def test_v2_tlvs() -> None:
    tlvs = (
        tlv(PP2_TYPE_ALPN, b"h2")
        + tlv(PP2_TYPE_AUTHORITY, b"example.com")
        + tlv(PP2_TYPE_NOOP, b"")
        + tlv(PP2_TYPE_UNIQUE_ID, bytes(range(128)))
        + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))
        + tlv(0xE0, b"custom")
        + tlv(PP2_TYPE_ALPN, b"dup")
    )
    result = parse_every_split(v2(0x21, 0x11, IPV4_BLOCK + tlvs))
    assert result.source == ("192.0.2.1", 56324)
    assert result.tlvs == (
        (PP2_TYPE_ALPN, b"h2"),
        (PP2_TYPE_AUTHORITY, b"example.com"),
        (PP2_TYPE_NOOP, b""),
        (PP2_TYPE_UNIQUE_ID, bytes(range(128))),
        (0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3")),
        (0xE0, b"custom"),
        (PP2_TYPE_ALPN, b"dup"),
    )
    assert result.tlv(PP2_TYPE_ALPN) == b"h2"  # the first of duplicates
    assert result.tlv(PP2_TYPE_AUTHORITY) == b"example.com"
    assert result.tlv(0x30) is None


def with_crc(header: bytes) -> bytes:
    """Append a CRC32C TLV to a v2 header (fixing its length) and fill in the checksum."""
    header = header[:14] + struct.pack("!H", len(header) - 16 + 7) + header[16:]
    header += tlv(PP2_TYPE_CRC32C, b"\0\0\0\0")
    return header[:-4] + struct.pack("!I", _crc32c(header))


def test_crc32c_reference_vector() -> None:
    # The CRC-32C check value (RFC 3720 / iSCSI): crc32c(b"123456789") == 0xE3069283.
    assert _crc32c(b"123456789") == 0xE3069283
    assert _crc32c(b"") == 0
    assert _crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_v2_crc32c_verified() -> None:
    header = with_crc(v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_ALPN, b"h2")))
    result = parse_every_split(header)
    assert result.tlv(PP2_TYPE_ALPN) == b"h2"
    assert result.tlv(PP2_TYPE_CRC32C) == header[-4:]
    corrupt = bytearray(header)
    corrupt[19] ^= 0x01  # flip a bit of the source address
    assert_rejected(bytes(corrupt), "CRC32C checksum mismatch", at=len(header))
    # Without verification the corrupt header is accepted as it is.
    result = ProxyHeaderParser(verify_crc32c=False).feed(bytes(corrupt))
    assert result is not None and result.source == ("192.0.2.0", 56324)


def test_v2_crc32c_mismatch_rejects_local_too() -> None:
    header = bytearray(with_crc(v2(0x20, 0x00, tlv(PP2_TYPE_ALPN, b"h2"))))
    parse_every_split(bytes(header))
    header[-1] ^= 0xFF
    assert_rejected(bytes(header), "CRC32C checksum mismatch")


def test_v2_full_length_when_allowed() -> None:
    payload = IPV4_BLOCK + tlv(PP2_TYPE_NOOP, b"\0" * (0xFFFF - 12 - 3))
    header = v2(0x21, 0x11, payload)
    assert len(header) == 16 + 0xFFFF
    result = ProxyHeaderParser(max_v2_length=0xFFFF).feed(header + b"x")
    assert result is not None and result.remaining == b"x"
    assert_rejected(header[:40], "exceeds the limit of 4096", at=16)


# -- malformed input, and how early it is caught ---------------------------------------------


@pytest.mark.parametrize(
    ("data", "at"),
    [
        (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", 1),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 1),  # TLS ClientHello
        (b"SSH-2.0-OpenSSH_9.6\r\n", 1),
        (b"*1\r\n$4\r\nPING\r\n", 1),  # RESP
        (b"\x00" * 40, 1),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 1),  # case matters
        (b"PRoXY TCP4", 3),
        (b"PROXYTCP4 1.2.3.4", 6),
        (b"PROXY  TCP4 1.2.3.4", 7),
        (b"PROXY GET / HTTP/1.1\r\n", 7),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", 10),
        (b"PROXY TCP4\r\n", 11),
        (b"PROXY UNKNOWNX\r\n", 14),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", 8),  # "U" could still start "UNKNOWN"
        (b"\r\n\r\nGET /", 5),
        (b"\r\nGET /", 3),
        (b"\r\n\r\n\x00\r\nQUIx\n", 11),
    ],
)
def test_garbage_is_rejected_early(data: bytes, at: int) -> None:
    found = error_position(data)
    assert found is not None
    assert found[0] == at, found
    assert "signature" in found[1] or "protocol" in found[1]


V1_MALFORMED: list[tuple[bytes, str]] = [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "LF without CR"),
    (b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n", "LF without CR"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CR not followed by LF"),
    (b"PROXY UNKNOWN\rX\r\n", "CR not followed by LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "single spaces"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "single spaces"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "single spaces"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "single spaces"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad TCP4 source address"),  # leading zero
    (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "bad TCP4 destination address"),
    (b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "bad destination port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 x\r\n", "bad destination port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "bad destination port"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad TCP6 source address"),
    (b"PROXY TCP6 ::1 ::1%eth0 1 2\r\n", "bad TCP6 destination address"),
    (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad TCP6 source address"),
    (b"PROXY TCP6 ::g ::1 1 2\r\n", "bad TCP6 source address"),
    (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "bad TCP6 source address"),
]


@pytest.mark.parametrize(("data", "match"), V1_MALFORMED)
def test_v1_malformed(data: bytes, match: str) -> None:
    assert_rejected(data + APP, match)


def test_v1_line_too_long_decided_at_107_bytes() -> None:
    # CRLF would end at byte 108: rejected as soon as byte 107 arrives (no CRLF within 107).
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n"
    assert len(line) == V1_MAX_LENGTH + 1
    assert_rejected(line, "no CRLF within the first 107 bytes", at=V1_MAX_LENGTH)
    assert_rejected(b"PROXY UNKNOWN " + b"y" * 500, "no CRLF", at=V1_MAX_LENGTH)
    long_ipv6 = b"PROXY TCP6 " + b"0000:" * 20
    assert_rejected(long_ipv6, "no CRLF", at=V1_MAX_LENGTH)


V2_MALFORMED: list[tuple[bytes, str, int]] = [
    (SIG[:12] + b"\x11\x11\x00\x0c" + IPV4_BLOCK, "unsupported version 1", 13),
    (SIG[:12] + b"\x31\x11\x00\x0c" + IPV4_BLOCK, "unsupported version 3", 13),
    (SIG[:12] + b"\x01\x11\x00\x0c" + IPV4_BLOCK, "unsupported version 0", 13),
    (SIG[:12] + b"\x22\x11\x00\x0c" + IPV4_BLOCK, "unsupported command 2", 13),
    (SIG[:12] + b"\x2f\x11\x00\x0c" + IPV4_BLOCK, "unsupported command 15", 13),
    (v2(0x21, 0x10, IPV4_BLOCK), "family/transport 0x10", 14),
    (v2(0x21, 0x13, IPV4_BLOCK), "family/transport 0x13", 14),
    (v2(0x21, 0x01, IPV4_BLOCK), "family/transport 0x01", 14),
    (v2(0x21, 0x41, IPV4_BLOCK), "family/transport 0x41", 14),
    (v2(0x21, 0x11, IPV4_BLOCK[:11]), "shorter than the 12 that TCP4 needs", 16),
    (v2(0x21, 0x21, IPV4_BLOCK), "shorter than the 36 that TCP6 needs", 16),
    (v2(0x21, 0x31, IPV6_BLOCK), "shorter than the 216 that UNIX needs", 16),
    (v2(0x21, 0x11, b""), "shorter than the 12", 16),
    (SIG + b"\x21\x11\x10\x01", "header length 4097 exceeds the limit of 4096", 16),
    (SIG + b"\x21\x11\xff\xff", "header length 65535 exceeds", 16),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x01"), "truncated TLV header", 29),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00"), "truncated TLV header", 30),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00\x05abcd"), "overruns the header", 35),
    (v2(0x21, 0x11, IPV4_BLOCK + tlv(1, b"a") + b"\x02\xff\xff"), "TLV 0x02", 35),
    (v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, b"abc")), "CRC32C TLV of 3 bytes", 34),
    (
        v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, b"abcd") * 2),
        "more than one CRC32C TLV",
        42,
    ),
]


@pytest.mark.parametrize(("data", "match", "at"), V2_MALFORMED)
def test_v2_malformed(data: bytes, match: str, at: int) -> None:
    assert_rejected(data + APP, match, at=at)


def test_v2_length_cap_is_configurable() -> None:
    header = v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_NOOP, b"\0" * 100))
    assert ProxyHeaderParser(max_v2_length=115).feed(header) is not None
    assert_rejected(header, "header length 115 exceeds the limit of 114", at=16, max_v2_length=114)


def test_version_selection() -> None:
    v1_line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    v2_header = v2(0x21, 0x11, IPV4_BLOCK)
    assert ProxyHeaderParser(accept_v2=False).feed(v1_line) is not None
    assert ProxyHeaderParser(accept_v1=False).feed(v2_header) is not None
    assert_rejected(v1_line, "bad signature", at=1, accept_v1=False)
    assert_rejected(v2_header, "bad signature", at=1, accept_v2=False)
    assert ProxyHeaderParser(accept_v2=False).max_header_size == V1_MAX_LENGTH
    assert ProxyHeaderParser().max_header_size == 16 + DEFAULT_MAX_V2_LENGTH
    assert ProxyHeaderParser(accept_v2=True, max_v2_length=50).max_header_size == V1_MAX_LENGTH


def test_constructor_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        ProxyHeaderParser(accept_v1=False, accept_v2=False)
    with pytest.raises(ValueError):
        ProxyHeaderParser(max_v2_length=0x10000)
    with pytest.raises(ValueError):
        ProxyHeaderParser(max_v2_length=-1)


def test_parser_is_spent_after_result_or_error() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"PROXY UNKNOWN\r\nabc") is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"more")
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError, match="bad signature"):
        parser.feed(b"HELLO")
    with pytest.raises(ProxyProtocolError, match="bad signature"):
        parser.feed(b"PROXY UNKNOWN\r\n")


def test_empty_feed_and_partial_headers_wait() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None
    result = parser.feed(b"\n")
    assert result is not None and result.remaining == b""
    parser = ProxyHeaderParser()
    header = v2(0x21, 0x11, IPV4_BLOCK)
    assert parser.feed(memoryview(header[:-1])) is None
    assert parser.feed(bytearray(header[-1:] + b"app")) is not None


# -- builders ----------------------------------------------------------------------------------


def test_build_v1() -> None:
    assert build_v1() == b"PROXY UNKNOWN\r\n"
    assert build_v1(("192.0.2.1", 56324), ("192.0.2.11", 443)) == (
        b"PROXY TCP4 192.0.2.1 192.0.2.11 56324 443\r\n"
    )
    assert build_v1(("2001:db8::1", 1), ("::1", 65535)) == b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n"
    for source, destination in [
        (("1.2.3.4", 1), ("::1", 2)),
        (("1.2.3.4", -1), ("5.6.7.8", 2)),
        (("1.2.3.4", 1), ("5.6.7.8", 65536)),
        (("1.2.3.4", 1), ("5.6.7.8", "80")),
        (("not an ip", 1), ("5.6.7.8", 2)),
        (("1.2.3.4", 1), None),
        (("fe80::1%eth0", 1), ("::1", 2)),
    ]:
        with pytest.raises(ValueError):
            build_v1(source, destination)  # type: ignore[arg-type]


def test_build_v2_matches_hand_built_headers() -> None:
    assert build_v2(("192.0.2.1", 56324), ("198.51.100.7", 443)) == v2(0x21, 0x11, IPV4_BLOCK)
    assert build_v2(("2001:db8::1", 65535), ("fe80::abc", 0)) == v2(0x21, 0x21, IPV6_BLOCK)
    assert build_v2(("192.0.2.1", 56324), ("198.51.100.7", 443), transport="DGRAM") == v2(
        0x21, 0x12, IPV4_BLOCK
    )
    assert build_v2(source_path=b"/run/a.sock", destination_path=b"\0abstract") == v2(
        0x21, 0x31, UNIX_BLOCK
    )
    assert build_v2(command="LOCAL") == v2(0x20, 0x00, b"")
    assert build_v2() == v2(0x21, 0x00, b"")
    assert build_v2(tlvs=[(PP2_TYPE_ALPN, b"h2")]) == v2(0x21, 0x00, tlv(PP2_TYPE_ALPN, b"h2"))


def test_build_v2_crc32c() -> None:
    header = build_v2(("192.0.2.1", 56324), ("198.51.100.7", 443), crc32c=True)
    assert header == with_crc(v2(0x21, 0x11, IPV4_BLOCK))
    assert parse_every_split(header).source == ("192.0.2.1", 56324)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"source": ("1.2.3.4", 1)},
        {"source": ("1.2.3.4", 1), "destination": ("::1", 2)},
        {"source": ("1.2.3.4", 70000), "destination": ("5.6.7.8", 2)},
        {"source": ("1.2.3.4", 1), "destination": ("5.6.7.8", 2), "source_path": b"/x"},
        {"source_path": b"x" * 109},
        {"command": "HEALTH"},
        {"transport": "RAW"},
        {"tlvs": [(256, b"")]},
        {"tlvs": [(-1, b"")]},
        {"tlvs": [(1, b"x" * 0x10000)]},
        {"tlvs": [(1, b"x" * 0x8000), (2, b"x" * 0x8000)]},
    ],
)
def test_build_v2_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_v2(**kwargs)


def test_builders_round_trip() -> None:
    cases = [
        (build_v1(("10.1.2.3", 5), ("10.3.2.1", 6)), "TCP4"),
        (build_v1(("::ffff:10.1.2.3", 5), ("1::", 6)), "TCP6"),
        (build_v2(("10.1.2.3", 5), ("10.3.2.1", 6), tlvs=[(0xE5, b"v")], crc32c=True), "TCP4"),
        (build_v2(("::1", 5), ("::2", 6), transport="DGRAM"), "UDP6"),
        (build_v2(source_path=b"/s"), "UNIX"),
        (build_v2(("10.1.2.3", 5), ("10.3.2.1", 6), command="LOCAL"), "UNKNOWN"),
    ]
    for header, family in cases:
        assert parse_every_split(header).family == family


# -- fuzz --------------------------------------------------------------------------------------


def fuzz_seeds() -> list[bytes]:
    return [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 65535 0\r\n",
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f::f ffff:f::f 65535 65535\r\n",
        v2(0x21, 0x11, IPV4_BLOCK),
        v2(0x21, 0x21, IPV6_BLOCK + tlv(PP2_TYPE_ALPN, b"h2")),
        v2(0x20, 0x00, b""),
        v2(0x21, 0x32, UNIX_BLOCK),
        with_crc(v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_AUTHORITY, b"example.com"))),
        with_crc(v2(0x20, 0x00, tlv(PP2_TYPE_UNIQUE_ID, b"id"))),
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(8)
        i = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            j = rng.randrange(len(buf))
            buf[j] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # replace a byte, often with a "meaningful" one
            j = rng.randrange(len(buf))
            buf[j] = rng.choice([0, 0x0A, 0x0D, 0x20, 0x3A, 0x2E, 0x30, 0xFF, rng.randrange(256)])
        elif op == 2:  # insert bytes
            buf[i:i] = rng.randbytes(rng.randrange(1, 4))
        elif op == 3 and buf:  # delete bytes
            del buf[i : i + rng.randrange(1, 4)]
        elif op == 4:  # truncate
            del buf[i:]
        elif op == 5:  # append garbage (application data or not)
            buf += rng.randbytes(rng.randrange(1, 40))
        elif op == 6 and len(buf) >= 16 and buf[:12] == SIG:  # rewrite the v2 length
            buf[14:16] = struct.pack(
                "!H", rng.choice([0, 1, 11, 12, 36, 216, rng.randrange(65536)])
            )
        elif op == 7:  # duplicate a slice
            j = rng.randrange(len(buf) + 1)
            buf[i:i] = buf[min(i, j) : max(i, j)][:64]
    return bytes(buf)


def outcome_byte_by_byte(data: bytes) -> tuple[str, object, int]:
    """Feed one byte at a time: ("result", result, n) / ("error", message, n) / ("wait", None,
    n), n being the bytes fed when the parser decided (or all of them)."""
    parser = ProxyHeaderParser()
    for i in range(len(data)):
        try:
            result = parser.feed(data[i : i + 1])
        except ProxyProtocolError as exc:
            return "error", str(exc), i + 1
        if result is not None:
            return "result", result, i + 1
    return "wait", None, len(data)


def outcome_at_once(data: bytes) -> tuple[str, object]:
    try:
        result = ProxyHeaderParser().feed(data)
    except ProxyProtocolError as exc:
        return "error", str(exc)
    return ("wait", None) if result is None else ("result", result)


def test_fuzz_mutated_headers() -> None:
    """Mutations of valid headers: only ProxyProtocolError ever escapes, the verdict does not
    depend on how the bytes arrive, and no decision needs more than max_header_size bytes."""
    rng = random.Random(20240229)
    seeds = fuzz_seeds()
    limit = ProxyHeaderParser().max_header_size
    seen = {"result": 0, "error": 0, "wait": 0}
    for _ in range(3000):
        data = mutate(rng, rng.choice(seeds))
        kind, value, decided_at = outcome_byte_by_byte(data)
        seen[kind] += 1
        assert decided_at <= limit
        if kind == "wait":
            assert len(data) < limit
        whole_kind, whole_value = outcome_at_once(data)
        assert whole_kind == kind, data
        if kind == "error":
            assert whole_value == value, data
        elif kind == "result":
            assert isinstance(value, ProxyResult) and isinstance(whole_value, ProxyResult)
            assert value.remaining == b""
            assert whole_value.remaining == data[decided_at:]
            assert (whole_value.family, whole_value.source, whole_value.tlvs) == (
                value.family,
                value.source,
                value.tlvs,
            )
    # The mutations exercised every outcome, not just rejections.
    assert min(seen.values()) > 100, seen


def test_fuzz_random_bytes_after_signatures() -> None:
    rng = random.Random(7)
    limit = ProxyHeaderParser().max_header_size
    for _ in range(1500):
        prefix = rng.choice(
            [b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY UNKNOWN", SIG, SIG + b"!"]
        )
        data = prefix + rng.randbytes(rng.randrange(0, 300))
        kind, _, decided_at = outcome_byte_by_byte(data)
        assert decided_at <= limit
        assert outcome_at_once(data)[0] == kind
