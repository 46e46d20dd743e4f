"""TCP over IPv4 and IPv6: parsing and building whole IP packets.

Parsing functions take bytes from the network and may fail only with
:class:`MalformedSegment`, whatever the input. The edge counts those and drops the
packet. Building functions compute every checksum, so their output can go straight
onto a raw socket with the IP header included.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

_FLAG_NAMES = "FSRPAUEC"

IPPROTO_TCP = 6

# TCP option kinds (IANA "TCP Option Kind Numbers").
OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

# IPv6 extension headers that may sit between the fixed header and TCP
# (RFC 8200 section 4): hop-by-hop, routing, destination options.
_IPV6_SKIPPABLE = frozenset({0, 43, 60})
_IPV6_FRAGMENT = 44

MAX_SACK_BLOCKS = 4
_TCP_HEADER = struct.Struct("!HHIIBBHHH")
_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_IPV6_HEADER = struct.Struct("!IHBB16s16s")
_CHECKSUM_FIELD = struct.Struct("!H")
_TIMESTAMP_ONLY = struct.Struct("!BBBBII")
# NOP, NOP, timestamps: the options field of most segments on a connection
# with timestamps, as Linux lays it out when no SACK blocks follow.
_TIMESTAMP_ONLY_START = bytes((OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10))
_TIMESTAMP_VALUES = struct.Struct("!II")

# The codec converts between packed and text addresses for every packet. These
# caches hold the results for the addresses seen most recently, and are emptied
# when full, so a flood of distinct source addresses costs only the uncached
# conversion.
_ADDRESS_CACHE_SIZE = 4096
_text_by_packed: dict[bytes, str] = {}
_packed_by_text: dict[str, bytes] = {}


class MalformedSegment(ValueError):
    """A packet that is not a well-formed TCP segment over IPv4 or IPv6."""


@dataclass(frozen=True)
class TcpOptions:
    """The TCP options the shield reads and writes; others are skipped."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    """SACK blocks as (left edge, right edge) pairs, right edge exclusive."""
    timestamp: tuple[int, int] | None = None
    """(TSval, TSecr) of the timestamps option (RFC 7323)."""


NO_OPTIONS = TcpOptions()


@dataclass(frozen=True)
class Segment:
    """A TCP segment with the addresses of the IP packet that carried it."""

    version: int
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: TcpOptions = NO_OPTIONS
    payload: bytes = b""
    urgent: int = 0
    checksum_ok: bool | None = field(default=None, compare=False)
    """None when the checksum was not verified."""

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies: payload plus one each for SYN, FIN."""
        return len(self.payload) + bool(self.flags & SYN) + bool(self.flags & FIN)

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def __str__(self) -> str:
        flags = "".join(
            name for bit, name in enumerate(_FLAG_NAMES) if self.flags & (1 << bit)
        )
        return (
            f"{self.src}.{self.sport} > {self.dst}.{self.dport} [{flags}] "
            f"seq {self.seq} ack {self.ack} win {self.window} len {len(self.payload)}"
        )


# checksums


def _ones_complement_sum(data: bytes | bytearray | memoryview) -> int:
    """Sum the big-endian 16-bit words of DATA with end-around carry.

    Since 2**16 is 1 modulo 0xFFFF, the data read as one big-endian integer
    has the same remainder modulo 0xFFFF as the sum of its words. The folded
    one's complement sum is that remainder, except that a nonzero sum is
    0xFFFF where the remainder is 0. An odd trailing byte is padded with zero.
    """
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    value = int.from_bytes(data, "big")
    total = value % 0xFFFF
    if total == 0 and value:
        return 0xFFFF
    return total


def internet_checksum(*parts: bytes | bytearray | memoryview) -> int:
    """Return the Internet checksum (RFC 1071) of the concatenated parts."""
    total = 0
    for part in parts:
        total += _ones_complement_sum(part)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(version: int, src: bytes, dst: bytes, tcp_length: int) -> bytes:
    if version == 4:
        return src + dst + struct.pack("!BBH", 0, IPPROTO_TCP, tcp_length)
    return src + dst + struct.pack("!I3xB", tcp_length, IPPROTO_TCP)


# options


def parse_options_untrusted(data: bytes | memoryview) -> TcpOptions:
    """Parse the TCP options field, raising MalformedSegment on any overrun."""
    if len(data) == 12 and data[:4] == _TIMESTAMP_ONLY_START:
        return TcpOptions(timestamp=_TIMESTAMP_VALUES.unpack_from(data, 4))
    mss: int | None = None
    wscale: int | None = None
    sack_permitted = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    timestamp: tuple[int, int] | None = None
    i = 0
    end = len(data)
    while i < end:
        kind = data[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise MalformedSegment(f"option kind {kind} at offset {i} has no length")
        length = data[i + 1]
        if length < 2 or i + length > end:
            raise MalformedSegment(
                f"option kind {kind} at offset {i} has invalid length {length}"
            )
        body = data[i + 2 : i + length]
        if kind == OPT_MSS:
            _expect_length(kind, length, 4)
            mss = int.from_bytes(body, "big")
        elif kind == OPT_WSCALE:
            _expect_length(kind, length, 3)
            wscale = body[0]
        elif kind == OPT_SACK_PERMITTED:
            _expect_length(kind, length, 2)
            sack_permitted = True
        elif kind == OPT_SACK:
            count, rest = divmod(length - 2, 8)
            if rest or not 1 <= count <= MAX_SACK_BLOCKS:
                raise MalformedSegment(f"SACK option has invalid length {length}")
            sack_blocks = tuple(
                struct.unpack_from("!II", body, 8 * n) for n in range(count)
            )
        elif kind == OPT_TIMESTAMP:
            _expect_length(kind, length, 10)
            tsval, tsecr = struct.unpack("!II", body)
            timestamp = (tsval, tsecr)
        i += length
    return TcpOptions(mss, wscale, sack_permitted, sack_blocks, timestamp)


def _expect_length(kind: int, length: int, expected: int) -> None:
    if length != expected:
        raise MalformedSegment(
            f"option kind {kind} has length {length}, expected {expected}"
        )


def encode_options(options: TcpOptions) -> bytes:
    """Encode options the way Linux lays them out, padded to 32-bit words."""
    if (
        not options.sack_blocks
        and options.mss is None
        and options.wscale is None
        and not options.sack_permitted
    ):
        if options.timestamp is None:
            return b""
        return _TIMESTAMP_ONLY.pack(
            OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, *options.timestamp
        )
    out = bytearray()
    if options.mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, options.mss)
    if options.sack_permitted and options.timestamp is not None:
        out += struct.pack("!BB", OPT_SACK_PERMITTED, 2)
        out += struct.pack("!BBII", OPT_TIMESTAMP, 10, *options.timestamp)
    else:
        if options.timestamp is not None:
            out += struct.pack("!BBBBII", OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10,
                               *options.timestamp)  # fmt: skip
        if options.sack_permitted:
            out += struct.pack("!BBBB", OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2)
    if options.wscale is not None:
        out += struct.pack("!BBBB", OPT_NOP, OPT_WSCALE, 3, options.wscale)
    if options.sack_blocks:
        blocks = options.sack_blocks[:MAX_SACK_BLOCKS]
        out += struct.pack("!BBBB", OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks))
        for left, right in blocks:
            out += struct.pack("!II", left, right)
    if len(out) % 4:
        out += bytes(4 - len(out) % 4)
    if len(out) > 40:
        raise ValueError(f"TCP options need {len(out)} bytes, the maximum is 40")
    return bytes(out)


# parsing


def parse_packet_untrusted(data: bytes, *, verify_checksum: bool = False) -> Segment:
    """Parse an IPv4 or IPv6 packet carrying TCP.

    Packets taken from NFQUEUE on the forwarding path may still carry a partial
    checksum, left for an offload that never ran. So checksums are verified only
    when asked, and the result is recorded in ``Segment.checksum_ok``.
    """
    if not data:
        raise MalformedSegment("empty packet")
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data, verify_checksum)
    if version == 6:
        return _parse_ipv6(data, verify_checksum)
    raise MalformedSegment(f"IP version {version} is not 4 or 6")


def _parse_ipv4(data: bytes, verify: bool) -> Segment:
    if len(data) < 20:
        raise MalformedSegment(f"IPv4 header truncated at {len(data)} bytes")
    (ver_ihl, _tos, total_length, _ident, frag, _ttl, proto, _csum, src, dst) = (
        _IPV4_HEADER.unpack_from(data)
    )
    ihl = (ver_ihl & 0x0F) * 4
    if ihl < 20:
        raise MalformedSegment(f"IPv4 header length {ihl} is below 20")
    if total_length < ihl or total_length > len(data):
        raise MalformedSegment(
            f"IPv4 total length {total_length} does not fit a {len(data)}-byte "
            f"packet with a {ihl}-byte header"
        )
    if proto != IPPROTO_TCP:
        raise MalformedSegment(f"IPv4 protocol {proto} is not TCP")
    if frag & 0x3FFF:
        raise MalformedSegment("IPv4 fragments are not reassembled")
    return _parse_tcp(4, src, dst, memoryview(data)[ihl:total_length], verify)


def _parse_ipv6(data: bytes, verify: bool) -> Segment:
    if len(data) < 40:
        raise MalformedSegment(f"IPv6 header truncated at {len(data)} bytes")
    _vtf, payload_length, next_header, _hops, src, dst = _IPV6_HEADER.unpack_from(data)
    end = 40 + payload_length
    if end > len(data):
        raise MalformedSegment(
            f"IPv6 payload length {payload_length} overruns a {len(data)}-byte packet"
        )
    offset = 40
    for _ in range(8):
        if next_header == IPPROTO_TCP:
            break
        if next_header == _IPV6_FRAGMENT:
            raise MalformedSegment("IPv6 fragments are not reassembled")
        if next_header not in _IPV6_SKIPPABLE:
            raise MalformedSegment(f"IPv6 next header {next_header} is not TCP")
        if offset + 2 > end:
            raise MalformedSegment("IPv6 extension header truncated")
        next_header, ext_len = data[offset], data[offset + 1]
        offset += (ext_len + 1) * 8
        if offset > end:
            raise MalformedSegment("IPv6 extension header overruns the packet")
    else:
        raise MalformedSegment("more than 8 IPv6 extension headers")
    return _parse_tcp(6, src, dst, memoryview(data)[offset:end], verify)


def _parse_tcp(
    version: int, src: bytes, dst: bytes, tcp: memoryview, verify: bool
) -> Segment:
    if len(tcp) < 20:
        raise MalformedSegment(f"TCP header truncated at {len(tcp)} bytes")
    sport, dport, seq, ack, offset_byte, flags, window, _csum, urgent = (
        _TCP_HEADER.unpack_from(tcp)
    )
    header_length = (offset_byte >> 4) * 4
    if header_length < 20 or header_length > len(tcp):
        raise MalformedSegment(
            f"TCP data offset {header_length} does not fit a {len(tcp)}-byte segment"
        )
    options = (
        parse_options_untrusted(tcp[20:header_length])
        if header_length > 20
        else NO_OPTIONS
    )
    checksum_ok: bool | None = None
    if verify:
        pseudo = _pseudo_header(version, src, dst, len(tcp))
        checksum_ok = internet_checksum(pseudo, tcp) == 0
    # Positional arguments in field order: keywords make this call slower.
    return Segment(
        version,
        _address_text(src),
        _address_text(dst),
        sport,
        dport,
        seq,
        ack,
        flags | ((offset_byte & 0x01) << 8),
        window,
        options,
        bytes(tcp[header_length:]),
        urgent,
        checksum_ok,
    )


def _address_text(packed: bytes) -> str:
    """Return the text form ``str(ipaddress.ip_address(packed))`` gives.

    glibc's ``inet_ntop`` writes the same compressed text (RFC 5952) for every
    IPv4 address and for IPv6 addresses without an embedded IPv4 part, which
    the codec's unit tests check on the running system. Its output with a
    dotted quad (such as ``::ffff:198.18.1.2``) can differ from the
    :mod:`ipaddress` text, so those addresses go through :mod:`ipaddress`.
    """
    text = _text_by_packed.get(packed)
    if text is not None:
        return text
    if len(packed) == 4:
        text = socket.inet_ntop(socket.AF_INET, packed)
    else:
        text = socket.inet_ntop(socket.AF_INET6, packed)
        if "." in text:
            text = str(ipaddress.IPv6Address(packed))
    if len(_text_by_packed) >= _ADDRESS_CACHE_SIZE:
        _text_by_packed.clear()
    _text_by_packed[packed] = text
    return text


def _packed_address(text: str) -> bytes:
    """Return ``ipaddress.ip_address(text).packed``, cached for text addresses."""
    # Only str keys are looked up and cached. ip_address() also takes integers
    # and bytes, and a key of another type may be unhashable or equal to one
    # of a different value (1.0 == 1, but ip_address(1.0) raises).
    is_text = type(text) is str
    if is_text:
        packed = _packed_by_text.get(text)
        if packed is not None:
            return packed
    packed = ipaddress.ip_address(text).packed
    if is_text:
        if len(_packed_by_text) >= _ADDRESS_CACHE_SIZE:
            _packed_by_text.clear()
        _packed_by_text[text] = packed
    return packed


# building


def build_packet(segment: Segment, *, hop_limit: int = 64) -> bytes:
    """Build the IP packet for a segment, with IP and TCP checksums filled in."""
    version = segment.version
    src = _packed_address(segment.src)
    dst = _packed_address(segment.dst)
    if len(src) != (4 if version == 4 else 16) or len(dst) != len(src):
        raise ValueError(
            f"addresses {segment.src} and {segment.dst} do not match IPv{version}"
        )
    options = encode_options(segment.options)
    header_length = 20 + len(options)
    payload = segment.payload
    tcp_length = header_length + len(payload)
    tcp = bytearray(
        _TCP_HEADER.pack(
            segment.sport,
            segment.dport,
            segment.seq,
            segment.ack,
            (header_length // 4) << 4 | (segment.flags >> 8 & 0x01),
            segment.flags & 0xFF,
            segment.window,
            0,
            segment.urgent,
        )
    )
    tcp += options
    tcp += payload
    # Only the payload can have an odd length, so one pass over the pseudo
    # header and the whole segment sums the same words as one pass per part.
    checksum = internet_checksum(_pseudo_header(version, src, dst, tcp_length), tcp)
    _CHECKSUM_FIELD.pack_into(tcp, 16, checksum)
    if version == 4:
        packet = bytearray(
            _IPV4_HEADER.pack(
                0x45, 0, 20 + tcp_length, 0, 0x4000, hop_limit, IPPROTO_TCP, 0, src, dst
            )
        )
        _CHECKSUM_FIELD.pack_into(packet, 10, internet_checksum(packet))
        packet += tcp
        return bytes(packet)
    ipv6 = _IPV6_HEADER.pack(6 << 28, tcp_length, IPPROTO_TCP, hop_limit, src, dst)
    return ipv6 + tcp
