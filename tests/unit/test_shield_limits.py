"""The shield engine's memory limits, and the queue binding's bounded batches.

Packets are faked: each carries a segment built with the project's codec, and
records the verdict the shield gives it.
"""

import errno
import random
import socket

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from shieldproxy.config import ShieldConfig
from shieldproxy.control import ControlError
from shieldproxy.daemon import Daemon, ScopeState
from shieldproxy.kernel import nfqueue
from shieldproxy.kernel.nfqueue import QueueBinding
from shieldproxy.metrics import ShieldMetrics
from shieldproxy.shield import DROP_REASONS, FlowLimitError, Shield
from shieldproxy.state import snapshot_document
from shieldproxy.tcp.flow import FlowLimits
from shieldproxy.tcp.segment import (
    ACK,
    FIN,
    Segment,
    TcpOptions,
    build_packet,
    parse_packet_untrusted,
)
from shieldproxy.tcp.seq import seq_add
from shieldproxy.tcp.snapshot import FlowKey, FlowSnapshot

RCV_NXT = 2**32 - 1000  # close to the wrap, so the tests cross it
SND_NXT = 7000
TSVAL = 100_000
PEER_TSVAL = 3_000_000


def key(port):
    return FlowKey.create("198.18.2.2", 5001, "198.18.1.2", port)


FIRST, SECOND, THIRD = key(40000), key(40001), key(40002)


def snapshot(flow_key, *, window=65536):
    return FlowSnapshot(
        key=flow_key,
        rcv_nxt=RCV_NXT,
        rcv_wup=RCV_NXT,
        rcv_wnd=window,
        snd_una=SND_NXT,
        snd_nxt=SND_NXT,
        rcv_wscale=0,
        snd_wscale=7,
        mss=1460,
        sack_ok=True,
        timestamps_ok=True,
        tsval=TSVAL,
        taken_at=10.0,
        ts_recent=None,
    )


def peer_segment(flow_key, offset, payload=b"", *, flags=ACK):
    return Segment(
        version=4,
        src=flow_key.peer_addr,
        dst=flow_key.container_addr,
        sport=flow_key.peer_port,
        dport=flow_key.container_port,
        seq=seq_add(RCV_NXT, offset),
        ack=SND_NXT,
        flags=flags,
        window=1000,
        options=TcpOptions(timestamp=(PEER_TSVAL, TSVAL)),
        payload=payload,
    )


class FakePacket:
    """A queued packet that records its verdict."""

    def __init__(self, segment):
        self._payload = build_packet(segment)
        self.verdict = None

    def get_payload(self):
        return self._payload

    def retain(self):
        pass

    def accept(self):
        self.verdict = "accept"

    def drop(self):
        self.verdict = "drop"


class ListSender:
    def __init__(self):
        self.segments = []

    def send(self, packet, version, dst):
        self.segments.append(parse_packet_untrusted(packet))
        return True

    def acks_to(self, flow_key):
        return [s.ack for s in self.segments if s.dport == flow_key.peer_port]


class RecordingJournal:
    """An AckJournal that keeps the payload lengths it was given."""

    def __init__(self):
        self.data = []

    def record_data(self, key, seq, payload):
        self.data.append((key, seq, len(payload)))

    def record_acked(self, key, state):
        pass

    def commit(self):
        pass

    def is_durable(self, key):
        return True


def send(shield, flow_key, offset, payload=b"", *, flags=ACK, now=10.0):
    packet = FakePacket(peer_segment(flow_key, offset, payload, flags=flags))
    shield.handle_packet(packet, now)
    return packet


def flows_buffered(shield):
    return sum(flow.buffered_bytes for flow in shield.flows.values())


# total buffer


def test_total_buffer_cuts_segment():
    sender = ListSender()
    shield = Shield(sender, total_buffer_bytes=3000)
    shield.add_flow(snapshot(FIRST), 10.0)
    shield.add_flow(snapshot(SECOND), 10.0)
    send(shield, FIRST, 0, b"a" * 2000)
    send(shield, SECOND, 0, b"b" * 2000)
    assert shield.flows[FIRST].buffered_bytes == 2000
    assert shield.flows[SECOND].buffered_bytes == 1000
    assert shield.buffered_bytes == 3000
    assert sender.acks_to(SECOND) == [seq_add(RCV_NXT, 1000)]
    assert shield.counters.dropped["total-buffer-limit"] == 1
    assert shield.counters.dropped_bytes["total-buffer-limit"] == 1000


def test_total_buffer_full_drops_data_unacknowledged():
    sender = ListSender()
    shield = Shield(sender, total_buffer_bytes=1000)
    flow = shield.add_flow(snapshot(FIRST), 10.0)
    send(shield, FIRST, 0, b"a" * 1000)
    acks_before = len(sender.segments)
    packet = send(shield, FIRST, 1000, b"a" * 500)
    assert packet.verdict == "drop"
    assert flow.rcv_nxt == seq_add(RCV_NXT, 1000)
    assert flow.stats.bytes_absorbed == 1000
    # an in-window segment without payload gets no reply, as on Linux
    assert len(sender.segments) == acks_before
    assert shield.counters.dropped["total-buffer-limit"] == 1
    assert shield.counters.dropped_bytes["total-buffer-limit"] == 500


def test_total_buffer_room_after_release():
    sender = ListSender()
    shield = Shield(sender, total_buffer_bytes=1500)
    shield.add_flow(snapshot(FIRST), 10.0)
    second = shield.add_flow(snapshot(SECOND), 10.0)
    send(shield, FIRST, 0, b"a" * 1000)
    send(shield, SECOND, 0, b"b" * 1000)
    assert second.rcv_nxt == seq_add(RCV_NXT, 500)
    shield.handover(FIRST, 10.1)
    shield.release(FIRST, 10.2)
    assert shield.buffered_bytes == 500
    # the peer sends the cut bytes again
    send(shield, SECOND, 500, b"b" * 500, now=10.3)
    assert second.rcv_nxt == seq_add(RCV_NXT, 1000)
    assert sender.acks_to(SECOND)[-1] == seq_add(RCV_NXT, 1000)
    assert shield.buffered_bytes == flows_buffered(shield) == 1000


def test_total_buffer_cut_drops_fin():
    shield = Shield(ListSender(), total_buffer_bytes=1000)
    flow = shield.add_flow(snapshot(FIRST), 10.0)
    send(shield, FIRST, 0, b"a" * 1500, flags=ACK | FIN)
    assert flow.rcv_nxt == seq_add(RCV_NXT, 1000)
    assert not flow.fin_received


def test_total_buffer_ignores_duplicates():
    sender = ListSender()
    shield = Shield(sender, total_buffer_bytes=1000)
    flow = shield.add_flow(snapshot(FIRST), 10.0)
    send(shield, FIRST, 0, b"a" * 1000)
    acks_before = len(sender.segments)
    send(shield, FIRST, 0, b"a" * 1000)
    assert shield.counters.dropped["total-buffer-limit"] == 0
    assert flow.stats.bytes_duplicate == 1000
    # the retransmission is acknowledged again
    assert sender.acks_to(FIRST)[acks_before:] == [seq_add(RCV_NXT, 1000)]


def test_total_buffer_leaves_beyond_edge_to_flow():
    shield = Shield(ListSender(), total_buffer_bytes=1000)
    flow = shield.add_flow(snapshot(FIRST, window=4000), 10.0)
    send(shield, FIRST, 0, b"a" * 1000)
    send(shield, FIRST, 5000, b"x" * 300)
    assert shield.counters.dropped["total-buffer-limit"] == 0
    assert flow.stats.bytes_beyond_edge == 300


def test_total_buffer_journal_gets_cut_payload():
    journal = RecordingJournal()
    shield = Shield(ListSender(), total_buffer_bytes=600, journal=journal)
    shield.add_flow(snapshot(FIRST), 10.0)
    send(shield, FIRST, 0, b"a" * 1000)
    assert journal.data == [(FIRST, RCV_NXT, 600)]


def test_total_buffer_never_exceeded():
    rng = random.Random(7)
    total = 5000
    shield = Shield(ListSender(), total_buffer_bytes=total)
    keys = (FIRST, SECOND, THIRD)
    for flow_key in keys:
        shield.add_flow(snapshot(flow_key, window=4000), 10.0)
    for step in range(2000):
        flow_key = rng.choice(keys)
        offset = rng.randrange(-500, 4500)
        length = rng.randrange(1, 1400)
        flags = ACK | FIN if rng.random() < 0.05 else ACK
        send(shield, flow_key, offset, b"z" * length, flags=flags, now=10.0 + step)
        assert shield.buffered_bytes == flows_buffered(shield)
        assert shield.buffered_bytes <= total
    assert shield.counters.dropped["total-buffer-limit"] > 0


def test_configure_lowers_total_buffer():
    shield = Shield(ListSender(), total_buffer_bytes=10_000)
    flow = shield.add_flow(snapshot(FIRST), 10.0)
    send(shield, FIRST, 0, b"a" * 1000)
    shield.configure(FlowLimits(), None, total_buffer_bytes=500, max_flows=None)
    send(shield, FIRST, 1000, b"a" * 1000)
    assert flow.rcv_nxt == seq_add(RCV_NXT, 1000)
    assert shield.counters.dropped["total-buffer-limit"] == 1


# maximum number of flows


def test_max_flows_rejects_add_flow():
    shield = Shield(ListSender(), max_flows=2)
    shield.add_flow(snapshot(FIRST), 10.0)
    shield.add_flow(snapshot(SECOND), 10.0)
    with pytest.raises(FlowLimitError, match="max_flows") as raised:
        shield.add_flow(snapshot(THIRD), 10.0)
    assert "raise it or release a scope" in str(raised.value)
    assert THIRD not in shield.flows


def test_max_flows_counts_handed_over_until_release():
    shield = Shield(ListSender(), max_flows=1)
    shield.add_flow(snapshot(FIRST), 10.0)
    shield.handover(FIRST, 10.1)
    with pytest.raises(FlowLimitError):
        shield.add_flow(snapshot(SECOND), 10.2)
    shield.release(FIRST, 10.3)
    shield.add_flow(snapshot(SECOND), 10.4)
    assert set(shield.flows) == {SECOND}


def test_rejected_flow_packets_stay_held():
    shield = Shield(ListSender(), max_flows=1)
    shield.add_flow(snapshot(FIRST), 10.0)
    packet = send(shield, SECOND, 0, b"a" * 100)
    with pytest.raises(FlowLimitError):
        shield.add_flow(snapshot(SECOND), 10.1)
    assert packet.verdict is None
    assert shield.totals()["held"] == 1


def test_daemon_freeze_shields_flows_that_fit(tmp_path):
    config = ShieldConfig.model_validate(
        {
            "mode": "gateway",
            "scopes": [{"name": "web", "addresses": ["198.18.2.2"]}],
            "durability": "memory",
            "state_dir": str(tmp_path),
            "limits": {"max_flows": 2},
        }
    )
    daemon = Daemon(config)
    daemon.shield = Shield(ListSender(), max_flows=config.limits.max_flows)
    runtime = daemon.scopes["web"]
    # as if the rules were installed, so the freeze touches no kernel state
    runtime.state = ScopeState.FROZEN
    documents = [snapshot_document(snapshot(k)) for k in (FIRST, SECOND, THIRD)]
    with pytest.raises(ControlError, match="limits.max_flows") as raised:
        daemon.freeze("web", [], documents)
    assert "shielded 2 flows but not 1 more" in str(raised.value)
    assert set(daemon.shield.flows) == {FIRST, SECOND}
    assert runtime.flows == {FIRST, SECOND}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"total_buffer_bytes": 0},
        {"max_flows": 0},
        {"max_held_packets": 0},
        {"max_held_packets": 8, "max_held_per_flow": 9},
        {"max_held_packets": 8, "reserved_held_packets": 8},
        {"held_unknown_timeout_s": 0},
    ],
)
def test_invalid_limits_rejected(kwargs):
    with pytest.raises(ValueError, match="invalid"):
        Shield(ListSender(), **kwargs)


# held packets


def held_shield(**kwargs):
    kwargs.setdefault("max_held_packets", 8)
    kwargs.setdefault("max_held_per_flow", 3)
    kwargs.setdefault("reserved_held_packets", 4)
    return Shield(ListSender(), **kwargs)


def test_held_per_flow_cap():
    shield = held_shield()
    packets = [send(shield, FIRST, i * 10, b"a" * 10) for i in range(4)]
    assert [p.verdict for p in packets] == [None, None, None, "drop"]
    assert shield.counters.dropped["held-flow-limit"] == 1
    assert shield.totals()["held"] == 3


def test_unknown_flows_leave_reserve_free():
    shield = held_shield()
    packets = [send(shield, key(41000 + i), 0, b"a") for i in range(6)]
    assert [p.verdict for p in packets] == [None] * 4 + ["drop"] * 2
    assert shield.counters.dropped["held-unknown-limit"] == 2
    assert shield.totals()["held_unknown"] == 4


def test_known_flow_uses_reserve():
    shield = held_shield(max_held_per_flow=5)
    for i in range(4):
        send(shield, key(41000 + i), 0, b"a")
    shield.add_flow(snapshot(FIRST), 10.0)
    shield.handover(FIRST, 10.1)
    held = [send(shield, FIRST, i * 10, b"a" * 10, now=10.2) for i in range(5)]
    assert [p.verdict for p in held] == [None] * 4 + ["drop"]
    assert shield.counters.dropped["held-limit"] == 1
    assert shield.release(FIRST, 10.3) == 4
    assert [p.verdict for p in held[:4]] == ["accept"] * 4
    totals = shield.totals()
    assert totals["held"] == 4
    assert totals["held_unknown"] == 4


def test_add_flow_frees_unknown_share():
    shield = held_shield()
    for i in range(4):
        send(shield, key(41000 + i), 0, b"a")
    shield.add_flow(snapshot(key(41000)), 10.0)
    assert shield.totals()["held_unknown"] == 3
    packet = send(shield, key(42000), 0, b"a")
    assert packet.verdict is None


def test_unknown_held_packets_expire():
    shield = held_shield(held_unknown_timeout_s=5.0)
    old = send(shield, SECOND, 0, b"a", now=10.0)
    new = send(shield, SECOND, 1, b"b", now=14.0)
    shield.add_flow(snapshot(FIRST), 10.0)
    shield.handover(FIRST, 10.0)
    handed_over = send(shield, FIRST, 0, b"c", now=10.0)
    shield.on_timer(15.0)
    assert old.verdict == "drop"
    assert new.verdict is None
    assert handed_over.verdict is None
    assert shield.counters.dropped["held-expired"] == 1
    assert shield.totals()["held"] == 2
    shield.on_timer(19.0)
    assert new.verdict == "drop"
    assert handed_over.verdict is None
    assert shield.counters.dropped["held-expired"] == 2


def test_expired_packets_not_replayed():
    shield = held_shield(held_unknown_timeout_s=5.0)
    send(shield, FIRST, 0, b"a" * 100, now=10.0)
    shield.on_timer(16.0)
    flow = shield.add_flow(snapshot(FIRST), 16.0)
    assert flow.stats.segments == 0
    assert shield.totals()["held"] == 0


# metrics


def test_drop_reasons_exported():
    shield = Shield(
        ListSender(),
        total_buffer_bytes=1000,
        max_held_packets=4,
        max_held_per_flow=1,
        reserved_held_packets=2,
    )
    shield.add_flow(snapshot(FIRST), 10.0)
    send(shield, FIRST, 0, b"a" * 1500)
    send(shield, SECOND, 0, b"a")
    send(shield, SECOND, 1, b"a")
    metrics = ShieldMetrics()
    metrics.sample(
        {"web": ("frozen", list(shield.flows.values()))}, shield.counters.dropped
    )
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "shieldproxy_dropped_segments_total":
                samples[sample.labels["reason"]] = sample.value
    assert samples["total-buffer-limit"] == 1
    assert samples["held-flow-limit"] == 1
    for reason in DROP_REASONS:
        assert reason in samples, reason


# queue binding


class FakeNetfilterQueue:
    """Stands in for netfilterqueue.NetfilterQueue on a datagram socket pair.

    ``run_socket`` reads like netfilterqueue 1.1.0's: until ``recv`` raises
    EAGAIN, skipping ENOBUFS.
    """

    def __init__(self):
        self.reader, self.writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.callback = None

    def bind(self, queue_num, callback, **kwargs):
        self.callback = callback

    def unbind(self):
        self.callback = None

    def get_fd(self):
        return self.reader.fileno()

    def run_socket(self, sock):
        while True:
            try:
                data = sock.recv(4096)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    continue
                if exc.errno == errno.EAGAIN:
                    return
                raise
            self.callback(BytesPacket(data))

    def close(self):
        self.reader.close()
        self.writer.close()


class BytesPacket:
    def __init__(self, data):
        self.data = data

    def get_payload(self):
        return self.data

    def retain(self):
        pass

    def accept(self):
        pass

    def drop(self):
        pass


@pytest.fixture
def fake_queue(monkeypatch):
    fake = FakeNetfilterQueue()
    monkeypatch.setattr(nfqueue, "NetfilterQueue", lambda: fake)
    yield fake
    fake.close()


def test_serve_reads_in_bounded_batches(fake_queue):
    handled = []
    batches = []
    binding = QueueBinding(0, lambda packet: handled.append(packet.data))

    def after_batch():
        batches.append(len(handled))
        if len(handled) == 20:
            nursery.cancel_scope.cancel()

    for index in range(20):
        fake_queue.writer.send(index.to_bytes(2, "big"))

    async def main():
        nonlocal nursery
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: binding.serve(after_batch, batch_packets=8))

    nursery = None
    trio.run(main)
    binding.close()
    assert handled == [index.to_bytes(2, "big") for index in range(20)]
    assert batches == [8, 16, 20]


def test_serve_yields_under_steady_load(fake_queue):
    # Every packet handled brings the next one, so the socket is never empty
    # until the stream ends; other tasks must still run during the stream.
    stream_length = 200
    handled = []
    seen_by_other_task = []

    def handle(packet):
        handled.append(packet.data)
        if len(handled) < stream_length:
            fake_queue.writer.send(b"p")

    binding = QueueBinding(0, handle)

    async def other_task():
        for _ in range(1000):
            seen_by_other_task.append(len(handled))
            if len(handled) >= stream_length:
                return
            await trio.sleep(0)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: binding.serve(batch_packets=16))
            fake_queue.writer.send(b"p")
            await other_task()
            nursery.cancel_scope.cancel()

    trio.run(main)
    binding.close()
    assert len(handled) == stream_length
    during_stream = {n for n in seen_by_other_task if 0 < n < stream_length}
    # an unbounded read would handle the whole stream in one go, leaving this
    # empty
    assert len(during_stream) >= 3


def test_serve_rejects_empty_batch(fake_queue):
    binding = QueueBinding(0, lambda packet: None)
    with pytest.raises(ValueError, match="batch_packets"):
        trio.run(lambda: binding.serve(batch_packets=0))
    binding.close()
