"""Inputs of a scenario: the lab, the sizes of the run and the output folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.progress import Progress
from shieldproxy.lab.topology import Lab


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run: ``--quick``, the default, or ``--long``."""

    name: str
    freezes: tuple[float, ...]
    """Freeze lengths of the resume-gap scenario, in seconds."""
    scenarios: tuple[str, ...]
    """Scenarios run when ``--scenario`` is not given."""
    long_survival: bool = False
    """Also run the 1000 s freeze of the survival scenario."""
    overhead_rounds: int = 5
    overhead_seconds: int = 5
    absorb_flows: int = 50
    absorb_measure_s: float = 3.0
    engage_flows: tuple[int, ...] = (1, 100, 10_000)
    engage_repeats: int = 5
    handover_flows: int = 1000
    memory_flows: int = 10_000


@dataclass
class Context:
    """Inputs of every scenario: the lab, the run's sizes and the output folder."""

    lab: Lab
    preset: Preset
    out_dir: Path
    progress: Progress
    lab_rtt_s: float | None
    checkout: Path = field(default_factory=lambda: Path(__file__).resolve().parents[1])

    def work_dir(self, scenario: str) -> Path:
        """Return the folder for a scenario's captures, logs and series."""
        path = self.out_dir / "work" / scenario
        path.mkdir(parents=True, exist_ok=True)
        return path
