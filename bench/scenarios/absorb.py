"""Segments per second the shield absorbs, against an accept-only NFQUEUE reader.

Many flows push data from the peer to the container at once, through the
gateway's NFQUEUE rules. First the queue reader only accepts each packet, which
gives the ceiling of an NFQUEUE reader in this process. Then the container's
sockets are dumped and the shield acknowledges the data of all of them. Both
phases run in this Python process, on one core.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench import plots
from bench.context import Context
from bench.report import Figure, ScenarioReport
from shieldproxy.kernel.netns import enter_netns, netns_command, run_in_netns
from shieldproxy.kernel.nfqueue import QueueBinding, QueuedPacket
from shieldproxy.kernel.rawsock import RawSender
from shieldproxy.kernel.repair import dump_socket, take_socket
from shieldproxy.kernel.rules import RuleSet, Scope
from shieldproxy.lab.children import Child
from shieldproxy.shield import Shield
from shieldproxy.tcp.seq import seq_diff

PORT = 5301
QUEUE = 3
WARMUP_S = 1.0
SETTLE_S = 0.5
# The receiver's SO_RCVBUF: a large buffer gives a large window at the dump, so
# the shield has room to absorb during the whole measurement.
RCVBUF_BYTES = 64 * 1024 * 1024
RATE_TARGET = 50_000
CEILING_SHARE_TARGET = 0.5

MEASURES = (
    "{flows} TCP flows push data from the peer to the container as fast as they "
    "can, through NFQUEUE rules in the gateway. **Accept-only ceiling**: the same "
    "NFQUEUE binding in the same Python process gives every packet an accept "
    "verdict and does nothing else; the container reads the data. **Shield**: the "
    "container's sockets are dumped with TCP_REPAIR and the shield acknowledges "
    "every segment: it parses it, stores the payload, sends an ACK from a raw "
    "socket and drops the packet. Rates count the packets the queue reader "
    "handled over {seconds:g} s. CPU is this process's user and system time "
    "over the same interval, divided by those packets. Sender, receiver and the "
    "bench share the machine's {cores} cores."
)


@dataclass
class Phase:
    """Packets handled and CPU used over one measurement interval."""

    packets: int
    seconds: float
    cpu_seconds: float
    extra: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.packets / self.seconds if self.seconds else 0.0

    def per_second(self, name: str) -> float:
        """Return ``extra[name]`` divided by the interval."""
        value = self.extra.get(name, 0)
        return value / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_packet(self) -> float | None:
        return None if not self.packets else self.cpu_seconds / self.packets * 1e6


async def run(context: Context) -> ScenarioReport:
    preset = context.preset
    flows = preset.absorb_flows
    report = ScenarioReport(
        name="absorb",
        title="Absorb capacity",
        measures=MEASURES.format(
            flows=flows,
            seconds=preset.absorb_measure_s,
            cores=os.cpu_count(),
        ),
        baseline_label="accept-only ceiling",
    )
    work = context.work_dir("absorb")

    context.progress.step(f"  accept-only, {flows} flows")
    ceiling = await _accept_only(context, work)
    context.progress.step(f"  accept-only: {ceiling.rate:,.0f} packets/s")
    context.progress.step(f"  shield, {flows} flows")
    shield = await _shielded(context, work)
    context.progress.step(f"  shield: {shield.rate:,.0f} packets/s")

    report.data = {
        "flows": flows,
        "accept_only": _phase_data(ceiling),
        "shield": _phase_data(shield),
    }
    report.figures = _figures(shield, ceiling)
    if shield.extra.get("flows_with_window_left", flows) < flows:
        report.notes.append(
            f"{flows - shield.extra['flows_with_window_left']} of {flows} flows "
            "had filled their window before the measurement ended, so the shield "
            "rate is a lower bound."
        )

    name = "absorb_rate.png"
    plots.bars(
        context.out_dir / name,
        f"Packets handled per second, {flows} flows",
        "packets/s",
        ["accept-only", "shield"],
        [ceiling.rate, shield.rate],
    )
    report.plots = [name]
    return report


def _phase_data(phase: Phase) -> dict[str, Any]:
    return {
        "packets": phase.packets,
        "seconds": phase.seconds,
        "cpu_seconds": phase.cpu_seconds,
        "packets_per_s": phase.rate,
        "cpu_us_per_packet": phase.cpu_us_per_packet,
        **phase.extra,
    }


def _figures(shield: Phase, ceiling: Phase) -> list[Figure]:
    share = shield.rate / ceiling.rate * 100 if ceiling.rate else None
    absorbed = shield.per_second("bytes_absorbed") / 1e6
    return [
        Figure(
            "segments handled per second",
            shield.rate,
            ceiling.rate,
            unit="seg/s",
            target=f"≥ {RATE_TARGET:,} seg/s",
            met=shield.rate >= RATE_TARGET,
        ),
        Figure(
            "shield rate / accept-only ceiling",
            share,
            unit="%",
            digits=1,
            target=f"≥ {CEILING_SHARE_TARGET * 100:g}%",
            met=None if share is None else share >= CEILING_SHARE_TARGET * 100,
        ),
        Figure(
            "CPU per segment",
            shield.cpu_us_per_packet,
            ceiling.cpu_us_per_packet,
            unit="µs",
            digits=1,
        ),
        Figure("payload absorbed", absorbed, None, unit="MB/s", digits=1),
        Figure(
            "ACKs sent per second",
            shield.per_second("acks_sent"),
            None,
            unit="/s",
        ),
        Figure(
            "packets the kernel dropped at the queue",
            shield.extra.get("queue_drops"),
            ceiling.extra.get("queue_drops"),
        ),
    ]


def _queue_drops(context: Context) -> int:
    """Return queue_dropped + user_dropped of QUEUE in the gateway namespace."""
    result = run_in_netns(
        context.lab.gw_ns, ["cat", "/proc/net/netfilter/nfnetlink_queue"]
    )
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields and int(fields[0]) == QUEUE:
            return int(fields[5]) + int(fields[6])
    return 0


class _Load:
    """The loadgen receiver and sender processes of one phase."""

    def __init__(self, context: Context, work: Path, nursery: trio.Nursery) -> None:
        self.context = context
        self.work = work
        self.nursery = nursery
        self.children: list[Child] = []

    async def start(self, duration_s: float) -> dict[str, Any]:
        """Start both sides; return the receiver's ``accepted`` event."""
        lab = self.context.lab
        script = str(Path(__file__).resolve().parents[1] / "loadgen.py")
        flows = str(self.context.preset.absorb_flows)
        common = ["--addr", lab.ctr_v4, "--port", str(PORT), "--flows", flows]
        receiver = await self._start(
            "receiver",
            lab.ctr_ns,
            [sys.executable, script, "receive", *common],
            ["--rcvbuf", str(RCVBUF_BYTES)],
        )
        await receiver.wait_for("listening", 10)
        sender = await self._start(
            "sender",
            lab.peer_ns,
            [sys.executable, script, "send", *common],
            ["--duration", str(duration_s)],
        )
        await sender.wait_for("connected", 20)
        return await receiver.wait_for("accepted", 20)

    async def _start(
        self, name: str, netns: str, argv: list[str], extra: list[str]
    ) -> Child:
        child = await Child.start(name, netns_command(netns, argv + extra), self.work)
        self.children.append(child)
        self.nursery.start_soon(child.read_events)
        return child

    @property
    def receiver(self) -> Child:
        return self.children[0]

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            for child in reversed(self.children):
                await child.stop()


def _rules(context: Context) -> RuleSet:
    lab = context.lab
    tag = f"b{lab.lab_id}{secrets.token_hex(2)}"
    return RuleSet(
        tag, [Scope(lab.ctr_v4, PORT)], QUEUE, hook="FORWARD", netns=lab.gw_ns
    )


class Meter:
    """Count the packets a handler gets between two CLOCK_MONOTONIC times.

    The count is kept by the handler itself: the binding's read loop runs for
    as long as packets keep coming, so under load trio's timers fire late.
    """

    def __init__(
        self,
        handler: Callable[[QueuedPacket], None],
        counters: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.handler = handler
        self.counters = counters
        """Read at both ends of the interval; :meth:`phase` reports the change."""
        self._counters_first: dict[str, int] = {}
        self._counters_end: dict[str, int] | None = None
        self.start = float("inf")
        self.end = float("inf")
        self.packets = 0
        self.first: float | None = None
        self.last: float | None = None
        self.cpu_first: float | None = None
        self.cpu_end: float | None = None

    def arm(self, start: float, seconds: float) -> None:
        self.start = start
        self.end = start + seconds

    def __call__(self, packet: QueuedPacket) -> None:
        self.handler(packet)
        now = time.monotonic()
        if now < self.start or self.cpu_end is not None:
            return
        if now >= self.end:
            self.cpu_end = time.process_time()
            if self.counters is not None:
                self._counters_end = self.counters()
            return
        if self.cpu_first is None:
            self.cpu_first = time.process_time()
            self.first = now
            if self.counters is not None:
                self._counters_first = self.counters()
        self.packets += 1
        self.last = now

    def phase(self, extra: dict[str, Any]) -> Phase:
        """Return the packets, interval and CPU time measured."""
        if self.first is None or self.last is None or self.cpu_first is None:
            return Phase(0, 0.0, 0.0, extra)
        # when traffic stopped before the end, the interval ends at the last packet
        end = self.end if self.cpu_end is not None else self.last
        cpu_end = self.cpu_end if self.cpu_end is not None else time.process_time()
        counters_end = self._counters_end
        if counters_end is None and self.counters is not None:
            counters_end = self.counters()
        for name, value in (counters_end or {}).items():
            extra[name] = value - self._counters_first.get(name, 0)
        return Phase(self.packets, end - self.first, cpu_end - self.cpu_first, extra)


async def _wait(context: Context, meter: Meter, label: str) -> None:
    """Wait until the meter's interval is over, showing progress."""
    seconds = meter.end - meter.start
    while (now := time.monotonic()) < meter.end + 0.2:
        context.progress.bar(label, max(0.0, now - meter.start), seconds)
        await trio.sleep(0.25)


async def _accept_only(context: Context, work: Path) -> Phase:
    meter = Meter(lambda packet: packet.accept())
    measure_s = context.preset.absorb_measure_s
    rules = _rules(context)
    with ExitStack() as stack:
        with enter_netns(context.lab.gw_ns):
            binding = stack.enter_context(QueueBinding(QUEUE, meter))
        stack.callback(rules.remove)
        async with trio.open_nursery() as nursery:
            load = _Load(context, work, nursery)
            try:
                # The sender stops soon after the interval, which lets the
                # binding's read loop, and so trio, go idle again.
                await load.start(WARMUP_S + measure_s + 0.5)
                # peers' packets are queued; the container's own packets pass
                rules.install("queue-in")
                drops_before = _queue_drops(context)
                meter.arm(time.monotonic() + WARMUP_S, measure_s)
                nursery.start_soon(binding.serve)
                await _wait(context, meter, "accept-only")
            finally:
                await load.stop()
            nursery.cancel_scope.cancel()
        drops = _queue_drops(context) - drops_before
    return meter.phase({"queue_drops": drops})


async def _shielded(context: Context, work: Path) -> Phase:
    measure_s = context.preset.absorb_measure_s
    rules = _rules(context)
    with ExitStack() as stack:
        with enter_netns(context.lab.gw_ns):
            sender = stack.enter_context(RawSender())
            shield = Shield(sender)
            meter = Meter(
                lambda packet: shield.handle_packet(packet, time.monotonic()),
                lambda: _absorb_counters(shield),
            )
            binding = stack.enter_context(QueueBinding(QUEUE, meter))
        stack.callback(rules.remove)
        async with trio.open_nursery() as nursery:
            load = _Load(context, work, nursery)
            try:
                duration = WARMUP_S + SETTLE_S + measure_s + 0.5
                accepted = await load.start(duration)
                await trio.sleep(WARMUP_S)
                rules.install("queue")
                drops_before = _queue_drops(context)
                load.receiver.signal(signal.SIGUSR1)
                await load.receiver.wait_for("paused", 10)
                # The kernel keeps the peers' packets queued meanwhile; serving
                # starts once every flow is known, so none is held.
                window = _dump_all(shield, accepted)
                meter.arm(time.monotonic() + SETTLE_S, measure_s)
                nursery.start_soon(binding.serve)
                nursery.start_soon(shield.run_timers)
                await _wait(context, meter, "shield")
                drops = _queue_drops(context) - drops_before
                left = sum(
                    1
                    for flow in shield.flows.values()
                    if flow.right_edge != flow.rcv_nxt
                )
            finally:
                await load.stop()
            nursery.cancel_scope.cancel()
    extra = {
        "window_at_dump_bytes": window,
        "queue_drops": drops,
        "flows_with_window_left": left,
    }
    return meter.phase(extra)


def _absorb_counters(shield: Shield) -> dict[str, int]:
    totals = shield.totals()
    return {name: totals.get(name, 0) for name in ("bytes_absorbed", "acks_sent")}


def _dump_all(shield: Shield, accepted: dict[str, Any]) -> int:
    """Dump every receiver socket and shield it; return the total window."""
    window = 0
    for fd in accepted["fds"]:
        sock = take_socket(int(accepted["pid"]), int(fd))
        try:
            snapshot = dump_socket(sock).flow_snapshot()
        finally:
            # the receiver still has the socket open, so this sends nothing
            sock.close()
        shield.add_flow(snapshot, time.monotonic())
        window += max(0, seq_diff(snapshot.right_edge, snapshot.rcv_nxt))
    return window
