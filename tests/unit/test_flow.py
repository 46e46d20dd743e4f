from hypothesis import given, settings
from hypothesis import strategies as st

from shieldproxy.tcp.flow import (
    RESTORE_TSVAL_MARGIN_MS,
    FinReceived,
    FlowLimits,
    FlowState,
    ResetReceived,
    ShieldFlow,
    Transmit,
    TricklePolicy,
    restore_tsval,
)
from shieldproxy.tcp.segment import ACK, FIN, PSH, RST, SYN, Segment, TcpOptions
from shieldproxy.tcp.seq import seq_add, seq_diff
from shieldproxy.tcp.snapshot import FlowKey, FlowSnapshot

KEY = FlowKey.create("198.18.2.2", 5001, "198.18.1.2", 40000)
RCV_NXT = 2**32 - 1000  # close to the wrap, so every test crosses it
SND_NXT = 7000
TSVAL = 100_000


def snapshot(
    *,
    window=8192,
    wscale=0,
    sack=True,
    timestamps=True,
    rcv_wup=None,
    ts_recent=None,
    peer_fin=False,
):
    rcv_wup = RCV_NXT if rcv_wup is None else rcv_wup
    return FlowSnapshot(
        key=KEY,
        rcv_nxt=RCV_NXT,
        rcv_wup=rcv_wup,
        rcv_wnd=window,
        snd_una=SND_NXT,
        snd_nxt=SND_NXT,
        rcv_wscale=wscale,
        snd_wscale=7,
        mss=1460,
        sack_ok=sack,
        timestamps_ok=timestamps,
        tsval=TSVAL,
        taken_at=10.0,
        ts_recent=ts_recent,
        peer_fin=peer_fin,
    )


def peer(offset, payload=b"", *, flags=ACK, tsval=500, ack=SND_NXT, seq=None):
    return Segment(
        version=4,
        src=KEY.peer_addr,
        dst=KEY.container_addr,
        sport=KEY.peer_port,
        dport=KEY.container_port,
        seq=seq_add(RCV_NXT, offset) if seq is None else seq,
        ack=ack,
        flags=flags,
        window=1000,
        options=TcpOptions(timestamp=(tsval, TSVAL)),
        payload=payload,
    )


def only_transmit(actions):
    transmits = [a for a in actions if isinstance(a, Transmit)]
    assert len(transmits) == 1, actions
    return transmits[0]


def edge(segment, wscale):
    return seq_add(segment.ack, segment.window << wscale)


def test_in_order_data_absorbed_and_acked():
    flow = ShieldFlow(snapshot())
    reply = only_transmit(flow.receive(peer(0, b"a" * 1000), now=10.5))
    assert reply.reason == "data"
    assert reply.segment.ack == seq_add(RCV_NXT, 1000)
    assert reply.segment.window == 8192 - 1000
    assert reply.segment.seq == SND_NXT
    assert reply.segment.src == KEY.container_addr
    assert reply.segment.dport == KEY.peer_port
    assert reply.segment.options.timestamp == (TSVAL + 500, 500)
    assert flow.stats.bytes_absorbed == 1000


def test_out_of_order_data_reported_with_sack():
    flow = ShieldFlow(snapshot())
    reply = only_transmit(flow.receive(peer(2000, b"c" * 500), now=10.0))
    assert reply.segment.ack == RCV_NXT
    assert reply.segment.options.sack_blocks == (
        (seq_add(RCV_NXT, 2000), seq_add(RCV_NXT, 2500)),
    )
    reply = only_transmit(flow.receive(peer(0, b"a" * 2000), now=10.0))
    assert reply.segment.ack == seq_add(RCV_NXT, 2500)
    assert reply.segment.options.sack_blocks == ()
    handover, _ = flow.handover(now=11.0)
    assert handover.data == b"a" * 2000 + b"c" * 500


def test_no_sack_blocks_when_sack_off():
    flow = ShieldFlow(snapshot(sack=False))
    reply = only_transmit(flow.receive(peer(2000, b"c" * 500), now=10.0))
    assert reply.segment.options.sack_blocks == ()


def test_data_beyond_right_edge_dropped_and_counted():
    flow = ShieldFlow(snapshot(window=1000))
    reply = only_transmit(flow.receive(peer(0, b"x" * 1500), now=10.0))
    assert reply.segment.ack == seq_add(RCV_NXT, 1000)
    assert reply.segment.window == 0
    assert flow.stats.bytes_beyond_edge == 500
    assert flow.buffered_bytes == 1000


def test_duplicate_and_overlap_trimmed():
    flow = ShieldFlow(snapshot())
    flow.receive(peer(0, b"a" * 100), now=10.0)
    reply = only_transmit(flow.receive(peer(50, b"a" * 50 + b"b" * 50), now=10.0))
    assert reply.segment.ack == seq_add(RCV_NXT, 150)
    assert flow.stats.bytes_duplicate == 50
    assert flow.handover(now=10.0)[0].data == b"a" * 100 + b"b" * 50


def test_keepalive_answered():
    flow = ShieldFlow(snapshot())
    # Linux keepalive: one sequence number below rcv_nxt, no payload
    reply = only_transmit(flow.receive(peer(-1), now=12.0))
    assert reply.reason == "out-of-window"
    assert reply.segment.ack == RCV_NXT
    # a second one within the rate limit is not answered, a later one is
    assert flow.receive(peer(-1), now=12.1) == []
    assert len(flow.receive(peer(-1), now=13.0)) == 1


def test_keepalive_with_garbage_byte_answered():
    flow = ShieldFlow(snapshot())
    reply = only_transmit(flow.receive(peer(-1, b"\x00"), now=12.0))
    assert reply.segment.ack == RCV_NXT
    assert flow.buffered_bytes == 0


def test_zero_window_probe_answered():
    flow = ShieldFlow(snapshot(window=100))
    flow.receive(peer(0, b"x" * 100), now=10.0)
    # a one-byte probe past the edge, as BSD-derived stacks send
    reply = only_transmit(flow.receive(peer(100, b"y"), now=11.0))
    assert reply.segment.ack == seq_add(RCV_NXT, 100)
    assert reply.segment.window == 0
    # Linux's probe: sequence number snd_una - 1, no payload
    reply = only_transmit(flow.receive(peer(99), now=12.0))
    assert reply.segment.window == 0
    assert flow.buffered_bytes == 100


def test_rst_at_exact_sequence_accepted():
    flow = ShieldFlow(snapshot())
    flow.receive(peer(0, b"a" * 10), now=10.0)
    actions = flow.receive(peer(10, flags=RST | ACK), now=10.0)
    assert actions == [ResetReceived()]
    assert flow.state is FlowState.RESET
    assert flow.handover(now=10.0)[0].reset


def test_rst_in_window_gets_challenge_ack():
    flow = ShieldFlow(snapshot())
    reply = only_transmit(flow.receive(peer(5, flags=RST), now=10.0))
    assert reply.reason == "challenge"
    assert flow.state is FlowState.SHIELDING


def test_rst_outside_window_dropped():
    flow = ShieldFlow(snapshot(window=1000))
    assert flow.receive(peer(5000, flags=RST), now=10.0) == []
    assert flow.receive(peer(-5000, flags=RST), now=10.0) == []
    assert flow.stats.rst_ignored == 2
    assert flow.state is FlowState.SHIELDING


def test_syn_gets_rate_limited_challenge_ack():
    flow = ShieldFlow(snapshot(), limits=FlowLimits(challenge_acks_per_s=3))
    answers = [flow.receive(peer(7, flags=SYN), now=10.0) for _ in range(10)]
    assert sum(len(a) for a in answers) == 3
    assert flow.stats.challenge_acks_suppressed == 7
    assert len(flow.receive(peer(7, flags=SYN), now=11.5)) == 1


def test_ack_of_unsent_data_rejected():
    flow = ShieldFlow(snapshot())
    reply = only_transmit(flow.receive(peer(0, b"z" * 10, ack=SND_NXT + 5), now=10.0))
    assert reply.reason == "bad-ack"
    assert flow.buffered_bytes == 0


def test_segment_without_ack_flag_dropped():
    flow = ShieldFlow(snapshot())
    assert flow.receive(peer(0, b"z", flags=PSH), now=10.0) == []
    assert flow.stats.no_ack_flag == 1


def test_fin_acknowledged_after_data():
    flow = ShieldFlow(snapshot())
    reply = only_transmit(flow.receive(peer(100, b"b" * 10, flags=ACK | FIN), now=10.0))
    assert reply.segment.ack == RCV_NXT
    actions = flow.receive(peer(0, b"a" * 100), now=10.0)
    assert FinReceived(seq_add(RCV_NXT, 110)) in actions
    reply = only_transmit(actions)
    assert reply.segment.ack == seq_add(RCV_NXT, 111)
    handover, _ = flow.handover(now=10.0)
    assert handover.fin
    assert handover.data == b"a" * 100 + b"b" * 10


def test_bare_fin_accepted_into_zero_window():
    flow = ShieldFlow(snapshot(window=10))
    flow.receive(peer(0, b"a" * 10), now=10.0)
    actions = flow.receive(peer(10, flags=ACK | FIN), now=10.0)
    assert FinReceived(seq_add(RCV_NXT, 10)) in actions
    assert only_transmit(actions).segment.ack == seq_add(RCV_NXT, 11)


def test_keepalive_after_fin_answered():
    flow = ShieldFlow(snapshot())
    flow.receive(peer(0, b"a" * 10, flags=ACK | FIN), now=10.0)
    # the peer's keepalive probe after its FIN carries the FIN's sequence number
    reply = only_transmit(flow.receive(peer(10), now=12.0))
    assert reply.reason == "out-of-window"
    assert reply.segment.ack == seq_add(RCV_NXT, 11)


def test_retransmitted_fin_acknowledged_again():
    flow = ShieldFlow(snapshot())
    flow.receive(peer(0, b"a" * 10, flags=ACK | FIN), now=10.0)
    reply = only_transmit(flow.receive(peer(0, b"a" * 10, flags=ACK | FIN), now=10.3))
    assert reply.segment.ack == seq_add(RCV_NXT, 11)
    assert flow.stats.bytes_duplicate == 10
    assert flow.handover(now=11.0)[0].fin


def test_rst_after_fin_at_next_sequence_accepted():
    flow = ShieldFlow(snapshot())
    flow.receive(peer(0, b"a" * 10, flags=ACK | FIN), now=10.0)
    assert flow.receive(peer(11, flags=RST | ACK), now=11.0) == [ResetReceived()]
    handover, _ = flow.handover(now=11.0)
    assert handover.reset
    assert handover.data == b"a" * 10


def test_rst_at_last_ack_sent_accepted():
    # 200 bytes held, but the ACK stayed on the window-scale grid at 128
    flow = ShieldFlow(snapshot(window=128 * 10, wscale=7))
    reply = only_transmit(flow.receive(peer(0, b"x" * 200), now=10.0))
    assert reply.segment.ack == seq_add(RCV_NXT, 128)
    # a peer without a socket replies to an ACK with an RST at its ACK number
    assert flow.receive(peer(128, flags=RST), now=10.01) == [ResetReceived()]
    handover, final_ack = flow.handover(now=10.02)
    assert final_ack is None
    assert handover.reset
    assert handover.rcv_nxt == seq_add(RCV_NXT, 128)


def test_release_update_keeps_fin_acknowledged():
    flow = ShieldFlow(snapshot())
    flow.receive(peer(0, b"a" * 10, flags=ACK | FIN), now=10.0)
    handover, _ = flow.handover(now=11.0)
    update = flow.release_update(
        11.0, rcv_nxt=handover.rcv_nxt, right_edge=seq_add(RCV_NXT, 8192)
    )
    assert update.segment.ack == seq_add(RCV_NXT, 11)
    assert edge(update.segment, 0) == seq_add(RCV_NXT, 8192)


def test_fin_before_freeze_retransmission_acknowledged():
    # CLOSE_WAIT: the container took the peer's FIN, so RCV_NXT counts it
    flow = ShieldFlow(snapshot(peer_fin=True))
    reply = only_transmit(flow.receive(peer(-1, flags=ACK | FIN), now=10.0))
    assert reply.segment.ack == RCV_NXT
    assert flow.buffered_bytes == 0


def test_data_after_fin_before_freeze_dropped():
    flow = ShieldFlow(snapshot(peer_fin=True))
    actions = flow.receive(peer(0, b"late" * 10, flags=ACK | FIN), now=10.0)
    assert not any(isinstance(action, FinReceived) for action in actions)
    assert only_transmit(actions).segment.ack == RCV_NXT
    assert flow.stats.bytes_after_fin == 40
    assert flow.stats.bytes_absorbed == 0
    handover, final_ack = flow.handover(now=11.0)
    assert final_ack is None
    assert handover.data == b""
    assert not handover.fin
    assert handover.rcv_nxt == RCV_NXT


def test_rst_after_fin_before_freeze_accepted():
    flow = ShieldFlow(snapshot(peer_fin=True))
    assert flow.receive(peer(0, flags=RST), now=10.0) == [ResetReceived()]
    assert flow.handover(now=10.5)[0].reset


def test_paws_rejects_old_timestamp():
    flow = ShieldFlow(snapshot())
    flow.receive(peer(0, b"a", tsval=1000), now=10.0)
    reply = only_transmit(flow.receive(peer(1, b"b", tsval=999), now=10.0))
    assert reply.reason == "paws"
    assert flow.stats.paws_rejected == 1
    assert flow.buffered_bytes == 1


def test_tsecr_echoes_segment_at_left_edge():
    flow = ShieldFlow(snapshot())
    # out-of-order segment: its TSval must not become ts_recent
    reply = only_transmit(flow.receive(peer(10, b"b", tsval=2000), now=10.0))
    assert reply.segment.options.timestamp[1] == 2000  # first TSval seen is taken
    reply = only_transmit(flow.receive(peer(20, b"c", tsval=3000), now=10.0))
    assert reply.segment.options.timestamp[1] == 2000
    reply = only_transmit(flow.receive(peer(0, b"a" * 10, tsval=4000), now=10.0))
    assert reply.segment.options.timestamp[1] == 4000


def test_tsval_follows_container_clock_and_never_goes_back():
    flow = ShieldFlow(snapshot())
    first = only_transmit(flow.receive(peer(0, b"a"), now=12.0))
    assert first.segment.options.timestamp[0] == TSVAL + 2000
    # a clock that steps back must not move TSval back
    second = only_transmit(flow.receive(peer(1, b"b"), now=11.0))
    assert second.segment.options.timestamp[0] == TSVAL + 2000
    assert flow.handover(now=13.0)[0].tsval == TSVAL + 3000


def test_no_timestamp_option_when_not_negotiated():
    flow = ShieldFlow(snapshot(timestamps=False))
    reply = only_transmit(flow.receive(peer(0, b"a"), now=10.0))
    assert reply.segment.options.timestamp is None


def test_handover_stops_answering():
    flow = ShieldFlow(snapshot())
    flow.receive(peer(0, b"a" * 10), now=10.0)
    handover, _ = flow.handover(now=10.0)
    assert handover.rcv_nxt == seq_add(RCV_NXT, 10)
    assert handover.start_seq == RCV_NXT
    assert flow.receive(peer(10, b"b"), now=10.0) == []
    assert flow.stats.after_handover == 1


def test_handover_so_far_keeps_answering():
    flow = ShieldFlow(snapshot())
    flow.receive(peer(0, b"a" * 10), now=10.0)
    early = flow.handover_so_far(now=10.0)
    assert early.data == b"a" * 10
    assert early.start_seq == RCV_NXT
    # the flow still acknowledges what comes after the early hand-over
    reply = only_transmit(flow.receive(peer(10, b"b" * 5), now=10.5))
    assert reply.segment.ack == seq_add(RCV_NXT, 15)
    final, _ = flow.handover(now=11.0)
    assert final.data == b"a" * 10 + b"b" * 5
    assert final.data.startswith(early.data)
    assert final.start_seq == early.start_seq


def test_window_scale_rounding_never_retracts_edge():
    wscale = 7
    flow = ShieldFlow(snapshot(window=128 * 100, wscale=wscale))
    initial_edge = seq_add(RCV_NXT, 128 * 100)
    last_edge = initial_edge
    for offset in range(0, 1000, 100):
        reply = only_transmit(flow.receive(peer(offset, b"x" * 100), now=10.0))
        current = edge(reply.segment, wscale)
        assert seq_diff(current, last_edge) >= 0
        last_edge = current
    assert flow.stats.max_right_edge_retraction == 0


def test_buffer_limit_bounds_absorbed_bytes():
    wscale = 7
    flow = ShieldFlow(
        snapshot(window=128 * 10, wscale=wscale),
        limits=FlowLimits(max_buffer_bytes=128 * 11),
    )
    # one-byte segments, each followed by a tail ACK that moves the edge right
    best_edge = seq_add(RCV_NXT, 128 * 10)
    now = 10.0
    for offset in range(2000):
        now += 0.05
        actions = flow.receive(peer(offset, b"x"), now) + flow.on_deadline(now)
        for action in actions:
            assert seq_diff(edge(action.segment, wscale), best_edge) >= 0
            best_edge = edge(action.segment, wscale)
    assert flow.buffered_bytes <= 128 * 11
    assert flow.stats.bytes_beyond_edge > 0
    assert flow.stats.max_right_edge_retraction == 0


def test_off_grid_tail_acked_after_delay():
    wscale = 7
    flow = ShieldFlow(snapshot(window=128 * 10, wscale=wscale))
    reply = only_transmit(flow.receive(peer(0, b"x" * 200), now=10.0))
    # 200 is not a multiple of 128: the ack stays on the grid for now
    assert reply.segment.ack == seq_add(RCV_NXT, 128)
    assert reply.segment.window == 9
    assert flow.next_deadline() == 10.0 + FlowLimits().tail_ack_delay_s
    assert flow.on_deadline(10.01) == []
    tail = only_transmit(flow.on_deadline(10.05))
    assert tail.reason == "tail"
    assert tail.segment.ack == seq_add(RCV_NXT, 200)
    # the edge moved right by less than one unit instead of moving left
    assert edge(tail.segment, wscale) == seq_add(RCV_NXT, 200 + 9 * 128)
    assert flow.next_deadline() is None
    handover, final_ack = flow.handover(now=10.1)
    assert final_ack is None
    assert handover.data == b"x" * 200


def test_handover_acks_tail_at_once():
    flow = ShieldFlow(snapshot(window=128 * 10, wscale=7))
    flow.receive(peer(0, b"x" * 200), now=10.0)
    handover, final_ack = flow.handover(now=10.001)
    assert final_ack is not None
    assert final_ack.segment.ack == seq_add(RCV_NXT, 200)
    assert handover.data == b"x" * 200
    assert handover.discarded_bytes == 0


def test_out_of_order_bytes_not_handed_over():
    flow = ShieldFlow(snapshot())
    flow.receive(peer(0, b"a" * 10), now=10.0)
    flow.receive(peer(20, b"c" * 10), now=10.0)
    handover, final_ack = flow.handover(now=10.0)
    assert final_ack is None
    assert handover.data == b"a" * 10
    assert handover.discarded_bytes == 10


def test_container_delayed_ack_is_caught_up():
    # The container last acked 500 bytes before rcv_nxt.
    flow = ShieldFlow(snapshot(rcv_wup=seq_add(RCV_NXT, -500), window=8192))
    assert flow.ack_sent == seq_add(RCV_NXT, -500)
    reply = only_transmit(flow.receive(peer(0, b"a"), now=10.0))
    assert reply.segment.ack == seq_add(RCV_NXT, 1)
    assert edge(reply.segment, 0) == seq_add(RCV_NXT, 8192 - 500)
    assert flow.handover(now=10.0)[0].data == b"a"


def test_trickle_opens_a_filled_window():
    flow = ShieldFlow(
        snapshot(window=100),
        trickle=TricklePolicy(step_bytes=50, interval_s=1.0),
        limits=FlowLimits(max_buffer_bytes=200),
    )
    flow.receive(peer(0, b"a" * 100), now=10.0)
    assert flow.on_deadline(10.0) == []  # arms the timer
    assert flow.next_deadline() == 11.0
    reply = only_transmit(flow.on_deadline(11.0))
    assert reply.reason == "window-update"
    assert reply.segment.window == 50
    flow.receive(peer(100, b"b" * 50), now=11.5)
    only_transmit(flow.on_deadline(12.0))
    flow.receive(peer(150, b"c" * 50), now=12.5)
    # the buffer limit is reached: no more window
    assert flow.on_deadline(13.0) == []
    assert flow.buffered_bytes == 200


@st.composite
def peer_segments(draw):
    count = draw(st.integers(min_value=1, max_value=60))
    result = []
    for _ in range(count):
        kind = draw(
            st.sampled_from(["data", "data", "data", "ack", "rst", "syn", "fin"])
        )
        offset = draw(st.integers(min_value=-3000, max_value=40_000))
        size = draw(st.integers(min_value=0, max_value=3000))
        tsval = draw(st.integers(min_value=0, max_value=2**32 - 1))
        flags = {"data": ACK, "ack": ACK, "rst": RST, "syn": SYN, "fin": ACK | FIN}[
            kind
        ]
        payload = b"" if kind in ("ack", "rst", "syn") else bytes(size)
        result.append(peer(offset, payload, flags=flags, tsval=tsval))
    return result


@settings(max_examples=300)
@given(
    peer_segments(),
    st.integers(min_value=0, max_value=14),
    st.integers(min_value=0, max_value=2000),
    st.booleans(),
)
def test_right_edge_never_retracts(segments, wscale, window_units, timestamps):
    unit = 1 << wscale
    window = min(window_units * unit, 0xFFFF << wscale)
    flow = ShieldFlow(
        snapshot(window=window, wscale=wscale, timestamps=timestamps),
        trickle=TricklePolicy(step_bytes=1000, interval_s=0.1),
    )
    best_edge = seq_add(RCV_NXT, window)
    last_ack = RCV_NXT
    last_tsval = TSVAL
    now = 10.0
    for segment in segments:
        now += 0.05
        actions = flow.receive(segment, now) + flow.on_deadline(now)
        for action in actions:
            if not isinstance(action, Transmit):
                continue
            sent = action.segment
            assert sent.window <= 0xFFFF
            assert seq_diff(edge(sent, wscale), best_edge) >= 0
            best_edge = edge(sent, wscale)
            assert seq_diff(sent.ack, last_ack) >= 0
            last_ack = sent.ack
            if timestamps:
                assert seq_diff(sent.options.timestamp[0], last_tsval) >= 0
                last_tsval = sent.options.timestamp[0]
    handover, final_ack = flow.handover(now)
    if final_ack is not None:
        assert seq_diff(edge(final_ack.segment, wscale), best_edge) >= 0
        last_ack = final_ack.segment.ack
    assert flow.stats.max_right_edge_retraction == 0
    assert seq_diff(handover.right_edge, best_edge) >= 0
    # every byte handed over was acknowledged, and nothing acknowledged is lost
    assert seq_diff(handover.rcv_nxt, last_ack) <= 0


def test_restore_tsval_stays_ahead_of_shield():
    flow = ShieldFlow(snapshot())
    handover, _ = flow.handover(now=12.0)
    restored = restore_tsval(handover.tsval, 12.0, 12.0304)
    # the shield's clock 30.4 ms later, plus the margin for millisecond ticks
    assert restored == TSVAL + 2000 + 31 + RESTORE_TSVAL_MARGIN_MS
    assert seq_diff(restored, flow.tsval_at(12.0304)) >= RESTORE_TSVAL_MARGIN_MS
