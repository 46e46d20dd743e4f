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
it after each read from the queue, and the shield calls it itself after its
timers and control operations.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .journal import AckedState
from .kernel.nfqueue import QueuedPacket
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
from .tcp.segment import MalformedSegment, build_packet, parse_packet_untrusted
from .tcp.seq import seq_diff
from .tcp.snapshot import FlowKey, FlowSnapshot

log = logging.getLogger(__name__)


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


class Shield:
    """Answer queued peer packets for every flow it has a snapshot of."""

    def __init__(
        self,
        sender: Sender,
        *,
        limits: FlowLimits | None = None,
        trickle: TricklePolicy | None = None,
        max_held_packets: int = 4096,
        journal: AckJournal | None = None,
        commit_interval_s: float = 0.005,
        commit_max_acks: int = 1024,
    ) -> None:
        """Create a shield that sends through SENDER.

        With JOURNAL set, ACKs wait for a journal commit. A batch of packets is
        committed at the latest COMMIT_INTERVAL_S after its first held ACK or
        once COMMIT_MAX_ACKS ACKs are held, even if the queue never runs empty.
        """
        self.flows: dict[FlowKey, ShieldFlow] = {}
        self.counters = ShieldCounters()
        self._sender = sender
        self._limits = limits if limits is not None else FlowLimits()
        self._trickle = trickle
        self._max_held = max_held_packets
        # packets without a verdict yet, per flow, in arrival order
        self._held: dict[FlowKey, list[QueuedPacket]] = {}
        # released flows whose packets may still be queued until the rules go
        self._passthrough: set[FlowKey] = set()
        self._announced: set[FlowKey] = set()
        self._held_total = 0
        self._journal = journal
        self._commit_interval_s = commit_interval_s
        self._commit_max_acks = commit_max_acks
        # ACKs waiting for the next journal commit, in the order they were made
        self._unsent: list[tuple[ShieldFlow, Transmit]] = []
        self._unsent_since: float | None = None

    def configure(self, limits: FlowLimits, trickle: TricklePolicy | None) -> None:
        """Set the limits and window policy of flows added from now on."""
        self._limits = limits
        self._trickle = trickle

    # flow lifecycle

    def add_flow(self, snapshot: FlowSnapshot, now: float) -> ShieldFlow:
        """Start answering for a flow, then replay the packets held for it."""
        if snapshot.key in self.flows:
            raise ValueError(f"flow {snapshot.key} is already shielded")
        flow = ShieldFlow(snapshot, limits=self._limits, trickle=self._trickle)
        self.flows[snapshot.key] = flow
        log.info(
            "shielding %s: rcv_nxt %d, right edge %d, window scale %d",
            snapshot.key,
            snapshot.rcv_nxt,
            snapshot.right_edge,
            snapshot.rcv_wscale,
        )
        held = self._held.pop(snapshot.key, [])
        self._held_total -= len(held)
        for packet in held:
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
        held = self._held.pop(key, [])
        self._held_total -= len(held)
        for packet in held:
            packet.accept()
        count = len(held)
        self.counters.released += count
        log.info("released %s: %d held packets let through", key, count)
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
            self._hold(key, packet)
            return
        absorbed_before = flow.stats.bytes_absorbed
        actions = flow.receive(segment, now)
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
        """Run flow deadlines that are due: tail ACKs and the trickle policy."""
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

    def _hold(self, key: FlowKey, packet: QueuedPacket) -> None:
        if self._held_total >= self._max_held:
            self.counters.dropped["held-limit"] += 1
            packet.drop()
            return
        # the payload is only readable during the callback unless copied now
        packet.retain()
        self._held.setdefault(key, []).append(packet)
        self._held_total += 1
        self.counters.held += 1

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
        totals["held"] = self._held_total
        for reason, count in self.counters.dropped.items():
            totals[f"dropped_{reason}"] = count
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
