"""HAProxy PROXY protocol, versions 1 (text) and 2 (binary): a sans-IO header parser and builders.

A load balancer in front of mpnet (HAProxy, nginx stream, AWS NLB, ...) can prepend a PROXY
header to each connection, so the service sees the real client address instead of the balancer's.
Feed the first bytes of a connection into a :class:`ProxyHeaderParser`; it answers None until the
header is complete, then a :class:`ProxyResult` whose ``remaining`` bytes belong to the
application. Reference: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

Security, from the spec: only enable this on listeners that trusted proxies connect to, and
always require the header there (never guess whether it is present), or any client can spoof
its address.

Decisions the spec leaves open, made here:

* Partial headers are accepted (the spec recommends tolerance); the parser decides after at
  most :attr:`ProxyHeaderParser.max_header_size` bytes, and rejects garbage as soon as the bytes
  received cannot start a valid header (``GET / HTTP/1.1`` fails on its first byte).
* ``family`` is a string: ``"TCP4"``, ``"TCP6"``, ``"UDP4"``, ``"UDP6"`` (v2 datagram),
  ``"UNIX"`` (v2 AF_UNIX, stream or datagram, see ``transport``) or ``"UNKNOWN"``.
  ``source``/``destination`` are ``(ip, port)`` with ``ip`` in ``ipaddress``'s textual form,
  only for the four IP families. An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a
  dual-stack balancer sends for an IPv4 client) is given as its IPv4 address (``192.0.2.1``):
  that is the client, and its text would otherwise differ between Python versions (3.13 writes
  ``::ffff:192.0.2.1``, earlier ones ``::ffff:c000:201``); ``family`` stays what the header
  said. For ``"UNIX"`` they are None and the socket paths are in ``source_path``/
  ``destination_path``. For ``"UNKNOWN"`` (v1 ``UNKNOWN``, v2 ``LOCAL``, v2
  AF_UNSPEC) they are None: use the connection's real peer address.
* v2 ``LOCAL`` (health checks): the spec says to ignore the address block including the
  family, so any family byte is accepted and ``family`` is ``"UNKNOWN"``. The same holds for
  ``PROXY`` with AF_UNSPEC, whose address information is to be ignored. In both cases TLVs are
  still returned when they can be located and parsed, and dropped (not an error) otherwise;
  a CRC32C mismatch is still an error.
* v2 ``PROXY`` is strict: only the family/transport bytes listed in the spec, an address block
  at least as long as the family needs, well-formed TLVs.
* v2 length is capped (``max_v2_length``, 4096 by default rather than the 65535 the field
  allows), so a peer cannot make us buffer 64 KiB before we decide; real headers, TLVs
  included, are a few hundred bytes.
* A ``PP2_TYPE_CRC32C`` TLV is verified (``verify_crc32c=True``) as the spec requires of
  receivers that support it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_V2_LENGTH",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "Address",
    "ProxyHeaderParser",
    "ProxyProtocolError",
    "ProxyResult",
    "build_v1",
    "build_v2",
]

V1_MAX_LENGTH = 107
"""Longest v1 line, CRLF included (the spec's worst case, ``PROXY UNKNOWN`` + IPv6 fields)."""

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16  # signature, version/command, family/transport, length
DEFAULT_MAX_V2_LENGTH = 4096
"""Default cap on the v2 length field (bytes after the 16-byte fixed part)."""

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

_V1_PREFIX = b"PROXY "
# What may follow "PROXY ": the family token and the byte after it.
_V1_TOKENS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
# Family/transport byte -> (family, transport, address block length); the spec's full list.
_V2_FAMILIES = {
    0x00: ("UNKNOWN", "UNSPEC", 0),
    0x11: ("TCP4", "STREAM", 12),
    0x12: ("UDP4", "DGRAM", 12),
    0x21: ("TCP6", "STREAM", 36),
    0x22: ("UDP6", "DGRAM", 36),
    0x31: ("UNIX", "STREAM", 216),
    0x32: ("UNIX", "DGRAM", 216),
}
_UNIX_PATH_LENGTH = 108

Address = tuple[str, int]
"""``(ip, port)``, ip as text, e.g. ``("192.0.2.1", 56324)`` or ``("2001:db8::1", 443)``."""


class ProxyProtocolError(Exception):
    """The bytes are not a valid PROXY header; ``str(exc)`` says why. Close the connection."""


@dataclass(frozen=True, slots=True)
class ProxyResult:
    """A parsed PROXY header.

    ``version``: 1 or 2. ``command``: ``"PROXY"`` or ``"LOCAL"`` (v2 only). ``family`` /
    ``transport`` (``"STREAM"``, ``"DGRAM"``, ``"UNSPEC"``): see the module docstring. ``tlvs``:
    v2 type-length-value extensions in wire order as ``(type, value)``, duplicates and
    ``PP2_TYPE_NOOP`` kept; empty for v1. ``remaining``: bytes received after the header, which
    belong to the application.
    """

    version: int
    command: str
    family: str
    transport: str
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...]
    remaining: bytes
    source_path: bytes | None = None
    destination_path: bytes | None = None

    @property
    def use_peer_address(self) -> bool:
        """True when the header conveys no address (v1 UNKNOWN, v2 LOCAL or AF_UNSPEC): use the
        connection's real endpoints, as if there had been no header."""
        return self.source is None and self.source_path is None

    def tlv(self, tlv_type: int) -> bytes | None:
        """Value of the first TLV of this type, or None."""
        for t, value in self.tlvs:
            if t == tlv_type:
                return value
        return None


class ProxyHeaderParser:
    """Incremental parser for one connection's PROXY header (v1 and/or v2).

    Contract: :meth:`feed` returns None while more bytes are needed and a :class:`ProxyResult`
    once the header is complete; it raises :class:`ProxyProtocolError` as soon as the bytes
    seen cannot be the start of a valid header, and never buffers more than
    :attr:`max_header_size` bytes before deciding. The outcome does not depend on how the
    input is split. After a result or an error the parser is spent: feeding again raises
    RuntimeError after a result, and the same ProxyProtocolError after an error.

    ``accept_v1`` / ``accept_v2`` restrict the accepted versions; ``max_v2_length`` caps the v2
    length field (0..65535); ``verify_crc32c`` checks a CRC32C TLV when one is present.
    """

    __slots__ = (
        "_accept_v1",
        "_accept_v2",
        "_buf",
        "_done",
        "_error",
        "_max_v2_length",
        "_verify_crc32c",
    )

    def __init__(
        self,
        *,
        accept_v1: bool = True,
        accept_v2: bool = True,
        max_v2_length: int = DEFAULT_MAX_V2_LENGTH,
        verify_crc32c: bool = True,
    ) -> None:
        if not accept_v1 and not accept_v2:
            raise ValueError("accept at least one PROXY protocol version")
        if not 0 <= max_v2_length <= 0xFFFF:
            raise ValueError("max_v2_length must be within 0..65535")
        self._accept_v1 = accept_v1
        self._accept_v2 = accept_v2
        self._max_v2_length = max_v2_length
        self._verify_crc32c = verify_crc32c
        self._buf = bytearray()
        self._done = False
        self._error: str | None = None

    @property
    def max_header_size(self) -> int:
        """Most bytes the parser may need before it returns a result or raises."""
        return max(
            V1_MAX_LENGTH if self._accept_v1 else 0,
            V2_FIXED_LENGTH + self._max_v2_length if self._accept_v2 else 0,
        )

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyResult | None:
        """Add received bytes; return the result once the header is complete, else None."""
        if self._error is not None:
            raise ProxyProtocolError(self._error)
        if self._done:
            raise RuntimeError("the PROXY header was already parsed")
        self._buf += data
        try:
            result = self._parse()
        except ProxyProtocolError as exc:
            self._error = str(exc)
            self._buf = bytearray()
            raise
        if result is not None:
            self._done = True
            self._buf = bytearray()
        return result

    def _parse(self) -> ProxyResult | None:
        buf = self._buf
        if not buf:
            return None
        if self._accept_v2 and buf[0] == 0x0D:
            return self._parse_v2(buf)
        if self._accept_v1 and buf[0] == 0x50:  # "P"
            return self._parse_v1(buf)
        raise ProxyProtocolError("not a PROXY protocol header (bad signature)")

    # -- version 1 ---------------------------------------------------------------------------

    def _parse_v1(self, buf: bytearray) -> ProxyResult | None:
        n = len(buf)
        if buf[:6] != _V1_PREFIX[:n]:
            raise ProxyProtocolError("not a PROXY protocol header (bad signature)")
        if n > 6:
            token = buf[6:14]
            if not any(token[: len(t)] == t[: len(token)] for t in _V1_TOKENS):
                raise ProxyProtocolError("v1: unsupported protocol, expected TCP4, TCP6 or UNKNOWN")
        # The line must end in CRLF within the first 107 bytes; a lone CR or LF is an error.
        # Each check looks only at bytes up to the first CR/LF, so the verdict is the same
        # whether the bytes came one by one or all at once.
        window = buf[:V1_MAX_LENGTH]
        cr = window.find(b"\r")
        lf = window.find(b"\n")
        if lf >= 0 and (cr < 0 or lf < cr):
            raise ProxyProtocolError("v1: line ends in LF without CR")
        if cr < 0 or cr + 2 > V1_MAX_LENGTH:
            if n >= V1_MAX_LENGTH:
                raise ProxyProtocolError("v1: no CRLF within the first 107 bytes")
            return None
        if cr + 1 >= n:
            return None
        if buf[cr + 1] != 0x0A:
            raise ProxyProtocolError("v1: CR not followed by LF")
        line = bytes(buf[:cr])
        remaining = bytes(buf[cr + 2 :])
        fields = line.split(b" ")
        protocol = fields[1]
        if protocol == b"UNKNOWN":
            # The spec: the receiver must ignore anything before the CRLF.
            return ProxyResult(1, "PROXY", "UNKNOWN", "UNSPEC", None, None, (), remaining)
        if len(fields) != 6:
            raise ProxyProtocolError(
                "v1: expected 'PROXY <family> <src> <dst> <srcport> <dstport>'"
                " separated by single spaces"
            )
        family = protocol.decode("ascii")
        parse_ip = _v1_ipv4 if family == "TCP4" else _v1_ipv6
        source = (parse_ip(fields[2], "source"), _v1_port(fields[4], "source"))
        destination = (parse_ip(fields[3], "destination"), _v1_port(fields[5], "destination"))
        return ProxyResult(1, "PROXY", family, "STREAM", source, destination, (), remaining)

    # -- version 2 ---------------------------------------------------------------------------

    def _parse_v2(self, buf: bytearray) -> ProxyResult | None:
        n = len(buf)
        if buf[:12] != V2_SIGNATURE[:n]:
            raise ProxyProtocolError("not a PROXY protocol header (bad signature)")
        if n < 13:
            return None
        version, command = buf[12] >> 4, buf[12] & 0x0F
        if version != 2:
            raise ProxyProtocolError(f"v2: unsupported version {version}")
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyProtocolError(f"v2: unsupported command {command}")
        if n < 14:
            return None
        fam = buf[13]
        spec = _V2_FAMILIES.get(fam)
        if command == _CMD_PROXY and spec is None:
            raise ProxyProtocolError(f"v2: unsupported address family/transport 0x{fam:02x}")
        if n < V2_FIXED_LENGTH:
            return None
        length = int.from_bytes(buf[14:16], "big")
        if length > self._max_v2_length:
            raise ProxyProtocolError(
                f"v2: header length {length} exceeds the limit of {self._max_v2_length}"
            )
        if command == _CMD_PROXY and spec is not None and length < spec[2]:
            raise ProxyProtocolError(
                f"v2: address block of {length} bytes is shorter than the {spec[2]}"
                f" that {spec[0]} needs"
            )
        total = V2_FIXED_LENGTH + length
        if n < total:
            return None
        header = bytes(buf[:total])
        remaining = bytes(buf[total:])

        if command == _CMD_LOCAL or fam == 0x00:
            # LOCAL, or PROXY with AF_UNSPEC: the addresses (and, for LOCAL, the family) are to
            # be ignored, so the block is not validated; TLVs are kept when they can be found.
            tlvs: tuple[tuple[int, bytes], ...] = ()
            if spec is not None and length >= spec[2]:
                try:
                    tlvs = self._tlvs(header, V2_FIXED_LENGTH + spec[2])
                except _BadTLV:
                    tlvs = ()
            name = "PROXY" if command == _CMD_PROXY else "LOCAL"
            return ProxyResult(2, name, "UNKNOWN", "UNSPEC", None, None, tlvs, remaining)

        assert spec is not None
        family, transport, addr_len = spec
        try:
            tlvs = self._tlvs(header, V2_FIXED_LENGTH + addr_len)
        except _BadTLV as exc:
            raise ProxyProtocolError(f"v2: {exc}") from None
        block = header[V2_FIXED_LENGTH : V2_FIXED_LENGTH + addr_len]
        if addr_len == 12:
            source = (str(ipaddress.IPv4Address(block[0:4])), _u16(block, 8))
            destination = (str(ipaddress.IPv4Address(block[4:8])), _u16(block, 10))
            return ProxyResult(2, "PROXY", family, transport, source, destination, tlvs, remaining)
        if addr_len == 36:
            source = (_ipv6_text(ipaddress.IPv6Address(block[0:16])), _u16(block, 32))
            destination = (_ipv6_text(ipaddress.IPv6Address(block[16:32])), _u16(block, 34))
            return ProxyResult(2, "PROXY", family, transport, source, destination, tlvs, remaining)
        if addr_len == 216:
            return ProxyResult(
                2,
                "PROXY",
                family,
                transport,
                None,
                None,
                tlvs,
                remaining,
                source_path=_unix_path(block[:_UNIX_PATH_LENGTH]),
                destination_path=_unix_path(block[_UNIX_PATH_LENGTH:]),
            )
        raise AssertionError("unreachable: every family is handled above")

    def _tlvs(self, header: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
        """Parse the TLVs from ``offset`` to the end of ``header``; check a CRC32C TLV."""
        tlvs: list[tuple[int, bytes]] = []
        crc_at = -1
        end = len(header)
        while offset < end:
            if end - offset < 3:
                raise _BadTLV("truncated TLV header")
            tlv_type = header[offset]
            size = (header[offset + 1] << 8) | header[offset + 2]
            start = offset + 3
            if start + size > end:
                raise _BadTLV(f"TLV 0x{tlv_type:02x} of {size} bytes overruns the header")
            if tlv_type == PP2_TYPE_CRC32C:
                if size != 4:
                    raise _BadTLV(f"CRC32C TLV of {size} bytes instead of 4")
                if crc_at >= 0:
                    raise _BadTLV("more than one CRC32C TLV")
                crc_at = start
            tlvs.append((tlv_type, header[start : start + size]))
            offset = start + size
        if crc_at >= 0 and self._verify_crc32c:
            expected = int.from_bytes(header[crc_at : crc_at + 4], "big")
            zeroed = header[:crc_at] + b"\0\0\0\0" + header[crc_at + 4 :]
            if _crc32c(zeroed) != expected:
                # Not a framing problem: reject even a LOCAL header, the bytes are corrupt.
                raise ProxyProtocolError("v2: CRC32C checksum mismatch")
        return tuple(tlvs)


class _BadTLV(Exception):
    pass


def _u16(data: bytes, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]


def _unix_path(raw: bytes) -> bytes:
    """A ``sun_path`` as bytes: cut at the first NUL, except for a Linux abstract address (which
    starts with NUL), where only the trailing NUL padding is removed."""
    if raw[:1] == b"\0":
        return raw.rstrip(b"\0")
    return raw.split(b"\0", 1)[0]


def _v1_ipv4(text: bytes, which: str) -> str:
    try:
        # Strict dotted quad; since Python 3.9.5 leading zeros are rejected, as the spec wants.
        return str(ipaddress.IPv4Address(text.decode("ascii")))
    except ValueError:
        raise ProxyProtocolError(f"v1: bad TCP4 {which} address {text!r}") from None


def _v1_ipv6(text: bytes, which: str) -> str:
    # Hex groups and colons, plus dots for an IPv4-mapped tail (inet_ntop writes those); no
    # "%scope", which ipaddress would otherwise accept.
    if not text or not _V1_IPV6_CHARS.issuperset(text):
        raise ProxyProtocolError(f"v1: bad TCP6 {which} address {text!r}")
    try:
        return _ipv6_text(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        raise ProxyProtocolError(f"v1: bad TCP6 {which} address {text!r}") from None


def _ipv6_text(address: ipaddress.IPv6Address) -> str:
    """The text of *address*, or of the IPv4 address it maps (see the module's docstring)."""
    mapped = address.ipv4_mapped
    return str(mapped if mapped is not None else address)


def _v1_port(text: bytes, which: str) -> int:
    if _V1_PORT.fullmatch(text) is None or int(text) > 0xFFFF:
        raise ProxyProtocolError(f"v1: bad {which} port {text!r}")
    return int(text)


# -- CRC32C (Castagnoli), as the PP2_TYPE_CRC32C TLV uses; not in the standard library --------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def _crc32c(data: bytes | bytearray) -> int:
    table = _CRC32C_TABLE
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- builders ------------------------------------------------------------------------------------


def _ip_pair(
    source: Address, destination: Address
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if getattr(src, "scope_id", None) or getattr(dst, "scope_id", None):
        raise ValueError("scoped IPv6 addresses (with %zone) cannot be sent")
    if src.version != dst.version:
        raise ValueError("source and destination must be of the same IP version")
    for port in (source[1], destination[1]):
        if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise ValueError(f"bad port {port!r}")
    return src, dst


def build_v1(source: Address | None = None, destination: Address | None = None) -> bytes:
    """Build a v1 line: ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n``.

    The family follows the addresses' IP version. With neither address, builds
    ``PROXY UNKNOWN\\r\\n`` (which the spec advises against for connections meant to be
    accepted). Raises ValueError for one address alone, mixed IP versions or a bad port.
    """
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    if source is None or destination is None:
        raise ValueError("give both source and destination, or neither")
    src, dst = _ip_pair(source, destination)
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def build_v2(
    source: Address | None = None,
    destination: Address | None = None,
    *,
    command: str = "PROXY",
    transport: str = "STREAM",
    source_path: bytes | None = None,
    destination_path: bytes | None = None,
    tlvs: Iterable[tuple[int, bytes]] = (),
    crc32c: bool = False,
) -> bytes:
    """Build a v2 header.

    The family follows the arguments: IP addresses give TCP4/TCP6 (UDP4/UDP6 with
    ``transport="DGRAM"``), ``source_path``/``destination_path`` (at most 108 bytes each) give
    AF_UNIX, nothing gives AF_UNSPEC. ``command="LOCAL"`` builds a health-check header (usually
    with no addresses). ``tlvs`` are appended in order; ``crc32c=True`` appends a CRC32C TLV
    holding the checksum of the whole header. Raises ValueError for inconsistent arguments or a
    header over 65535 + 16 bytes.
    """
    if command not in ("PROXY", "LOCAL"):
        raise ValueError("command must be 'PROXY' or 'LOCAL'")
    if transport not in ("STREAM", "DGRAM"):
        raise ValueError("transport must be 'STREAM' or 'DGRAM'")
    proto = 0x1 if transport == "STREAM" else 0x2
    if source is not None or destination is not None:
        if source is None or destination is None:
            raise ValueError("give both source and destination, or neither")
        if source_path is not None or destination_path is not None:
            raise ValueError("give IP addresses or UNIX paths, not both")
        src, dst = _ip_pair(source, destination)
        fam = (0x10 if src.version == 4 else 0x20) | proto
        block = src.packed + dst.packed + source[1].to_bytes(2, "big")
        block += destination[1].to_bytes(2, "big")
    elif source_path is not None or destination_path is not None:
        paths = (source_path or b"", destination_path or b"")
        if any(len(p) > _UNIX_PATH_LENGTH for p in paths):
            raise ValueError(f"a UNIX socket path is at most {_UNIX_PATH_LENGTH} bytes")
        fam = 0x30 | proto
        block = b"".join(p.ljust(_UNIX_PATH_LENGTH, b"\0") for p in paths)
    else:
        fam = 0x00
        block = b""
    parts = [block]
    for tlv_type, value in tlvs:
        if not 0 <= tlv_type <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"bad TLV type {tlv_type!r} or value length {len(value)}")
        parts.append(bytes((tlv_type, len(value) >> 8, len(value) & 0xFF)) + bytes(value))
    if crc32c:
        parts.append(bytes((PP2_TYPE_CRC32C, 0, 4)) + b"\0\0\0\0")
    payload = b"".join(parts)
    if len(payload) > 0xFFFF:
        raise ValueError(f"v2 payload of {len(payload)} bytes exceeds 65535")
    ver_cmd = 0x21 if command == "PROXY" else 0x20
    header = V2_SIGNATURE + bytes((ver_cmd, fam)) + len(payload).to_bytes(2, "big") + payload
    if crc32c:
        header = header[:-4] + _crc32c(header).to_bytes(4, "big")
    return header
