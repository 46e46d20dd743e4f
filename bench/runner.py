"""Run the benchmark scenarios in one lab and write the results.

Each scenario compares the shield with a baseline in the same run and lab: for
the checkpoint scenarios the baseline is CRIU's network lock, which drops every
packet. Output, in the folder given with ``--out``: ``results.json``,
``results.md`` (a Markdown table per scenario, with each target and whether
it is met) and PNG plots.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from bench.context import Context, Preset
from bench.progress import Progress
from bench.report import BenchReport, ScenarioReport, write_results
from shieldproxy.demo import machine_facts
from shieldproxy.kernel.netns import enter_netns
from shieldproxy.lab.topology import Lab, lab

log = logging.getLogger(__name__)

SCENARIOS = (
    "resume_gap",
    "survival",
    "overhead",
    "absorb",
    "engage",
    "handover",
    "memory",
)
DEFAULT_OUT = Path("results/bench")


PRESETS = {
    "quick": Preset(
        name="quick",
        freezes=(1.0,),
        scenarios=tuple(s for s in SCENARIOS if s != "survival"),
        overhead_rounds=1,
        overhead_seconds=2,
        absorb_measure_s=2.0,
        engage_repeats=3,
        handover_flows=100,
        memory_flows=1000,
    ),
    "default": Preset(
        name="default",
        freezes=(1.0, 5.0, 20.0, 60.0),
        scenarios=tuple(s for s in SCENARIOS if s != "survival"),
    ),
    "long": Preset(
        name="long",
        freezes=(1.0, 5.0, 20.0, 60.0, 300.0),
        scenarios=SCENARIOS,
        long_survival=True,
        overhead_rounds=7,
        overhead_seconds=10,
        absorb_measure_s=5.0,
    ),
}


Scenario = Callable[[Context], Awaitable[ScenarioReport]]


def _scenario(name: str) -> Scenario:
    # Imported on use, so that --help works without the scenarios' imports.
    if name == "resume_gap":
        from bench.scenarios.resume_gap import run as resume_gap

        return resume_gap
    if name == "survival":
        from bench.scenarios.survival import run as survival

        return survival
    if name == "overhead":
        from bench.scenarios.overhead import run as overhead

        return overhead
    if name == "absorb":
        from bench.scenarios.absorb import run as absorb

        return absorb
    if name == "engage":
        from bench.scenarios.engage import run as engage

        return engage
    if name == "handover":
        from bench.scenarios.handover import run as handover

        return handover
    if name == "memory":
        from bench.scenarios.memory import run as memory

        return memory
    raise ValueError(f"unknown scenario {name!r}: use one of {', '.join(SCENARIOS)}")


def measure_lab_rtt(created: Lab, samples: int = 21) -> float:
    """Return the median TCP handshake time from peer to container, in seconds.

    A handshake takes one round trip, through the gateway and back.
    """
    import socket

    with enter_netns(created.ctr_ns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((created.ctr_v4, 0))
        listener.listen(samples)
        port = listener.getsockname()[1]
        times = []
        for _ in range(samples):
            with enter_netns(created.peer_ns):
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with client:
                started = time.perf_counter()
                client.connect((created.ctr_v4, port))
                times.append(time.perf_counter() - started)
                accepted, _ = listener.accept()
                accepted.close()
    finally:
        listener.close()
    return statistics.median(times)


async def run_all(
    names: Sequence[str], preset: Preset, out_dir: Path, command: str
) -> BenchReport:
    """Create a lab, run the scenarios in it one after another, remove the lab."""
    progress = Progress()
    started_at = time.monotonic()
    machine = machine_facts()
    machine["load_average"] = list(os.getloadavg())
    machine["tcp_congestion_control"] = (
        Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    )
    report = BenchReport(
        command=command,
        preset=preset.name,
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        machine=machine,
        lab_rtt_s=None,
        scenarios=[],
    )

    with lab() as created:
        progress.step(f"lab {created.lab_id} up")
        report.lab_rtt_s = measure_lab_rtt(created)
        progress.step(f"lab round-trip time {report.lab_rtt_s * 1000:.3f} ms")
        context = Context(created, preset, out_dir, progress, report.lab_rtt_s)

        for index, name in enumerate(names, start=1):
            progress.step(f"scenario {index}/{len(names)}: {name}")
            scenario_started = time.monotonic()
            scenario = await _run_one(name, context)
            scenario.duration_s = time.monotonic() - scenario_started
            report.scenarios.append(scenario)
            report.duration_s = time.monotonic() - started_at
            # written after each scenario, so an interrupted run keeps its results
            write_results(report, out_dir)
            status = "failed: " + scenario.error if scenario.error else "done"
            progress.step(f"{name} {status} in {scenario.duration_s:.0f} s")

    report.machine["load_average_end"] = list(os.getloadavg())
    report.duration_s = time.monotonic() - started_at
    write_results(report, out_dir)
    return report


async def _run_one(name: str, context: Context) -> ScenarioReport:
    try:
        return await _scenario(name)(context)
    except Exception as exc:
        log.error("scenario %s failed", name, exc_info=exc)
        return ScenarioReport(
            name=name,
            title=name,
            measures="",
            error=f"{type(exc).__name__}: {exc}",
        )


async def _until_sigterm(
    main: Callable[[], Awaitable[BenchReport]],
) -> BenchReport | None:
    """Run MAIN; on SIGTERM cancel it so that every cleanup path runs."""
    result: list[BenchReport] = []
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in signals:
                    log.warning("SIGTERM received, cleaning up")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            result.append(await main())
            nursery.cancel_scope.cancel()
    return result[0] if result else None


def select_scenarios(preset: Preset, requested: Sequence[str] | None) -> list[str]:
    """Return the scenarios to run, in the order of SCENARIOS.

    Raises:
        ValueError: a requested name is not a scenario.
    """
    if not requested:
        return list(preset.scenarios)
    unknown = [name for name in requested if name not in SCENARIOS]
    if unknown:
        raise ValueError(
            f"unknown scenario {', '.join(unknown)}: use one of {', '.join(SCENARIOS)}"
        )
    return [name for name in SCENARIOS if name in requested]


def run(preset_name: str, out_dir: Path, requested: Sequence[str] | None) -> int:
    """Run the benchmarks and print where the results are; return the exit status.

    The status is 0 when every scenario ran, missed targets included, 1 when
    a scenario failed, 2 for invalid options or a missing requirement, and 130
    or 143 after SIGINT or SIGTERM.
    """
    preset = PRESETS[preset_name]
    try:
        names = select_scenarios(preset, requested)
    except ValueError as exc:
        print(f"shieldproxy bench: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(
            "shieldproxy bench needs root: it creates network namespaces",
            file=sys.stderr,
        )
        return 2
    if importlib.util.find_spec("matplotlib") is None:
        print(
            "shieldproxy bench needs matplotlib for its plots: install the test "
            "extras with .venv/bin/pip install -e '.[test]'",
            file=sys.stderr,
        )
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "shieldproxy bench"
    if preset.name != "default":
        command += f" --{preset.name}"
    for name in requested or ():
        command += f" --scenario {name}"
    report = None
    status, signal_name = 143, "SIGTERM"
    try:
        report = trio.run(
            _until_sigterm, lambda: run_all(names, preset, out_dir, command)
        )
    except* KeyboardInterrupt:
        # trio raises it inside an exception group when a nursery was open
        status, signal_name = 130, "SIGINT"
    if report is None:
        print(
            f"\ninterrupted by {signal_name}; the lab, its rules and processes were "
            f"removed. Results of the finished scenarios are in {out_dir}",
            file=sys.stderr,
        )
        return status
    print(f"results in {out_dir}: results.md, results.json and PNG plots")
    return 1 if any(s.error for s in report.scenarios) else 0
