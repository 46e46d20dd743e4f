"""Figures of a benchmark run, and the results.json and results.md they go to."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Value = float | int | str | bool | None


@dataclass
class Figure:
    """One measured quantity, with the shield's and the baseline's value.

    ``met`` is None when the figure has no target, or when a value is missing
    because the run failed.
    """

    name: str
    shield: Value
    baseline: Value = None
    unit: str = ""
    digits: int = 0
    target: str = ""
    met: bool | None = None

    def verdict(self) -> str:
        if not self.target:
            return "-"
        if self.met is None:
            return "not measured"
        return "met" if self.met else "missed"


@dataclass
class ScenarioReport:
    """Everything one scenario measured."""

    name: str
    title: str
    measures: str
    """Description of the figures and of the baseline, in a few sentences."""
    baseline_label: str = "drop lock"
    figures: list[Figure] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    """File names of PNG plots in the output folder."""
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    """Raw measurements, for results.json only."""
    error: str | None = None
    duration_s: float = 0.0


@dataclass
class BenchReport:
    """A whole run: the command, the machine and every scenario."""

    command: str
    preset: str
    started: str
    machine: dict[str, Any]
    lab_rtt_s: float | None
    scenarios: list[ScenarioReport]
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["scenarios"] = {}
        for scenario in self.scenarios:
            entry = asdict(scenario)
            for raw, figure in zip(entry["figures"], scenario.figures, strict=True):
                raw["result"] = figure.verdict()
            data["scenarios"][scenario.name] = entry
        return data


def format_value(value: Value, unit: str = "", digits: int = 0) -> str:
    """Return VALUE as table text: thousands separators, then the unit."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        text = f"{value:,}"
    else:
        text = f"{value:,.{digits}f}"
    if unit in ("%", "×"):
        return text + unit
    return f"{text} {unit}".rstrip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def scenario_table(scenario: ScenarioReport) -> str:
    """Return the Markdown table of one scenario's figures."""
    lines = [
        f"| figure | shield | {scenario.baseline_label} | target | result |",
        "|---|---|---|---|---|",
    ]
    for figure in scenario.figures:
        cells = [
            figure.name,
            format_value(figure.shield, figure.unit, figure.digits),
            format_value(figure.baseline, figure.unit, figure.digits),
            figure.target or "-",
            figure.verdict(),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def targets_table(report: BenchReport) -> str:
    """Return a Markdown table of every figure that has a target."""
    lines = [
        "| scenario | figure | shield | target | result |",
        "|---|---|---|---|---|",
    ]
    for scenario in report.scenarios:
        for figure in scenario.figures:
            if not figure.target:
                continue
            value = format_value(figure.shield, figure.unit, figure.digits)
            cells = [scenario.name, figure.name, value, figure.target]
            cells.append(figure.verdict())
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(report: BenchReport) -> str:
    """Return results.md: the run's facts, the targets, then each scenario."""
    machine = report.machine
    load = machine.get("load_average")
    load_end = machine.get("load_average_end")
    load_text = ""
    if load is not None:
        load_text = f", load average {load[0]:.2f} at the start"
    if load_end is not None:
        load_text += f" and {load_end[0]:.2f} at the end"
    rtt = report.lab_rtt_s
    rtt_text = "not measured" if rtt is None else f"{rtt * 1000:.3f} ms"
    parts = [
        "# shieldproxy bench results\n",
        f"- command: `{report.command}`",
        f"- started {report.started}, took {report.duration_s:.0f} s",
        f"- machine: {machine.get('cores')} cores, kernel {machine.get('kernel')}, "
        f"Python {machine.get('python')}, TCP congestion control "
        f"{machine.get('tcp_congestion_control')}{load_text}",
        f"- lab round-trip time (median TCP handshake, peer to container through "
        f"the gateway): {rtt_text}\n",
        "## Targets\n",
        targets_table(report),
    ]
    for scenario in report.scenarios:
        parts.append(f"## {scenario.title}\n")
        parts.append(scenario.measures + "\n")
        if scenario.error:
            parts.append(f"The scenario failed: `{scenario.error}`\n")
        if scenario.figures:
            parts.append(scenario_table(scenario))
        for note in scenario.notes:
            parts.append(f"- {note}")
        if scenario.notes:
            parts.append("")
        for plot in scenario.plots:
            parts.append(f"![{scenario.title}: {plot}]({plot})\n")
    return "\n".join(parts).rstrip() + "\n"


def write_results(report: BenchReport, out_dir: Path) -> None:
    """Write results.json and results.md into OUT_DIR."""
    text = json.dumps(report.to_json(), indent=2) + "\n"
    (out_dir / "results.json").write_text(text)
    (out_dir / "results.md").write_text(markdown(report))
