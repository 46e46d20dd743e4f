"""The per-flow shield: answer a peer in the container's name while it is frozen.

A :class:`ShieldFlow` starts from a :class:`FlowSnapshot` of the container's
socket. It is fed the peer's segments together with the current time and returns
actions: segments to transmit to the peer and events to report. It never reads a
clock, touches a socket or logs.

States::

    SHIELDING --handover()--> HANDED_OVER
        |
        +--RST at exactly rcv_nxt, or at the last ACK sent--> RESET

While SHIELDING it behaves as the container's receive side would (RFC 9293
section 3.10.7.4, in that order): PAWS check, sequence acceptability, RST, SYN,
ACK field, data, FIN. "The container has been restored" arrives as the call to
:meth:`ShieldFlow.handover`; the flow never infers it.

Window rule: the right edge a peer sees, ``ack + (window << rcv_wscale)``, never
moves left (RFC 9293 section 3.8.6 forbids shrinking a window already offered).
With a window scale the advertised window is a multiple of ``1 << rcv_wscale``,
so after an ACK that does not land on that grid the flow moves the edge right to
the next multiple or, while more data keeps coming, acknowledges slightly less
than it holds; :meth:`ShieldFlow._choose_ack` explains the trade.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .reassembly import Reassembler
from .segment import ACK, FIN, RST, SYN, Segment, TcpOptions
from .seq import seq_add, seq_diff, seq_ge, seq_gt, seq_le, seq_lt
from .snapshot import FlowKey, FlowSnapshot

MAX_WINDOW_FIELD = 0xFFFF

# The kernel's TCP timestamp clock ticks in whole milliseconds that need not line
# up with the shield's clock, so a restored clock set to the shield's value can
# run up to about 2 ms behind it. A peer drops segments whose TSval goes back
# (PAWS), so the restored clock starts this far ahead.
RESTORE_TSVAL_MARGIN_MS = 10


def restore_tsval(handover_tsval: int, handover_at: float, now: float) -> int:
    """Return the TCP_TIMESTAMP value for a socket restored at ``now``.

    It is at or above every TSval the shield has sent or will send until the
    release, as long as the shield's clock and ``now`` are CLOCK_MONOTONIC
    seconds of the same host.
    """
    elapsed_ms = math.ceil(max(0.0, now - handover_at) * 1000)
    return seq_add(handover_tsval, elapsed_ms + RESTORE_TSVAL_MARGIN_MS)


class FlowState(enum.Enum):
    SHIELDING = "shielding"
    HANDED_OVER = "handed-over"
    RESET = "reset"


@dataclass(frozen=True)
class FlowLimits:
    """Bounds on one flow's memory and on the answers it sends."""

    max_buffer_bytes: int | None = None
    """Most bytes past the snapshot's rcv_nxt the flow may ever accept; bytes
    past it are dropped and counted even inside the advertised window. None
    means the container's own window plus a quarter of it (at least 64 KiB) for
    window-scale rounding. The container's window is always honoured, even
    above this limit."""
    tail_ack_delay_s: float = 0.04
    """How long bytes may stay unacknowledged to keep the edge on the scale grid."""
    challenge_acks_per_s: int = 10
    """Challenge ACKs (RFC 5961 section 7) sent per flow per second at most."""
    invalid_ack_interval_s: float = 0.5
    """Minimum gap between ACKs sent for zero-length out-of-window segments,
    like Linux's net.ipv4.tcp_invalid_ratelimit, so two middleboxes can't loop."""


@dataclass(frozen=True)
class TricklePolicy:
    """Open the window by a few bytes at a fixed interval once the peer filled it.

    Peers with TCP_USER_TIMEOUT abort a connection whose zero window lasts longer
    than the timeout (Linux 5.11 and later), so a shield for them must keep
    accepting some data.
    """

    step_bytes: int
    interval_s: float


@dataclass(frozen=True)
class Transmit:
    """A segment to send to the peer in the container's name."""

    segment: Segment
    reason: str
    """Why it is sent: data, fin, out-of-window, paws, challenge, bad-ack, tail,
    window-update or handover."""


@dataclass(frozen=True)
class ResetReceived:
    """The peer reset the connection with an RST at exactly rcv_nxt."""


@dataclass(frozen=True)
class FinReceived:
    """The peer's FIN is in order: all its data up to ``seq`` has arrived."""

    seq: int


Action = Transmit | ResetReceived | FinReceived


@dataclass
class FlowStats:
    """Counters of one flow, all since the flow was created."""

    segments: int = 0
    bytes_absorbed: int = 0
    """New payload bytes accepted, in order or not."""
    bytes_duplicate: int = 0
    bytes_beyond_edge: int = 0
    """Payload bytes dropped because they were past the right edge."""
    bytes_after_fin: int = 0
    """Payload bytes dropped because they came after a FIN the container had
    received before the freeze."""
    acks_sent: int = 0
    challenge_acks: int = 0
    challenge_acks_suppressed: int = 0
    invalid_acks_suppressed: int = 0
    paws_rejected: int = 0
    rst_accepted: int = 0
    rst_ignored: int = 0
    syn_received: int = 0
    no_ack_flag: int = 0
    bad_ack_field: int = 0
    after_handover: int = 0
    max_right_edge_retraction: int = 0
    """Largest leftward move of the advertised right edge; nonzero is a bug."""

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class FlowHandover:
    """State the restored socket needs to continue where the shield stopped."""

    key: FlowKey
    start_seq: int
    """Snapshot rcv_nxt: the sequence number of ``data[0]``."""
    data: bytes
    """Bytes the shield acknowledged, to append to the restored receive queue."""
    rcv_nxt: int
    """start_seq + len(data), not counting a FIN."""
    fin: bool
    """The peer's FIN came after ``data`` and was acknowledged."""
    reset: bool
    right_edge: int
    """Largest ack + scaled window the peer was shown."""
    tsval: int
    """Shield's timestamp clock at hand-over, at or above every TSval it sent."""
    ts_recent: int | None
    discarded_bytes: int
    """Out-of-order bytes held past a gap, which cannot be handed over; the peer
    still has them to resend."""


@dataclass
class _RateLimit:
    per_second: int
    window_start: float = float("-inf")
    used: int = 0

    def allow(self, now: float) -> bool:
        if now - self.window_start >= 1.0:
            self.window_start = now
            self.used = 0
        if self.used >= self.per_second:
            return False
        self.used += 1
        return True


class ShieldFlow:
    """Sans-IO receive side of one TCP connection, speaking for the container."""

    # A shield keeps one instance per frozen flow, so slots keep its memory small.
    __slots__ = (
        "snapshot",
        "key",
        "state",
        "stats",
        "_limits",
        "_trickle",
        "_sack",
        "_timestamps",
        "_rcv_wscale",
        "_family",
        "_base",
        "_buffer",
        "_last_ack",
        "_edge",
        "_max_edge_shown",
        "_limit",
        "_snd_una",
        "_max_snd_window",
        "_snd_nxt",
        "_ts_recent",
        "_last_tsval",
        "_fin_offset",
        "_fin_delivered",
        "_fin_before_freeze",
        "_challenges",
        "_last_invalid_ack",
        "_next_trickle",
        "_tail_since",
    )

    def __init__(
        self,
        snapshot: FlowSnapshot,
        *,
        limits: FlowLimits = FlowLimits(),
        trickle: TricklePolicy | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.key = snapshot.key
        self.state = FlowState.SHIELDING
        self.stats = FlowStats()
        self._limits = limits
        self._trickle = trickle
        self._sack = snapshot.sack_ok
        self._timestamps = snapshot.timestamps_ok
        self._rcv_wscale = snapshot.rcv_wscale if 0 <= snapshot.rcv_wscale <= 14 else 0
        # IP version of the key, looked up at the first ACK
        self._family: int | None = None
        self._base = snapshot.rcv_nxt
        self._buffer = Reassembler()

        # Offsets below are relative to self._base. The container's last ACK
        # carried rcv_wup, which may be behind rcv_nxt (delayed ACK).
        self._last_ack = seq_diff(snapshot.rcv_wup, self._base)
        if self._last_ack > 0:
            self._last_ack = 0
        self._edge = max(seq_diff(snapshot.right_edge, self._base), 0)
        self._max_edge_shown = self._edge
        if limits.max_buffer_bytes is not None:
            self._limit = max(limits.max_buffer_bytes, self._edge)
        else:
            self._limit = self._edge + max(64 * 1024, self._edge // 4)

        self._snd_una = snapshot.snd_una
        # MAX.SND.WND of RFC 5961 is the largest window the peer advertised. The
        # snapshot does not record it, so this is the largest its scale allows.
        self._max_snd_window = MAX_WINDOW_FIELD << min(max(snapshot.snd_wscale, 0), 14)
        self._snd_nxt = snapshot.snd_nxt
        self._ts_recent = snapshot.ts_recent
        self._last_tsval = snapshot.tsval
        self._fin_offset: int | None = None
        self._fin_delivered = False
        # The FIN is behind rcv_nxt already, so the hand-over has no FIN to give.
        self._fin_before_freeze = snapshot.peer_fin
        # created at the first challenge ACK, which most flows never send
        self._challenges: _RateLimit | None = None
        self._last_invalid_ack = float("-inf")
        self._next_trickle: float | None = None
        # Bytes below rcv_nxt that the container has not acknowledged yet wait
        # for its delayed ACK, which the rules now drop. The tail timer sends
        # that ACK instead, or the peer would resend them after its RTO.
        self._tail_since: float | None = (
            snapshot.taken_at if self._last_ack < 0 else None
        )

    # properties

    @property
    def rcv_nxt(self) -> int:
        """Sequence number one past the contiguous bytes held."""
        return seq_add(self._base, self._buffer.contiguous_end)

    @property
    def ack_sent(self) -> int:
        """Acknowledgement number of the last ACK shown to the peer."""
        return seq_add(self._base, self._last_ack)

    @property
    def right_edge(self) -> int:
        """Largest ack + scaled window the peer has been shown."""
        return seq_add(self._base, self._max_edge_shown)

    @property
    def buffered_bytes(self) -> int:
        return self._buffer.buffered_bytes

    @property
    def fin_received(self) -> bool:
        return self._fin_delivered

    def tsval_at(self, now: float) -> int:
        """Container's timestamp clock (ms) at ``now``, never below one already sent."""
        elapsed_ms = max(0, int((now - self.snapshot.taken_at) * 1000))
        tsval = seq_add(self.snapshot.tsval, elapsed_ms)
        if seq_lt(tsval, self._last_tsval):
            tsval = self._last_tsval
        return tsval

    # inputs

    def receive(self, seg: Segment, now: float) -> list[Action]:
        """Process one segment from the peer and return what to do about it."""
        self.stats.segments += 1
        if self.state is not FlowState.SHIELDING:
            self.stats.after_handover += 1
            return []

        flags = seg.flags
        # PAWS (RFC 7323 section 5.3): an older TSval than ts_recent is a stale
        # duplicate, unless it is an RST.
        timestamp = seg.options.timestamp if self._timestamps else None
        if (
            timestamp is not None
            and self._ts_recent is not None
            and not flags & RST
            and seq_lt(timestamp[0], self._ts_recent)
        ):
            self.stats.paws_rejected += 1
            return self._ack_unacceptable(seg, now, "paws")

        if flags & RST:
            return self._receive_reset(seg, now)

        # sequence acceptability (RFC 9293 section 3.10.7.4, first check)
        if not self._acceptable(seg):
            self._count_dropped_payload(seg)
            return self._ack_unacceptable(seg, now, "out-of-window")

        # SYN on an established connection (RFC 5961 section 4.2)
        if flags & SYN:
            self.stats.syn_received += 1
            return self._challenge(now)

        if not flags & ACK:
            self.stats.no_ack_flag += 1
            return []

        # ACK field (RFC 5961 section 5.2): acking unsent data gets an ACK back.
        # An ACK below snd_una - MAX.SND.WND is a blind guess, so its data is
        # dropped with a rate-limited challenge ACK, as Linux's tcp_ack() does.
        if seq_gt(seg.ack, self._snd_nxt):
            self.stats.bad_ack_field += 1
            return self._ack_unacceptable(seg, now, "bad-ack")
        if seq_lt(seg.ack, seq_add(self._snd_una, -self._max_snd_window)):
            self.stats.bad_ack_field += 1
            return self._challenge(now)
        if seq_gt(seg.ack, self._snd_una):
            self._snd_una = seg.ack

        # RFC 7323 section 4.3: remember the TSval of a segment that covers the
        # left edge of the window, which the next TSecr echoes.
        if timestamp is not None and (
            self._ts_recent is None
            or seq_le(seg.seq, seq_add(self._base, self._last_ack))
        ):
            self._ts_recent = timestamp[0]

        actions: list[Action] = []
        if seg.payload or flags & FIN:
            self._absorb(seg, actions)
            actions.append(self._ack(now, "fin" if self._fin_delivered else "data"))
        return actions

    def _receive_reset(self, seg: Segment, now: float) -> list[Action]:
        """Reset on an exact match, as RFC 5961 section 3.2 requires.

        RCV.NXT counts the peer's FIN once it is in order. The peer knows
        RCV.NXT only from the last ACK it saw, which can stop short of the
        bytes held (see :meth:`_choose_ack`), and a peer whose socket is gone
        replies to the challenge ACK with an RST at that ACK number. So that
        number resets too; otherwise the two would trade challenge ACKs and
        RSTs until the hand-over. Any other RST in the window gets a challenge
        ACK, and one outside it is dropped.
        """
        if seg.seq in (self._next_seq(), self.ack_sent):
            self.stats.rst_accepted += 1
            self.state = FlowState.RESET
            return [ResetReceived()]
        if self._acceptable(seg):
            return self._challenge(now)
        self.stats.rst_ignored += 1
        return []

    def next_deadline(self) -> float | None:
        """Monotonic time at which :meth:`on_deadline` wants to run, if any."""
        if self.state is not FlowState.SHIELDING:
            return None
        deadlines = []
        if self._tail_since is not None:
            deadlines.append(self._tail_since + self._limits.tail_ack_delay_s)
        if self._trickle is not None and self._next_trickle is not None:
            deadlines.append(self._next_trickle)
        return min(deadlines, default=None)

    def on_deadline(self, now: float) -> list[Action]:
        """Acknowledge a lingering tail, and run the trickle window policy."""
        if self.state is not FlowState.SHIELDING:
            return []
        actions: list[Action] = []
        if (
            self._tail_since is not None
            and now >= self._tail_since + self._limits.tail_ack_delay_s
        ):
            actions.append(self._ack(now, "tail", ack_all=True))
        if self._trickle is not None:
            actions += self._run_trickle(now, self._trickle)
        return actions

    def _run_trickle(self, now: float, trickle: TricklePolicy) -> list[Action]:
        if self._next_trickle is None:
            self._next_trickle = now + trickle.interval_s
            return []
        if now < self._next_trickle:
            return []
        self._next_trickle = now + trickle.interval_s
        unit = 1 << self._rcv_wscale
        if self._edge - self._last_ack >= trickle.step_bytes:
            return []
        step = -(-trickle.step_bytes // unit) * unit
        ceiling = min(self._limit, self._last_ack + MAX_WINDOW_FIELD * unit)
        if self._edge + step > ceiling:
            return []
        self._edge += step
        return [self._ack(now, "window-update")]

    def handover(self, now: float) -> tuple[FlowHandover, Transmit | None]:
        """Stop answering and return what the restored socket must be given.

        Bytes held in order but not yet acknowledged (the ACK stayed on the
        window-scale grid) are acknowledged now by the returned final ACK, which
        may move the right edge by less than one scale unit past the buffer limit.
        Otherwise the peer could only get them acknowledged by retransmitting them
        after its retransmission timeout.
        """
        state = self.state
        final_ack: Transmit | None = None
        if state is FlowState.SHIELDING:
            if self._last_ack < self._buffer.contiguous_end:
                final_ack = self._ack(now, "handover", ack_all=True)
            self.state = FlowState.HANDED_OVER
        return self._handover_state(now, reset=state is FlowState.RESET), final_ack

    def handover_so_far(self, now: float) -> FlowHandover:
        """Return what the shield has acknowledged so far, and go on answering.

        A restore that starts before the flow stops answering takes these bytes
        first; a later :meth:`handover` returns them again at the start of its
        data, followed by what came since.
        """
        return self._handover_state(now, reset=self.state is FlowState.RESET)

    def _handover_state(self, now: float, *, reset: bool) -> FlowHandover:
        data_end = max(0, min(self._last_ack, self._buffer.contiguous_end))
        data = self._buffer.prefix(data_end)
        fin_acked = (
            self._fin_offset is not None
            and self._fin_delivered
            and self._last_ack > self._fin_offset
        )
        return FlowHandover(
            key=self.key,
            start_seq=self._base,
            data=data,
            rcv_nxt=seq_add(self._base, len(data)),
            fin=fin_acked,
            reset=reset,
            right_edge=self.right_edge,
            tsval=self.tsval_at(now),
            ts_recent=self._ts_recent,
            discarded_bytes=self._buffer.buffered_bytes - len(data),
        )

    def release_update(self, now: float, *, rcv_nxt: int, right_edge: int) -> Transmit:
        """Build a window update announcing the restored socket's receive window.

        A restored Linux socket announces itself with a window probe whose
        sequence number is snd_una - 1, and the peer drops that as an old
        segment. A peer stuck at a zero window would then wait for its next
        backed-off persist probe. This ACK carries the restored socket's rcv_nxt
        and right edge, which must be at or past every edge the shield showed.
        """
        unit = 1 << self._rcv_wscale
        edge = right_edge
        if seq_lt(edge, self.right_edge):
            edge = self.right_edge
        # The shield acknowledged the peer's FIN with rcv_nxt + 1. A restore
        # that delivered the FIN reports that number. A restore that did not
        # must still not show the peer a lower ACK than it already saw.
        ack = rcv_nxt if seq_ge(rcv_nxt, self.ack_sent) else self.ack_sent
        window_bytes = max(0, seq_diff(edge, ack))
        # Round down where that still keeps the shield's own edge. The restored
        # kernel rounds its edge to the scale unit from its own ACK numbers, so
        # an edge rounded up here could lie up to one unit past its later ones.
        window = window_bytes // unit
        if seq_lt(seq_add(ack, window * unit), self.right_edge):
            window = -(-window_bytes // unit)
        window = min(MAX_WINDOW_FIELD, window)
        timestamp = self._next_timestamp(now)
        segment = self._ack_segment(ack, window, TcpOptions(timestamp=timestamp))
        return Transmit(segment, "window-update")

    # helpers

    def _next_timestamp(self, now: float) -> tuple[int, int] | None:
        """Return (TSval, TSecr) for a segment sent now, or None without timestamps."""
        if not self._timestamps:
            return None
        tsval = self.tsval_at(now)
        self._last_tsval = tsval
        return (tsval, self._ts_recent or 0)

    def _ack_segment(self, ack: int, window: int, options: TcpOptions) -> Segment:
        """Build a pure ACK from the container to the peer, and count it."""
        self.stats.acks_sent += 1
        key = self.key
        family = self._family
        if family is None:
            family = self._family = key.family
        return Segment(
            version=family,
            src=key.container_addr,
            dst=key.peer_addr,
            sport=key.container_port,
            dport=key.peer_port,
            seq=self._snd_nxt,
            ack=ack,
            flags=ACK,
            window=window,
            options=options,
        )

    def _next_offset(self) -> int:
        """Offset of RCV.NXT: past the contiguous bytes and the peer's FIN."""
        end = self._buffer.contiguous_end
        return end + 1 if self._fin_delivered else end

    def _next_seq(self) -> int:
        return seq_add(self._base, self._next_offset())

    def _acceptable(self, seg: Segment) -> bool:
        # After the peer's FIN its keepalive probes carry the FIN's sequence
        # number, one below RCV.NXT, so they count as old and get an ACK.
        next_offset = self._next_offset()
        window = self._edge - next_offset
        length = seg.seg_len
        start = seq_diff(seg.seq, seq_add(self._base, next_offset))
        if length == 0:
            return 0 <= start < window if window > 0 else start == 0
        # a bare FIN at rcv_nxt is accepted even into a zero window, as Linux does
        if not seg.payload and seg.flags & FIN and start == 0:
            return True
        if window <= 0:
            return False
        end = start + length - 1
        return 0 <= start < window or 0 <= end < window

    def _absorb(self, seg: Segment, actions: list[Action]) -> None:
        offset = seq_diff(seg.seq, self._base)
        payload = seg.payload
        if self._fin_before_freeze:
            # A retransmitted FIN lies before rcv_nxt and gets the ACK the caller
            # sends. Data after the FIN is a peer's error, which Linux ignores too
            # (tcp_rcv_state_process in CLOSE_WAIT, CLOSING and LAST_ACK).
            self.stats.bytes_after_fin += len(payload)
            return
        if offset < 0:
            # before the snapshot: the container already has these bytes
            cut = min(-offset, len(payload))
            self.stats.bytes_duplicate += cut
            payload = payload[cut:]
            offset += cut
        limit = min(self._edge, self._limit)
        if self._fin_offset is not None:
            limit = min(limit, self._fin_offset)
        fits = True
        if offset + len(payload) > limit:
            keep = max(0, limit - offset)
            self.stats.bytes_beyond_edge += len(payload) - keep
            payload = payload[:keep]
            fits = False
        if payload:
            result = self._buffer.insert(offset, payload)
            self.stats.bytes_absorbed += result.new
            self.stats.bytes_duplicate += result.duplicate

        # A FIN before bytes already held contradicts them, so it is ignored and
        # the peer has to resend it. Otherwise the held bytes would be
        # acknowledged past the peer's FIN.
        fin_offset = offset + len(payload)
        if (
            seg.flags & FIN
            and fits
            and self._fin_offset is None
            and self._buffer.held_end <= fin_offset
        ):
            self._fin_offset = fin_offset
        if (
            self._fin_offset is not None
            and not self._fin_delivered
            and self._buffer.contiguous_end == self._fin_offset
        ):
            self._fin_delivered = True
            actions.append(FinReceived(seq_add(self._base, self._fin_offset)))

    def _count_dropped_payload(self, seg: Segment) -> None:
        """Count the payload of a segment with no byte in the window.

        Bytes before rcv_nxt are duplicates. The rest lie past the right edge,
        unless the segment spans the whole window, which is rare.
        """
        length = len(seg.payload)
        duplicate = min(length, max(0, -seq_diff(seg.seq, self.rcv_nxt)))
        self.stats.bytes_duplicate += duplicate
        self.stats.bytes_beyond_edge += length - duplicate

    def _ack_unacceptable(self, seg: Segment, now: float, reason: str) -> list[Action]:
        # Linux answers out-of-window segments carrying data every time, but
        # rate-limits answers to zero-length ones (net.ipv4.tcp_invalid_ratelimit).
        if seg.seg_len == 0:
            if now - self._last_invalid_ack < self._limits.invalid_ack_interval_s:
                self.stats.invalid_acks_suppressed += 1
                return []
            self._last_invalid_ack = now
        return [self._ack(now, reason)]

    def _challenge(self, now: float) -> list[Action]:
        if self._challenges is None:
            self._challenges = _RateLimit(self._limits.challenge_acks_per_s)
        if not self._challenges.allow(now):
            self.stats.challenge_acks_suppressed += 1
            return []
        self.stats.challenge_acks += 1
        return [self._ack(now, "challenge")]

    def _choose_ack(self, now: float, *, ack_all: bool) -> tuple[int, int]:
        """Pick (ack offset, window in bytes) that keeps the right edge in place.

        With a window scale the window is shown in units of ``1 << rcv_wscale``.
        An ACK for every byte held would usually need a window that is not a
        whole number of units. The edge would then have to move right on nearly
        every ACK ("creep", as Linux's tcp_select_window does), and the buffer
        would grow without bound. So the ACK normally stops at the last byte
        that keeps the edge on the unit grid, and the up to ``unit - 1`` bytes
        after it are acknowledged by a later ACK. If no later data comes within
        ``FlowLimits.tail_ack_delay_s``, :meth:`on_deadline` acknowledges them
        with ``ack_all`` and lets the edge creep once, long before the peer's
        retransmission timeout (200 ms at least on Linux).
        """
        unit = 1 << self._rcv_wscale
        candidate = self._buffer.contiguous_end
        if self._fin_delivered and self._fin_offset is not None:
            candidate = self._fin_offset + 1
            ack_all = True
        candidate = max(candidate, self._last_ack)
        gap = self._edge - candidate
        if gap < 0:
            # only the FIN can sit past the edge; widen the edge to cover it
            self._edge = candidate
            gap = 0
        remainder = gap % unit
        if remainder == 0:
            self._tail_since = None
            return candidate, gap
        short = unit - remainder
        aligned = candidate - short
        if not ack_all and aligned >= self._last_ack:
            if self._tail_since is None:
                self._tail_since = now
            return aligned, gap + short
        # ack everything: the edge moves right by less than one unit
        self._edge += short
        self._tail_since = None
        return candidate, gap + short

    def _ack(self, now: float, reason: str, *, ack_all: bool = False) -> Transmit:
        ack_offset, window_bytes = self._choose_ack(now, ack_all=ack_all)
        window = window_bytes >> self._rcv_wscale
        if window > MAX_WINDOW_FIELD:
            window = MAX_WINDOW_FIELD
        shown_edge = ack_offset + (window << self._rcv_wscale)
        retraction = self._max_edge_shown - shown_edge
        if retraction > self.stats.max_right_edge_retraction:
            self.stats.max_right_edge_retraction = retraction
        self._max_edge_shown = max(self._max_edge_shown, shown_edge)
        self._last_ack = ack_offset

        timestamp = self._next_timestamp(now)
        sack_blocks: tuple[tuple[int, int], ...] = ()
        if self._sack:
            max_blocks = 3 if timestamp is not None else 4
            ranges = self._buffer.out_of_order_ranges(max_blocks)
            if ranges:
                base = self._base
                sack_blocks = tuple(
                    (seq_add(base, start), seq_add(base, end)) for start, end in ranges
                )
        options = TcpOptions(sack_blocks=sack_blocks, timestamp=timestamp)
        segment = self._ack_segment(seq_add(self._base, ack_offset), window, options)
        return Transmit(segment, reason)


__all__ = [
    "Action",
    "FinReceived",
    "FlowHandover",
    "FlowLimits",
    "FlowState",
    "FlowStats",
    "ResetReceived",
    "ShieldFlow",
    "Transmit",
    "TricklePolicy",
]
