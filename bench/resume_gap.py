"""Resume gap against freeze length, with the shield and with a drop lock.

Run as root from a checkout::

    .venv/bin/python bench/resume_gap.py --freezes 1 5 20 --out results/

Each freeze length runs the demo's checkpoint scenario twice in one lab, once
shielded and once with plain DROP rules as CRIU's network lock does, and
records the resume gap and the peer's RTO timeouts and retransmissions. It
writes ``results.json`` and ``results.md`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

from shieldproxy.demo import ScenarioConfig, ScenarioResult, machine_facts, run_scenario
from shieldproxy.lab.topology import lab


def measure(freezes: list[float], out_dir: Path) -> list[dict[str, Any]]:
    rows = []
    with lab() as created:
        for freeze in freezes:
            for queue_num, shielded in enumerate((True, False)):
                config = ScenarioConfig(
                    shielded=shielded, freeze_s=freeze, queue_num=queue_num
                )
                work = out_dir / "runs" / f"freeze-{freeze:g}"
                result: ScenarioResult = trio.run(run_scenario, created, config, work)
                rows.append(
                    {
                        "freeze_s": freeze,
                        "mode": result.mode,
                        "resume_gap_s": result.resume_gap_s,
                        "peer_rto_timeouts": result.peer_rto_timeouts,
                        "peer_retransmits": result.peer_retransmits,
                        "integrity": result.integrity,
                        "error": result.error,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| freeze | mode | resume gap | peer RTO timeouts | peer retransmits "
        "| integrity |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        gap = row["resume_gap_s"]
        gap_text = "-" if gap is None else f"{gap:.3f} s"
        lines.append(
            f"| {row['freeze_s']:g} s | {row['mode']} | {gap_text} "
            f"| {row['peer_rto_timeouts']} | {row['peer_retransmits']} "
            f"| {row['integrity']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--freezes",
        type=float,
        nargs="+",
        default=[1.0, 5.0, 20.0],
        help="freeze lengths in seconds (default 1 5 20)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "the benchmark needs root: it creates network namespaces", file=sys.stderr
        )
        return 2
    if any(not 0 < freeze <= 3600 for freeze in args.freezes):
        print(f"invalid --freezes {args.freezes}: use seconds in (0, 3600]",
              file=sys.stderr)  # fmt: skip
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = measure(args.freezes, args.out)
    report = {"started": started, "machine": machine_facts(), "runs": rows}
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(rows))
    print(markdown(rows))
    failed = [row for row in rows if row["mode"] == "shielded" and row["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
