import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from shieldproxy.tcp.segment import (
    ACK,
    FIN,
    PSH,
    SYN,
    MalformedSegment,
    Segment,
    TcpOptions,
    build_packet,
    internet_checksum,
    parse_packet_untrusted,
)
from shieldproxy.tcp.snapshot import FlowKey

u32 = st.integers(min_value=0, max_value=2**32 - 1)
u16 = st.integers(min_value=0, max_value=2**16 - 1)
ports = st.integers(min_value=1, max_value=65535)
v4 = st.sampled_from(["198.18.1.2", "198.18.2.2", "198.19.255.254"])
v6 = st.sampled_from(["2001:2:0:1::2", "2001:2:0:2::2", "2001:2::ffff"])

options_strategy = st.builds(
    TcpOptions,
    mss=st.none() | st.integers(min_value=0, max_value=65535),
    wscale=st.none() | st.integers(min_value=0, max_value=14),
    sack_permitted=st.booleans(),
    sack_blocks=st.just(()),
    timestamp=st.none() | st.tuples(u32, u32),
)
ack_options = st.builds(
    TcpOptions,
    sack_blocks=st.lists(st.tuples(u32, u32), max_size=3).map(tuple),
    timestamp=st.none() | st.tuples(u32, u32),
)


@st.composite
def segments(draw):
    version = draw(st.sampled_from([4, 6]))
    addrs = v4 if version == 4 else v6
    options = draw(st.one_of(options_strategy, ack_options))
    return Segment(
        version=version,
        src=draw(addrs),
        dst=draw(addrs),
        sport=draw(ports),
        dport=draw(ports),
        seq=draw(u32),
        ack=draw(u32),
        flags=draw(st.integers(min_value=0, max_value=0xFF)),
        window=draw(u16),
        options=options,
        payload=draw(st.binary(max_size=300)),
        urgent=draw(u16),
    )


def scapy_options(options):
    """Translate scapy's option list into our TcpOptions."""
    out = TcpOptions()
    values = {}
    for name, value in options:
        values[name] = value
    return TcpOptions(
        mss=values.get("MSS"),
        wscale=values.get("WScale"),
        sack_permitted="SAckOK" in values,
        sack_blocks=tuple(zip(values["SAck"][0::2], values["SAck"][1::2], strict=True))
        if "SAck" in values
        else out.sack_blocks,
        timestamp=values.get("Timestamp"),
    )


@given(segments())
def test_built_packet_parses_identically_in_scapy(segment):
    packet = build_packet(segment)
    parsed = (IP if segment.version == 4 else IPv6)(packet)
    tcp = parsed[TCP]
    assert parsed.src == segment.src
    assert parsed.dst == segment.dst
    assert tcp.sport == segment.sport
    assert tcp.dport == segment.dport
    assert tcp.seq == segment.seq
    assert tcp.ack == segment.ack
    assert int(tcp.flags) == segment.flags
    assert tcp.window == segment.window
    assert tcp.urgptr == segment.urgent
    assert bytes(tcp.payload) == segment.payload
    assert scapy_options(tcp.options) == segment.options
    # checksums: scapy recomputes them when the fields are deleted
    rebuilt = parsed.copy()
    del rebuilt[TCP].chksum
    if segment.version == 4:
        del rebuilt[IP].chksum
    assert bytes(rebuilt) == packet


@given(segments())
def test_scapy_packet_parses_identically(segment):
    layer = (
        IP(src=segment.src, dst=segment.dst)
        if segment.version == 4
        else IPv6(src=segment.src, dst=segment.dst)
    )
    opts = []
    o = segment.options
    if o.mss is not None:
        opts.append(("MSS", o.mss))
    if o.wscale is not None:
        opts.append(("WScale", o.wscale))
    if o.sack_permitted:
        opts.append(("SAckOK", b""))
    if o.timestamp is not None:
        opts.append(("Timestamp", o.timestamp))
    if o.sack_blocks:
        opts.append(("SAck", tuple(x for block in o.sack_blocks for x in block)))
    packet = bytes(
        layer
        / TCP(
            sport=segment.sport,
            dport=segment.dport,
            seq=segment.seq,
            ack=segment.ack,
            flags=segment.flags,
            window=segment.window,
            urgptr=segment.urgent,
            options=opts,
        )
        / segment.payload
    )
    parsed = parse_packet_untrusted(packet, verify_checksum=True)
    assert parsed == segment
    assert parsed.checksum_ok is True


@given(segments())
def test_parse_inverts_build(segment):
    parsed = parse_packet_untrusted(build_packet(segment), verify_checksum=True)
    assert parsed == segment
    assert parsed.checksum_ok is True


def reference_checksum(*parts):
    """RFC 1071 checksum one 16-bit word at a time, each part padded alone."""
    total = 0
    for part in parts:
        padded = bytes(part) + b"\x00" * (len(part) % 2)
        for index in range(0, len(padded), 2):
            total += int.from_bytes(padded[index : index + 2], "big")
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.lists(st.binary(max_size=80), max_size=4))
def test_checksum_matches_word_by_word_sum(parts):
    assert internet_checksum(*parts) == reference_checksum(*parts)


@pytest.mark.parametrize("word", [0x0000, 0x0001, 0xFFFE, 0xFFFF])
def test_checksum_of_repeated_word(word):
    data = word.to_bytes(2, "big") * 3
    assert internet_checksum(data) == reference_checksum(data)


def hextets():
    # zero runs of every length, so every compression case comes up
    return st.lists(
        st.sampled_from([0, 0, 0, 1, 0xFFFF]) | st.integers(0, 0xFFFF),
        min_size=8,
        max_size=8,
    )


IPV6_SPECIAL = [
    "::",
    "::1",
    "::ffff:198.18.1.2",
    "::198.18.1.2",
    "::ffff:0:198.18.1.2",
    "64:ff9b::198.18.1.2",
    "2001:2::",
    "2001:2:0:0:1::",
    "2001:0:0:1:0:0:0:2",
]


def tcp_packet_from(src, dst):
    version = ipaddress.ip_address(src).version
    return build_packet(Segment(version, src, dst, 1, 2, 3, 4, ACK, 5))


@given(hextets(), hextets())
def test_parsed_ipv6_text_matches_ipaddress(src_words, dst_words):
    src, dst = (
        ipaddress.IPv6Address(b"".join(w.to_bytes(2, "big") for w in words))
        for words in (src_words, dst_words)
    )
    segment = parse_packet_untrusted(tcp_packet_from(str(src), str(dst)))
    assert segment.src == str(src)
    assert segment.dst == str(dst)


@pytest.mark.parametrize("text", IPV6_SPECIAL)
def test_parsed_ipv6_special_text_matches_ipaddress(text):
    segment = parse_packet_untrusted(tcp_packet_from(text, "2001:2::1"))
    assert segment.src == str(ipaddress.IPv6Address(text))


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4))
def test_parsed_ipv4_text_matches_ipaddress(src, dst):
    packet = tcp_packet_from(
        str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst))
    )
    segment = parse_packet_untrusted(packet)
    assert segment.src == str(ipaddress.IPv4Address(src))
    assert segment.dst == str(ipaddress.IPv4Address(dst))


def test_address_conversion_past_cache_size():
    # more distinct addresses than the codec caches, twice over
    for round_number in range(2):
        for index in range(5000):
            src = str(ipaddress.IPv4Address(0xC6120000 + index))
            segment = parse_packet_untrusted(tcp_packet_from(src, "198.18.0.1"))
            assert segment.src == src, round_number


def test_build_rejects_invalid_address():
    segment = Segment(4, "198.18.1.256", "198.18.2.2", 1, 2, 3, 4, ACK, 5)
    with pytest.raises(ValueError, match="does not appear to be an IPv4"):
        build_packet(segment)


def test_build_rejects_address_of_other_version():
    segment = Segment(4, "2001:2::1", "198.18.2.2", 1, 2, 3, 4, ACK, 5)
    with pytest.raises(ValueError, match="do not match IPv4"):
        build_packet(segment)


@pytest.mark.parametrize(
    ("text", "canonical", "family"),
    [
        ("198.18.1.2", "198.18.1.2", 4),
        ("2001:2:0:1:0:0:0:2", "2001:2:0:1::2", 6),
        ("2001:0002:0000:0001::0002", "2001:2:0:1::2", 6),
        ("::ffff:198.18.1.2", str(ipaddress.IPv6Address("::ffff:198.18.1.2")), 6),
    ],
)
def test_flow_key_normalizes_addresses(text, canonical, family):
    for _ in range(2):  # the second call reads the cache
        key = FlowKey.create(text, 1, text, 2)
        assert key.container_addr == canonical
        assert key.peer_addr == canonical
        assert key.family == family


@pytest.mark.parametrize("text", ["198.18.1.256", "", "2001:2::1::2", "01.2.3.4"])
def test_flow_key_rejects_invalid_address(text):
    for _ in range(2):  # errors are not cached
        with pytest.raises(ValueError):
            FlowKey.create(text, 1, "198.18.1.2", 2)
        with pytest.raises(ValueError):
            _ = FlowKey(text, 1, "198.18.1.2", 2).family


def test_checksum_detects_corruption():
    segment = Segment(4, "198.18.1.2", "198.18.2.2", 1, 2, 3, 4, ACK, 5, payload=b"x")
    packet = bytearray(build_packet(segment))
    packet[-1] ^= 0x01
    assert (
        parse_packet_untrusted(bytes(packet), verify_checksum=True).checksum_ok is False
    )


def test_internet_checksum_odd_length():
    # RFC 1071 example bytes, plus an odd trailing byte padded with zero.
    assert internet_checksum(b"\x00\x01\xf2\x03\xf4\xf5\xf6\xf7") == 0x220D
    assert internet_checksum(b"\x01") == 0xFEFF


def valid_packet(version=4, payload=b"hello"):
    segment = Segment(
        version,
        "198.18.1.2" if version == 4 else "2001:2:0:1::2",
        "198.18.2.2" if version == 4 else "2001:2:0:2::2",
        40000,
        5001,
        1000,
        2000,
        ACK | PSH,
        512,
        TcpOptions(timestamp=(1, 2), sack_blocks=((5, 9),)),
        payload,
    )
    return build_packet(segment)


def replace(data, offset, value):
    out = bytearray(data)
    out[offset : offset + len(value)] = value
    return bytes(out)


MALFORMED = {
    "empty": b"",
    "version 5": b"\x50" + bytes(39),
    "ipv4 truncated": valid_packet()[:19],
    "ipv4 ihl below 20": replace(valid_packet(), 0, b"\x44"),
    "ipv4 total length over packet": replace(valid_packet(), 2, b"\xff\xff"),
    "ipv4 total length under header": replace(valid_packet(), 2, b"\x00\x10"),
    "ipv4 not tcp": replace(valid_packet(), 9, b"\x11"),
    "ipv4 fragment": replace(valid_packet(), 6, b"\x20\x00"),
    "tcp truncated": valid_packet(payload=b"")[:30],
    "tcp data offset below 20": replace(valid_packet(), 32, b"\x40"),
    "tcp data offset over segment": replace(valid_packet(), 32, b"\xf0"),
    "option without length": replace(valid_packet(payload=b""), 40, b"\x08"),
    "option length zero": replace(valid_packet(payload=b""), 43, b"\x00"),
    "option overruns header": replace(valid_packet(payload=b""), 42, b"\x08\x30"),
    "timestamp wrong length": replace(valid_packet(payload=b""), 42, b"\x08\x09"),
    "ipv6 truncated": valid_packet(6)[:39],
    "ipv6 payload length over packet": replace(valid_packet(6), 4, b"\xff\xff"),
    "ipv6 not tcp": replace(valid_packet(6), 6, b"\x11"),
    "ipv6 fragment": replace(valid_packet(6), 6, b"\x2c"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_packet_raises(name):
    with pytest.raises(MalformedSegment):
        parse_packet_untrusted(MALFORMED[name])


@pytest.mark.parametrize("version", [4, 6])
def test_every_truncation_and_mutation_raises_only_malformed(version):
    packet = valid_packet(version)
    rng = random.Random(version)
    candidates = [packet[:n] for n in range(len(packet))]
    for _ in range(3000):
        mutated = bytearray(packet)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        candidates.append(bytes(mutated[: rng.randint(0, len(mutated))]))
    for candidate in candidates:
        try:
            parse_packet_untrusted(candidate, verify_checksum=True)
        except MalformedSegment:
            pass


@given(st.binary(max_size=120))
def test_random_bytes_raise_only_malformed(data):
    try:
        parse_packet_untrusted(data, verify_checksum=True)
    except MalformedSegment:
        pass


def test_segment_str_names_flags():
    segment = Segment(4, "198.18.1.2", "198.18.2.2", 1, 2, 3, 4, SYN | ACK | FIN, 5)
    assert "[FSA]" in str(segment)
