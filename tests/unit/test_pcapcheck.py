import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

from shieldproxy.pcapcheck import (
    CaptureError,
    Check,
    check_capture,
    first_new_data_at,
    format_report,
    main,
    parse_endpoint,
    read_packets,
)

CLIENT = "198.18.1.2"
SERVER = "198.18.2.2"
CLIENT6 = "2001:db8::1"
SERVER6 = "2001:db8::2"
CPORT = 40000
SPORT = 5001
ISN_C = 1000
ISN_S = 5000
# Explicit MAC addresses, because a bare Ether() makes scapy resolve the
# destination with ARP or neighbor discovery, which sends packets.
MAC_SRC = "02:00:00:00:00:01"
MAC_DST = "02:00:00:00:00:02"


def seg(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: str,
    seq: int,
    ack: int = 0,
    window: int = 512,
    tsval: int | None = None,
    wscale: int | None = None,
    payload: bytes = b"",
) -> Packet:
    options: list[tuple[str, object]] = []
    if wscale is not None:
        options.append(("WScale", wscale))
    if tsval is not None:
        options.append(("Timestamp", (tsval, 0)))
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    packet = ip / TCP(
        sport=sport,
        dport=dport,
        flags=flags,
        seq=seq,
        ack=ack,
        window=window,
        options=options,
    )
    if payload:
        packet = packet / Raw(payload)
    return packet


def c2s(flags: str, seq: int, ack: int = 0, **kwargs: Any) -> Packet:
    return seg(CLIENT, SERVER, CPORT, SPORT, flags, seq, ack, **kwargs)


def s2c(flags: str, seq: int, ack: int = 0, **kwargs: Any) -> Packet:
    return seg(SERVER, CLIENT, SPORT, CPORT, flags, seq, ack, **kwargs)


def handshake(
    client_ws: int | None = 7, server_ws: int | None = 7, server_tsval: int = 900
) -> list[Packet]:
    return [
        c2s("S", ISN_C, window=64240, wscale=client_ws, tsval=100),
        s2c("SA", ISN_S, ISN_C + 1, window=65160, wscale=server_ws, tsval=server_tsval),
        c2s("A", ISN_C + 1, ISN_S + 1, window=502, tsval=101),
    ]


def ether() -> Ether:
    return Ether(src=MAC_SRC, dst=MAC_DST)


def write_ether(path: Path, packets: list[Packet]) -> Path:
    """Write packets as Ethernet frames with scapy's own pcap writer."""
    wrpcap(str(path), [ether() / p for p in packets])
    return path


def write_pcap(
    path: Path,
    frames: list[bytes],
    *,
    linktype: int = 1,
    byte_order: str = "<",
    nanoseconds: bool = False,
    snaplen: int = 65535,
    timestamps: list[tuple[int, int]] | None = None,
) -> Path:
    """Write a classic pcap file, cutting each frame to the snap length."""
    magic = 0xA1B23C4D if nanoseconds else 0xA1B2C3D4
    out = bytearray(
        struct.pack(byte_order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    )
    for index, frame in enumerate(frames):
        seconds, fraction = timestamps[index] if timestamps else (1700000000, index)
        captured = frame[:snaplen]
        out += struct.pack(
            byte_order + "IIII", seconds, fraction, len(captured), len(frame)
        )
        out += captured
    path.write_bytes(bytes(out))
    return path


def retraction_packets() -> list[Packet]:
    """A handshake with wscale 7, then the server shrinks its window by one unit."""
    return handshake() + [
        s2c("A", ISN_S + 1, ISN_C + 1, window=500, tsval=901),
        s2c("A", ISN_S + 1, ISN_C + 1, window=499, tsval=902),
    ]


# clean capture


def test_clean_connection_passes(tmp_path: Path) -> None:
    data = b"x" * 1000
    packets = handshake() + [
        c2s("PA", ISN_C + 1, ISN_S + 1, window=502, tsval=102, payload=data),
        s2c("A", ISN_S + 1, ISN_C + 1001, window=497, tsval=901),
        c2s("PA", ISN_C + 1001, ISN_S + 1, window=502, tsval=103, payload=data),
        s2c("A", ISN_S + 1, ISN_C + 2001, window=496, tsval=902),
        c2s("FA", ISN_C + 2001, ISN_S + 1, window=502, tsval=104),
        s2c("FA", ISN_S + 1, ISN_C + 2002, window=496, tsval=903),
        c2s("A", ISN_C + 2002, ISN_S + 2, window=502, tsval=105),
    ]
    report = check_capture(write_ether(tmp_path / "clean.pcap", packets))
    assert report.ok
    assert report.violations == []
    assert report.records == 10
    assert report.tcp_segments == 10
    assert len(report.directions) == 2
    by_flow = {d.flow: d for d in report.directions}
    server = by_flow[f"{SERVER}:{SPORT} > {CLIENT}:{CPORT}"]
    client = by_flow[f"{CLIENT}:{CPORT} > {SERVER}:{SPORT}"]
    assert server.packets == 4
    assert client.packets == 6
    assert server.window_scale == 7
    assert not server.window_scale_assumed
    assert server.max_right_edge_retraction == 0
    assert server.first_timestamp < server.last_timestamp
    assert "OK: no violations" in format_report(report)


def test_window_scale_is_per_direction(tmp_path: Path) -> None:
    # The server shifts by 2: ACKing 100 bytes while dropping the window by
    # 20 units is 80 bytes of shrink with its own scale, but 2560 with the
    # client's scale 7.
    packets = handshake(client_ws=7, server_ws=2) + [
        c2s("PA", ISN_C + 1, ISN_S + 1, window=502, tsval=102, payload=b"y" * 100),
        s2c("A", ISN_S + 1, ISN_C + 1, window=1000, tsval=901),
        s2c("A", ISN_S + 1, ISN_C + 101, window=980, tsval=902),
    ]
    report = check_capture(write_ether(tmp_path / "scales.pcap", packets))
    assert report.ok, format_report(report)
    scales = {d.flow: d.window_scale for d in report.directions}
    assert scales[f"{SERVER}:{SPORT} > {CLIENT}:{CPORT}"] == 2
    assert scales[f"{CLIENT}:{CPORT} > {SERVER}:{SPORT}"] == 7


def test_scale_zero_without_both_options(tmp_path: Path) -> None:
    # The SYN-ACK carries no wscale, so the client's 7 does not apply and a
    # one-unit shrink is one byte.
    packets = handshake(client_ws=7, server_ws=None) + [
        c2s("A", ISN_C + 1, ISN_S + 1, window=501, tsval=102),
    ]
    report = check_capture(write_ether(tmp_path / "noscale.pcap", packets))
    assert report.violation_count == 1
    assert report.violations[0].amount == 1


# violations


def test_right_edge_retraction_caught(tmp_path: Path) -> None:
    report = check_capture(write_ether(tmp_path / "shrink.pcap", retraction_packets()))
    assert not report.ok
    assert report.violation_count == 1
    violation = report.violations[0]
    assert violation.check is Check.RIGHT_EDGE
    assert violation.packet == 5
    assert violation.amount == 128
    assert violation.previous == ISN_C + 1 + (500 << 7)
    assert violation.new == ISN_C + 1 + (499 << 7)
    server = next(d for d in report.directions if d.flow.startswith(SERVER))
    assert server.max_right_edge_retraction == 128
    assert server.right_edge_retractions == 1
    expected = (
        f"packet 5 {SERVER}:{SPORT} > {CLIENT}:{CPORT}: right edge moved left by 128 "
        f"(from {ISN_C + 1 + (500 << 7)} to {ISN_C + 1 + (499 << 7)})"
    )
    assert expected in format_report(report).splitlines()


def test_right_edge_compared_with_highest(tmp_path: Path) -> None:
    packets = handshake() + [
        s2c("A", ISN_S + 1, ISN_C + 1, window=500, tsval=901),
        s2c("A", ISN_S + 1, ISN_C + 1, window=490, tsval=902),
        s2c("A", ISN_S + 1, ISN_C + 1, window=495, tsval=903),
    ]
    report = check_capture(write_ether(tmp_path / "regrow.pcap", packets))
    assert [v.amount for v in report.violations] == [10 << 7, 5 << 7]
    assert all(v.previous == ISN_C + 1 + (500 << 7) for v in report.violations)


def test_rst_and_syn_windows_ignored(tmp_path: Path) -> None:
    packets = handshake() + [
        s2c("A", ISN_S + 1, ISN_C + 1, window=500, tsval=901),
        s2c("RA", ISN_S + 1, ISN_C + 1, window=0, tsval=902),
    ]
    report = check_capture(write_ether(tmp_path / "rst.pcap", packets))
    assert report.ok, format_report(report)


def test_ack_regression_caught(tmp_path: Path) -> None:
    packets = handshake() + [
        c2s("PA", ISN_C + 1, ISN_S + 1, window=502, tsval=102, payload=b"z" * 300),
        s2c("A", ISN_S + 1, ISN_C + 301, window=500, tsval=901),
        s2c("A", ISN_S + 1, ISN_C + 201, window=501, tsval=902),
    ]
    report = check_capture(write_ether(tmp_path / "ack.pcap", packets))
    checks = [v.check for v in report.violations]
    assert Check.ACK in checks
    ack_violation = report.violations[checks.index(Check.ACK)]
    assert ack_violation.previous == ISN_C + 301
    assert ack_violation.new == ISN_C + 201
    assert ack_violation.amount == 100
    assert ack_violation.packet == 6
    assert "ACK moved back by 100" in format_report(report)


def test_tsval_forward_wrap_passes(tmp_path: Path) -> None:
    packets = handshake(server_tsval=2**32 - 20) + [
        s2c("A", ISN_S + 1, ISN_C + 1, window=500, tsval=2**32 - 10),
        s2c("A", ISN_S + 1, ISN_C + 1, window=500, tsval=5),
    ]
    report = check_capture(write_ether(tmp_path / "wrap.pcap", packets))
    assert report.ok, format_report(report)


def test_tsval_regression_across_wrap(tmp_path: Path) -> None:
    packets = handshake(server_tsval=2**32 - 20) + [
        s2c("A", ISN_S + 1, ISN_C + 1, window=500, tsval=2**32 - 10),
        s2c("A", ISN_S + 1, ISN_C + 1, window=500, tsval=5),
        s2c("A", ISN_S + 1, ISN_C + 1, window=500, tsval=2**32 - 5),
    ]
    report = check_capture(write_ether(tmp_path / "tsback.pcap", packets))
    assert report.violation_count == 1
    violation = report.violations[0]
    assert violation.check is Check.TSVAL
    assert violation.previous == 5
    assert violation.new == 2**32 - 5
    assert violation.amount == 10
    server = next(d for d in report.directions if d.flow.startswith(SERVER))
    assert server.tsval_regressions == 1


def test_port_reuse_starts_over(tmp_path: Path) -> None:
    first = retraction_packets()[:4]
    second = [
        c2s("S", 77, window=64240, wscale=7, tsval=10),
        s2c("SA", 99, 78, window=65160, wscale=7, tsval=20),
        c2s("A", 78, 100, window=502, tsval=11),
        s2c("A", 100, 78, window=500, tsval=21),
    ]
    report = check_capture(write_ether(tmp_path / "reuse.pcap", first + second))
    assert report.ok, format_report(report)


def test_duplicate_delivery_counted(tmp_path: Path) -> None:
    data = b"d" * 1000
    packets = handshake() + [
        c2s("PA", ISN_C + 1, ISN_S + 1, window=502, tsval=102, payload=data),
        s2c("A", ISN_S + 1, ISN_C + 1001, window=500, tsval=901),
        c2s("PA", ISN_C + 501, ISN_S + 1, window=502, tsval=103, payload=data),
    ]
    path = write_ether(tmp_path / "dup.pcap", packets)
    assert check_capture(path).ok
    report = check_capture(path, check_duplicates=True)
    assert report.violation_count == 1
    violation = report.violations[0]
    assert violation.check is Check.DELIVERED_AFTER_ACK
    assert violation.amount == 500
    assert violation.previous == ISN_C + 1001
    assert violation.new == ISN_C + 501
    client = next(d for d in report.directions if d.flow.startswith(CLIENT))
    assert client.bytes_delivered_after_ack == 500


def test_max_violations_bounds_list(tmp_path: Path) -> None:
    packets = handshake() + [
        s2c("A", ISN_S + 1, ISN_C + 1, window=500 - n, tsval=901 + n) for n in range(5)
    ]
    report = check_capture(
        write_ether(tmp_path / "many.pcap", packets), max_violations=2
    )
    assert report.violation_count == 4
    assert len(report.violations) == 2
    assert "2 more violations not stored" in format_report(report)


# missing handshake


def no_handshake_packets() -> list[Packet]:
    # Scale 0: edge goes from A+10 to A+109. Scale 7: from A+1280 to A+1252.
    return [
        s2c("A", ISN_S + 1, ISN_C + 1, window=10, tsval=901),
        s2c("A", ISN_S + 1, ISN_C + 101, window=9, tsval=902),
    ]


def test_missing_handshake_assumes_zero(tmp_path: Path) -> None:
    report = check_capture(write_ether(tmp_path / "mid.pcap", no_handshake_packets()))
    assert report.ok
    (server,) = report.directions
    assert server.window_scale == 0
    assert server.window_scale_assumed
    assert "assumed" in format_report(report)


def test_missing_handshake_uses_assume_wscale(tmp_path: Path) -> None:
    path = write_ether(tmp_path / "mid.pcap", no_handshake_packets())
    report = check_capture(path, assume_wscale={(SERVER, SPORT): 7})
    assert report.violation_count == 1
    assert report.violations[0].amount == 28
    (server,) = report.directions
    assert server.window_scale == 7
    assert server.window_scale_assumed


def test_synack_alone_gives_server_scale(tmp_path: Path) -> None:
    packets = [
        s2c("SA", ISN_S, ISN_C + 1, window=65160, wscale=7, tsval=900),
        c2s("A", ISN_C + 1, ISN_S + 1, window=502, tsval=101),
        *retraction_packets()[3:],
    ]
    report = check_capture(write_ether(tmp_path / "synack.pcap", packets))
    by_flow = {d.flow: d for d in report.directions}
    server = by_flow[f"{SERVER}:{SPORT} > {CLIENT}:{CPORT}"]
    client = by_flow[f"{CLIENT}:{CPORT} > {SERVER}:{SPORT}"]
    assert server.window_scale == 7
    assert not server.window_scale_assumed
    assert client.window_scale_assumed
    assert report.violations[0].amount == 128


def test_assume_wscale_rejects_invalid() -> None:
    with pytest.raises(ValueError, match="invalid window scale 15"):
        check_capture("unused.pcap", assume_wscale={(SERVER, SPORT): 15})


# capture formats


def frames_of(packets: list[Packet]) -> list[bytes]:
    return [bytes(ether() / p) for p in packets]


def test_truncated_capture_parses(tmp_path: Path) -> None:
    packets = handshake() + [
        c2s("PA", ISN_C + 1, ISN_S + 1, window=502, tsval=102, payload=b"p" * 1400),
        s2c("A", ISN_S + 1, ISN_C + 1401, window=500, tsval=901),
        s2c("A", ISN_S + 1, ISN_C + 1401, window=499, tsval=902),
    ]
    path = write_pcap(tmp_path / "snap.pcap", frames_of(packets), snaplen=128)
    read = list(read_packets(path))
    assert [truncated for _, _, _, truncated in read] == [False] * 3 + [True] + [
        False
    ] * 2
    big = read[3][2]
    assert len(big) == len(bytes(packets[3]))
    assert big[:100] == bytes(packets[3])[:100]
    report = check_capture(path)
    assert report.tcp_segments == 6
    assert report.truncated_packets == 1
    assert report.skipped_packets == 0
    assert report.violations[0].amount == 128


def test_cut_tcp_header_skipped(tmp_path: Path) -> None:
    # 14 + 20 + 20 bytes keeps the IP header and the first 20 TCP bytes, but
    # not the timestamp option, so the segment cannot be checked.
    packets = handshake() + [s2c("A", ISN_S + 1, ISN_C + 1, window=500, tsval=901)]
    frames = frames_of(packets)
    path = write_pcap(tmp_path / "cut.pcap", frames, snaplen=54)
    report = check_capture(path)
    assert report.truncated_headers == 4
    assert report.tcp_segments == 0
    assert "cut their TCP header" in format_report(report)


def test_bad_magic_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad.pcap"
    path.write_bytes(b"\x00\x11\x22\x33" + bytes(20))
    with pytest.raises(CaptureError) as caught:
        list(read_packets(path))
    assert caught.value.offset == 0
    assert str(path) in str(caught.value)
    assert "0x00112233" in str(caught.value)


def test_pcapng_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ng.pcapng"
    path.write_bytes(struct.pack("<I", 0x0A0D0D0A) + bytes(40))
    with pytest.raises(CaptureError, match="pcapng"):
        check_capture(path)


def test_record_overrun_raises(tmp_path: Path) -> None:
    frames = frames_of(retraction_packets()[:2])
    path = write_pcap(tmp_path / "overrun.pcap", frames)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CaptureError) as caught:
        check_capture(path)
    assert caught.value.offset == 24 + 16 + len(frames[0])
    assert f"byte offset {24 + 16 + len(frames[0])}" in str(caught.value)
    assert str(path) in str(caught.value)


def test_truncated_record_header_raises(tmp_path: Path) -> None:
    frames = frames_of(retraction_packets()[:1])
    path = write_pcap(tmp_path / "hdr.pcap", frames)
    path.write_bytes(path.read_bytes() + bytes(7))
    with pytest.raises(CaptureError, match="record header of packet 2") as caught:
        check_capture(path)
    assert caught.value.offset == 24 + 16 + len(frames[0])


def test_unsupported_link_type_raises(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "wifi.pcap", [], linktype=105)
    with pytest.raises(CaptureError, match="link type 105 is not supported"):
        check_capture(path)


def sll_frame(ip: bytes) -> bytes:
    ethertype = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return struct.pack("!HHH8sH", 0, 1, 6, bytes(8), ethertype) + ip


def sll2_frame(ip: bytes) -> bytes:
    ethertype = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return struct.pack("!HHIHBB8s", ethertype, 0, 2, 1, 0, 6, bytes(8)) + ip


def vlan_frame(ip: bytes) -> bytes:
    """Wrap an IPv4 packet in Ethernet with one 802.1Q tag (VLAN 5)."""
    return bytes(12) + struct.pack("!HHH", 0x8100, 5, 0x0800) + ip


def unwrapped(ip: bytes) -> bytes:
    return ip


@pytest.mark.parametrize(
    ("linktype", "wrap"),
    [
        (101, unwrapped),
        (228, unwrapped),
        (113, sll_frame),
        (276, sll2_frame),
        (1, vlan_frame),
    ],
    ids=["raw", "ipv4", "sll", "sll2", "vlan"],
)
def test_link_types_find_retraction(
    tmp_path: Path, linktype: int, wrap: Callable[[bytes], bytes]
) -> None:
    frames = [wrap(bytes(p)) for p in retraction_packets()]
    path = write_pcap(tmp_path / "link.pcap", frames, linktype=linktype)
    report = check_capture(path)
    assert report.tcp_segments == 5
    assert report.violation_count == 1
    assert report.violations[0].amount == 128


def test_non_ip_frames_skipped(tmp_path: Path) -> None:
    arp = bytes(Ether(src=MAC_SRC, dst=MAC_DST, type=0x0806)) + bytes(28)
    frames = [arp] + frames_of(retraction_packets())
    report = check_capture(write_pcap(tmp_path / "arp.pcap", frames))
    assert report.records == 6
    assert report.tcp_segments == 5
    assert report.violations[0].packet == 6


def test_nanosecond_timestamps(tmp_path: Path) -> None:
    frames = frames_of(retraction_packets()[:1])
    path = write_pcap(
        tmp_path / "ns.pcap", frames, nanoseconds=True, timestamps=[(100, 500_000_000)]
    )
    ((number, timestamp, _, _),) = read_packets(path)
    assert number == 1
    assert timestamp == pytest.approx(100.5)


def test_microsecond_timestamps(tmp_path: Path) -> None:
    frames = frames_of(retraction_packets()[:1])
    path = write_pcap(tmp_path / "us.pcap", frames, timestamps=[(100, 250_000)])
    ((_, timestamp, _, _),) = read_packets(path)
    assert timestamp == pytest.approx(100.25)


def test_big_endian_file(tmp_path: Path) -> None:
    frames = frames_of(retraction_packets())
    stamps = [(200, n * 1000) for n in range(len(frames))]
    path = write_pcap(tmp_path / "be.pcap", frames, byte_order=">", timestamps=stamps)
    assert path.read_bytes()[:4] == bytes.fromhex("a1b2c3d4")
    report = check_capture(path)
    assert report.violation_count == 1
    assert report.violations[0].amount == 128
    assert report.violations[0].timestamp == pytest.approx(200.004)


def ipv6_retraction_packets() -> list[Packet]:
    return [
        seg(CLIENT6, SERVER6, CPORT, SPORT, "S", ISN_C, wscale=7, tsval=100),
        seg(SERVER6, CLIENT6, SPORT, CPORT, "SA", ISN_S, ISN_C + 1, wscale=7),
        seg(CLIENT6, SERVER6, CPORT, SPORT, "A", ISN_C + 1, ISN_S + 1, tsval=101),
        seg(SERVER6, CLIENT6, SPORT, CPORT, "A", ISN_S + 1, ISN_C + 1, window=500),
        seg(SERVER6, CLIENT6, SPORT, CPORT, "A", ISN_S + 1, ISN_C + 1, window=499),
    ]


def test_ipv6_flow(tmp_path: Path) -> None:
    report = check_capture(write_ether(tmp_path / "v6.pcap", ipv6_retraction_packets()))
    assert report.violation_count == 1
    violation = report.violations[0]
    assert violation.flow == f"[{SERVER6}]:{SPORT} > [{CLIENT6}]:{CPORT}"
    assert violation.amount == 128


def test_raw_ipv6_link_type(tmp_path: Path) -> None:
    frames = [bytes(p) for p in ipv6_retraction_packets()]
    report = check_capture(write_pcap(tmp_path / "v6raw.pcap", frames, linktype=229))
    assert report.tcp_segments == 5
    assert report.violations[0].amount == 128


def test_only_from_ipv6_normalized(tmp_path: Path) -> None:
    path = write_ether(tmp_path / "v6.pcap", ipv6_retraction_packets())
    report = check_capture(path, only_from=("2001:db8:0:0::1", CPORT))
    assert report.ok
    assert [d.flow for d in report.directions] == [
        f"[{CLIENT6}]:{CPORT} > [{SERVER6}]:{SPORT}"
    ]
    assert main([str(path), "--only-from", f"[{SERVER6}]:{SPORT}"]) == 1


# only_from


def both_sides_shrink() -> list[Packet]:
    return handshake() + [
        s2c("A", ISN_S + 1, ISN_C + 1, window=500, tsval=901),
        s2c("A", ISN_S + 1, ISN_C + 1, window=499, tsval=902),
        c2s("A", ISN_C + 1, ISN_S + 1, window=501, tsval=102),
    ]


def test_only_from_filters_directions(tmp_path: Path) -> None:
    path = write_ether(tmp_path / "both.pcap", both_sides_shrink())
    assert check_capture(path).violation_count == 2
    report = check_capture(path, only_from=(SERVER, SPORT))
    assert report.violation_count == 1
    assert report.violations[0].flow.startswith(f"{SERVER}:{SPORT}")
    assert [d.flow for d in report.directions] == [
        f"{SERVER}:{SPORT} > {CLIENT}:{CPORT}"
    ]
    client_only = check_capture(path, only_from=(CLIENT, CPORT))
    assert client_only.violations[0].flow.startswith(f"{CLIENT}:{CPORT}")


def test_only_from_without_match_warns(tmp_path: Path) -> None:
    path = write_ether(tmp_path / "both.pcap", both_sides_shrink())
    report = check_capture(path, only_from=("198.18.9.9", 1))
    assert report.ok
    assert "no TCP segments from 198.18.9.9:1 were checked" in format_report(report)


def test_parse_endpoint_forms() -> None:
    assert parse_endpoint("198.18.1.2:5001") == ("198.18.1.2", 5001)
    assert parse_endpoint("[2001:db8:0::2]:80") == ("2001:db8::2", 80)
    with pytest.raises(ValueError, match="in brackets"):
        parse_endpoint("2001:db8::2:80")
    with pytest.raises(ValueError, match="invalid port"):
        parse_endpoint("198.18.1.2:http")
    with pytest.raises(ValueError, match="invalid IP address"):
        parse_endpoint("host:80")


# main


def test_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = write_ether(tmp_path / "clean.pcap", handshake())
    shrink = write_ether(tmp_path / "shrink.pcap", retraction_packets())
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(bytes(24))
    assert main([str(clean)]) == 0
    assert main([str(shrink)]) == 1
    assert "right edge moved left by 128" in capsys.readouterr().out
    assert main([str(bad)]) == 2
    assert "invalid magic number" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pcap")]) == 2


def test_main_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mid = write_ether(tmp_path / "mid.pcap", no_handshake_packets())
    assert main([str(mid)]) == 0
    assert main([str(mid), "--assume-wscale", f"{SERVER}:{SPORT}=7"]) == 1
    assert main([str(mid), "--only-from", f"{CLIENT}:{CPORT}"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        main([str(mid), "--assume-wscale", f"{SERVER}:{SPORT}"])
    assert caught.value.code == 2
    assert "expected ADDR:PORT=N" in capsys.readouterr().err


def test_main_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_ether(tmp_path / "shrink.pcap", retraction_packets())
    assert main([str(path), "--json", "--only-from", f"{SERVER}:{SPORT}"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    assert data["violation_count"] == 1
    assert data["violations"][0]["check"] == "right-edge"
    assert data["violations"][0]["amount"] == 128
    assert data["only_from"] == f"{SERVER}:{SPORT}"
    assert data["directions"][0]["max_right_edge_retraction"] == 128


def peer_data(seq: int, length: int) -> bytes:
    packet = seg(CLIENT, SERVER, CPORT, SPORT, "A", seq, ISN_S, payload=b"d" * length)
    return bytes(ether() / packet)


@pytest.mark.parametrize("start", [ISN_C, 2**32 - 1500], ids=["plain", "wrapping"])
def test_first_new_data_after_retransmission(tmp_path, start):
    frames = [
        peer_data(start, 1000),
        peer_data((start + 1000) % 2**32, 1000),
        # after the resume: a retransmission, then bytes never sent before
        peer_data(start, 1000),
        peer_data((start + 1000) % 2**32, 1500),
        bytes(ether() / seg(SERVER, CLIENT, SPORT, CPORT, "A", ISN_S, start)),
    ]
    times = [(1700000000, 0), (1700000000, 1000), (1700000005, 0),
             (1700000005, 250000), (1700000006, 0)]  # fmt: skip
    path = write_pcap(tmp_path / "data.pcap", frames, timestamps=times)
    found = first_new_data_at(path, (SERVER, SPORT), after=1700000004.0)
    assert found == pytest.approx(1700000005.25)


def test_first_new_data_none_without_new_bytes(tmp_path):
    frames = [peer_data(ISN_C, 1000), peer_data(ISN_C, 1000)]
    times = [(1700000000, 0), (1700000005, 0)]
    path = write_pcap(tmp_path / "data.pcap", frames, timestamps=times)
    assert first_new_data_at(path, (SERVER, SPORT), after=1700000004.0) is None
    # bytes to another receiver do not count
    assert first_new_data_at(path, (CLIENT, CPORT), after=1699999999.0) is None
