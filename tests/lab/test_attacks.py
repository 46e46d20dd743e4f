"""Off-path attacks on a frozen connection, sent from the lab's attacker namespace.

The demo scenario streams from the peer to a receiver in the container
namespace, freezes it and hands the absorbed bytes over. Halfway through the
freeze these tests pause the sending process until the shield's rcv_nxt stops
moving. Then, from the attacker namespace and with scapy raw sockets, they send
RSTs, SYNs and data with guessed sequence and acknowledgement numbers, spoofing
the peer's address and from the attacker's own, plus a bounded SYN flood and
many new flows. No guess may be accepted: the flow keeps its state and bytes,
sends at most the configured challenge ACKs, holds memory within its limits,
and the stream's byte check passes after the restore.

The shield's total buffer limit is smaller than what the stream sends during
the freeze, so the stream fills it before the attack. The bytes past it are
never acknowledged: the peer keeps sending them again, during the attack too,
and the restored socket gets them after the release.

Every attack packet goes to the container's lab address. Spoofed sources are
the peer's address or other addresses in 198.18.0.0/15 and 2001:2::/48. The
gateway forwards them, because reverse-path filtering is off in the lab's
namespaces (rp_filter 0, the kernel's default for a new namespace).
"""

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw
from scapy.supersocket import L3RawSocket, L3RawSocket6

from shieldproxy import demo
from shieldproxy.demo import ScenarioConfig, run_scenario
from shieldproxy.kernel.nfqueue import QueueBinding
from shieldproxy.lab.topology import lab
from shieldproxy.shield import Shield
from shieldproxy.tcp.flow import FlowLimits, FlowState, ShieldFlow
from shieldproxy.tcp.segment import MalformedSegment, parse_packet_untrusted
from shieldproxy.tcp.seq import seq_add, seq_diff
from shieldproxy.tcp.snapshot import FlowKey
from tests.lab.test_demo_scenario import leftovers

pytestmark = pytest.mark.lab

FREEZE_S = 8.0
# A slow stream leaves most of the container's window open at the attack.
STREAM_RATE = 64 * 1024
CHALLENGE_ACKS_PER_S = 10
MAX_HELD_PACKETS = 1024
MAX_HELD_PER_FLOW = 256
RESERVED_HELD_PACKETS = 256
# Longer than the test, so the held packets of the early phases stay held.
HELD_UNKNOWN_TIMEOUT_S = 3600.0
PER_FLOW_BUFFER_BYTES = 4 * 1024 * 1024
# About one second of the stream.
TOTAL_BUFFER_BYTES = 64 * 1024
LIMITS = FlowLimits(
    max_buffer_bytes=PER_FLOW_BUFFER_BYTES,
    challenge_acks_per_s=CHALLENGE_ACKS_PER_S,
)
SYN_FLOOD_PACKETS = 2000
ONE_FLOW_FLOOD_PACKETS = 300
NEW_FLOWS = 500
BATCH = 100
# Bounds on the waits for the shield to process what was sent.
PROCESS_TIMEOUT_S = 10.0
QUIET_TIMEOUT_S = 10.0
ATTACK_PAYLOAD = b"ATTACK" * 20


@dataclass
class Recorder:
    """The shield and queue binding the scenario creates, for the attack to use."""

    shields: list[Shield] = field(default_factory=list)
    bindings: list[QueueBinding] = field(default_factory=list)


@dataclass(frozen=True)
class FlowView:
    """What an accepted guess would change in the shielded flow."""

    state: FlowState
    rcv_nxt: int
    right_edge: int
    buffered_bytes: int
    bytes_absorbed: int

    @classmethod
    def of(cls, flow: ShieldFlow) -> "FlowView":
        return cls(
            flow.state,
            flow.rcv_nxt,
            flow.right_edge,
            flow.buffered_bytes,
            flow.stats.bytes_absorbed,
        )


@dataclass
class PhaseResult:
    """Counter changes caused by one attack phase."""

    name: str
    sent: int
    processed: int
    flow_stats: dict[str, int]
    engine: dict[str, int]


@dataclass
class AttackReport:
    family: int
    before: FlowView | None = None
    after: FlowView | None = None
    window_bytes: int = 0
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    attack_seconds: float = 0.0
    buffer_limit: int = 0
    max_buffered_bytes: int = 0
    max_held_packets: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@pytest.fixture
def recorder(monkeypatch):
    recorded = Recorder()

    class RecordingShield(Shield):
        def __init__(self, sender, **kwargs):
            kwargs.update(
                limits=LIMITS,
                max_held_packets=MAX_HELD_PACKETS,
                max_held_per_flow=MAX_HELD_PER_FLOW,
                reserved_held_packets=RESERVED_HELD_PACKETS,
                held_unknown_timeout_s=HELD_UNKNOWN_TIMEOUT_S,
                total_buffer_bytes=TOTAL_BUFFER_BYTES,
            )
            super().__init__(sender, **kwargs)
            self.peer_data_packets = 0
            """Packets of a shielded flow with payload other than the attack's."""
            self.max_buffered_bytes = 0
            """Max bytes buffered by all flows together after any packet."""
            recorded.shields.append(self)

        def handle_packet(self, packet, now):
            if self._is_peer_data(packet):
                self.peer_data_packets += 1
            super().handle_packet(packet, now)
            self.max_buffered_bytes = max(self.max_buffered_bytes, self.buffered_bytes)

        def _is_peer_data(self, packet):
            try:
                segment = parse_packet_untrusted(packet.get_payload())
            except MalformedSegment:
                return False
            key = FlowKey(segment.dst, segment.dport, segment.src, segment.sport)
            return (
                key in self.flows
                and bool(segment.payload)
                and segment.payload != ATTACK_PAYLOAD
            )

    class RecordingBinding(QueueBinding):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            recorded.bindings.append(self)

    monkeypatch.setattr(demo, "Shield", RecordingShield)
    monkeypatch.setattr(demo, "QueueBinding", RecordingBinding)
    return recorded


@pytest.fixture
def attack_lab():
    with lab(attacker=True) as created:
        yield created
    assert leftovers(created.lab_id) == []


def stream_client_pid(lab_id):
    """Pid of the demo's stream client in lab LAB_ID."""
    label = f"SHIELDPROXY_LAB={lab_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if label in environ and b"shieldproxy.lab.stream_client" in cmdline:
            return int(entry.name)
    raise AssertionError(f"no stream client running in lab {lab_id}")


def send_from_attacker(created, family, packets):
    """Send scapy packets from raw sockets opened in the attacker namespace."""
    with created.enter("atk"):
        sock = L3RawSocket() if family == 4 else L3RawSocket6()
    try:
        for packet in packets:
            sock.send(packet)
    finally:
        sock.close()


class Attacker:
    """Build the attack packets for one shielded flow."""

    def __init__(self, created, family, flow, rng):
        key = flow.key
        self.family = family
        self.rng = rng
        self.container = (key.container_addr, key.container_port)
        self.peer = (key.peer_addr, key.peer_port)
        self.own_addr = created.atk_v4 if family == 4 else created.atk_v6
        self.rcv_nxt = flow.rcv_nxt
        self.edge = flow.right_edge
        snapshot = flow.snapshot
        # RFC 5961 section 5.2 accepts snd_una - MAX.SND.WND <= ACK <= snd_nxt;
        # the peer's window is at most 65535 << snd_wscale.
        oldest = seq_add(snapshot.snd_una, -(0xFFFF << min(snapshot.snd_wscale, 14)))
        self.acceptable_acks = (oldest, snapshot.snd_nxt)
        self.snd_nxt = snapshot.snd_nxt

    def packet(self, src, sport, seq, *, flags, ack=0, payload=b""):
        dst, dport = self.container
        layer = IP(src=src, dst=dst) if self.family == 4 else IPv6(src=src, dst=dst)
        segment = TCP(
            sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=1000
        )
        if payload:
            return layer / segment / Raw(payload)
        return layer / segment

    def spoofed(self, seq, **kwargs):
        return self.packet(self.peer[0], self.peer[1], seq, **kwargs)

    def in_window_seq(self):
        """A sequence number inside the window, never rcv_nxt itself."""
        window = seq_diff(self.edge, self.rcv_nxt)
        return seq_add(self.rcv_nxt, 1 + self.rng.randrange(window - 1))

    def blind_seq(self):
        while True:
            seq = self.rng.getrandbits(32)
            if seq != self.rcv_nxt:
                return seq

    def bad_ack(self):
        """An ACK number outside the range RFC 5961 accepts."""
        oldest, newest = self.acceptable_acks
        outside = (1 << 32) - seq_diff(newest, oldest) - 1
        return seq_add(newest, 1 + self.rng.randrange(outside))

    def lab_source(self):
        """A random lab address outside the peer's and attacker's subnets."""
        if self.family == 4:
            return f"198.18.{self.rng.randrange(10, 250)}.{self.rng.randrange(1, 255)}"
        return (
            f"2001:2:0:{self.rng.randrange(10, 250):x}::{self.rng.randrange(1, 9999):x}"
        )

    def phases(self):
        """Return (name, packets) for each phase, the real flow's first."""
        rng = self.rng
        payload = ATTACK_PAYLOAD
        return [
            (
                "rst-blind",
                [self.spoofed(self.blind_seq(), flags="R") for _ in range(300)],
            ),
            (
                "rst-in-window",
                [self.spoofed(self.in_window_seq(), flags="RA") for _ in range(200)],
            ),
            (
                "syn-in-window",
                [self.spoofed(self.in_window_seq(), flags="S") for _ in range(200)],
            ),
            (
                "data-guessed-ack",
                [
                    self.spoofed(
                        self.in_window_seq(),
                        flags="PA",
                        ack=self.bad_ack(),
                        payload=payload,
                    )
                    for _ in range(200)
                ],
            ),
            (
                "data-without-ack-flag",
                [
                    self.spoofed(self.in_window_seq(), flags="P", payload=payload)
                    for _ in range(100)
                ],
            ),
            (
                "data-beyond-window",
                [
                    # even with the right ACK number, past the edge is dropped
                    self.spoofed(
                        seq_add(self.edge, rng.randrange(0, 1 << 20)),
                        flags="PA",
                        ack=self.snd_nxt,
                        payload=payload,
                    )
                    for _ in range(200)
                ],
            ),
            (
                "own-address-guesses",
                [
                    self.packet(
                        self.own_addr,
                        self.peer[1],
                        self.in_window_seq(),
                        flags=flags,
                        ack=self.snd_nxt,
                        payload=payload if "P" in flags else b"",
                    )
                    for flags in ("R", "RA", "S", "PA") * 50
                ],
            ),
            (
                "one-flow-flood",
                [
                    self.packet(
                        self.own_addr,
                        9_000,
                        rng.getrandbits(32),
                        flags="PA",
                        ack=rng.getrandbits(32),
                        payload=payload,
                    )
                    for _ in range(ONE_FLOW_FLOOD_PACKETS)
                ],
            ),
            (
                "syn-flood",
                [
                    self.packet(
                        self.lab_source(),
                        rng.randrange(1024, 65536),
                        rng.getrandbits(32),
                        flags="S",
                    )
                    for _ in range(SYN_FLOOD_PACKETS)
                ],
            ),
            (
                "new-flows",
                [
                    self.packet(
                        self.own_addr,
                        10_000 + index,
                        rng.getrandbits(32),
                        flags="PA",
                        ack=rng.getrandbits(32),
                        payload=payload,
                    )
                    for index in range(NEW_FLOWS)
                ],
            ),
        ]


def engine_counts(shield):
    counters = shield.counters
    return {
        "packets": counters.packets,
        "held": counters.held,
        "peer_data": shield.peer_data_packets,
        **{f"dropped_{reason}": n for reason, n in counters.dropped.items()},
    }


def attack_packets_seen(shield):
    """Packets the shield has processed, less the peer's own data packets."""
    return shield.counters.packets - shield.peer_data_packets


def difference(after, before):
    return {
        name: after.get(name, 0) - before.get(name, 0)
        for name in set(after) | set(before)
    }


async def wait_until(predicate, timeout):
    """Poll PREDICATE every 10 ms for at most TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await trio.sleep(0.01)
    return True


async def wait_quiet(flow):
    """Wait until the flow's rcv_nxt has stayed put for 0.3 s."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    last, stable_since = flow.rcv_nxt, time.monotonic()
    while time.monotonic() < deadline:
        await trio.sleep(0.05)
        if flow.rcv_nxt != last:
            last, stable_since = flow.rcv_nxt, time.monotonic()
        elif time.monotonic() - stable_since >= 0.3:
            return
    raise AssertionError(f"rcv_nxt still moving after {QUIET_TIMEOUT_S} s")


async def run_attack(created, family, recorder, report):
    """Pause the stream, send every phase from the attacker, record counters."""
    (shield,) = recorder.shields
    (flow,) = shield.flows.values()
    client = stream_client_pid(created.lab_id)
    os.kill(client, signal.SIGSTOP)
    try:
        await wait_quiet(flow)
        report.before = FlowView.of(flow)
        report.window_bytes = seq_diff(flow.right_edge, flow.rcv_nxt)
        # the flow honours the container's window even above the configured limit
        report.buffer_limit = max(
            PER_FLOW_BUFFER_BYTES,
            seq_diff(flow.snapshot.right_edge, flow.snapshot.rcv_nxt),
        )
        attacker = Attacker(created, family, flow, random.Random(family))
        started = time.monotonic()
        for name, packets in attacker.phases():
            stats_before = flow.stats.as_dict()
            engine_before = engine_counts(shield)
            for start in range(0, len(packets), BATCH):
                batch = packets[start : start + BATCH]
                expected = attack_packets_seen(shield) + len(batch)
                await trio.to_thread.run_sync(
                    send_from_attacker, created, family, batch
                )
                await wait_until(
                    lambda expected=expected: attack_packets_seen(shield) >= expected,
                    PROCESS_TIMEOUT_S,
                )
                report.max_buffered_bytes = max(
                    report.max_buffered_bytes,
                    sum(f.buffered_bytes for f in shield.flows.values()),
                )
                report.max_held_packets = max(
                    report.max_held_packets, shield.totals()["held"]
                )
            engine_after = engine_counts(shield)
            report.phases[name] = PhaseResult(
                name=name,
                sent=len(packets),
                processed=engine_after["packets"] - engine_before["packets"],
                flow_stats=difference(flow.stats.as_dict(), stats_before),
                engine=difference(engine_after, engine_before),
            )
        report.attack_seconds = time.monotonic() - started
        report.after = FlowView.of(flow)
        report.totals = shield.totals()
    except Exception as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        os.kill(client, signal.SIGCONT)


@pytest.mark.parametrize("family", [4, 6])
def test_off_path_attacks_rejected(attack_lab, recorder, tmp_path, family):
    report = AttackReport(family)

    async def attack():
        await run_attack(attack_lab, family, recorder, report)

    config = ScenarioConfig(
        shielded=True,
        freeze_s=FREEZE_S,
        family=family,
        rate_bytes_per_s=STREAM_RATE,
        mid_freeze=attack,
    )
    result = trio.run(run_scenario, attack_lab, config, Path(tmp_path))
    for name, phase in report.phases.items():
        accepted = phase.flow_stats.get("bytes_absorbed", 0)
        print(f"IPv{family} {name}: {phase.sent} packets, {accepted} bytes absorbed")

    # the attack ran against an open window, with the total buffer full
    assert report.error is None
    assert report.before is not None
    assert report.before.state is FlowState.SHIELDING
    assert report.window_bytes > 10_000
    assert report.before.buffered_bytes == TOTAL_BUFFER_BYTES
    phases = report.phases
    for phase in phases.values():
        # the peer's own packets are its resends of the bytes past the total
        peer_data = phase.engine.get("peer_data", 0)
        assert phase.processed == phase.sent + peer_data, phase

    # nothing was accepted: same state, same bytes, no reset
    assert report.after is not None
    assert report.after.state is FlowState.SHIELDING
    assert report.after.rcv_nxt == report.before.rcv_nxt
    assert report.after.buffered_bytes == report.before.buffered_bytes
    assert report.after.bytes_absorbed == report.before.bytes_absorbed
    assert seq_diff(report.after.right_edge, report.before.right_edge) >= 0
    assert report.totals["rst_accepted"] == 0

    # each guess was dropped, and counted under its reason
    blind = phases["rst-blind"].flow_stats
    assert (
        blind["rst_ignored"]
        + blind["challenge_acks"]
        + blind["challenge_acks_suppressed"]
        == phases["rst-blind"].sent
    )
    for name in ("rst-in-window", "syn-in-window"):
        stats = phases[name].flow_stats
        answered = stats["challenge_acks"] + stats["challenge_acks_suppressed"]
        assert answered == phases[name].sent, name
    assert phases["syn-in-window"].flow_stats["syn_received"] == 200
    guessed = phases["data-guessed-ack"].flow_stats
    assert guessed["bad_ack_field"] == phases["data-guessed-ack"].sent
    assert phases["data-without-ack-flag"].flow_stats["no_ack_flag"] == 100
    beyond = phases["data-beyond-window"]
    assert beyond.flow_stats["bytes_beyond_edge"] == beyond.sent * len(ATTACK_PAYLOAD)
    for name in ("data-guessed-ack", "data-without-ack-flag", "data-beyond-window"):
        assert phases[name].flow_stats["bytes_absorbed"] == 0, name
    # in-window payload was cut for the total before the flow checked it, and
    # bytes past the edge were left to the flow
    for name, phase in phases.items():
        cut = phase.engine.get("dropped_total-buffer-limit", 0)
        resent = phase.engine.get("peer_data", 0)
        if name in ("data-guessed-ack", "data-without-ack-flag"):
            assert phase.sent <= cut <= phase.sent + resent, name
        else:
            assert cut <= resent, name

    # challenge ACKs stay within the per-second limit: the limit applies per
    # second from the first challenge, so a span of s seconds allows int(s) + 2
    challenges = sum(phase.flow_stats["challenge_acks"] for phase in phases.values())
    seconds = report.attack_seconds
    assert challenges <= CHALLENGE_ACKS_PER_S * (int(seconds) + 2)

    # packets of other flows are held within the limit and never acknowledged
    for name in ("own-address-guesses", "one-flow-flood", "syn-flood", "new-flows"):
        stats = phases[name].flow_stats
        # the peer's resends reach the flow without their payload, unanswered
        resent = phases[name].engine.get("peer_data", 0)
        assert stats.get("segments", 0) == resent, name
        assert stats.get("acks_sent", 0) == 0, name
    one_flow = phases["one-flow-flood"].engine
    assert one_flow["held"] == MAX_HELD_PER_FLOW
    assert one_flow["dropped_held-flow-limit"] == (
        ONE_FLOW_FLOOD_PACKETS - MAX_HELD_PER_FLOW
    )
    flood = phases["syn-flood"].engine
    assert flood["dropped_held-unknown-limit"] > 0
    assert phases["new-flows"].engine["dropped_held-unknown-limit"] == NEW_FLOWS
    for phase in phases.values():
        assert phase.engine.get("dropped_held-limit", 0) == 0, phase.name
    # flows without a snapshot never take the slots reserved for known flows
    assert report.max_held_packets <= MAX_HELD_PACKETS - RESERVED_HELD_PACKETS
    assert report.max_buffered_bytes <= report.buffer_limit
    (shield,) = recorder.shields
    assert shield.max_buffered_bytes == TOTAL_BUFFER_BYTES
    assert shield.counters.dropped_bytes["total-buffer-limit"] > 0
    assert all(binding.handler_errors == 0 for binding in recorder.bindings)

    # the real flow survived: every byte arrived once, in order
    assert result.error is None
    assert result.integrity == "ok"
    assert result.bytes_received == result.bytes_sent
    assert result.peer_counters["TcpExtTCPAbortOnTimeout"] == 0
    # the shield's own segments never moved the right edge left
    for phase in phases.values():
        retraction = phase.flow_stats.get("max_right_edge_retraction", 0)
        assert retraction == 0, phase.name
    # and neither did the restored socket's, as the capture shows
    assert result.max_right_edge_retraction == 0
    assert result.tsval_regressions == 0
