"""The shield engine: queued packets in, flow machines in the middle, ACKs out.

One :class:`Shield` serves every flow diverted to its NFQUEUE binding. Packets of
a flow whose snapshot has not arrived yet, and packets that arrive after a flow
was handed over, are held without a verdict; :meth:`Shield.release` lets them
through to the restored socket. Everything else is answered by the flow's
:class:`ShieldFlow` and dropped, since the shield has taken its bytes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import trio

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
from .tcp.snapshot import FlowKey, FlowSnapshot

log = logging.getLogger(__name__)


class Sender(Protocol):
    """Destination of the shield's packets: a raw socket, or a list in tests."""

    def send(self, packet: bytes, version: int, dst: str) -> bool: ...


@dataclass
class ShieldCounters:
    """Engine-wide counters; per-flow ones live in each flow's stats."""

    packets: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    held: int = 0
    released: int = 0
    acks_sent: int = 0
    send_errors: int = 0


class Shield:
    """Answer queued peer packets for every flow it has a snapshot of."""

    def __init__(
        self,
        sender: Sender,
        *,
        limits: FlowLimits | None = None,
        trickle: TricklePolicy | None = None,
        max_held_packets: int = 4096,
    ) -> None:
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
        return flow

    def handover(self, key: FlowKey, now: float) -> FlowHandover:
        """Stop answering for a flow and return what the restored socket needs."""
        flow = self._flow(key)
        handover, final_ack = flow.handover(now)
        if final_ack is not None:
            self._send(final_ack)
        log.info(
            "handing over %s: %d bytes acknowledged, %d discarded, fin %s, reset %s",
            key,
            len(handover.data),
            handover.discarded_bytes,
            handover.fin,
            handover.reset,
        )
        return handover

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
            )
        )
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
                )
            )
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
        actions = flow.receive(segment, now)
        packet.drop()
        for action in actions:
            if isinstance(action, Transmit):
                self._send(action)
            elif isinstance(action, ResetReceived):
                log.info("peer reset %s during the freeze", key)
            elif isinstance(action, FinReceived):
                log.info("peer closed %s during the freeze (FIN)", key)

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
                    self._send(action)

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

    def _send(self, transmit: Transmit) -> None:
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
        totals["held"] = self._held_total
        for reason, count in self.counters.dropped.items():
            totals[f"dropped_{reason}"] = count
        return dict(totals)
