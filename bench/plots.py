"""PNG plots of benchmark results, drawn with matplotlib's Agg backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

SIZE_INCHES = (7.0, 4.0)
DPI = 100
COLORS = {"shielded": "tab:blue", "baseline": "tab:red"}


@dataclass
class Series:
    """One line of a time-sequence plot, times relative to the freeze start."""

    label: str
    mode: str
    t: Sequence[float]
    value: Sequence[float]
    resumed_at: float | None
    """Seconds from the freeze start to the restored socket's repair off."""


def time_sequence(path: Path, title: str, series: Sequence[Series]) -> None:
    """Plot the peer's acknowledged bytes against time, one line per run."""
    figure, axes = plt.subplots(figsize=SIZE_INCHES, dpi=DPI)
    for line in series:
        color = COLORS.get(line.mode, "black")
        axes.plot(line.t, line.value, label=line.label, color=color, linewidth=1.2)
        if line.resumed_at is not None:
            axes.axvline(line.resumed_at, color=color, linestyle=":", linewidth=1)
    axes.axvline(0, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("seconds since the freeze started (dotted: restore)")
    axes.set_ylabel("peer bytes acknowledged (MB)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def gap_against_freeze(
    path: Path,
    freezes: Sequence[float],
    lines: Mapping[str, Sequence[float | None]],
    target_s: float | None,
) -> None:
    """Plot resume gap against freeze length on log-log axes."""
    figure, axes = plt.subplots(figsize=SIZE_INCHES, dpi=DPI)
    for mode, gaps in lines.items():
        points = [(f, g) for f, g in zip(freezes, gaps, strict=True) if g]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        label = "shield" if mode == "shielded" else "drop lock"
        axes.plot(xs, ys, marker="o", label=label, color=COLORS.get(mode, "black"))
    if target_s is not None:
        axes.axhline(
            target_s, color="grey", linestyle="--", linewidth=1, label="lab RTT + 50 ms"
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("freeze (s)")
    axes.set_ylabel("resume gap (s)")
    axes.set_title("Resume gap against freeze length")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def bars(
    path: Path, title: str, ylabel: str, labels: Sequence[str], values: Sequence[float]
) -> None:
    """Plot one bar per label."""
    figure, axes = plt.subplots(figsize=SIZE_INCHES, dpi=DPI)
    axes.bar(labels, values, color=["tab:blue", "tab:grey", "tab:green"][: len(values)])
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
