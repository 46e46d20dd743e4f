"""Resume gap against freeze length, with the shield and with CRIU's drop lock.

For each freeze length the demo's checkpoint scenario runs twice in the same
lab: shielded, and with plain DROP rules as CRIU's network lock has them. A
peer streams 4 MiB/s to the container, the container's socket is dumped with
TCP_REPAIR, and after the freeze it is restored in a new process.
"""

from __future__ import annotations

from typing import Any

from bench import plots
from bench.context import Context
from bench.report import Figure, ScenarioReport
from bench.scenarios.checkpoint import STREAM_PORT, CheckpointRun, run_checkpoint
from shieldproxy.demo import ScenarioConfig

RATIO_TARGET = 20.0
RATIO_TARGET_FREEZE_S = 20.0
GAP_MARGIN_S = 0.050
# Only these freeze lengths get a time-sequence plot; the others are in the CSVs.
PLOTTED_FREEZES_S = (1.0, 20.0, 60.0, 300.0)

MEASURES = (
    "A peer streams 4 MiB/s through the gateway to a receiver in the container "
    "namespace. The receiver's socket is dumped with TCP_REPAIR, the process is "
    "killed, and after the freeze the socket is restored in a new process. "
    "**Resume gap**: from switching repair off to the first peer byte that "
    "reaches the container's interface for the first time since the freeze, "
    "in a capture there. With the shield the peer never stops sending, so its "
    "next bytes wait in the gateway's queue and pass right after repair off, "
    "and a ratio to such a sub-millisecond gap mostly shows its noise. "
    "**Application reads a new byte**: from repair off to the first byte past "
    "the handed-over ones that the restored application reads, after it has "
    "read and checked those. **RTO "
    "timeouts** and **retransmitted segments**: the peer namespace's "
    "`TcpExtTCPTimeouts` and `TcpRetransSegs`. **cwnd at resume**: the peer "
    "socket's `tcpi_snd_cwnd` (TCP_INFO, sampled every 10 ms) when repair goes "
    "off. Baseline: plain DROP rules in the gateway, as CRIU's network lock."
)


async def run(context: Context) -> ScenarioReport:
    report = ScenarioReport(
        name="resume_gap",
        title="Resume gap after a freeze",
        measures=MEASURES,
    )
    work = context.work_dir("resume_gap")
    freezes = context.preset.freezes
    runs: dict[tuple[float, str], CheckpointRun] = {}
    for freeze in freezes:
        for queue, shielded in enumerate((True, False)):
            mode = "shielded" if shielded else "baseline"
            context.progress.step(f"  freeze {freeze:g} s, {mode}")
            config = ScenarioConfig(
                shielded=shielded,
                freeze_s=freeze,
                queue_num=queue,
                port=STREAM_PORT,
            )
            run_dir = work / f"freeze-{freeze:g}"
            label = f"{freeze:g} s {mode}"
            checkpoint = await run_checkpoint(context, config, run_dir, label)
            runs[(freeze, mode)] = checkpoint
            checkpoint.write_samples(run_dir / f"peer-tcp-info-{mode}.csv")
            gap = checkpoint.result.wire_resume_gap_s
            gap_text = "no resume" if gap is None else f"resume gap {gap:.3f} s"
            context.progress.step(
                f"  {label}: {gap_text}, integrity {checkpoint.result.integrity}"
            )
    report.data["runs"] = [run.summary() for run in runs.values()]
    report.figures = figures(runs, freezes, context.lab_rtt_s)
    report.notes = notes(runs, context.lab_rtt_s)
    report.plots = draw(context, runs, freezes)
    return report


def figures(
    runs: dict[tuple[float, str], CheckpointRun],
    freezes: tuple[float, ...],
    lab_rtt_s: float | None,
) -> list[Figure]:
    result = []
    limit = None if lab_rtt_s is None else lab_rtt_s + GAP_MARGIN_S
    for freeze in freezes:
        shield = runs[(freeze, "shielded")].result
        baseline = runs[(freeze, "baseline")].result
        f = f"{freeze:g} s freeze"
        gap_target = (
            "" if limit is None else f"≤ lab RTT + 50 ms ({limit * 1000:.0f} ms)"
        )
        gap_met = None
        if limit is not None and shield.wire_resume_gap_s is not None:
            gap_met = shield.wire_resume_gap_s <= limit
        result.append(
            Figure(
                f"resume gap, {f}",
                shield.wire_resume_gap_s,
                baseline.wire_resume_gap_s,
                unit="s",
                digits=3,
                target=gap_target,
                met=gap_met,
            )
        )
        ratio = None
        if shield.wire_resume_gap_s and baseline.wire_resume_gap_s is not None:
            ratio = baseline.wire_resume_gap_s / shield.wire_resume_gap_s
        is_target_freeze = freeze == RATIO_TARGET_FREEZE_S
        result.append(
            Figure(
                f"resume gap, drop lock / shield, {f}",
                ratio,
                unit="×",
                digits=1,
                target=f"≥ {RATIO_TARGET:g}×" if is_target_freeze else "",
                met=None if ratio is None else ratio >= RATIO_TARGET,
            )
        )
        result.append(
            Figure(
                f"application reads a new byte, {f}",
                shield.resume_gap_s,
                baseline.resume_gap_s,
                unit="s",
                digits=3,
            )
        )
        ok = shield.error is None and shield.integrity != "not run"
        result.append(
            Figure(
                f"peer RTO timeouts, {f}",
                shield.peer_rto_timeouts if ok else None,
                baseline.peer_rto_timeouts,
                target="0 while shielded",
                met=shield.peer_rto_timeouts == 0 if ok else None,
            )
        )
        result.append(
            Figure(
                f"peer retransmitted segments, {f}",
                shield.peer_retransmits if ok else None,
                baseline.peer_retransmits,
            )
        )
        result.append(
            Figure(
                f"peer cwnd at resume (segments), {f}",
                runs[(freeze, "shielded")].cwnd_at("resumed"),
                runs[(freeze, "baseline")].cwnd_at("resumed"),
            )
        )
        result.append(
            Figure(
                f"every byte once and in order, {f}",
                shield.integrity_ok,
                baseline.integrity_ok,
                target="yes",
                met=shield.integrity_ok,
            )
        )
    return result


def notes(
    runs: dict[tuple[float, str], CheckpointRun], lab_rtt_s: float | None
) -> list[str]:
    return _gap_notes(runs, lab_rtt_s) + _failure_notes(runs)


def _gap_notes(
    runs: dict[tuple[float, str], CheckpointRun], lab_rtt_s: float | None
) -> list[str]:
    """Explain each shielded resume gap above the target."""
    lines = []
    limit = None if lab_rtt_s is None else lab_rtt_s + GAP_MARGIN_S
    for (freeze, mode), checkpoint in runs.items():
        gap = checkpoint.result.wire_resume_gap_s
        if mode != "shielded" or limit is None or gap is None or gap <= limit:
            continue
        timeline = checkpoint.result.timeline
        released = timeline.get("released")
        resumed = timeline.get("resumed")
        release_text = (
            "-"
            if released is None or resumed is None
            else f"{(released - resumed) * 1000:.0f} ms"
        )
        lines.append(
            f"{freeze:g} s shielded: the peer sent its first new byte "
            f"{gap * 1000:.0f} ms after repair off; releasing the held packets "
            f"and removing the rules took {release_text} of that."
        )
    return lines


def _failure_notes(runs: dict[tuple[float, str], CheckpointRun]) -> list[str]:
    lines = []
    for (freeze, mode), checkpoint in runs.items():
        result = checkpoint.result
        if result.error or not result.integrity_ok:
            lines.append(
                f"{freeze:g} s {mode}: {result.integrity}"
                + (f" ({result.error})" if result.error else "")
            )
        if checkpoint.probe.error:
            lines.append(f"{freeze:g} s {mode}: {checkpoint.probe.error}")
    return lines


def draw(
    context: Context,
    runs: dict[tuple[float, str], CheckpointRun],
    freezes: tuple[float, ...],
) -> list[str]:
    names = []
    for freeze in freezes:
        if freeze not in PLOTTED_FREEZES_S and freeze != max(freezes):
            continue
        lines = []
        end = freeze
        for mode, label in (("shielded", "shield"), ("baseline", "drop lock")):
            checkpoint = runs[(freeze, mode)]
            series = checkpoint.series(label)
            if series is None:
                continue
            first_new = checkpoint.result.timeline.get("first_new_byte")
            frozen = checkpoint.frozen_at
            if first_new is not None and frozen is not None:
                end = max(end, first_new - frozen)
            lines.append(series)
        if not lines:
            continue
        clipped = [_clip(series, -2.0, end + 3.0) for series in lines]
        name = f"resume_gap_timeseq_{freeze:g}s.png"
        plots.time_sequence(
            context.out_dir / name,
            f"Peer's acknowledged bytes around a {freeze:g} s freeze",
            clipped,
        )
        names.append(name)
    gaps: dict[str, list[float | None]] = {
        mode: [runs[(f, mode)].result.wire_resume_gap_s for f in freezes]
        for mode in ("shielded", "baseline")
    }
    limit = None if context.lab_rtt_s is None else context.lab_rtt_s + GAP_MARGIN_S
    name = "resume_gap_vs_freeze.png"
    plots.gap_against_freeze(context.out_dir / name, freezes, gaps, limit)
    names.append(name)
    return names


def _clip(series: plots.Series, start: float, end: float) -> plots.Series:
    points: list[tuple[float, Any]] = [
        (t, v) for t, v in zip(series.t, series.value, strict=True) if start <= t <= end
    ]
    return plots.Series(
        label=series.label,
        mode=series.mode,
        t=[t for t, _ in points],
        value=[v for _, v in points],
        resumed_at=series.resumed_at,
    )
