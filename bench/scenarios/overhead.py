"""Throughput cost of a running shield daemon when nothing is frozen.

iperf3 measures peer-to-container TCP throughput through the gateway in three
configurations, interleaved round by round so that load from other work on the
machine hits all of them alike.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from bench import plots
from bench.context import Context
from bench.processes import daemon_config, iperf3, running_daemon
from bench.report import Figure, ScenarioReport

IPERF_PORT = 5201
OTHER_PORT = 5202
QUEUE = 2
RATIO_TARGET = 0.98
CONFIGURATIONS = {
    "none": "no daemon, no rules",
    "idle": "daemon running, scope configured, nothing frozen",
    "other": "daemon running, another scope frozen (rules in the path)",
}

MEASURES = (
    "iperf3 throughput from the peer to the container through the gateway "
    "(one TCP stream, median of the rounds). **Daemon idle**: `shieldproxy run` "
    "in the gateway with a scope that covers the iperf3 port, nothing frozen, so "
    "no rules are installed. **Another scope frozen**: a second scope, for "
    "another port of the same container, is frozen, so every iperf3 packet "
    "passes the shield's iptables chain without matching it. Baseline: no "
    "daemon and no rules."
)


async def run(context: Context) -> ScenarioReport:
    report = ScenarioReport(
        name="overhead",
        title="Throughput with the daemon running",
        measures=MEASURES,
        baseline_label="no daemon",
    )
    samples = await _measure_rounds(context)
    report.data = {"runs": samples, "configurations": CONFIGURATIONS}
    medians = {
        name: statistics.median(run["gbit_per_s"] for run in runs)
        for name, runs in samples.items()
    }
    report.data["median_gbit_per_s"] = medians
    report.figures = _figures(medians, samples)

    name = "overhead_throughput.png"
    plots.bars(
        context.out_dir / name,
        "iperf3 peer to container through the gateway (median)",
        "Gbit/s",
        ["no daemon", "daemon idle", "other scope frozen"],
        [medians["none"], medians["idle"], medians["other"]],
    )
    report.plots = [name]
    return report


async def _measure_rounds(context: Context) -> dict[str, list[dict[str, float]]]:
    """Run iperf3 in each configuration, once per round."""
    preset = context.preset
    work = context.work_dir("overhead")
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGURATIONS}
    # A short folder: a Unix socket path has at most 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="sp-bench-"))
    try:
        config = daemon_config(
            context.lab, folder, [("bench", IPERF_PORT), ("other", OTHER_PORT)], QUEUE
        )
        # one short run first, so the first measured round is not the coldest
        await iperf3(context.lab, IPERF_PORT, 1, work / "iperf3.log")
        for index in range(preset.overhead_rounds):
            context.progress.step(
                f"  round {index + 1}/{preset.overhead_rounds}: iperf3 -t "
                f"{preset.overhead_seconds} in each configuration"
            )
            # the no-daemon run goes first in even rounds and last in odd ones
            if index % 2 == 0:
                samples["none"].append(await _iperf(context, work))
            async with running_daemon(config, work / "daemon.log") as daemon:
                samples["idle"].append(await _iperf(context, work))
                await daemon.call(command="freeze", scope="other", dumps=[])
                try:
                    samples["other"].append(await _iperf(context, work))
                finally:
                    await daemon.call(command="release", scope="other", force=True)
            if index % 2 == 1:
                samples["none"].append(await _iperf(context, work))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return samples


async def _iperf(context: Context, work: Path) -> dict[str, float]:
    seconds = context.preset.overhead_seconds
    return await iperf3(context.lab, IPERF_PORT, seconds, work / "iperf3.log")


def _figures(
    medians: dict[str, float], samples: dict[str, list[dict[str, float]]]
) -> list[Figure]:
    none = medians["none"]
    idle_ratio = medians["idle"] / none * 100
    other_ratio = medians["other"] / none * 100
    spread = {
        name: (
            f"{min(r['gbit_per_s'] for r in runs):.2f} to "
            f"{max(r['gbit_per_s'] for r in runs):.2f} Gbit/s"
        )
        for name, runs in samples.items()
    }
    return [
        Figure(
            "throughput, daemon idle",
            medians["idle"],
            none,
            unit="Gbit/s",
            digits=2,
        ),
        Figure(
            "throughput, daemon idle / no daemon",
            idle_ratio,
            unit="%",
            digits=1,
            target=f"≥ {RATIO_TARGET * 100:g}%",
            met=idle_ratio >= RATIO_TARGET * 100,
        ),
        Figure(
            "throughput, another scope frozen",
            medians["other"],
            none,
            unit="Gbit/s",
            digits=2,
        ),
        Figure(
            "throughput, another scope frozen / no daemon",
            other_ratio,
            unit="%",
            digits=1,
        ),
        Figure(
            "throughput, lowest to highest round, daemon idle",
            spread["idle"],
            spread["none"],
        ),
        Figure(
            "throughput, lowest to highest round, another scope frozen",
            spread["other"],
            spread["none"],
        ),
    ]
