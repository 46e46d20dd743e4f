"""Does the connection survive a long freeze, and one past the peer's user timeout?

Two cases, each shielded and with CRIU's drop lock:

- a peer with TCP_USER_TIMEOUT 30 s under a 60 s freeze. Such a Linux peer
  aborts when its zero-window probes go on longer than the timeout, even when
  they are acknowledged, as Linux 6.18 in the lab does. So the shield opens
  the window a little every few seconds with its trickle policy. A shielded
  run without trickle shows the abort.
- a 1000 s freeze, only with ``--long``. It outlasts Linux's default
  retransmission limit: tcp_retries2 = 15, which the kernel's ip-sysctl
  documentation puts at a timeout of at least 924.6 s.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.context import Context
from bench.report import Figure, ScenarioReport
from bench.scenarios.checkpoint import STREAM_PORT, CheckpointRun, run_checkpoint
from shieldproxy.demo import ScenarioConfig
from shieldproxy.tcp.flow import TricklePolicy

USER_TIMEOUT_MS = 30_000
USER_TIMEOUT_FREEZE_S = 60.0
LONG_FREEZE_S = 1000.0
# Slower than the resume-gap runs: after the restore the sender catches up with
# its schedule at full speed, and the receiver checks every byte.
RATE_BYTES_PER_S = 1024 * 1024
LONG_RATE_BYTES_PER_S = 256 * 1024
# The daemon's trickle defaults (config/gateway.yaml): 1 KiB every 5 s, well
# inside a 30 s user timeout.
TRICKLE = TricklePolicy(step_bytes=1024, interval_s=5.0)

MEASURES = (
    "The checkpoint scenario of the resume-gap runs, at "
    f"{RATE_BYTES_PER_S >> 20} MiB/s. **Alive**: after the restore the "
    "connection carried new data and was not reset. **Intact**: every byte "
    "arrived once and in order. With TCP_USER_TIMEOUT "
    f"{USER_TIMEOUT_MS // 1000} s set on the peer's socket before a "
    f"{USER_TIMEOUT_FREEZE_S:g} s freeze, the shield uses its trickle window "
    f"policy ({TRICKLE.step_bytes} bytes every {TRICKLE.interval_s:g} s); a "
    "shielded run that holds the window shows why. The "
    f"{LONG_FREEZE_S:g} s freeze (only with --long, at "
    f"{LONG_RATE_BYTES_PER_S >> 10} KiB/s) outlasts Linux's default "
    "retransmission limit. Baseline: plain DROP rules, as CRIU's network lock."
)


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    freeze_s: float
    shielded: bool
    rate: int = RATE_BYTES_PER_S
    trickle: TricklePolicy | None = None
    user_timeout_ms: int | None = None


def cases(long: bool) -> list[Case]:
    timeout = USER_TIMEOUT_MS
    freeze = USER_TIMEOUT_FREEZE_S
    result = [
        Case("timeout-trickle", "user timeout, shield with trickle", freeze, True,
             trickle=TRICKLE, user_timeout_ms=timeout),
        Case("timeout-hold", "user timeout, shield holding the window", freeze,
             True, user_timeout_ms=timeout),
        Case("timeout-drop", "user timeout, drop lock", freeze, False,
             user_timeout_ms=timeout),
    ]  # fmt: skip
    if long:
        result += [
            Case("long-shield", "1000 s, shield", LONG_FREEZE_S, True,
                 rate=LONG_RATE_BYTES_PER_S),
            Case("long-drop", "1000 s, drop lock", LONG_FREEZE_S, False,
                 rate=LONG_RATE_BYTES_PER_S),
        ]  # fmt: skip
    return result


def alive(run: CheckpointRun) -> bool:
    """Return True when the restored connection carried new data, unreset."""
    result = run.result
    return (
        result.error is None
        and "first_new_byte" in result.timeline
        and not result.integrity.startswith("receiver error")
    )


async def run(context: Context) -> ScenarioReport:
    report = ScenarioReport(
        name="survival",
        title="Survival of long freezes",
        measures=MEASURES,
    )
    work = context.work_dir("survival")
    runs: dict[str, CheckpointRun] = {}
    for index, case in enumerate(cases(context.preset.long_survival)):
        context.progress.step(f"  {case.label}: freeze {case.freeze_s:g} s")
        config = ScenarioConfig(
            shielded=case.shielded,
            freeze_s=case.freeze_s,
            queue_num=10 + index,
            port=STREAM_PORT,
            rate_bytes_per_s=case.rate,
            trickle=case.trickle,
        )
        checkpoint = await run_checkpoint(
            context,
            config,
            work / case.key,
            case.label,
            user_timeout_ms=case.user_timeout_ms,
            stop_on_peer_abort=True,
        )
        runs[case.key] = checkpoint
        checkpoint.write_samples(work / case.key / "peer-tcp-info.csv")
        if case.user_timeout_ms is not None:
            _check_timeout_set(checkpoint, report, case)
        result = checkpoint.result
        context.progress.step(
            f"  {case.label}: alive {alive(checkpoint)}, {result.integrity}"
        )
    report.data["runs"] = {key: run.summary() for key, run in runs.items()}
    report.figures = _figures(runs)
    return report


def _check_timeout_set(
    checkpoint: CheckpointRun, report: ScenarioReport, case: Case
) -> None:
    set_at = checkpoint.probe.user_timeout_set_at
    # A run stopped after the peer aborted has no timeline, but the abort
    # shows that the timeout was in effect.
    frozen_at = checkpoint.frozen_at
    if set_at is None or (frozen_at is not None and set_at > frozen_at):
        report.notes.append(
            f"{case.label}: TCP_USER_TIMEOUT was not set on the peer's socket "
            f"before the freeze ({checkpoint.probe.error or 'socket not found'}), "
            "so this run does not test it."
        )


def _figures(runs: dict[str, CheckpointRun]) -> list[Figure]:
    figures = []
    pairs = [
        ("timeout-trickle", "timeout-drop", "60 s freeze, peer TCP_USER_TIMEOUT 30 s"),
        ("long-shield", "long-drop", "1000 s freeze"),
    ]
    for shield_key, drop_key, name in pairs:
        if shield_key not in runs:
            continue
        shield, drop = runs[shield_key], runs[drop_key]
        figures.append(
            Figure(
                f"alive after {name}",
                alive(shield),
                alive(drop),
                target="shield yes, drop lock no",
                met=alive(shield) and not alive(drop),
            )
        )
        figures.append(
            Figure(
                f"intact after {name}",
                shield.result.integrity_ok,
                drop.result.integrity_ok,
                target="shield yes",
                met=shield.result.integrity_ok,
            )
        )
        figures.append(
            Figure(
                f"peer aborts on timeout, {name}",
                shield.result.peer_counters.get("TcpExtTCPAbortOnTimeout"),
                drop.result.peer_counters.get("TcpExtTCPAbortOnTimeout"),
            )
        )
    if "timeout-hold" in runs:
        hold = runs["timeout-hold"]
        figures.append(
            Figure(
                "alive after 60 s freeze, peer TCP_USER_TIMEOUT 30 s, shield "
                "holding the window (no trickle)",
                alive(hold),
            )
        )
    return figures
