"""Check a packet capture against the shield's TCP invariants.

The shield replies to a checkpointed container's peers in the container's name,
so what the peers see on the wire must look like one continuous TCP endpoint. For
each flow direction this module checks, on a classic libpcap capture:

1. the right edge ``ack + (window << wscale)`` never falls below the highest
   right edge that direction advertised before;
2. the ACK number never falls below the highest ACK sent before;
3. the TSval never falls below the highest TSval sent before (mod 2**32);
4. optionally, no payload byte is sent after the receiver ACKed it.

Each check compares with the highest value so far, not with the previous packet,
because the peer keeps the highest edge, ACK and TSval it has accepted (PAWS
compares with the last accepted TSval). So every packet below that value is a
violation, not only the first step down.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from shieldproxy.tcp.segment import (
    ACK,
    RST,
    SYN,
    MalformedSegment,
    Segment,
    parse_packet_untrusted,
)
from shieldproxy.tcp.seq import SEQ_MOD, seq_diff

# Link-layer header types (tcpdump.org "LINK-LAYER HEADER TYPES").
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_VLAN = 0x8100
_IP_ETHERTYPES = frozenset({_ETHERTYPE_IPV4, _ETHERTYPE_IPV6})
_SUPPORTED_LINK_TYPES = frozenset(
    {
        LINKTYPE_ETHERNET,
        LINKTYPE_RAW,
        LINKTYPE_IPV4,
        LINKTYPE_IPV6,
        LINKTYPE_LINUX_SLL,
        LINKTYPE_LINUX_SLL2,
    }
)

_MAGIC_MICROSECONDS = 0xA1B2C3D4
_MAGIC_NANOSECONDS = 0xA1B23C4D
_MAGIC_PCAPNG = 0x0A0D0D0A
_GLOBAL_HEADER_SIZE = 24
_RECORD_HEADER_SIZE = 16

# libpcap's MAXIMUM_SNAPLEN (pcap-int.h). A longer record means a corrupt file
# unless the file header's snap length is larger.
_MAX_RECORD = 262144
# An IP packet without jumbograms ends within 65535 bytes plus the IPv6 fixed
# header, so padding a truncated record beyond that cannot help the parser.
_MAX_IP_PACKET = 65535 + 40

# RFC 7323 section 2.3: a shift above 14 is used as 14.
MAX_WSCALE = 14

_MASK32 = SEQ_MOD - 1

Endpoint = tuple[str, int]


class CaptureError(Exception):
    """A capture file that is not a readable classic pcap file."""

    def __init__(self, path: str, offset: int, problem: str) -> None:
        super().__init__(f"{path}: at byte offset {offset}: {problem}")
        self.path = path
        self.offset = offset
        self.problem = problem


# reading


def read_packets(path: str | Path) -> Iterator[tuple[int, float, bytes, bool]]:
    """Yield (packet number, timestamp, IP packet, truncated) for each IP packet.

    Packet numbers count every record from 1, as Wireshark does, so records that
    carry no IP packet leave gaps. A record shorter than the packet on the wire
    is padded with zero bytes to the original length and marked truncated, so
    its headers parse but its payload contents are unknown.
    """
    for number, timestamp, ip, captured in _PcapReader(str(path)):
        yield number, timestamp, ip, captured < len(ip)


class _PcapReader:
    """Iterate (packet number, timestamp, IP packet, captured IP bytes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records = 0
        """Records read so far, IP or not."""

    def __iter__(self) -> Iterator[tuple[int, float, bytes, int]]:
        with open(self.path, "rb") as stream:
            yield from self._parse(stream)

    def _parse(self, stream: BinaryIO) -> Iterator[tuple[int, float, bytes, int]]:
        path = self.path
        header = stream.read(_GLOBAL_HEADER_SIZE)
        byte_order, fraction_scale, snaplen, link_type = _parse_file_header(
            path, header
        )
        max_record = max(snaplen, _MAX_RECORD)
        record_header = struct.Struct(byte_order + "IIII")
        offset = _GLOBAL_HEADER_SIZE
        number = 0
        while True:
            raw_header = stream.read(_RECORD_HEADER_SIZE)
            if not raw_header:
                return
            number += 1
            self.records = number
            if len(raw_header) < _RECORD_HEADER_SIZE:
                raise CaptureError(
                    path,
                    offset,
                    f"record header of packet {number} truncated at "
                    f"{len(raw_header)} of 16 bytes",
                )

            seconds, fraction, captured, original = record_header.unpack(raw_header)
            if captured > max_record:
                raise CaptureError(
                    path,
                    offset,
                    f"packet {number} claims {captured} captured bytes, above the "
                    f"maximum {max_record}, so the file is corrupt",
                )
            frame = stream.read(captured)
            if len(frame) < captured:
                raise CaptureError(
                    path,
                    offset,
                    f"packet {number} claims {captured} bytes but the file ends "
                    f"after {len(frame)}",
                )
            offset += _RECORD_HEADER_SIZE + captured

            start = _locate_ip(link_type, frame)
            if start is None:
                continue
            ip = frame[start:]
            captured_ip = len(ip)
            if original > captured:
                wire_ip = min(original - start, _MAX_IP_PACKET)
                if wire_ip > captured_ip:
                    ip += bytes(wire_ip - captured_ip)
            yield number, seconds + fraction / fraction_scale, ip, captured_ip


def _parse_file_header(path: str, header: bytes) -> tuple[str, float, int, int]:
    """Return the byte order, fraction units, snap length and link type."""
    byte_order, fraction_scale = _parse_magic(path, header)
    if len(header) < _GLOBAL_HEADER_SIZE:
        raise CaptureError(
            path, 0, f"file header truncated at {len(header)} of 24 bytes"
        )
    snaplen, network = struct.unpack_from(byte_order + "II", header, 16)
    # The upper bits of the link type field carry FCS length flags.
    link_type = network & 0xFFFF
    if link_type not in _SUPPORTED_LINK_TYPES:
        raise CaptureError(
            path,
            20,
            f"link type {link_type} is not supported, only Ethernet, raw IP and "
            "Linux cooked captures are. Capture on an Ethernet interface or with "
            "'tcpdump -i any'",
        )
    return byte_order, fraction_scale, snaplen, link_type


def _parse_magic(path: str, header: bytes) -> tuple[str, float]:
    """Return the struct byte order and timestamp fraction units of a pcap file."""
    if len(header) < 4:
        raise CaptureError(
            path, 0, f"file is {len(header)} bytes long, too short for a pcap header"
        )
    (magic,) = struct.unpack_from("<I", header)
    if magic == _MAGIC_PCAPNG:
        raise CaptureError(
            path,
            0,
            "file is pcapng, which is not supported. Write classic pcap instead, "
            "which tcpdump -w writes by default, or convert the file with "
            "'editcap -F pcap IN OUT'",
        )
    for byte_order in ("<", ">"):
        (magic,) = struct.unpack_from(byte_order + "I", header)
        if magic == _MAGIC_MICROSECONDS:
            return byte_order, 1e6
        if magic == _MAGIC_NANOSECONDS:
            return byte_order, 1e9
    raise CaptureError(
        path,
        0,
        f"invalid magic number 0x{header[:4].hex()}, so this is not a pcap file",
    )


def _locate_ip(link_type: int, frame: bytes) -> int | None:
    """Return the offset of the IP header in a frame, or None for non-IP frames."""
    if link_type == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == _ETHERTYPE_VLAN:
            if len(frame) < 18:
                return None
            ethertype = int.from_bytes(frame[16:18], "big")
            start = 18
        else:
            start = 14
        return start if ethertype in _IP_ETHERTYPES else None
    if link_type in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return 0
    if link_type == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None
        protocol = int.from_bytes(frame[14:16], "big")
        return 16 if protocol in _IP_ETHERTYPES else None
    if link_type == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return None
        protocol = int.from_bytes(frame[0:2], "big")
        return 20 if protocol in _IP_ETHERTYPES else None
    return None


# report


class Check(StrEnum):
    RIGHT_EDGE = "right-edge"
    ACK = "ack"
    TSVAL = "tsval"
    DELIVERED_AFTER_ACK = "delivered-after-ack"


@dataclass(frozen=True)
class Violation:
    """One packet that broke one check.

    For right-edge, ack and tsval checks, ``previous`` is the highest value the
    direction sent before and ``amount`` is how far ``new`` falls below it. For
    delivered-after-ack, ``previous`` is the receiver's highest ACK, ``new`` is
    the segment's sequence number and ``amount`` counts payload bytes below
    that ACK.
    """

    packet: int
    timestamp: float
    flow: str
    check: Check
    previous: int
    new: int
    amount: int

    def describe(self) -> str:
        prefix = f"packet {self.packet} {self.flow}: "
        if self.check is Check.RIGHT_EDGE:
            change = "right edge moved left"
        elif self.check is Check.ACK:
            change = "ACK moved back"
        elif self.check is Check.TSVAL:
            change = "TSval moved back"
        else:
            return prefix + (
                f"{self.amount} payload bytes at seq {self.new} sent after the "
                f"receiver ACKed up to {self.previous}"
            )
        return (
            prefix + f"{change} by {self.amount} (from {self.previous} to {self.new})"
        )


@dataclass
class DirectionStats:
    """Counts for the segments one endpoint sent to another on one connection."""

    flow: str
    packets: int = 0
    window_scale: int = 0
    window_scale_assumed: bool = False
    """True when the handshake was not fully captured and the scale was assumed."""
    max_right_edge_retraction: int = 0
    """Bytes, the largest distance below the highest right edge sent before."""
    right_edge_retractions: int = 0
    ack_regressions: int = 0
    tsval_regressions: int = 0
    bytes_delivered_after_ack: int = 0
    first_timestamp: float = 0.0
    last_timestamp: float = 0.0


@dataclass
class CaptureReport:
    """The result of :func:`check_capture`."""

    path: str
    records: int = 0
    """Every record in the file, IP or not."""
    tcp_segments: int = 0
    skipped_packets: int = 0
    """IP packets that are not parseable TCP segments (other protocols, fragments)."""
    truncated_packets: int = 0
    """TCP segments captured without their full payload (snap length)."""
    truncated_headers: int = 0
    """Segments whose TCP header was cut by the snap length, so they were skipped."""
    only_from: str | None = None
    check_duplicates: bool = False
    directions: list[DirectionStats] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    violation_count: int = 0
    """Total violations, including those beyond the stored ``violations`` list."""

    @property
    def ok(self) -> bool:
        return self.violation_count == 0

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# checking


class _Direction:
    """Mutable state of one direction of one connection."""

    __slots__ = (
        "stats",
        "checked",
        "reverse",
        "active",
        "handshake_seen",
        "handshake_is_synack",
        "handshake_seq",
        "handshake_wscale",
        "scale",
        "max_right_edge",
        "max_ack",
        "max_tsval",
    )

    def __init__(self, stats: DirectionStats, checked: bool) -> None:
        self.stats = stats
        self.checked = checked
        self.reverse: _Direction = self
        self.reset()

    def reset(self) -> None:
        """Forget the previous incarnation of the connection on a new SYN."""
        self.active = False
        self.handshake_seen = False
        self.handshake_is_synack = False
        self.handshake_seq = 0
        self.handshake_wscale: int | None = None
        self.scale: int | None = None
        self.max_right_edge: int | None = None
        self.max_ack: int | None = None
        self.max_tsval: int | None = None


def _resolve_scale(direction: _Direction) -> int | None:
    """Return the window scale from the captured handshake, or None if unknown.

    RFC 7323 section 2.2: windows are scaled only when both the SYN and the
    SYN-ACK carry the option, and a SYN-ACK carries it only if the SYN did.
    """
    reverse = direction.reverse
    own = direction.handshake_wscale
    if direction.handshake_seen and reverse.handshake_seen:
        if own is None or reverse.handshake_wscale is None:
            return 0
        return min(own, MAX_WSCALE)
    if direction.handshake_seen and own is None:
        return 0
    if reverse.handshake_seen and reverse.handshake_wscale is None:
        return 0
    if direction.handshake_seen and direction.handshake_is_synack:
        assert own is not None
        return min(own, MAX_WSCALE)
    return None


class _Checker:
    def __init__(
        self,
        report: CaptureReport,
        only_from: Endpoint | None,
        assume_wscale: dict[Endpoint, int],
        default_wscale: int,
        check_duplicates: bool,
        max_violations: int,
    ) -> None:
        self.report = report
        self.only_from = only_from
        self.assume_wscale = assume_wscale
        self.default_wscale = default_wscale
        self.check_duplicates = check_duplicates
        self.max_violations = max_violations
        self.directions: dict[tuple[str, int, str, int], _Direction] = {}

    def direction_for(self, src: str, sport: int, dst: str, dport: int) -> _Direction:
        key = (src, sport, dst, dport)
        direction = self.directions.get(key)
        if direction is not None:
            return direction
        forward = self._new_direction(src, sport, dst, dport)
        reverse = self._new_direction(dst, dport, src, sport)
        forward.reverse = reverse
        reverse.reverse = forward
        self.directions[key] = forward
        self.directions[(dst, dport, src, sport)] = reverse
        return forward

    def _new_direction(self, src: str, sport: int, dst: str, dport: int) -> _Direction:
        flow = f"{format_endpoint(src, sport)} > {format_endpoint(dst, dport)}"
        checked = self.only_from is None or self.only_from == (src, sport)
        return _Direction(DirectionStats(flow), checked)

    def violate(
        self,
        direction: _Direction,
        number: int,
        timestamp: float,
        check: Check,
        previous: int,
        new: int,
        amount: int,
    ) -> None:
        report = self.report
        report.violation_count += 1
        if len(report.violations) < self.max_violations:
            report.violations.append(
                Violation(
                    number,
                    timestamp,
                    direction.stats.flow,
                    check,
                    previous,
                    new,
                    amount,
                )
            )

    def handle_syn(
        self, direction: _Direction, seq: int, flags: int, wscale: int | None
    ) -> None:
        """Record a SYN or SYN-ACK, starting over when it opens a new connection.

        A SYN with a new ISN on a 4-tuple that already carried segments is a
        new connection reusing the ports, whose ACKs and TSvals start afresh.
        """
        if direction.handshake_seen and direction.handshake_seq == seq:
            return
        reverse = direction.reverse
        if direction.handshake_seen or direction.active or reverse.active:
            direction.reset()
            if reverse.active:
                reverse.reset()
        direction.handshake_seen = True
        direction.handshake_is_synack = bool(flags & ACK)
        direction.handshake_seq = seq
        direction.handshake_wscale = wscale

    def check_segment(self, number: int, timestamp: float, segment: Segment) -> None:
        direction = self.direction_for(
            segment.src, segment.sport, segment.dst, segment.dport
        )
        flags = segment.flags
        if flags & SYN:
            self.handle_syn(direction, segment.seq, flags, segment.options.wscale)
        else:
            direction.active = True
        stats = direction.stats
        if direction.checked:
            if not stats.packets:
                stats.first_timestamp = timestamp
            stats.packets += 1
            stats.last_timestamp = timestamp

        timestamp_option = segment.options.timestamp
        if timestamp_option is not None:
            self.check_tsval(direction, number, timestamp, timestamp_option[0])
        if self.check_duplicates and segment.payload and not flags & SYN:
            self.check_delivery(direction, number, timestamp, segment)
        if flags & RST or not flags & ACK:
            return
        # A segment with an older ACK than one already seen arrived out of
        # order. The peer does not take its window (RFC 9293 SND.WL1/SND.WL2
        # rule), so it is reported by the ACK check only, not as a retraction.
        reordered = (
            direction.max_ack is not None
            and seq_diff(segment.ack, direction.max_ack) < 0
        )
        self.check_ack(direction, number, timestamp, segment.ack)
        if not flags & SYN and not reordered:
            scale = direction.scale
            if scale is None:
                scale = self.scale_of(direction, segment.src, segment.sport)
            edge = (segment.ack + (segment.window << scale)) & _MASK32
            self.check_right_edge(direction, number, timestamp, edge)

    @staticmethod
    def _raise_highest(
        direction: _Direction, field: str, value: int
    ) -> tuple[int, int] | None:
        """Move the highest value of ``field`` up to ``value``, mod 2**32.

        Returns (highest, amount) when ``value`` is below the highest value
        already seen in a checked direction, None otherwise.
        """
        highest: int | None = getattr(direction, field)
        if highest is None:
            setattr(direction, field, value)
            return None
        distance = seq_diff(value, highest)
        if distance > 0:
            setattr(direction, field, value)
            return None
        if distance < 0 and direction.checked:
            return highest, -distance
        return None

    def check_tsval(
        self, direction: _Direction, number: int, timestamp: float, tsval: int
    ) -> None:
        regression = self._raise_highest(direction, "max_tsval", tsval)
        if regression is None:
            return
        highest, amount = regression
        direction.stats.tsval_regressions += 1
        self.violate(direction, number, timestamp, Check.TSVAL, highest, tsval, amount)

    def check_ack(
        self, direction: _Direction, number: int, timestamp: float, ack: int
    ) -> None:
        regression = self._raise_highest(direction, "max_ack", ack)
        if regression is None:
            return
        highest, amount = regression
        direction.stats.ack_regressions += 1
        self.violate(direction, number, timestamp, Check.ACK, highest, ack, amount)

    def check_right_edge(
        self, direction: _Direction, number: int, timestamp: float, edge: int
    ) -> None:
        regression = self._raise_highest(direction, "max_right_edge", edge)
        if regression is None:
            return
        highest, amount = regression
        stats = direction.stats
        stats.right_edge_retractions += 1
        stats.max_right_edge_retraction = max(stats.max_right_edge_retraction, amount)
        self.violate(
            direction, number, timestamp, Check.RIGHT_EDGE, highest, edge, amount
        )

    def check_delivery(
        self, direction: _Direction, number: int, timestamp: float, segment: Segment
    ) -> None:
        """Count payload bytes below the highest ACK the receiver sent before.

        NOTE: a keep-alive probe that carries one byte below the ACK, as some
        stacks other than Linux send, counts here too.
        """
        receiver_ack = direction.reverse.max_ack
        if receiver_ack is None or not direction.checked:
            return
        covered = min(seq_diff(receiver_ack, segment.seq), len(segment.payload))
        if covered <= 0:
            return
        direction.stats.bytes_delivered_after_ack += covered
        self.violate(
            direction,
            number,
            timestamp,
            Check.DELIVERED_AFTER_ACK,
            receiver_ack,
            segment.seq,
            covered,
        )

    def scale_of(self, direction: _Direction, src: str, sport: int) -> int:
        scale = _resolve_scale(direction)
        if scale is None:
            scale = self.assume_wscale.get((src, sport), self.default_wscale)
            direction.stats.window_scale_assumed = True
        direction.scale = scale
        direction.stats.window_scale = scale
        return scale


def check_capture(
    path: str | Path,
    *,
    only_from: Endpoint | None = None,
    assume_wscale: dict[Endpoint, int] | None = None,
    default_wscale: int = 0,
    check_duplicates: bool = False,
    max_violations: int = 10000,
) -> CaptureReport:
    """Check every TCP segment in a classic pcap file against the invariants.

    ``only_from`` limits the checks and the stats to segments sent from that
    (address, port), but the other side's segments are still read for the
    handshake and ACKs. ``assume_wscale`` maps a sending endpoint to the window
    scale it uses when its handshake is not in the capture, else
    ``default_wscale`` applies. With ``check_duplicates``, a payload byte sent
    after the receiver ACKed it counts as delivered twice. That check uses
    sequence ranges only, so it also works on snap-length-truncated captures,
    but it flags any retransmission of ACKed data and so belongs on captures
    taken next to the receiver. Only the first ``max_violations`` violations are
    stored, but all are counted.

    RST segments are left out of the ACK and right-edge checks, and SYN segments
    out of the right-edge check because their windows are never scaled.

    Raises CaptureError for an unreadable capture, OSError when the file cannot
    be opened and ValueError for an invalid endpoint or window scale argument.
    """
    path_text = str(path)
    only = _normalize_endpoint(only_from) if only_from is not None else None
    assumed: dict[Endpoint, int] = {}
    for endpoint, scale in (assume_wscale or {}).items():
        assumed[_normalize_endpoint(endpoint)] = _validate_wscale(scale)
    report = CaptureReport(
        path=path_text,
        only_from=format_endpoint(*only) if only else None,
        check_duplicates=check_duplicates,
    )
    checker = _Checker(
        report,
        only,
        assumed,
        _validate_wscale(default_wscale),
        check_duplicates,
        max_violations,
    )
    reader = _PcapReader(path_text)
    _check_records(checker, iter(reader))
    report.records = reader.records
    report.directions = [
        direction.stats
        for direction in checker.directions.values()
        if direction.checked and direction.stats.packets
    ]
    return report


def _check_records(
    checker: _Checker, records: Iterator[tuple[int, float, bytes, int]]
) -> None:
    report = checker.report
    for number, timestamp, ip, captured in records:
        try:
            segment = parse_packet_untrusted(ip)
        except MalformedSegment:
            report.skipped_packets += 1
            continue
        if captured < len(ip):
            # Zero padding in place of a cut TCP header would read as a zero
            # window or ACK and raise false violations.
            if captured < _header_end(ip, len(segment.payload)):
                report.truncated_headers += 1
                continue
            report.truncated_packets += 1
        report.tcp_segments += 1
        checker.check_segment(number, timestamp, segment)


@dataclass
class _StreamPosition:
    """Unwrapped sequence position of one direction of a flow in a capture."""

    last_seq: int
    offset: int = 0
    """Position of last_seq, counted from the flow's first captured segment."""
    highest_end: int = 0
    """Largest end of the payload seen before the time of interest."""


def first_new_data_at(
    path: str | Path, receiver: Endpoint, after: float
) -> float | None:
    """Return when the capture first shows a byte sent to RECEIVER, new since AFTER.

    A byte is new when no segment of the same flow before time AFTER carried
    it. Times are the capture's (seconds since the epoch). Each flow to
    RECEIVER is followed on its own, and its sequence numbers are unwrapped
    segment by segment, so a stream past 4 GiB works. Returns None when no
    such segment is in the capture.

    Raises CaptureError for an unreadable capture and OSError when the file
    cannot be opened.
    """
    address, port = _normalize_endpoint(receiver)
    streams: dict[tuple[str, int], _StreamPosition] = {}
    for _number, timestamp, ip, _captured in _PcapReader(str(path)):
        try:
            segment = parse_packet_untrusted(ip)
        except MalformedSegment:
            continue
        if not segment.payload or (segment.dst, segment.dport) != (address, port):
            continue
        sender = (segment.src, segment.sport)
        stream = streams.get(sender)
        if stream is None:
            stream = streams[sender] = _StreamPosition(segment.seq)
        stream.offset += seq_diff(segment.seq, stream.last_seq)
        stream.last_seq = segment.seq
        end = stream.offset + len(segment.payload)
        if timestamp < after:
            stream.highest_end = max(stream.highest_end, end)
        elif end > stream.highest_end:
            return timestamp
    return None


def _header_end(ip: bytes, payload_length: int) -> int:
    """Return the offset where the TCP payload starts in a parsed IP packet."""
    if ip[0] >> 4 == 4:
        return int.from_bytes(ip[2:4], "big") - payload_length
    return 40 + int.from_bytes(ip[4:6], "big") - payload_length


# endpoints


def format_endpoint(address: str, port: int) -> str:
    """Format an endpoint as ADDR:PORT, with IPv6 addresses in brackets."""
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse ADDR:PORT or [IPV6]:PORT, raising ValueError on invalid input."""
    if text.startswith("["):
        address, bracket, port_text = text[1:].partition("]:")
        if not bracket:
            raise ValueError(
                f"invalid endpoint {text!r}: expected [IPV6]:PORT, "
                "for example [2001:db8::1]:5001"
            )
    else:
        address, colon, port_text = text.rpartition(":")
        if not colon or ":" in address:
            raise ValueError(
                f"invalid endpoint {text!r}: expected ADDR:PORT, with an IPv6 "
                "address in brackets, for example 198.18.1.2:5001"
            )
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"invalid port {port_text!r} in endpoint {text!r}") from None
    return _normalize_endpoint((address, port))


def _normalize_endpoint(endpoint: Endpoint) -> Endpoint:
    """Return the endpoint with its address in the form the segment parser uses."""
    address, port = endpoint
    try:
        canonical = str(ipaddress.ip_address(address))
    except ValueError:
        raise ValueError(f"invalid IP address {address!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid port {port}: expected 0 to 65535")
    return canonical, port


def _validate_wscale(scale: int) -> int:
    if not 0 <= scale <= MAX_WSCALE:
        raise ValueError(f"invalid window scale {scale}: expected 0 to {MAX_WSCALE}")
    return scale


# output


def format_report(report: CaptureReport) -> str:
    """Format one line per stored violation, then per-direction stats and a summary."""
    lines = [violation.describe() for violation in report.violations]
    omitted = report.violation_count - len(report.violations)
    if omitted:
        lines.append(f"... and {omitted} more violations not stored")
    for stats in report.directions:
        scale = f"wscale {stats.window_scale}"
        if stats.window_scale_assumed:
            scale += " (assumed: handshake not in capture)"
        lines.append(
            f"{stats.flow}: {stats.packets} packets, {scale}, "
            f"max right edge retraction {stats.max_right_edge_retraction}, "
            f"ACK regressions {stats.ack_regressions}, "
            f"TSval regressions {stats.tsval_regressions}"
            + (
                f", bytes delivered after ACK {stats.bytes_delivered_after_ack}"
                if report.check_duplicates
                else ""
            )
        )
    lines.append(
        f"{report.path}: {report.records} records, {report.tcp_segments} TCP "
        f"segments, {report.truncated_packets} truncated by the snap length, "
        f"{report.skipped_packets} not TCP or malformed"
    )
    if report.truncated_headers:
        lines.append(
            f"warning: {report.truncated_headers} segments skipped because the snap "
            "length cut their TCP header. Capture with a snap length of at least 128"
        )
    if not report.directions:
        source = f" from {report.only_from}" if report.only_from else ""
        lines.append(f"warning: no TCP segments{source} were checked")
    if report.ok:
        lines.append("OK: no violations")
    else:
        lines.append(f"FAILED: {report.violation_count} violations")
    return "\n".join(lines)


def _parse_assume_wscale(text: str) -> tuple[Endpoint, int]:
    endpoint_text, equals, scale_text = text.rpartition("=")
    if not equals:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected ADDR:PORT=N, for example "
            "198.18.1.2:5001=7"
        )
    try:
        endpoint = parse_endpoint(endpoint_text)
        scale = _validate_wscale(int(scale_text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return endpoint, scale


def _parse_endpoint_argument(text: str) -> Endpoint:
    try:
        return parse_endpoint(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shieldproxy check-pcap",
        description=(
            "Check a classic pcap capture for right-edge retractions, ACK and "
            "TSval regressions and, optionally, bytes sent after they were ACKed."
        ),
    )
    parser.add_argument("file", help="classic pcap file, as written by tcpdump -w")
    parser.add_argument(
        "--only-from",
        metavar="ADDR:PORT",
        type=_parse_endpoint_argument,
        help=(
            "check only segments sent from this endpoint, given as ADDR:PORT "
            "or [IPV6]:PORT"
        ),
    )
    parser.add_argument(
        "--assume-wscale",
        metavar="ADDR:PORT=N",
        type=_parse_assume_wscale,
        action="append",
        default=[],
        help=(
            "window scale shift used by the sender ADDR:PORT when its handshake "
            "is not in the capture (default 0). Repeat for several endpoints"
        ),
    )
    parser.add_argument(
        "--check-duplicates",
        action="store_true",
        help="also flag payload bytes sent after the receiver ACKed them",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check-pcap command and return its exit status.

    The status is 0 when the capture passes, 1 on violations and 2 when the file
    cannot be read. Invalid options raise SystemExit(2) from argparse.
    """
    args = _build_parser().parse_args(argv)
    assume: dict[Endpoint, int] = dict(args.assume_wscale)
    try:
        report = check_capture(
            args.file,
            only_from=args.only_from,
            assume_wscale=assume,
            check_duplicates=args.check_duplicates,
        )
    except (OSError, CaptureError) as error:
        print(f"shieldproxy check-pcap: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
