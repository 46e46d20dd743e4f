"""Fuzz the codec and the flow machine: short fixed-seed runs and properties.

tests/fuzz/run_fuzz.py contains the generators and the invariant checker; its
command line runs the long fuzz. Here a few seeds run briefly, hypothesis drives
the same checker with shrinkable inputs, and the inputs that once broke an
invariant stay as regression tests.
"""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldproxy.tcp.flow import (
    FinReceived,
    FlowLimits,
    ShieldFlow,
    Transmit,
    TricklePolicy,
)
from shieldproxy.tcp.reassembly import Reassembler
from shieldproxy.tcp.segment import (
    ACK,
    FIN,
    RST,
    SYN,
    MalformedSegment,
    Segment,
    TcpOptions,
    build_packet,
    encode_options,
    parse_options_untrusted,
    parse_packet_untrusted,
)
from shieldproxy.tcp.seq import seq_add
from shieldproxy.tcp.snapshot import FlowSnapshot
from tests.fuzz.run_fuzz import (
    KEYS,
    FlowChecker,
    FuzzFailure,
    FuzzStats,
    main,
    mutate,
    random_option_bytes,
    run_episode,
    run_fuzz,
    stream_content,
)

SND_NXT = 50_000
SND_UNA = 49_000
PEER_TSVAL = 7_000


def snapshot(
    *,
    family=4,
    rcv_nxt=2**32 - 500,
    lag=0,
    window=8192,
    wscale=0,
    sack=True,
    timestamps=True,
    ts_recent=None,
):
    return FlowSnapshot(
        key=KEYS[family],
        rcv_nxt=rcv_nxt,
        rcv_wup=seq_add(rcv_nxt, -lag),
        rcv_wnd=max(window, lag),
        snd_una=SND_UNA,
        snd_nxt=SND_NXT,
        rcv_wscale=wscale,
        snd_wscale=7,
        mss=1460,
        sack_ok=sack,
        timestamps_ok=timestamps,
        tsval=90_000,
        taken_at=10.0,
        ts_recent=ts_recent,
    )


def peer_segment(
    snap,
    offset,
    length=0,
    *,
    flags=ACK,
    ack=SND_NXT,
    tsval=PEER_TSVAL,
    payload=None,
):
    key = snap.key
    return Segment(
        version=key.family,
        src=key.peer_addr,
        dst=key.container_addr,
        sport=key.peer_port,
        dport=key.container_port,
        seq=seq_add(snap.rcv_nxt, offset),
        ack=ack,
        flags=flags,
        window=4000,
        options=TcpOptions(timestamp=(tsval, 1)),
        payload=stream_content(offset, length) if payload is None else payload,
    )


# fixed-seed runs


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fuzz_seed_keeps_invariants(seed):
    stats = run_fuzz(5_000, seed)
    assert stats.segments == 5_000
    assert stats.malformed > 0
    assert stats.parsed > 0
    assert stats.episodes > 0


def test_fuzz_command_line_succeeds(capsys):
    assert main(["--count", "2000", "--seed", "9"]) == 0
    output = capsys.readouterr().out
    assert "no invariant broken" in output
    assert "segments/s" in output


def test_fuzz_episode_replays_identically():
    first, second = FuzzStats(), FuzzStats()
    run_episode(11, 3, first)
    run_episode(11, 3, second)
    assert first == second


# the checker must catch a broken flow


def shrinking_window(self, now, *, ack_all):
    ack, window = original_choose_ack(self, now, ack_all=ack_all)
    return ack, max(0, window - 1)


def duplicating_prefix(self, end=None):
    data = original_prefix(self, end)
    return data[:1] + data[:-1] if len(data) > 1 else data


original_choose_ack = ShieldFlow._choose_ack
original_prefix = Reassembler.prefix


@pytest.mark.parametrize(
    ("target", "name", "replacement"),
    [
        (ShieldFlow, "_choose_ack", shrinking_window),
        (Reassembler, "prefix", duplicating_prefix),
    ],
)
def test_fuzz_reports_broken_flow(monkeypatch, target, name, replacement):
    monkeypatch.setattr(target, name, replacement)
    with pytest.raises(FuzzFailure) as caught:
        run_fuzz(20_000, 1)
    failure = caught.value
    assert failure.seed == 1
    assert f"--seed 1 --episode {failure.episode}" in str(failure)
    # the episode alone reproduces it
    with pytest.raises(FuzzFailure) as replayed:
        run_episode(1, failure.episode, FuzzStats())
    assert replayed.value.message == failure.message


# codec properties


@given(st.binary(min_size=40, max_size=40), st.sampled_from([4, 6]))
def test_random_options_parse_or_raise_malformed(options, version):
    snap = snapshot(family=version)
    bare = replace(peer_segment(snap, 0, 10), options=TcpOptions())
    packet = bytearray(build_packet(bare))
    header_length = 20 if version == 4 else 40
    # insert 40 option bytes between the 20-byte TCP header and the payload
    packet[header_length + 20 : header_length + 20] = options
    packet[header_length + 12] = 15 << 4
    if version == 4:
        packet[2:4] = len(packet).to_bytes(2, "big")
    else:
        packet[4:6] = (len(packet) - 40).to_bytes(2, "big")
    try:
        segment = parse_packet_untrusted(bytes(packet))
    except MalformedSegment:
        return
    assert segment.payload == stream_content(0, 10)


@given(st.randoms(use_true_random=False))
def test_parsed_options_encode_and_parse_back(rng):
    data = random_option_bytes(rng)
    try:
        options = parse_options_untrusted(data)
    except MalformedSegment:
        return
    try:
        encoded = encode_options(options)
    except ValueError:
        # Linux's layout pads with NOPs, so it may not fit where a dense input did
        return
    assert parse_options_untrusted(encoded) == options


@given(st.randoms(use_true_random=False), st.sampled_from([4, 6]))
def test_mutated_packets_raise_only_malformed(rng, version):
    snap = snapshot(family=version)
    packet = build_packet(peer_segment(snap, 100, rng.randrange(0, 200)))
    for _ in range(20):
        try:
            parse_packet_untrusted(mutate(rng, packet), verify_checksum=True)
        except MalformedSegment:
            pass


# flow properties


@st.composite
def flow_cases(draw):
    wscale = draw(st.sampled_from([0, 1, 7, 14]))
    snap = snapshot(
        family=draw(st.sampled_from([4, 6])),
        rcv_nxt=draw(st.sampled_from([2**32 - 500, 0, 123_456_789])),
        lag=draw(st.sampled_from([0, 0, 1, 700])),
        window=draw(st.integers(0, 300)) << wscale,
        wscale=wscale,
        sack=draw(st.booleans()),
        timestamps=draw(st.booleans()),
        ts_recent=draw(st.sampled_from([None, PEER_TSVAL])),
    )
    limits = FlowLimits(
        max_buffer_bytes=draw(st.sampled_from([None, 0, 3000])),
        challenge_acks_per_s=draw(st.integers(1, 10)),
    )
    trickle = draw(
        st.sampled_from(
            [None, TricklePolicy(step_bytes=1000, interval_s=0.1)],
        )
    )
    step = st.tuples(
        st.sampled_from(["data", "data", "fin", "rst", "syn", "ack", "garbage"]),
        st.integers(-3000, 40_000),
        st.integers(0, 3000),
        st.sampled_from([0, 0, -1000, 1, -(2**31)]),
        st.sampled_from([0, 1, 100, -5]),
        st.sampled_from([0.0, 0.001, 0.05, 1.5]),
    )
    return snap, limits, trickle, draw(st.lists(step, max_size=60))


@settings(max_examples=300, deadline=None)
@given(flow_cases())
def test_flow_keeps_invariants(case):
    snap, limits, trickle, steps = case
    checker = FlowChecker(snap, limits, trickle)
    now = snap.taken_at
    tsval = PEER_TSVAL
    for kind, offset, length, ack_shift, tsval_step, dt in steps:
        now += dt
        tsval = seq_add(tsval, tsval_step)
        flags = {"fin": ACK | FIN, "rst": RST, "syn": SYN}.get(kind, ACK)
        if kind in ("rst", "syn", "ack"):
            length = 0
        segment = peer_segment(
            snap,
            offset,
            length,
            flags=flags,
            ack=seq_add(SND_NXT, ack_shift),
            tsval=tsval,
            payload=bytes(length) if kind == "garbage" else None,
        )
        # through the codec, as the shield gets it
        segment = parse_packet_untrusted(build_packet(segment))
        checker.receive(segment, now)
        if dt >= 0.05:
            checker.on_deadline(now)
    checker.finish(now + 0.01)


# inputs that broke an invariant once


def test_fin_before_held_bytes_is_ignored():
    # Found by the fuzzer: a FIN inside an out-of-order block was recorded,
    # so filling the gap acknowledged bytes past the FIN and never the FIN.
    snap = snapshot(family=6, window=1024, sack=True, timestamps=False)
    checker = FlowChecker(snap)
    checker.receive(peer_segment(snap, 298, 726), 10.0)
    actions = checker.receive(peer_segment(snap, 385, 45, flags=ACK | FIN), 10.1)
    assert not any(isinstance(action, FinReceived) for action in actions)
    actions = checker.receive(peer_segment(snap, 0, 298), 10.2)
    assert not any(isinstance(action, FinReceived) for action in actions)
    assert checker.last_ack == 1024
    checker.finish(10.3)


def test_owed_delayed_ack_is_sent_on_deadline():
    # Found by the fuzzer: the container had not acknowledged the last 731
    # bytes below rcv_nxt, and after a pure ACK from the peer no timer was set
    # to do it, so the peer would resend them after its RTO.
    snap = snapshot(lag=731, window=4096)
    checker = FlowChecker(snap)
    assert checker.receive(peer_segment(snap, 0), 10.01) == []
    assert checker.flow.next_deadline() == 10.0 + FlowLimits().tail_ack_delay_s
    (tail,) = checker.on_deadline(10.05)
    assert isinstance(tail, Transmit)
    assert tail.reason == "tail"
    assert tail.segment.ack == snap.rcv_nxt
    checker.finish(10.1)


def test_data_with_ack_older_than_peer_window_rejected():
    # Found by the fuzzer: data with an ACK field below snd_una - MAX.SND.WND
    # was absorbed, though RFC 5961 section 5.2 rejects it.
    snap = snapshot()
    checker = FlowChecker(snap)
    oldest = seq_add(SND_UNA, -(0xFFFF << snap.snd_wscale))
    (answer,) = checker.receive(
        peer_segment(snap, 0, 100, ack=seq_add(oldest, -1)), 10.0
    )
    assert answer.reason == "challenge"
    assert checker.flow.buffered_bytes == 0
    assert checker.flow.stats.bad_ack_field == 1
    checker.receive(peer_segment(snap, 0, 100, ack=oldest), 10.0)
    assert checker.flow.buffered_bytes == 100
    checker.finish(10.1)


def test_stream_content_wraps_its_period():
    long = stream_content(-10, 70_000)
    assert long[10:20] == stream_content(0, 10)
    assert long[10 + 65_521 : 10 + 65_531] == stream_content(0, 10)
