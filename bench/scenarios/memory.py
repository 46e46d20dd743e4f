"""Memory per frozen flow and per absorbed byte.

Each measurement runs in a fresh Python process (``python -m
bench.scenarios.memory``), so the resident set size (RSS) it reports is not
blurred by memory an earlier scenario freed. No lab is needed: the shield gets
synthetic flows and segments and sends its ACKs to a list.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import trio

from bench.context import Context
from bench.report import Figure, ScenarioReport

PER_FLOW_TARGET_BYTES = 2048
ABSORB_FLOWS = 100
ABSORB_BYTES_PER_FLOW = 1 << 20
SEGMENT_BYTES = 1448
TIMEOUT_S = 300

MEASURES = (
    "A fresh Python process creates a shield and adds {flows:,} synthetic flow "
    "snapshots with nothing absorbed; **per frozen flow** is the growth of its "
    "resident set size (RSS, from /proc/self/statm) divided by the flows, and, "
    "in a second process, the growth of Python's allocations (tracemalloc). "
    f"**Per absorbed byte**: {ABSORB_FLOWS} flows then absorb "
    f"{ABSORB_BYTES_PER_FLOW >> 20} MiB each in {SEGMENT_BYTES}-byte in-order "
    "segments, and the RSS growth is divided by the bytes absorbed. The drop "
    "lock keeps no state, so there is no baseline."
)


async def run(context: Context) -> ScenarioReport:
    flows = context.preset.memory_flows
    report = ScenarioReport(
        name="memory",
        title="Memory",
        measures=MEASURES.format(flows=flows),
        baseline_label="drop lock",
    )
    rss = await _measure(context, "rss", flows)
    traced = await _measure(context, "tracemalloc", flows)
    report.data = {"rss": rss, "tracemalloc": traced}
    per_flow = rss["flow_bytes"] / flows
    report.figures = [
        Figure(
            f"RSS per frozen flow, nothing absorbed ({flows:,} flows)",
            per_flow,
            unit="bytes",
            target=f"≤ {PER_FLOW_TARGET_BYTES:,} bytes",
            met=per_flow <= PER_FLOW_TARGET_BYTES,
        ),
        Figure(
            "Python allocations per frozen flow (tracemalloc)",
            traced["flow_bytes"] / flows,
            unit="bytes",
        ),
        Figure(
            "RSS per absorbed byte",
            rss["absorb_bytes"] / rss["absorbed"],
            unit="bytes",
            digits=3,
        ),
    ]
    return report


async def _measure(context: Context, mode: str, flows: int) -> dict[str, Any]:
    context.progress.step(f"  {mode}, {flows:,} flows, in a new process")
    argv = [sys.executable, "-m", "bench.scenarios.memory", mode, str(flows)]
    completed = None
    with trio.move_on_after(TIMEOUT_S):
        completed = await trio.run_process(
            argv, cwd=str(context.checkout), capture_stdout=True, capture_stderr=True
        )
    if completed is None:
        raise RuntimeError(f"the {mode} measurement timed out after {TIMEOUT_S} s")
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


# the measuring process


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _traced_bytes() -> int:
    return tracemalloc.get_traced_memory()[0]


def measure(mode: str, flows: int) -> dict[str, Any]:
    """Return the memory growth of adding FLOWS flows, then of absorbing data."""
    from bench.scenarios.engage import FIRST_PEER_PORT
    from shieldproxy.shield import Shield
    from shieldproxy.tcp.segment import ACK, Segment
    from shieldproxy.tcp.snapshot import FlowKey, FlowSnapshot

    class ListSender:
        def __init__(self) -> None:
            self.sent = 0

        def send(self, packet: bytes, version: int, dst: str) -> bool:
            self.sent += 1
            return True

    if mode == "tracemalloc":
        tracemalloc.start()
    usage: Callable[[], int] = _traced_bytes if mode == "tracemalloc" else _rss_bytes
    shield = Shield(ListSender())
    now = time.monotonic()
    window = 2 * ABSORB_BYTES_PER_FLOW

    def snapshot(index: int) -> FlowSnapshot:
        # a fresh address per 50,000 flows keeps the peer ports valid
        address = f"198.18.1.{2 + index // 50_000}"
        port = FIRST_PEER_PORT + index % 50_000
        return FlowSnapshot(
            key=FlowKey("198.18.2.2", 5601, address, port),
            rcv_nxt=1_000_000,
            rcv_wup=1_000_000,
            rcv_wnd=window,
            snd_una=2_000_000,
            snd_nxt=2_000_000,
            rcv_wscale=7,
            snd_wscale=7,
            mss=SEGMENT_BYTES,
            sack_ok=True,
            timestamps_ok=True,
            tsval=123_456,
            taken_at=now,
        )

    gc.collect()
    before = usage()
    keys = []
    for index in range(flows):
        flow = shield.add_flow(snapshot(index), now)
        keys.append(flow.key)
    gc.collect()
    flow_bytes = usage() - before

    payload = bytes(SEGMENT_BYTES)
    before = usage()
    absorbed = 0
    for key in keys[:ABSORB_FLOWS]:
        flow = shield.flows[key]
        seq = 1_000_000
        while seq - 1_000_000 < ABSORB_BYTES_PER_FLOW:
            segment = Segment(
                version=4,
                src=key.peer_addr,
                dst=key.container_addr,
                sport=key.peer_port,
                dport=key.container_port,
                seq=seq,
                ack=2_000_000,
                flags=ACK,
                window=1000,
                payload=payload,
            )
            flow.receive(segment, now)
            seq += SEGMENT_BYTES
        absorbed += flow.stats.bytes_absorbed
    gc.collect()
    return {
        "mode": mode,
        "flows": flows,
        "flow_bytes": flow_bytes,
        "absorbed": absorbed,
        "absorb_bytes": usage() - before,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the shield's memory use.")
    parser.add_argument("mode", choices=["rss", "tracemalloc"])
    parser.add_argument("flows", type=int)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.mode, args.flows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
