"""The demo's checkpoint scenario with the peer's socket sampled alongside.

Shared by the resume-gap and survival scenarios.
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.context import Context
from bench.peer_tcp import PeerProbe
from bench.plots import Series
from shieldproxy.demo import (
    ScenarioConfig,
    ScenarioResult,
    read_counters,
    run_scenario,
)

STREAM_PORT = 5001
ABORT_GRACE_S = 30.0


@dataclass
class CheckpointRun:
    """One run of the checkpoint scenario and the peer's TCP_INFO samples."""

    result: ScenarioResult
    probe: PeerProbe

    @property
    def frozen_at(self) -> float | None:
        return self.result.timeline.get("frozen")

    def cwnd_at(self, step: str) -> int | None:
        """Return the peer's cwnd (segments) when the run reached STEP."""
        at = self.result.timeline.get(step)
        sample = None if at is None else self.probe.at(at)
        return None if sample is None else sample.cwnd

    def peer_send_gap(self) -> float | None:
        """Return seconds from repair off to the peer's next sent bytes.

        ``tcpi_bytes_sent`` counts retransmissions too, so for the drop lock
        this is the peer's next retransmission timeout. The resolution is the
        probe's sampling interval.
        """
        resumed = self.result.timeline.get("resumed")
        base = None if resumed is None else self.probe.at(resumed)
        if resumed is None or base is None:
            return None
        for sample in self.probe.samples:
            if sample.t > resumed and sample.bytes_sent > base.bytes_sent:
                return sample.t - resumed
        return None

    def cwnd_before_freeze(self) -> float | None:
        """Return the median cwnd (segments) over the second before the freeze."""
        if self.frozen_at is None:
            return None
        window = self.probe.between(self.frozen_at - 1.0, self.frozen_at)
        if not window:
            return None
        return statistics.median(sample.cwnd for sample in window)

    def summary(self) -> dict[str, Any]:
        result = self.result
        return {
            "mode": result.mode,
            "freeze_s": result.freeze_s,
            "resume_gap_s": result.resume_gap_s,
            "wire_resume_gap_s": result.wire_resume_gap_s,
            "peer_rto_timeouts": result.peer_rto_timeouts,
            "peer_retransmits": result.peer_retransmits,
            "peer_counters": result.peer_counters,
            "bytes_absorbed": result.bytes_absorbed,
            "bytes_handed_over": result.bytes_handed_over,
            "acks_sent": result.acks_sent,
            "bytes_sent": result.bytes_sent,
            "bytes_received": result.bytes_received,
            "integrity": result.integrity,
            "integrity_ok": result.integrity_ok,
            "max_right_edge_retraction": result.max_right_edge_retraction,
            "capture_violations": result.capture_violations,
            "peer_cwnd_before_freeze": self.cwnd_before_freeze(),
            "peer_cwnd_at_resume": self.cwnd_at("resumed"),
            "peer_send_gap_s": self.peer_send_gap(),
            "timeline": result.timeline,
            "probe_samples": len(self.probe.samples),
            "probe_error": self.probe.error,
            "error": result.error,
        }

    def series(self, label: str) -> Series | None:
        """Return the peer's acknowledged megabytes against time since the freeze."""
        start = self.frozen_at
        if start is None or not self.probe.samples:
            return None
        base = self.probe.at(start)
        offset = base.bytes_acked if base is not None else 0
        samples = self.probe.samples
        resumed = self.result.timeline.get("resumed")
        return Series(
            label=label,
            mode=self.result.mode,
            t=[s.t - start for s in samples],
            value=[(s.bytes_acked - offset) / 1e6 for s in samples],
            resumed_at=None if resumed is None else resumed - start,
        )

    def write_samples(self, path: Path) -> None:
        """Write the TCP_INFO samples as CSV, times relative to the freeze."""
        start = self.frozen_at or 0.0
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(
                ["t_s", "cwnd", "ssthresh", "rto_us", "backoff", "bytes_acked"]
                + ["bytes_sent", "bytes_retrans", "snd_wnd", "state"]
            )
            for s in self.probe.samples:
                writer.writerow(
                    [f"{s.t - start:.4f}", s.cwnd, s.ssthresh, s.rto_us, s.backoff]
                    + [s.bytes_acked, s.bytes_sent, s.bytes_retrans, s.snd_wnd]
                    + [s.state]
                )


async def run_checkpoint(
    context: Context,
    config: ScenarioConfig,
    work_dir: Path,
    label: str,
    *,
    user_timeout_ms: int | None = None,
    stop_on_peer_abort: bool = False,
) -> CheckpointRun:
    """Run one checkpoint scenario while sampling the peer's socket.

    With ``stop_on_peer_abort``, a run whose peer has aborted the connection
    (``TcpExtTCPAbortOnTimeout`` went up) is cancelled 30 s after the freeze
    ends. The demo's scenario would otherwise wait minutes for a stream that
    can no longer finish: the restored socket's one window probe meets the
    drop lock's rules, and nothing else makes the peer send a reset.
    """
    probe = PeerProbe(context.lab.peer_ns, config.port, user_timeout_ms=user_timeout_ms)
    progress = context.progress
    total = config.freeze_s
    started = time.monotonic()
    aborts_before = _peer_aborts(context)
    results: list[ScenarioResult] = []

    def report(mode: str, elapsed: float, freeze: float, absorbed: int, _: int) -> None:
        detail = f"absorbed {absorbed:,} bytes" if mode == "shielded" else ""
        progress.bar(f"{label} frozen", elapsed, total, detail)

    async def watch(scope: trio.CancelScope) -> None:
        not_before = started + config.warmup_s + config.freeze_s + ABORT_GRACE_S
        while True:
            await trio.sleep(2.0)
            aborted = await trio.to_thread.run_sync(_peer_aborts, context)
            if aborted > aborts_before and time.monotonic() >= not_before:
                scope.cancel()
                return

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe.run)
            with trio.CancelScope() as scenario:
                if stop_on_peer_abort:
                    nursery.start_soon(watch, scenario)
                results.append(
                    await run_scenario(context.lab, config, work_dir, report)
                )
            nursery.cancel_scope.cancel()
    finally:
        probe.close()
    if results:
        return CheckpointRun(results[0], probe)
    mode = "shielded" if config.shielded else "baseline"
    stopped = ScenarioResult(mode=mode, family=config.family, freeze_s=total)
    stopped.integrity = (
        "stopped: the peer aborted the connection (TcpExtTCPAbortOnTimeout)"
    )
    stopped.peer_counters = {
        "TcpExtTCPAbortOnTimeout": _peer_aborts(context) - aborts_before
    }
    return CheckpointRun(stopped, probe)


def _peer_aborts(context: Context) -> int:
    counters = read_counters(context.lab.peer_ns, ("TcpExtTCPAbortOnTimeout",))
    return counters["TcpExtTCPAbortOnTimeout"]
