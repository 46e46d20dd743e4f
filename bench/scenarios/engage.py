"""Engage and release latency for many flows at once.

The flows are synthetic snapshots, not live connections, so the figures are the
shield's own work. The hand-over scenario uses real connections.
"""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

from bench import plots
from bench.context import Context
from bench.report import Figure, ScenarioReport
from shieldproxy.kernel.netns import enter_netns
from shieldproxy.kernel.nfqueue import QueueBinding
from shieldproxy.kernel.rawsock import RawSender
from shieldproxy.kernel.rules import RuleSet, Scope
from shieldproxy.shield import Shield
from shieldproxy.tcp.snapshot import FlowKey, FlowSnapshot

PORT = 5401
QUEUE = 4
ENGAGE_TARGET_S = 0.010
ENGAGE_TARGET_FLOWS = 10_000
FIRST_PEER_PORT = 10_000

MEASURES = (
    "**Engage**: from the freeze request until the shield acknowledges segments "
    "of every flow: installing the scope's NFQUEUE rules in the gateway (one "
    "`iptables-restore` transaction) and registering N flow snapshots with the "
    "shield. The snapshots are synthetic and already in memory, so reading "
    "TCP_REPAIR dumps is not included, and the queue binding exists beforehand, "
    "as in the daemon. **Release**: handing every flow over, letting held packets "
    "through, and removing the rules. Baseline: installing and removing the "
    "same scope's DROP rules, as CRIU's network lock, which keeps no per-flow "
    "state. Median of the repeats."
)


@dataclass
class Timing:
    rules_s: float
    flows_s: float
    release_s: float
    drop_install_s: float
    drop_remove_s: float

    @property
    def engage_s(self) -> float:
        return self.rules_s + self.flows_s


async def run(context: Context) -> ScenarioReport:
    report = ScenarioReport(
        name="engage",
        title="Engage and release latency",
        measures=MEASURES,
        baseline_label="drop lock",
    )
    preset = context.preset
    medians: dict[int, Timing] = {}
    for count in preset.engage_flows:
        context.progress.step(f"  {_flows(count)}, {preset.engage_repeats} repeats")
        timings = [_measure(context, count) for _ in range(preset.engage_repeats)]
        medians[count] = Timing(
            *(
                statistics.median(getattr(t, name) for t in timings)
                for name in Timing.__dataclass_fields__
            )
        )
        report.data[str(count)] = [t.__dict__ for t in timings]
    for count, timing in medians.items():
        target = ""
        met = None
        if count == ENGAGE_TARGET_FLOWS:
            target = f"≤ {ENGAGE_TARGET_S * 1000:g} ms"
            met = timing.engage_s <= ENGAGE_TARGET_S
        report.figures += [
            Figure(
                f"engage, {_flows(count)}",
                timing.engage_s * 1000,
                timing.drop_install_s * 1000,
                unit="ms",
                digits=2,
                target=target,
                met=met,
            ),
            Figure(
                f"rules part of engage, {_flows(count)}",
                timing.rules_s * 1000,
                unit="ms",
                digits=2,
            ),
            Figure(
                f"release, {_flows(count)}",
                timing.release_s * 1000,
                timing.drop_remove_s * 1000,
                unit="ms",
                digits=2,
            ),
        ]
    name = "engage_latency.png"
    plots.bars(
        context.out_dir / name,
        "Engage latency (rules + flows), median",
        "ms",
        [_flows(count) for count in medians],
        [timing.engage_s * 1000 for timing in medians.values()],
    )
    report.plots = [name]
    return report


def _flows(count: int) -> str:
    return f"{count:,} flow" + ("" if count == 1 else "s")


def snapshots(context: Context, count: int) -> Iterator[FlowSnapshot]:
    """Yield COUNT snapshots of flows from the lab peer to the container."""
    lab = context.lab
    now = time.monotonic()
    for index in range(count):
        key = FlowKey(lab.ctr_v4, PORT, lab.peer_v4, FIRST_PEER_PORT + index)
        yield FlowSnapshot(
            key=key,
            rcv_nxt=1_000_000,
            rcv_wup=1_000_000,
            rcv_wnd=65_535 << 7,
            snd_una=2_000_000,
            snd_nxt=2_000_000,
            rcv_wscale=7,
            snd_wscale=7,
            mss=1448,
            sack_ok=True,
            timestamps_ok=True,
            tsval=123_456,
            taken_at=now,
        )


def _rules(context: Context) -> RuleSet:
    lab = context.lab
    tag = f"b{lab.lab_id}{secrets.token_hex(2)}"
    return RuleSet(
        tag, [Scope(lab.ctr_v4, PORT)], QUEUE, hook="FORWARD", netns=lab.gw_ns
    )


def _measure_drop_lock(context: Context) -> tuple[float, float]:
    """Return the seconds to install and to remove the scope's DROP rules."""
    rules = _rules(context)
    with ExitStack() as stack:
        stack.callback(rules.remove)
        started = time.perf_counter()
        rules.install("drop")
        installed = time.perf_counter()
        rules.remove()
        removed = time.perf_counter()
    return installed - started, removed - installed


def _measure(context: Context, count: int) -> Timing:
    lab = context.lab
    flows = list(snapshots(context, count))
    rules = _rules(context)
    with ExitStack() as stack:
        with enter_netns(lab.gw_ns):
            sender = stack.enter_context(RawSender())
            shield = Shield(sender)
            stack.enter_context(
                QueueBinding(
                    QUEUE, lambda packet: shield.handle_packet(packet, time.monotonic())
                )
            )
        stack.callback(rules.remove)
        started = time.perf_counter()
        rules.install("queue")
        installed = time.perf_counter()
        for snapshot in flows:
            shield.add_flow(snapshot, time.monotonic())
        engaged = time.perf_counter()

        released_from = time.perf_counter()
        for snapshot in flows:
            now = time.monotonic()
            shield.handover(snapshot.key, now)
            shield.release(snapshot.key, now)
        rules.remove()
        released = time.perf_counter()
    drop_install, drop_remove = _measure_drop_lock(context)
    return Timing(
        installed - started,
        engaged - installed,
        released - released_from,
        drop_install,
        drop_remove,
    )
