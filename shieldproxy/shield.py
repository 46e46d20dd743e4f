"""The shield engine: queued packets in, flow machines in the middle, ACKs out.

One :class:`Shield` serves every flow diverted to its NFQUEUE binding. Packets of
a flow whose snapshot has not arrived yet, and packets that arrive after a flow
was handed over, are held without a verdict; :meth:`Shield.release` lets them
through to the restored socket. Everything else is answered by the flow's
:class:`ShieldFlow` and dropped, since the shield has taken its bytes.

With a journal (:class:`AckJournal`) the shield holds its ACKs back: it
journals the bytes it absorbed and the state its ACKs show, commits the
journal once per batch of packets, and sends the ACKs only after the commit
succeeded (group commit). :meth:`Shield.flush` ends a batch; the daemon calls
it after each batch read from the queue (see ``QueueBinding.serve``), and the
shield calls it itself after its timers and control operations.

Memory is bounded three ways. The bytes buffered by all flows together stay
within ``total_buffer_bytes``: payload past it is cut off before the flow
processes the segment, so it is never acknowledged and the peer sends it again later.
``max_flows`` bounds the flows. Held packets share one pool (see
:class:`HeldPackets`), in which one flow key holds at most a set number, and
flows without a snapshot, which anyone can forge, never get the part reserved
for flows waiting for their release. Each packet dropped or cut for a limit is
counted in ``Shield.counters.dropped`` by reason.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .journal import AckedState
from .kernel.nfqueue import DEFAULT_QUEUE_MAXLEN, QueuedPacket
from .tcp.flow import (
    FinReceived,
    FlowHandover,
    FlowLimits,
    FlowState,
    ResetReceived,
    ShieldFlow,
    Transmit,
    TricklePolicy,
)
from .tcp.segment import (
    FIN,
    MalformedSegment,
    Segment,
    build_packet,
    parse_packet_untrusted,
)
from .tcp.seq import seq_diff
from .tcp.snapshot import FlowKey, FlowSnapshot

log = logging.getLogger(__name__)

DEFAULT_MAX_HELD_PACKETS = DEFAULT_QUEUE_MAXLEN // 2
"""Size of the held-packet pool. A held packet takes a slot of the kernel's
NFQUEUE (its queue-maxlen) until its verdict, so a pool as large as the queue
would leave no slot for the packets of the flows it shields."""
HELD_UNKNOWN_TIMEOUT_S = 10.0
"""How long a packet of a flow without a snapshot is held before it is dropped.
By then the peer has sent it again, because its retransmission timeout is far
shorter (200 ms at least on Linux), so the slot is better spent on newer packets."""

DROP_REASONS = (
    "malformed",
    "held-limit",
    "held-flow-limit",
    "held-unknown-limit",
    "held-expired",
    "total-buffer-limit",
)
"""Keys of ``ShieldCounters.dropped``:

- malformed: not a TCP segment over IPv4 or IPv6.
- held-limit: the held-packet pool was full.
- held-flow-limit: the packet's flow already had its maximum of held packets.
- held-unknown-limit: the part of the pool open to flows without a snapshot
  was full.
- held-expired: a packet of a flow without a snapshot waited longer than the
  held timeout.
- total-buffer-limit: a segment lost payload bytes, or all of them, because
  the flows together already buffered ``total_buffer_bytes``.
"""


class FlowLimitError(ValueError):
    """Adding a flow would exceed the shield's maximum number of flows."""


class Sender(Protocol):
    """Destination of the shield's packets: a raw socket, or a list in tests."""

    def send(self, packet: bytes, version: int, dst: str) -> bool: ...


class AckJournal(Protocol):
    """Durable record of absorbed bytes, which must be committed before ACKs."""

    def record_data(self, key: FlowKey, seq: int, payload: bytes) -> None: ...
    def record_acked(self, key: FlowKey, state: AckedState) -> None: ...
    def commit(self) -> None: ...
    def is_durable(self, key: FlowKey) -> bool:
        """Return True when every record of the flow so far is committed."""
        ...


@dataclass
class ShieldCounters:
    """Engine-wide counters; per-flow ones live in each flow's stats."""

    packets: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    held: int = 0
    released: int = 0
    acks_sent: int = 0
    send_errors: int = 0
    acks_withheld: int = 0
    """ACKs never sent because the journal could not be written."""
    dropped_bytes: Counter[str] = field(default_factory=Counter)
    """Payload bytes cut off by a limit, by drop reason."""


class HeldPackets:
    """Queued packets without a verdict yet, per flow key, in arrival order.

    Packets of known flows (shielded flows that were handed over and wait for
    their release) may fill the whole pool. Packets of unknown flows (no
    snapshot yet) may use all but ``reserved`` slots, so forged or new flows
    cannot keep a known flow's packets out. Each key has at most
    ``max_per_flow`` packets, so one busy key cannot take a whole share.
    """

    def __init__(
        self,
        max_packets: int,
        *,
        max_per_flow: int,
        reserved: int,
        unknown_timeout_s: float,
    ) -> None:
        if max_packets < 1:
            raise ValueError(
                f"invalid max_held_packets {max_packets}: expected 1 or more"
            )
        if not 1 <= max_per_flow <= max_packets:
            raise ValueError(
                f"invalid max_held_per_flow {max_per_flow}: expected 1 to "
                f"max_held_packets ({max_packets})"
            )
        if not 0 <= reserved < max_packets:
            raise ValueError(
                f"invalid reserved_held_packets {reserved}: expected 0 to "
                f"max_held_packets - 1 ({max_packets - 1})"
            )
        if not unknown_timeout_s > 0:
            raise ValueError(
                f"invalid held_unknown_timeout_s {unknown_timeout_s!r}: expected "
                "a number of seconds above 0"
            )
        self.max_packets = max_packets
        self.max_per_flow = max_per_flow
        self.reserved = reserved
        self.unknown_timeout_s = unknown_timeout_s
        self.total = 0
        self.unknown_total = 0
        self._known: dict[FlowKey, list[QueuedPacket]] = {}
        # (arrival time, packet), so that old packets can expire
        self._unknown: dict[FlowKey, deque[tuple[float, QueuedPacket]]] = {}

    def rejection(self, key: FlowKey, *, known: bool) -> str | None:
        """Return the drop reason if a packet of KEY cannot be held, else None."""
        held = self._known.get(key) if known else self._unknown.get(key)
        if held is not None and len(held) >= self.max_per_flow:
            return "held-flow-limit"
        if self.total >= self.max_packets:
            return "held-limit"
        if not known and self.unknown_total >= self.max_packets - self.reserved:
            return "held-unknown-limit"
        return None

    def add(
        self, key: FlowKey, packet: QueuedPacket, now: float, *, known: bool
    ) -> None:
        """Hold PACKET; call :meth:`rejection` first."""
        if known:
            self._known.setdefault(key, []).append(packet)
        else:
            self._unknown.setdefault(key, deque()).append((now, packet))
            self.unknown_total += 1
        self.total += 1

    def pop(self, key: FlowKey) -> list[QueuedPacket]:
        """Remove and return the packets held for KEY, oldest first."""
        unknown = self._unknown.pop(key, deque())
        known = self._known.pop(key, [])
        self.unknown_total -= len(unknown)
        self.total -= len(unknown) + len(known)
        return [packet for _, packet in unknown] + known

    def unknown_keys(self) -> list[FlowKey]:
        """Return the keys of unknown flows that have packets held."""
        return list(self._unknown)

    def expire(self, now: float) -> list[QueuedPacket]:
        """Remove and return the unknown flows' packets held for too long."""
        if not self.unknown_total:
            return []
        cutoff = now - self.unknown_timeout_s
        expired = []
        for key in list(self._unknown):
            held = self._unknown[key]
            while held and held[0][0] <= cutoff:
                expired.append(held.popleft()[1])
            if not held:
                del self._unknown[key]
        self.unknown_total -= len(expired)
        self.total -= len(expired)
        return expired


class Shield:
    """Answer queued peer packets for every flow it has a snapshot of."""

    def __init__(
        self,
        sender: Sender,
        *,
        limits: FlowLimits | None = None,
        trickle: TricklePolicy | None = None,
        max_held_packets: int = DEFAULT_MAX_HELD_PACKETS,
        max_held_per_flow: int | None = None,
        reserved_held_packets: int | None = None,
        held_unknown_timeout_s: float = HELD_UNKNOWN_TIMEOUT_S,
        total_buffer_bytes: int | None = None,
        max_flows: int | None = None,
        journal: AckJournal | None = None,
        commit_interval_s: float = 0.005,
        commit_max_acks: int = 1024,
    ) -> None:
        """Create a shield that sends through SENDER.

        At most MAX_HELD_PACKETS packets are held, MAX_HELD_PER_FLOW (default a
        quarter of them) per flow key. RESERVED_HELD_PACKETS (default a quarter)
        are only for flows that have a snapshot. TOTAL_BUFFER_BYTES bounds the
        bytes all flows buffer together and MAX_FLOWS the flows; None means no
        limit.

        With JOURNAL set, ACKs wait for a journal commit. A batch of packets is
        committed at the latest COMMIT_INTERVAL_S after its first held ACK or
        once COMMIT_MAX_ACKS ACKs are held, even if the queue never runs empty.
        """
        self.flows: dict[FlowKey, ShieldFlow] = {}
        self.counters = ShieldCounters()
        self._sender = sender
        self._limits = limits if limits is not None else FlowLimits()
        self._trickle = trickle
        quarter = max_held_packets // 4
        if max_held_per_flow is None:
            max_held_per_flow = max(1, quarter)
        if reserved_held_packets is None:
            reserved_held_packets = quarter
        self._held = HeldPackets(
            max_held_packets,
            max_per_flow=max_held_per_flow,
            reserved=reserved_held_packets,
            unknown_timeout_s=held_unknown_timeout_s,
        )
        self._total_buffer_bytes: int | None = None
        self._max_flows: int | None = None
        self._set_engine_limits(total_buffer_bytes, max_flows)
        # sum of the flows' buffered_bytes, kept up to date on every change
        self._buffered_bytes = 0
        # next count of each drop reason that gets a log line: 1, 10, 100, ...
        self._next_drop_log: Counter[str] = Counter()
        # released flows whose packets may still be queued until the rules go
        self._passthrough: set[FlowKey] = set()
        self._announced: set[FlowKey] = set()
        self._journal = journal
        self._commit_interval_s = commit_interval_s
        self._commit_max_acks = commit_max_acks
        # ACKs waiting for the next journal commit, in the order they were made
        self._unsent: list[tuple[ShieldFlow, Transmit]] = []
        self._unsent_since: float | None = None

    def configure(
        self,
        limits: FlowLimits,
        trickle: TricklePolicy | None,
        *,
        total_buffer_bytes: int | None,
        max_flows: int | None,
    ) -> None:
        """Set the limits and window policy of flows added from now on.

        The total buffer and flow limits apply at once. Flows and bytes already
        above a lowered limit stay: new bytes and flows are rejected until enough
        flows are released.
        """
        self._set_engine_limits(total_buffer_bytes, max_flows)
        self._limits = limits
        self._trickle = trickle

    def _set_engine_limits(
        self, total_buffer_bytes: int | None, max_flows: int | None
    ) -> None:
        if total_buffer_bytes is not None and total_buffer_bytes < 1:
            raise ValueError(
                f"invalid total_buffer_bytes {total_buffer_bytes}: expected 1 or "
                "more, or None for no limit"
            )
        if max_flows is not None and max_flows < 1:
            raise ValueError(
                f"invalid max_flows {max_flows}: expected 1 or more, or None for "
                "no limit"
            )
        self._total_buffer_bytes = total_buffer_bytes
        self._max_flows = max_flows

    @property
    def max_flows(self) -> int | None:
        """Maximum number of flows, handed-over ones included; None is no limit."""
        return self._max_flows

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes buffered by all flows together."""
        return self._buffered_bytes

    # flow lifecycle

    def add_flow(self, snapshot: FlowSnapshot, now: float) -> ShieldFlow:
        """Start answering for a flow, then replay the packets held for it.

        Raises:
            FlowLimitError: the shield already has ``max_flows`` flows. Packets
                held for the flow stay held until they expire.
        """
        if snapshot.key in self.flows:
            raise ValueError(f"flow {snapshot.key} is already shielded")
        if self._max_flows is not None and len(self.flows) >= self._max_flows:
            raise FlowLimitError(
                f"shielding {snapshot.key} failed: the shield already has "
                f"{len(self.flows)} flows, its maximum (max_flows, "
                "limits.max_flows in the daemon's config); raise it or release "
                "a scope first"
            )
        flow = ShieldFlow(snapshot, limits=self._limits, trickle=self._trickle)
        self.flows[snapshot.key] = flow
        # a connection released after an earlier freeze is shielded again
        self._passthrough.discard(snapshot.key)
        self._buffered_bytes += flow.buffered_bytes
        log.info(
            "shielding %s: rcv_nxt %d, right edge %d, window scale %d",
            snapshot.key,
            snapshot.rcv_nxt,
            snapshot.right_edge,
            snapshot.rcv_wscale,
        )
        for packet in self._held.pop(snapshot.key):
            self.handle_packet(packet, now)
        self.flush(now)
        return flow

    def handover(self, key: FlowKey, now: float) -> FlowHandover:
        """Stop answering for a flow and return what the restored socket needs."""
        flow = self._flow(key)
        handover, final_ack = flow.handover(now)
        if final_ack is not None:
            self._send(final_ack, flow)
            self.flush(now)
        log.info(
            "handing over %s: %d bytes acknowledged, %d discarded, fin %s, reset %s",
            key,
            len(handover.data),
            handover.discarded_bytes,
            handover.fin,
            handover.reset,
        )
        return handover

    def handover_so_far(self, key: FlowKey, now: float) -> FlowHandover:
        """Return what a flow has acknowledged so far; it goes on answering."""
        return self._flow(key).handover_so_far(now)

    def announce(
        self,
        key: FlowKey,
        now: float,
        *,
        restored_rcv_nxt: int,
        restored_right_edge: int,
    ) -> None:
        """Send the restored socket's window to the peer, still holding packets.

        Held packets should reach the restored socket only once repair mode is
        off, because Linux did not acknowledge data that arrived in repair mode
        until the peer retransmitted it (seen with kernel 6.18).
        """
        flow = self._flow(key)
        self._send(
            flow.release_update(
                now, rcv_nxt=restored_rcv_nxt, right_edge=restored_right_edge
            ),
            flow,
        )
        self.flush(now)
        self._announced.add(key)

    def release(
        self,
        key: FlowKey,
        now: float,
        *,
        restored_rcv_nxt: int | None = None,
        restored_right_edge: int | None = None,
    ) -> int:
        """Let the held packets of a handed-over flow through and forget the flow.

        When the restored socket's receive state is given, the shield also sends
        one window update in its name. The restored socket's own window probe
        carries sequence number snd_una - 1, which a Linux peer drops as old, so
        without this update a peer stuck at a zero window would wait for its next
        backed-off persist probe.
        """
        flow = self.flows.pop(key, None)
        if flow is not None:
            self._buffered_bytes -= flow.buffered_bytes
        self._passthrough.add(key)
        announced = key in self._announced
        self._announced.discard(key)
        if flow is not None and restored_rcv_nxt is not None and not announced:
            edge = restored_right_edge
            self._send(
                flow.release_update(
                    now,
                    rcv_nxt=restored_rcv_nxt,
                    right_edge=flow.right_edge if edge is None else edge,
                ),
                flow,
            )
            self.flush(now)
        held = self._held.pop(key)
        for packet in held:
            packet.accept()
        count = len(held)
        self.counters.released += count
        log.info("released %s: %d held packets let through", key, count)
        return count

    def release_unknown(self, covers: Callable[[FlowKey], bool]) -> int:
        """Let through the held packets of unknown flows that COVERS selects.

        These are flows the shield never had a snapshot of, such as SYNs of
        new connections to a frozen port: at the release they go to the
        restored listener, so the clients connect without waiting for their
        next SYN retransmission.
        """
        count = 0
        for key in self._held.unknown_keys():
            if not covers(key):
                continue
            self._passthrough.add(key)
            for packet in self._held.pop(key):
                packet.accept()
                count += 1
        self.counters.released += count
        if count:
            log.info("released %d held packets of flows without a snapshot", count)
        return count

    def _flow(self, key: FlowKey) -> ShieldFlow:
        try:
            return self.flows[key]
        except KeyError:
            raise KeyError(f"flow {key} is not shielded") from None

    # packets

    def handle_packet(self, packet: QueuedPacket, now: float) -> None:
        """Give one queued packet its verdict, answering it if its flow is known."""
        self.counters.packets += 1
        try:
            segment = parse_packet_untrusted(packet.get_payload())
        except MalformedSegment as exc:
            self.counters.dropped["malformed"] += 1
            log.debug("dropping malformed packet: %s", exc)
            packet.drop()
            return
        key = FlowKey(segment.dst, segment.dport, segment.src, segment.sport)
        if key in self._passthrough:
            packet.accept()
            return
        flow = self.flows.get(key)
        if flow is None or flow.state is FlowState.HANDED_OVER:
            self._hold(key, packet, now, known=flow is not None)
            return
        if self._total_buffer_bytes is not None:
            segment = self._fit_total_buffer(flow, segment, self._total_buffer_bytes)
        absorbed_before = flow.stats.bytes_absorbed
        buffered_before = flow.buffered_bytes
        actions = flow.receive(segment, now)
        self._buffered_bytes += flow.buffered_bytes - buffered_before
        packet.drop()
        if self._journal is not None and flow.stats.bytes_absorbed > absorbed_before:
            # Only bytes up to the right edge can ever be acknowledged; the
            # flow dropped the rest.
            keep = max(0, seq_diff(flow.right_edge, segment.seq))
            self._journal.record_data(key, segment.seq, segment.payload[:keep])
        for action in actions:
            if isinstance(action, Transmit):
                self._send(action, flow)
            elif isinstance(action, ResetReceived):
                log.info("peer reset %s during the freeze", key)
            elif isinstance(action, FinReceived):
                log.info("peer closed %s during the freeze (FIN)", key)
        if self._unsent:
            if self._unsent_since is None:
                self._unsent_since = now
            if (
                len(self._unsent) >= self._commit_max_acks
                or now - self._unsent_since >= self._commit_interval_s
            ):
                self.flush(now)

    def next_deadline(self) -> float | None:
        """Earliest time a flow wants :meth:`on_timer` to run, if any."""
        deadlines = (flow.next_deadline() for flow in self.flows.values())
        return min((d for d in deadlines if d is not None), default=None)

    def on_timer(self, now: float) -> None:
        """Run flow deadlines that are due, and drop expired held packets.

        Deadlines are tail ACKs and the trickle policy. Packets of flows without
        a snapshot expire after ``held_unknown_timeout_s``.
        """
        for packet in self._held.expire(now):
            packet.drop()
            self._count_drop("held-expired")
        for flow in self.flows.values():
            deadline = flow.next_deadline()
            if deadline is not None and deadline > now:
                continue
            for action in flow.on_deadline(now):
                if isinstance(action, Transmit):
                    self._send(action, flow)
        self.flush(now)

    async def run_timers(self, tick_s: float = 0.05) -> None:
        """Call :meth:`on_timer` at each flow deadline until cancelled."""
        # Flows run on time.monotonic(), which is not trio's clock.
        while True:
            now = time.monotonic()
            deadline = self.next_deadline()
            wake = now + tick_s if deadline is None else min(deadline, now + tick_s)
            await trio.sleep(max(0.0, wake - now))
            self.on_timer(time.monotonic())

    def _hold(
        self, key: FlowKey, packet: QueuedPacket, now: float, *, known: bool
    ) -> None:
        reason = self._held.rejection(key, known=known)
        if reason is not None:
            self._count_drop(reason)
            packet.drop()
            return
        # the payload is only readable during the callback unless copied now
        packet.retain()
        self._held.add(key, packet, now, known=known)
        self.counters.held += 1

    def _fit_total_buffer(
        self, flow: ShieldFlow, segment: Segment, total_buffer_bytes: int
    ) -> Segment:
        """Cut SEGMENT's payload so the flows' buffers stay within the total.

        The flow takes new bytes only between its rcv_nxt and its right edge,
        so only those count; bytes it already holds out of order count too,
        which makes the cut err on the safe side. A cut segment loses its FIN,
        which the peer sends again with the cut bytes.
        """
        payload = segment.payload
        if not payload or flow.state is not FlowState.SHIELDING:
            return segment
        start = seq_diff(segment.seq, flow.rcv_nxt)
        window_end = seq_diff(flow.right_edge, flow.rcv_nxt)
        new_start = max(0, start)
        new_end = min(start + len(payload), window_end)
        room = max(0, total_buffer_bytes - self._buffered_bytes)
        if new_end - new_start <= room:
            return segment
        keep = new_start - start + room
        self._count_drop("total-buffer-limit")
        self.counters.dropped_bytes["total-buffer-limit"] += len(payload) - keep
        return dataclasses.replace(
            segment, payload=payload[:keep], flags=segment.flags & ~FIN
        )

    def _count_drop(self, reason: str) -> None:
        """Count a drop for a limit, logging the 1st, 10th, 100th ... of each."""
        self.counters.dropped[reason] += 1
        count = self.counters.dropped[reason]
        if count < self._next_drop_log[reason]:
            return
        self._next_drop_log[reason] = count * 10
        log.warning(
            "limit %s reached: %d packets dropped or cut so far; %s",
            reason,
            count,
            self._limit_state(),
        )

    def _limit_state(self) -> str:
        held = self._held
        total = self._total_buffer_bytes
        return (
            f"{held.total} of {held.max_packets} packets held, "
            f"{held.unknown_total} of them of flows without a snapshot; "
            f"{self._buffered_bytes} bytes buffered, limit "
            f"{'none' if total is None else total}"
        )

    def flush(self, now: float) -> None:
        """Commit the journal, then send the ACKs that waited for it.

        Each flow with a waiting ACK first gets a journal record of the state
        its ACKs show. ACKs of a flow whose journal failed are not sent: the
        peer keeps its bytes and sends them again.
        """
        if not self._unsent:
            return
        unsent, self._unsent = self._unsent, []
        self._unsent_since = None
        journal = self._journal
        assert journal is not None
        last: dict[FlowKey, tuple[ShieldFlow, Transmit]] = {}
        for flow, transmit in unsent:
            last[flow.key] = (flow, transmit)
        for key, (flow, transmit) in last.items():
            journal.record_acked(key, _acked_state(flow, transmit, now))
        journal.commit()
        for flow, transmit in unsent:
            if journal.is_durable(flow.key):
                self._transmit(transmit)
            else:
                self.counters.acks_withheld += 1

    def _send(self, transmit: Transmit, flow: ShieldFlow) -> None:
        if self._journal is None:
            self._transmit(transmit)
        else:
            self._unsent.append((flow, transmit))

    def _transmit(self, transmit: Transmit) -> None:
        segment = transmit.segment
        if self._sender.send(build_packet(segment), segment.version, segment.dst):
            self.counters.acks_sent += 1
        else:
            self.counters.send_errors += 1

    # reporting

    def totals(self) -> dict[str, int]:
        """Sum of the per-flow counters plus the engine's own."""
        totals: Counter[str] = Counter()
        for flow in self.flows.values():
            totals.update(flow.stats.as_dict())
        totals["packets"] = self.counters.packets
        totals["acks_sent_engine"] = self.counters.acks_sent
        totals["acks_withheld"] = self.counters.acks_withheld
        totals["held"] = self._held.total
        totals["held_unknown"] = self._held.unknown_total
        totals["buffered_bytes"] = self._buffered_bytes
        for reason, count in self.counters.dropped.items():
            totals[f"dropped_{reason}"] = count
        for reason, count in self.counters.dropped_bytes.items():
            totals[f"dropped_bytes_{reason}"] = count
        return dict(totals)


def _acked_state(flow: ShieldFlow, transmit: Transmit, now: float) -> AckedState:
    """Return what FLOW's ACKs show the peer, TRANSMIT being the last of them."""
    timestamp = transmit.segment.options.timestamp
    # The flow echoes 0 until it has seen a TSval of the peer, so 0 means none.
    ts_recent = timestamp[1] if timestamp is not None and timestamp[1] else None
    return AckedState(
        ack=flow.ack_sent,
        right_edge=flow.right_edge,
        tsval=flow.tsval_at(now),
        tsval_at=now,
        ts_recent=ts_recent,
        fin=flow.fin_received,
    )
