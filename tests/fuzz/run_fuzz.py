"""Fuzz the segment codec and the per-flow shield machine.

Run from the repository root::

    .venv/bin/python tests/fuzz/run_fuzz.py --count 1000000 --seed 1

Every input is an IP packet. 65 % are segments of a simulated peer built with
the codec, 25 % are such segments mutated (bit flips, truncation, random header
fields, random option bytes, IPv4 options, IPv6 extension headers), and 10 % are
random bytes or random TCP headers behind a valid IP header. Each packet goes
through ``parse_packet_untrusted``, which may raise only MalformedSegment, and
each segment it returns goes into a ShieldFlow with an advancing ``now`` and calls
to ``on_deadline``. :class:`FlowChecker` checks the invariants of the design
after every call, and at the hand-over that ends each flow.

The run is a series of episodes, one flow each. An episode's random stream
depends only on the seed and the episode number, so ``--episode`` replays a
failure alone. The exit status is 1 on the first failure, with the seed, the
episode and the index of the segment that broke an invariant.
"""

from __future__ import annotations

import argparse
import math
import random
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shieldproxy.tcp.flow import (
    Action,
    FinReceived,
    FlowLimits,
    FlowState,
    ResetReceived,
    ShieldFlow,
    Transmit,
    TricklePolicy,
    restore_tsval,
)
from shieldproxy.tcp.segment import (
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    MalformedSegment,
    Segment,
    TcpOptions,
    build_packet,
    parse_packet_untrusted,
)
from shieldproxy.tcp.seq import seq_add, seq_diff
from shieldproxy.tcp.snapshot import FlowKey, FlowSnapshot

MAX_WINDOW_FIELD = 0xFFFF
MAX_PAYLOAD = 4096

# Payload byte at stream offset k is _CONTENT[k % CONTENT_PERIOD], so every
# segment of the simulated peer that covers an offset carries the same byte
# there. The period is prime: a byte handed over at the wrong offset shows,
# unless it is off by a multiple of the period.
CONTENT_PERIOD = 65521
_PERIOD_BYTES = random.Random(0).randbytes(CONTENT_PERIOD)
_CONTENT = _PERIOD_BYTES + _PERIOD_BYTES[:MAX_PAYLOAD]

# Bytes of a failing packet printed; --episode replays the whole episode.
PACKET_SHOWN_BYTES = 160

KEYS = {
    4: FlowKey.create("198.18.2.2", 5001, "198.18.1.2", 40000),
    6: FlowKey.create("2001:2:0:2::2", 5001, "2001:2:0:1::2", 40000),
}

RECEIVE_REASONS = frozenset(
    {"data", "fin", "out-of-window", "paws", "challenge", "bad-ack"}
)
DEADLINE_REASONS = frozenset({"tail", "window-update"})
# Reasons of the ACKs sent for unacceptable segments. For zero-length segments
# these ACKs are rate-limited.
INVALID_REASONS = frozenset({"out-of-window", "paws", "bad-ack"})


def stream_content(offset: int, length: int) -> bytes:
    """Return the simulated peer's bytes at [offset, offset + length)."""
    start = offset % CONTENT_PERIOD
    if start + length <= len(_CONTENT):
        return _CONTENT[start : start + length]
    repeats = (start + length) // CONTENT_PERIOD + 1
    return (_PERIOD_BYTES * repeats)[start : start + length]


class InvariantViolation(AssertionError):
    """The codec or the flow broke one of the checked invariants."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantViolation(message)


def default_buffer_limit(snapshot: FlowSnapshot, limits: FlowLimits) -> int:
    """Return the max bytes past rcv_nxt a flow may hold, as FlowLimits documents."""
    edge = max(seq_diff(snapshot.right_edge, snapshot.rcv_nxt), 0)
    if limits.max_buffer_bytes is not None:
        return max(limits.max_buffer_bytes, edge)
    return edge + max(64 * 1024, edge // 4)


class FlowChecker:
    """Feed one ShieldFlow and check the design's invariants after every call.

    Checked after every call:

    - the right edge sent never moves left; ACK numbers and TSvals never go back;
    - no ACK covers bytes the flow does not hold in order, and SACK blocks lie
      between the ACK and the right edge;
    - held bytes stay within the edge shown, the buffer limit and a received
      FIN, and every absorbed byte is held;
    - an RST resets the flow when it is at rcv_nxt, or at the last ACK sent;
    - challenge ACKs and ACKs for zero-length invalid segments are rate-limited;
    - data is absorbed only with an ACK field RFC 5961 accepts, and payload
      dropped out of window is counted;
    - bytes held in order are acknowledged, or a deadline is set to do it.

    At the hand-over, the data is exactly the acknowledged bytes as the peer
    sent them, the FIN is handed over when it was acknowledged, and the right
    edge and TSval are not behind any segment sent.

    Offsets are relative to the snapshot's rcv_nxt. The checker reads two
    private fields of the flow, its reassembler and the offset of an accepted
    FIN, because nothing public exposes where held bytes end.
    """

    def __init__(
        self,
        snapshot: FlowSnapshot,
        limits: FlowLimits | None = None,
        trickle: TricklePolicy | None = None,
    ) -> None:
        limits = FlowLimits() if limits is None else limits
        self.flow = ShieldFlow(snapshot, limits=limits, trickle=trickle)
        self.snapshot = snapshot
        self.limits = limits
        self.base = snapshot.rcv_nxt
        self.wscale = snapshot.rcv_wscale if 0 <= snapshot.rcv_wscale <= 14 else 0
        self.best_edge = max(seq_diff(snapshot.right_edge, self.base), 0)
        self.last_ack = min(seq_diff(snapshot.rcv_wup, self.base), 0)
        self.last_tsval = snapshot.tsval
        self.buffer_limit = default_buffer_limit(snapshot, limits)
        self.fin_offset: int | None = None
        self.reset = False
        self.tainted: list[tuple[int, int]] = []
        self.challenge_times: deque[float] = deque()
        self.last_invalid_ack = -math.inf
        self.reasons: Counter[str] = Counter()

    # inputs

    def receive(self, segment: Segment, now: float) -> list[Action]:
        """Feed one peer segment and check the actions and the state after it."""
        flow = self.flow
        state = flow.state
        ack_sent = flow.ack_sent
        # RCV.NXT of RFC 793: one past the contiguous bytes and a FIN in order
        next_seq = flow._next_seq()
        absorbed = flow.stats.bytes_absorbed
        dropped = self._dropped_bytes()
        self._note_content(segment)

        actions = flow.receive(segment, now)
        if state is not FlowState.SHIELDING:
            check(actions == [], f"a {state.value} flow returned {actions}")
            return actions

        if flow.stats.bytes_absorbed > absorbed:
            self._check_ack_field(segment)
        transmits = [action for action in actions if isinstance(action, Transmit)]
        check(len(transmits) <= 1, f"{len(transmits)} ACKs sent for one segment")
        for action in actions:
            if isinstance(action, Transmit):
                self._check_reply(action, segment, dropped, now)
            elif isinstance(action, ResetReceived):
                self._check_reset(segment, next_seq, ack_sent)
            elif isinstance(action, FinReceived):
                check(self.fin_offset is None, "FinReceived reported twice")
                check(
                    action.seq == flow.rcv_nxt,
                    f"FIN at {action.seq} reported with rcv_nxt {flow.rcv_nxt}",
                )
                self.fin_offset = seq_diff(action.seq, self.base)
            else:
                raise InvariantViolation(f"unknown action {action!r}")

        if segment.has(RST) and segment.seq == next_seq and segment.seg_len == 0:
            check(self.reset, "an RST at exactly RCV.NXT did not reset the flow")
        self._check_state()
        return actions

    def on_deadline(self, now: float) -> list[Action]:
        """Run the flow's timers at ``now`` until no deadline is due."""
        flow = self.flow
        state = flow.state
        actions = flow.on_deadline(now)
        if state is not FlowState.SHIELDING:
            check(actions == [], f"a {state.value} flow acted on a deadline")
            return actions
        self._check_deadline_actions(actions, now)
        # A deadline at or before now must clear within a few calls, or the
        # shield's timer task would spin.
        for _ in range(3):
            deadline = flow.next_deadline()
            if deadline is None or deadline > now:
                break
            more = flow.on_deadline(now)
            self._check_deadline_actions(more, now)
            actions += more
        else:
            raise InvariantViolation(
                f"next_deadline() is still {flow.next_deadline()} at now={now} "
                "after three on_deadline calls"
            )
        self._check_state()
        return actions

    def finish(self, now: float) -> None:
        """Hand the flow over and check what the restored socket would get."""
        flow = self.flow
        state = flow.state
        contiguous = seq_diff(flow.rcv_nxt, self.base)
        handover, final_ack = flow.handover(now)
        if final_ack is not None:
            check(state is FlowState.SHIELDING, "final ACK from a flow not shielding")
            check(final_ack.reason == "handover", f"final ACK {final_ack.reason!r}")
            self._check_transmit(final_ack, now)
        if state is FlowState.SHIELDING:
            fin_bit = 1 if self.fin_offset is not None else 0
            check(
                self.last_ack >= contiguous + fin_bit,
                f"hand-over left bytes up to {contiguous} unacknowledged "
                f"(last ACK {self.last_ack})",
            )
        fin_acked = self.fin_offset is not None and self.last_ack == self.fin_offset + 1
        check(handover.fin == fin_acked, f"hand-over fin {handover.fin}")
        data = handover.data
        expected_length = max(0, self.last_ack - (1 if handover.fin else 0))
        check(
            len(data) == expected_length,
            f"{len(data)} bytes handed over, {expected_length} acknowledged",
        )
        check(handover.start_seq == self.base, "hand-over start_seq is not rcv_nxt")
        check(
            handover.rcv_nxt == seq_add(self.base, len(data)),
            "hand-over rcv_nxt does not follow its data",
        )
        check(
            seq_diff(handover.right_edge, self.base) == self.best_edge,
            "hand-over right edge differs from the largest edge sent",
        )
        check(
            seq_diff(handover.tsval, self.last_tsval) >= 0,
            "hand-over TSval is below a TSval sent",
        )
        check(handover.reset == self.reset, f"hand-over reset {handover.reset}")
        check(
            handover.discarded_bytes == flow.buffered_bytes - len(data) >= 0,
            f"discarded_bytes {handover.discarded_bytes} with "
            f"{flow.buffered_bytes} buffered and {len(data)} handed over",
        )
        check(len(data) <= self.best_edge, "handed over bytes past the right edge")
        self._check_content(data)

        check(flow.on_deadline(now + 10.0) == [], "a handed-over flow ran a timer")
        check(flow.next_deadline() is None, "a handed-over flow has a deadline")
        later = now + 0.0123
        restored = restore_tsval(handover.tsval, now, later)
        check(
            seq_diff(restored, flow.tsval_at(later)) >= 0,
            "restored TSval is behind the shield's clock",
        )
        restored_rcv_nxt = seq_add(handover.rcv_nxt, 1 if handover.fin else 0)
        update = flow.release_update(
            later, rcv_nxt=restored_rcv_nxt, right_edge=handover.right_edge
        )
        check(update.reason == "window-update", f"release update {update.reason!r}")
        self._check_transmit(update, later)

    # checks

    def _dropped_bytes(self) -> int:
        return self.flow.stats.bytes_duplicate + self.flow.stats.bytes_beyond_edge

    def _check_reply(
        self, transmit: Transmit, trigger: Segment, dropped: int, now: float
    ) -> None:
        check(
            transmit.reason in RECEIVE_REASONS,
            f"unknown reason {transmit.reason!r} for an ACK sent for a segment",
        )
        self._check_transmit(transmit, now)
        self._check_ack_rate(transmit, trigger, now)
        if transmit.reason == "out-of-window":
            counted = self._dropped_bytes() - dropped
            check(
                counted == len(trigger.payload),
                f"dropped {len(trigger.payload)} bytes out of window, "
                f"counted {counted}",
            )

    def _check_reset(self, segment: Segment, next_seq: int, ack_sent: int) -> None:
        check(segment.has(RST), "reset by a segment without RST")
        # A peer whose socket is gone answers a challenge ACK with an RST at
        # that ACK number, which can stop short of the bytes held.
        check(
            segment.seq in (next_seq, ack_sent),
            f"reset by an RST at {segment.seq}, RCV.NXT is {next_seq} and the "
            f"last ACK sent {ack_sent}",
        )
        check(self.flow.state is FlowState.RESET, "ResetReceived but not RESET")
        self.reset = True

    def _check_ack_field(self, segment: Segment) -> None:
        """Check that absorbed data came with an ACK field RFC 5961 accepts.

        Section 5.2 accepts SND.UNA - MAX.SND.WND <= SEG.ACK <= SND.NXT. The
        peer's window is at most 65535 << snd_wscale, and the flow's snd_una
        only grows, so this range contains the one the flow must apply.
        """
        snapshot = self.snapshot
        max_window = MAX_WINDOW_FIELD << min(snapshot.snd_wscale, 14)
        oldest = seq_add(snapshot.snd_una, -max_window)
        check(segment.has(ACK), "absorbed data from a segment without ACK")
        check(
            seq_diff(segment.ack, snapshot.snd_nxt) <= 0,
            f"absorbed data from a segment acknowledging unsent byte {segment.ack}",
        )
        check(
            seq_diff(segment.ack, oldest) >= 0,
            f"absorbed data from a segment with ACK {segment.ack}, older than "
            f"snd_una - max window ({oldest})",
        )

    def _check_deadline_actions(self, actions: list[Action], now: float) -> None:
        check(len(actions) <= 2, f"{len(actions)} actions from one deadline")
        for action in actions:
            check(isinstance(action, Transmit), f"deadline action {action!r}")
            assert isinstance(action, Transmit)
            check(
                action.reason in DEADLINE_REASONS,
                f"unknown reason {action.reason!r} for a timer segment",
            )
            self._check_transmit(action, now)

    def _check_transmit(self, transmit: Transmit, now: float) -> None:
        segment = transmit.segment
        key = self.snapshot.key
        self.reasons[transmit.reason] += 1
        check(segment.flags == ACK, f"sent flags {segment.flags:#x}, not a pure ACK")
        check(not segment.payload, "sent a payload")
        check(segment.seq == self.snapshot.snd_nxt, "sent seq is not snd_nxt")
        check(segment.version == key.family, "sent the wrong IP version")
        check(
            (segment.src, segment.sport, segment.dst, segment.dport)
            == (key.container_addr, key.container_port, key.peer_addr, key.peer_port),
            f"sent on the wrong flow: {segment}",
        )
        check(0 <= segment.window <= MAX_WINDOW_FIELD, f"window {segment.window}")

        ack = seq_diff(segment.ack, self.base)
        check(
            ack >= self.last_ack,
            f"ACK number went back from offset {self.last_ack} to {ack}",
        )
        edge = ack + (segment.window << self.wscale)
        check(
            edge >= self.best_edge,
            f"right edge moved left from offset {self.best_edge} to {edge}",
        )
        self.last_ack = ack
        self.best_edge = edge
        fin_bit = 1 if self.fin_offset is not None else 0
        held_end = seq_diff(self.flow.rcv_nxt, self.base) + fin_bit
        check(ack <= held_end, f"ACK offset {ack} past the {held_end} bytes held")

        timestamp = segment.options.timestamp
        if self.snapshot.timestamps_ok:
            check(timestamp is not None, "sent no timestamp on a timestamped flow")
            assert timestamp is not None
            check(
                seq_diff(timestamp[0], self.last_tsval) >= 0,
                f"TSval went back from {self.last_tsval} to {timestamp[0]}",
            )
            self.last_tsval = timestamp[0]
        else:
            check(timestamp is None, "sent a timestamp without timestamps negotiated")

        self._check_sack(segment.options.sack_blocks, ack, timestamp is not None)

        packet = build_packet(segment)
        parsed = parse_packet_untrusted(packet, verify_checksum=True)
        check(parsed == segment, f"sent segment does not round-trip: {segment}")
        check(parsed.checksum_ok is True, "sent segment has a bad checksum")

    def _check_sack(
        self, blocks: tuple[tuple[int, int], ...], ack: int, timestamps: bool
    ) -> None:
        if not self.snapshot.sack_ok:
            check(not blocks, "sent SACK blocks without SACK negotiated")
            return
        check(len(blocks) <= (3 if timestamps else 4), f"{len(blocks)} SACK blocks")
        seen: list[tuple[int, int]] = []
        for left_seq, right_seq in blocks:
            left = seq_diff(left_seq, self.base)
            right = seq_diff(right_seq, self.base)
            check(
                ack < left < right <= self.best_edge,
                f"SACK block [{left}, {right}) outside (ACK {ack}, edge "
                f"{self.best_edge}]",
            )
            for other_left, other_right in seen:
                check(
                    right < other_left or left > other_right,
                    "SACK blocks overlap or touch",
                )
            seen.append((left, right))

    def _check_ack_rate(self, transmit: Transmit, trigger: Segment, now: float) -> None:
        if transmit.reason == "challenge":
            times = self.challenge_times
            times.append(now)
            while times and times[0] <= now - 1.0:
                times.popleft()
            # The limit counts per second from the first challenge, so any 1 s
            # interval overlaps two of those seconds.
            max_challenges = 2 * self.limits.challenge_acks_per_s
            check(
                len(times) <= max_challenges, f"{len(times)} challenge ACKs within 1 s"
            )
        if transmit.reason in INVALID_REASONS and trigger.seg_len == 0:
            gap = now - self.last_invalid_ack
            check(
                gap >= self.limits.invalid_ack_interval_s,
                f"sent ACKs for zero-length invalid segments {gap:.4f} s apart",
            )
            self.last_invalid_ack = now

    def _check_state(self) -> None:
        flow = self.flow
        stats = flow.stats
        check(
            stats.max_right_edge_retraction == 0,
            f"flow counted a retraction of {stats.max_right_edge_retraction}",
        )
        check(
            stats.bytes_absorbed == flow.buffered_bytes,
            f"bytes_absorbed {stats.bytes_absorbed} but {flow.buffered_bytes} held",
        )
        check(
            flow.buffered_bytes <= self.buffer_limit,
            f"{flow.buffered_bytes} bytes held, the limit is {self.buffer_limit}",
        )
        reassembler = flow._buffer
        held_end = max(
            [reassembler.contiguous_end]
            + [end for _, end in reassembler.out_of_order_ranges()]
        )
        check(
            held_end <= self.best_edge,
            f"bytes held up to {held_end}, past the right edge {self.best_edge}",
        )
        fin_offset = flow._fin_offset
        if fin_offset is not None:
            check(
                held_end <= fin_offset,
                f"bytes held up to {held_end}, past the FIN at {fin_offset}",
            )
        check(
            seq_diff(flow.right_edge, self.base) == self.best_edge,
            "flow.right_edge differs from the largest edge sent",
        )
        check(
            seq_diff(flow.ack_sent, self.base) == self.last_ack,
            "flow.ack_sent differs from the last ACK sent",
        )
        if flow.state is FlowState.SHIELDING:
            fin_bit = 1 if self.fin_offset is not None else 0
            unacked = reassembler.contiguous_end + fin_bit > self.last_ack
            check(
                not unacked or flow.next_deadline() is not None,
                f"bytes up to {reassembler.contiguous_end + fin_bit} held in "
                f"order, acknowledged up to {self.last_ack}, and no deadline set",
            )

    def _note_content(self, segment: Segment) -> None:
        payload = segment.payload
        if not payload:
            return
        offset = seq_diff(segment.seq, self.base)
        if payload != stream_content(offset, len(payload)):
            self.tainted.append((offset, offset + len(payload)))

    def _check_content(self, data: bytes) -> None:
        expected = stream_content(0, len(data))
        if data == expected:
            return
        # Offsets some segment offered other bytes for may hold either.
        start = 0
        for left, right in sorted(self.tainted) + [(len(data), len(data))]:
            left = max(left, 0)
            if left > start:
                end = min(left, len(data))
                if data[start:end] != expected[start:end]:
                    bad = next(i for i in range(start, end) if data[i] != expected[i])
                    raise InvariantViolation(
                        f"handed-over byte at offset {bad} is not the peer's"
                    )
            start = max(start, right)
            if start >= len(data):
                return


# the simulated peer


@dataclass
class FuzzStats:
    """Counts of one fuzz run."""

    segments: int = 0
    malformed: int = 0
    parsed: int = 0
    mutated: int = 0
    episodes: int = 0
    resets: int = 0
    fins: int = 0
    bytes_handed_over: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    parse_errors: Counter[str] = field(default_factory=Counter)


def random_snapshot(rng: random.Random) -> FlowSnapshot:
    """Return a consistent snapshot with random options, windows and clocks."""
    family = rng.choice((4, 6))
    wscale = rng.choice((0, 0, 1, 2, 5, 7, 7, 8, 10, 14))
    unit = 1 << wscale
    shape = rng.random()
    if shape < 0.1:
        window = 0
    elif shape < 0.45:
        window = rng.randrange(1, 6000)
    elif shape < 0.8:
        window = rng.randrange(1, 200) * unit
    else:
        window = rng.randrange(1, MAX_WINDOW_FIELD + 1) * unit
    window = min(window, MAX_WINDOW_FIELD << wscale, 1 << 24)
    rcv_nxt = rng.choice((rng.getrandbits(32), (1 << 32) - rng.randrange(1, 5000)))
    # the container's last ACK may lag rcv_nxt (delayed ACK)
    lag = rng.choice((0, 0, 0, rng.randrange(1, 3000)))
    rcv_wup = seq_add(rcv_nxt, -lag)
    window = max(window, lag)
    snd_nxt = rng.getrandbits(32)
    return FlowSnapshot(
        key=KEYS[family],
        rcv_nxt=rcv_nxt,
        rcv_wup=rcv_wup,
        rcv_wnd=window,
        snd_una=seq_add(snd_nxt, -rng.choice((0, rng.randrange(1, 100_000)))),
        snd_nxt=snd_nxt,
        rcv_wscale=wscale,
        snd_wscale=rng.choice((0, 7, 14)),
        mss=rng.choice((536, 1220, 1448, 1460, 8960)),
        sack_ok=rng.random() < 0.7,
        timestamps_ok=rng.random() < 0.7,
        tsval=rng.getrandbits(32),
        taken_at=1000.0,
        ts_recent=rng.choice((None, rng.getrandbits(32))),
        # CLOSE_WAIT, LAST_ACK or CLOSING: the peer's FIN is behind rcv_nxt
        peer_fin=rng.random() < 0.1,
    )


def random_limits(rng: random.Random, snapshot: FlowSnapshot) -> FlowLimits:
    window = max(seq_diff(snapshot.right_edge, snapshot.rcv_nxt), 0)
    max_buffer = rng.choice((None, None, rng.randrange(0, 200_000), window + 1))
    return FlowLimits(
        max_buffer_bytes=max_buffer,
        tail_ack_delay_s=rng.choice((0.04, 0.04, 0.0, 0.2)),
        challenge_acks_per_s=rng.choice((1, 10, 10, 100)),
        invalid_ack_interval_s=rng.choice((0.5, 0.5, 0.0, 2.0)),
    )


def random_trickle(rng: random.Random) -> TricklePolicy | None:
    if rng.random() < 0.7:
        return None
    return TricklePolicy(
        step_bytes=rng.choice((1, 100, 1024, 5000)),
        interval_s=rng.choice((0.01, 0.1, 1.0)),
    )


class Peer:
    """The peer side of an episode: segments aimed at the flow, some hostile."""

    def __init__(self, rng: random.Random, checker: FlowChecker) -> None:
        self.rng = rng
        self.checker = checker
        self.snapshot = checker.snapshot
        self.key = self.snapshot.key
        self.cursor = rng.choice((0, 0, 0, -rng.randrange(1, 3000)))
        # the peer's clock, usually at or just past the ts_recent it last sent
        ts_recent = self.snapshot.ts_recent
        if ts_recent is not None and rng.random() < 0.9:
            self.tsval = seq_add(ts_recent, rng.randrange(0, 1000))
        else:
            self.tsval = rng.getrandbits(32)
        self.mss = self.snapshot.mss
        # One flow in five may be reset by an RST at exactly rcv_nxt. In the
        # others every RST misses rcv_nxt, so the flow lives on to the hand-over.
        self.exact_rst = rng.random() < 0.2
        # From this segment on, the peer closes: it sends its FIN after the
        # last byte and retransmits it.
        self.close_after = rng.choice((None, None, rng.randrange(0, 3000)))
        self.sent = 0

    def next_segment(self) -> Segment:
        """Return the next segment the peer sends, of a randomly chosen kind."""
        rng = self.rng
        kind = rng.random()
        edge = self.checker.best_edge
        rcv_nxt = seq_diff(self.checker.flow.rcv_nxt, self.checker.base)
        flags = ACK
        length = self._length()
        self.sent += 1
        closing = self.close_after is not None and self.sent > self.close_after
        if closing and kind < 0.5:
            offset = self.cursor - rng.choice((0, 0, length))
            flags, length = ACK | FIN, self.cursor - offset
        elif kind < 0.40:
            # in order, or waiting at the edge with a window probe
            offset = self.cursor
            if offset >= edge + self.mss:
                offset, length = edge, rng.choice((0, 1))
            self.cursor = max(self.cursor, offset + length)
        elif kind < 0.50:
            offset = self.cursor - rng.randrange(0, 5000)
        elif kind < 0.62:
            offset = rcv_nxt + rng.randrange(1, max(2, edge - rcv_nxt + 2))
        elif kind < 0.66:
            offset = edge + rng.randrange(-10, 3000)
        elif kind < 0.72:
            offset, length = self.cursor, 0
        elif kind < 0.75:
            # Linux keepalive: one below rcv_nxt, zero or one garbage byte
            offset, length = rcv_nxt - 1, rng.choice((0, 1))
        elif kind < 0.79:
            offset, flags = self.cursor, ACK | FIN
            length = rng.choice((0, 0, length))
        elif kind < 0.84:
            flags = RST | rng.choice((0, ACK))
            offset = rng.choice(
                (rcv_nxt + rng.randrange(1, 5000), -5, rng.getrandbits(31))
            )
            if self.exact_rst and rng.random() < 0.1:
                offset = rcv_nxt
            length = rng.choice((0, 0, 0, 3))
        elif kind < 0.87:
            flags = SYN | rng.choice((0, ACK))
            offset, length = rcv_nxt + rng.randrange(-100, 5000), 0
        elif kind < 0.93:
            offset = rng.getrandbits(32) - (1 << 31)
        else:
            offset = rcv_nxt + rng.randrange(-3000, 3000)
            flags = rng.getrandbits(9)
        if rng.random() < 0.1:
            flags |= rng.choice((PSH, URG, ECE, CWR, 0x100))
        return self._segment(offset, length, flags)

    def _length(self) -> int:
        rng = self.rng
        shape = rng.random()
        if shape < 0.3:
            return rng.randrange(1, 64)
        if shape < 0.9:
            return rng.randrange(1, self.mss + 1)
        return rng.randrange(1, MAX_PAYLOAD + 1)

    def _ack_field(self) -> int:
        rng = self.rng
        snd_nxt = self.snapshot.snd_nxt
        shape = rng.random()
        if shape < 0.85:
            return snd_nxt
        if shape < 0.92:
            return seq_add(self.snapshot.snd_una, rng.randrange(0, 200))
        if shape < 0.96:
            return seq_add(snd_nxt, rng.randrange(1, 100_000))
        return rng.getrandbits(32)

    def _options(self) -> TcpOptions:
        rng = self.rng
        timestamp = None
        if rng.random() < (0.95 if self.snapshot.timestamps_ok else 0.1):
            self.tsval = seq_add(self.tsval, rng.choice((0, 0, 1, 3, 10)))
            tsval = self.tsval
            shape = rng.random()
            if shape < 0.03:
                tsval = seq_add(tsval, -rng.randrange(1, 100_000))
            elif shape < 0.04:
                tsval = rng.getrandbits(32)
            timestamp = (tsval, rng.getrandbits(32))
        blocks: tuple[tuple[int, int], ...] = ()
        if rng.random() < 0.05:
            count = rng.randrange(1, 4 if timestamp is None else 3)
            blocks = tuple(
                (rng.getrandbits(32), rng.getrandbits(32)) for _ in range(count)
            )
        rare = rng.random() < 0.03
        return TcpOptions(
            mss=rng.randrange(1 << 16) if rare and rng.random() < 0.5 else None,
            wscale=rng.randrange(256) if rare and rng.random() < 0.5 else None,
            sack_permitted=rare and rng.random() < 0.5,
            sack_blocks=blocks,
            timestamp=timestamp,
        )

    def _segment(self, offset: int, length: int, flags: int) -> Segment:
        rng = self.rng
        if flags & (SYN | RST) and rng.random() < 0.8:
            length = 0
        payload = stream_content(offset, length)
        if payload and rng.random() < 0.02:
            payload = rng.randbytes(length)
        return Segment(
            version=self.key.family,
            src=self.key.peer_addr,
            dst=self.key.container_addr,
            sport=self.key.peer_port,
            dport=self.key.container_port,
            seq=seq_add(self.checker.base, offset),
            ack=self._ack_field(),
            flags=flags,
            window=rng.randrange(1 << 16),
            options=self._options(),
            payload=payload,
            urgent=0 if rng.random() < 0.95 else rng.randrange(1 << 16),
        )


# packet mutations


def random_option_bytes(rng: random.Random) -> bytes:
    """Return up to 40 bytes of TCP options, well-formed or not."""
    out = bytearray()
    target = rng.randrange(0, 41)
    while len(out) < target:
        pick = rng.randrange(12)
        if pick == 0:
            out += b"\x00"
        elif pick == 1:
            out += b"\x01"
        elif pick == 2:
            out += struct.pack("!BBH", 2, rng.choice((4, 4, 3, 5)), rng.getrandbits(16))
        elif pick == 3:
            out += bytes((3, rng.choice((3, 3, 2, 4)), rng.randrange(256)))
        elif pick == 4:
            out += bytes((4, rng.choice((2, 2, 3))))
        elif pick == 5:
            count = rng.randrange(0, 6)
            length = 2 + 8 * count + rng.choice((0, 0, 0, 1, -1))
            out += bytes((5, max(0, length) & 0xFF)) + rng.randbytes(8 * count)
        elif pick == 6:
            out += bytes((8, rng.choice((10, 10, 9, 11)))) + rng.randbytes(8)
        elif pick == 7:
            out += bytes((rng.randrange(256), rng.randrange(256)))
        elif pick == 8:
            body = rng.randbytes(rng.randrange(0, 8))
            out += bytes((rng.randrange(9, 256), len(body) + 2)) + body
        elif pick == 9:
            out += bytes((rng.choice((2, 3, 5, 8)),))
        else:
            out += rng.randbytes(rng.randrange(1, 6))
    del out[40:]
    out += bytes(-len(out) % 4)
    return bytes(out[:40])


def _ip_header_length(data: bytearray) -> int:
    return (data[0] & 0x0F) * 4 if data[0] >> 4 == 4 else 40


def _fix_lengths(data: bytearray) -> None:
    """Make the IP length fields match the packet, where the header allows it."""
    if len(data) < 20:
        return
    if data[0] >> 4 == 4:
        data[2:4] = struct.pack("!H", min(len(data), 0xFFFF))
    elif data[0] >> 4 == 6 and len(data) >= 40:
        data[4:6] = struct.pack("!H", min(len(data) - 40, 0xFFFF))


def _splice_tcp_options(rng: random.Random, data: bytearray) -> bytearray:
    ip_length = _ip_header_length(data)
    if len(data) < ip_length + 20:
        return data
    tcp_length = (data[ip_length + 12] >> 4) * 4
    options = random_option_bytes(rng)
    rest = data[ip_length + max(tcp_length, 20) :]
    spliced = data[: ip_length + 20] + options + rest
    offset_byte = spliced[ip_length + 12]
    spliced[ip_length + 12] = ((20 + len(options)) // 4) << 4 | (offset_byte & 0x0F)
    _fix_lengths(spliced)
    return spliced


def _insert_ipv4_options(rng: random.Random, data: bytearray) -> bytearray:
    if data[0] >> 4 != 4 or len(data) < 20:
        return data
    words = rng.randrange(1, 11)
    inserted = data[:20] + rng.randbytes(4 * words) + data[20:]
    inserted[0] = 0x40 | (5 + words)
    _fix_lengths(inserted)
    return inserted


def _insert_ipv6_extensions(rng: random.Random, data: bytearray) -> bytearray:
    if data[0] >> 4 != 6 or len(data) < 40:
        return data
    kinds = [
        rng.choice((0, 43, 60, 60, 44, 17, 59)) for _ in range(rng.randrange(1, 10))
    ]
    chain = bytearray()
    for next_header in kinds[1:] + [6]:
        units = rng.choice((0, 0, 1, 2))
        header = bytearray(rng.randbytes(8 * (units + 1)))
        header[0] = next_header
        header[1] = units if rng.random() < 0.95 else rng.randrange(256)
        chain += header
    inserted = data[:40] + chain + data[40:]
    inserted[6] = kinds[0]
    _fix_lengths(inserted)
    return inserted


def mutate(rng: random.Random, packet: bytes) -> bytes:
    """Apply one to three random mutations to a packet."""
    data = bytearray(packet)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not data:
            break
        ip_length = _ip_header_length(data)
        pick = rng.randrange(15)
        if pick == 0:
            position = rng.randrange(len(data))
            data[position] ^= 1 << rng.randrange(8)
        elif pick == 1 and len(data) > ip_length:
            position = rng.randrange(ip_length, min(len(data), ip_length + 60))
            data[position] ^= 1 << rng.randrange(8)
        elif pick == 2:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif pick == 3:
            del data[rng.randrange(len(data) + 1) :]
        elif pick == 4:
            data += rng.randbytes(rng.randrange(1, 64))
        elif pick == 5 and len(data) > ip_length + 12:
            data[ip_length + 12] = rng.randrange(16) << 4 | (
                data[ip_length + 12] & 0x0F
            )
        elif pick == 6 and len(data) > ip_length + 13:
            data[ip_length + 13] = rng.randrange(256)
        elif pick == 7:
            data = _splice_tcp_options(rng, data)
        elif pick == 8:
            data = _insert_ipv4_options(rng, data)
        elif pick == 9:
            data = _insert_ipv6_extensions(rng, data)
        elif pick == 10 and len(data) >= 6:
            field_at = 2 if data[0] >> 4 == 4 else 4
            data[field_at : field_at + 2] = rng.randbytes(2)
        elif pick == 11 and len(data) >= 10:
            data[9 if data[0] >> 4 == 4 else 6] = rng.choice((6, 6, 17, 0, 44, 255))
        elif pick == 12 and len(data) >= 8:
            data[6:8] = rng.randbytes(2)
        elif pick == 13:
            data[0] = rng.randrange(16) << 4 | (data[0] & 0x0F)
        elif len(data) >= ip_length + 12:
            start = ip_length + rng.choice((4, 8))
            data[start : start + 4] = rng.randbytes(4)
        if rng.random() < 0.5:
            _fix_lengths(data)
    return bytes(data)


def random_packet(rng: random.Random) -> bytes:
    """Return random bytes, or a valid IP header over random TCP bytes."""
    if rng.random() < 0.5:
        data = bytearray(rng.randbytes(rng.randrange(0, 120)))
        if data and rng.random() < 0.7:
            data[0] = rng.choice((0x45, 0x46, 0x4F, 0x60, 0x40, 0x41))
        return bytes(data)
    version = rng.choice((4, 6))
    tcp = bytearray(rng.randbytes(20))
    options = random_option_bytes(rng)
    tcp[12] = ((20 + len(options)) // 4) << 4 | (tcp[12] & 0x01)
    tcp += options + rng.randbytes(rng.choice((0, 0, 1, rng.randrange(1, 1500))))
    key = KEYS[version]
    if version == 4:
        src, dst = bytes((198, 18, 1, 2)), bytes((198, 18, 2, 2))
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst
        )
    else:
        src = bytes.fromhex("20010002000000010000000000000002")
        dst = bytes.fromhex("20010002000000020000000000000002")
        header = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, src, dst)
    if rng.random() < 0.5:
        # aim at the flow's ports, so the segment is one of the flow's
        tcp[0:4] = struct.pack("!HH", key.peer_port, key.container_port)
    return header + bytes(tcp)


# the run


@dataclass
class FuzzFailure(Exception):
    """An invariant broke; the fields reproduce it."""

    seed: int
    episode: int
    index: int
    """Index of the segment, counted over the whole run."""
    episode_index: int
    """Index of the segment within its episode."""
    message: str
    packet: bytes | None = None
    segment: str | None = None

    def __str__(self) -> str:
        lines = [
            f"seed {self.seed}, episode {self.episode}, segment {self.index} "
            f"(number {self.episode_index} of the episode): {self.message}",
        ]
        if self.segment is not None:
            lines.append(f"segment: {self.segment}")
        if self.packet is not None:
            text = self.packet[:PACKET_SHOWN_BYTES].hex()
            if len(self.packet) > PACKET_SHOWN_BYTES:
                text += f"... ({len(self.packet)} bytes)"
            lines.append(f"packet: {text}")
        lines.append(
            f"replay: .venv/bin/python tests/fuzz/run_fuzz.py --seed {self.seed} "
            f"--episode {self.episode}"
        )
        return "\n".join(lines)


def episode_rng(seed: int, episode: int) -> random.Random:
    return random.Random(f"{seed}/{episode}")


def run_episode(
    seed: int,
    episode: int,
    stats: FuzzStats,
    *,
    max_segments: int | None = None,
    first_index: int = 0,
) -> int:
    """Run one flow from snapshot to hand-over; return the segments it used.

    Raises:
        FuzzFailure: the parser raised something other than MalformedSegment,
            or the flow raised or broke an invariant.
    """
    rng = episode_rng(seed, episode)
    snapshot = random_snapshot(rng)
    limits = random_limits(rng, snapshot)
    checker = FlowChecker(snapshot, limits, random_trickle(rng))
    peer = Peer(rng, checker)
    length = rng.choice((20, 200, 1000, 3000))
    if max_segments is not None:
        length = min(length, max_segments)
    now = snapshot.taken_at + rng.random() * 0.01
    index = 0
    packet: bytes | None = None
    segment: Segment | None = None

    def fail(message: str) -> FuzzFailure:
        return FuzzFailure(
            seed,
            episode,
            first_index + index,
            index,
            message,
            packet,
            None if segment is None else str(segment),
        )

    try:
        while index < length:
            now += _time_step(rng)
            packet, original = _next_packet(rng, peer)
            segment = _parse(rng, packet, original, stats)
            if segment is not None:
                checker.receive(segment, now)
                deadline = checker.flow.next_deadline()
                if rng.random() < 0.2 or (deadline is not None and now >= deadline):
                    checker.on_deadline(now)
            index += 1
        segment = None
        packet = None
        checker.finish(now + _time_step(rng))
    except InvariantViolation as exc:
        raise fail(str(exc)) from exc
    except Exception as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from exc
    stats.episodes += 1
    stats.resets += checker.reset
    stats.fins += checker.fin_offset is not None
    stats.bytes_handed_over += max(0, checker.last_ack)
    stats.reasons.update(checker.reasons)
    return length


def _parse(
    rng: random.Random, packet: bytes, original: Segment | None, stats: FuzzStats
) -> Segment | None:
    """Parse a packet; return None when it is malformed.

    Raises:
        InvariantViolation: an unmutated packet did not parse back to the
            segment it was built from.
    """
    stats.segments += 1
    try:
        segment = parse_packet_untrusted(packet, verify_checksum=rng.random() < 0.1)
    except MalformedSegment as exc:
        stats.malformed += 1
        stats.parse_errors[str(exc).split(" ", 1)[0]] += 1
        if original is not None:
            message = f"a packet built by the codec is malformed: {exc}"
            raise InvariantViolation(message) from exc
        return None
    stats.parsed += 1
    if original is not None:
        check(segment == original, "a built segment does not parse back to itself")
        check(segment.checksum_ok is not False, "a built segment has a bad checksum")
    return segment


def _time_step(rng: random.Random) -> float:
    shape = rng.random()
    if shape < 0.15:
        return 0.0
    if shape < 0.85:
        return rng.expovariate(500.0)
    if shape < 0.97:
        return rng.uniform(0.05, 0.5)
    return rng.uniform(1.0, 3.0)


def _next_packet(rng: random.Random, peer: Peer) -> tuple[bytes, Segment | None]:
    """Return a packet and, when it is unmutated, the segment it encodes."""
    shape = rng.random()
    if shape < 0.1:
        return random_packet(rng), None
    segment = peer.next_segment()
    try:
        packet = build_packet(segment)
    except ValueError:
        # the options did not fit in 40 bytes
        options = segment.options
        segment = Segment(
            **{
                **segment.__dict__,
                "options": TcpOptions(timestamp=options.timestamp),
            }
        )
        packet = build_packet(segment)
    if shape < 0.35:
        return mutate(rng, packet), None
    return packet, segment


def run_fuzz(
    count: int,
    seed: int,
    *,
    progress: Callable[[FuzzStats, float], None] | None = None,
) -> FuzzStats:
    """Feed ``count`` packets through the parser and the flows.

    Raises:
        FuzzFailure: on the first broken invariant.
    """
    stats = FuzzStats()
    started = time.monotonic()
    last_report = started
    episode = 0
    while stats.segments < count:
        run_episode(
            seed,
            episode,
            stats,
            max_segments=count - stats.segments,
            first_index=stats.segments,
        )
        episode += 1
        if progress is not None and time.monotonic() - last_report >= 10.0:
            last_report = time.monotonic()
            progress(stats, last_report - started)
    return stats


def format_summary(stats: FuzzStats, seconds: float) -> str:
    rate = stats.segments / seconds if seconds > 0 else float("inf")
    top_errors = ", ".join(
        f"{name} {count}" for name, count in stats.parse_errors.most_common(6)
    )
    reasons = ", ".join(
        f"{name} {count}" for name, count in sorted(stats.reasons.items())
    )
    return "\n".join(
        [
            f"segments        {stats.segments:,} in {seconds:.1f} s "
            f"({rate:,.0f} segments/s)",
            f"malformed       {stats.malformed:,} (first words: {top_errors})",
            f"parsed          {stats.parsed:,} fed to {stats.episodes:,} flows",
            f"resets          {stats.resets:,} flows reset by an exact RST",
            f"fins            {stats.fins:,} flows saw the peer's FIN",
            f"handed over     {stats.bytes_handed_over:,} bytes",
            f"segments sent   {reasons}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--count", type=int, default=100_000, help="packets to feed (default 100000)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the run")
    parser.add_argument(
        "--episode",
        type=int,
        help="replay only this episode of the seed, as printed on a failure",
    )
    args = parser.parse_args(argv)
    if args.count <= 0:
        parser.error(f"invalid --count {args.count}: use a positive number")

    started = time.monotonic()
    stats = FuzzStats()

    def report(current: FuzzStats, seconds: float) -> None:
        rate = current.segments / seconds
        print(
            f"{current.segments:,} segments, {rate:,.0f}/s, {current.episodes:,} flows",
            file=sys.stderr,
            flush=True,
        )

    try:
        if args.episode is not None:
            run_episode(args.seed, args.episode, stats)
        else:
            stats = run_fuzz(args.count, args.seed, progress=report)
    except FuzzFailure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    print(f"seed {args.seed}: no invariant broken")
    print(format_summary(stats, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
