"""The end-to-end demo: one checkpointed connection, with and without the shield.

In a fresh lab, a peer streams the offset pattern to a receiver in the container
namespace. Then the demo engages: NFQUEUE rules in the gateway for the shielded
run, or plain DROP rules like CRIU's network lock for the baseline. It pauses the
receiver, dumps its socket with TCP_REPAIR and kills it. After the freeze it
restores the socket in a new process, with the absorbed bytes in its receive
queue when shielded. Then it releases and lets the stream finish, and the
receiver checks every byte.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from .config import DemoConfig
from .handover import restored_right_edge
from .kernel.netns import enter_netns, netns_command, run_in_netns
from .kernel.nfqueue import QueueBinding, QueuedPacket
from .kernel.rawsock import RawSender
from .kernel.repair import PeerClose, dump_socket, save_dump, take_socket
from .kernel.rules import Action, RuleSet, Scope
from .lab.children import Child
from .lab.topology import Lab, sysctl
from .shield import Shield
from .tcp.flow import FlowHandover, TricklePolicy

log = logging.getLogger(__name__)

PEER_COUNTERS = (
    "TcpRetransSegs",
    "TcpExtTCPTimeouts",
    "TcpExtTCPWinProbe",
    "TcpExtTCPLossProbes",
    "TcpExtPAWSEstab",
    "TcpExtTCPAbortOnTimeout",
    "TcpExtTCPSpuriousRTOs",
)
# Receive-side drops in the container namespace: data the restored socket had
# no buffer for, or out-of-order data it pruned.
CONTAINER_COUNTERS = (
    "TcpExtTCPRcvQDrop",
    "TcpExtTCPRcvPruned",
    "TcpExtTCPOFODrop",
    "TcpExtTCPZeroWindowDrop",
    "TcpExtTCPBacklogDrop",
)
LAB_ENV = "SHIELDPROXY_LAB"
CAPTURE_SNAPLEN = 128
PEER_DATA_LEAD_S = 0.3
"""Seconds before the freeze at which the capture of the peer's data at the
container starts, so the capture shows what reached it before the freeze."""
STREAM_PORT = 5001


@dataclass
class ScenarioConfig:
    """One run of the checkpoint scenario."""

    shielded: bool
    freeze_s: float = 20.0
    family: int = 4
    rate_bytes_per_s: int = 4 * 1024 * 1024
    warmup_s: float = 2.0
    after_s: float = 3.0
    receiver_rcvbuf_bytes: int = 8 * 1024 * 1024
    queue_num: int = 0
    capture: bool = True
    port: int = STREAM_PORT
    daemon_socket: Path | None = None
    """Control socket of a running daemon to shield with, instead of in-process."""
    daemon_scope: str = ""
    """Daemon scope that covers the flow, when ``daemon_socket`` is set."""
    mid_freeze: Callable[[], Awaitable[None]] | None = None
    """Called once halfway through the freeze, for tests that disturb it."""
    trickle: TricklePolicy | None = None
    """Window policy of the in-process shield once the peer has filled the
    window; None holds the container's right edge."""
    peer_sysctls: dict[str, str | int] = field(default_factory=dict)
    """Sysctls (dotted names) set in the peer namespace before the connection
    opens, for example ``{"net.ipv4.tcp_sack": 0}``."""
    container_sysctls: dict[str, str | int] = field(default_factory=dict)
    """Sysctls set in the container namespace before the receiver listens."""
    client_mss: int = 0
    """TCP_MAXSEG of the peer's socket in bytes, set before it connects; 0
    leaves the MSS to the route."""
    client_keepalive: tuple[int, int, int] | None = None
    """TCP_KEEPIDLE, TCP_KEEPINTVL (seconds) and TCP_KEEPCNT of the peer's
    socket, which then has SO_KEEPALIVE on."""
    client_idle_s: float = 0.0
    """Seconds the peer sends nothing, from half a second before the freeze."""
    client_user_timeout_ms: int = 0
    """TCP_USER_TIMEOUT of the peer's socket in milliseconds, 0 for none."""
    peer_close: PeerClose | None = None
    """Peer's close halfway through the freeze: "fin" half-closes the
    connection after its last byte (shutdown(SHUT_WR)), "rst" resets it
    (close() with SO_LINGER 0), None keeps streaming."""
    reply_bytes: int = 0
    """Bytes the receiver sends back after the peer's EOF; the peer checks
    them before it closes."""


@dataclass
class ScenarioResult:
    """Measurements of one run; times in seconds, sizes in bytes."""

    mode: str
    family: int
    freeze_s: float
    integrity_ok: bool = False
    integrity: str = "not run"
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_absorbed: int = 0
    bytes_handed_over: int = 0
    acks_sent: int = 0
    resume_gap_s: float | None = None
    """From repair off to the first new byte the restored application reads,
    after the handed-over ones."""
    wire_resume_gap_s: float | None = None
    """From repair off to the first peer byte that reaches the container's
    interface for the first time since the freeze, in a capture there. Bytes
    the shield absorbed reach it only through the hand-over, never on the wire,
    and the peer does not send them again."""
    peer_counters: dict[str, int] = field(default_factory=dict)
    container_counters: dict[str, int] = field(default_factory=dict)
    max_right_edge_retraction: int | None = None
    capture_violations: int | None = None
    ack_regressions: int | None = None
    tsval_regressions: int | None = None
    shield_counters: dict[str, int] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)
    """CLOCK_MONOTONIC seconds at which the run reached each step: frozen,
    restored, resumed, released and first_new_byte."""
    error: str | None = None
    handover_fin: bool = False
    """The shield acknowledged the peer's FIN and handed it over."""
    handover_reset: bool = False
    """The shield accepted the peer's RST and handed it over."""
    stream_end_offset: int | None = None
    """Stream offset after the last byte given to the restored socket: what
    the receiver read before the dump, its receive queue and the handed-over
    bytes."""
    peer_done: dict[str, Any] | None = None
    """The peer's last report: bytes sent, close status, reply bytes and
    whether they matched the pattern."""

    @property
    def peer_rto_timeouts(self) -> int:
        return self.peer_counters.get("TcpExtTCPTimeouts", 0)

    @property
    def peer_retransmits(self) -> int:
        return self.peer_counters.get("TcpRetransSegs", 0)


ProgressCallback = Callable[[str, float, float, int, int], None]
"""Called with (mode, elapsed s, freeze s, bytes absorbed, ACKs sent)."""


def read_counters(netns: str, names: tuple[str, ...] = PEER_COUNTERS) -> dict[str, int]:
    """Return absolute TCP counters of a network namespace, from nstat."""
    result = run_in_netns(netns, ["nstat", "-a", "-z", "-s", "-j"])
    kernel = json.loads(result.stdout)["kernel"]
    return {name: int(kernel.get(name, 0)) for name in names}


def _python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


async def run_scenario(
    lab: Lab,
    config: ScenarioConfig,
    work_dir: Path,
    progress: ProgressCallback | None = None,
) -> ScenarioResult:
    """Run one checkpoint of a streaming connection and measure what the peer saw."""
    mode = "shielded" if config.shielded else "baseline"
    result = ScenarioResult(mode=mode, family=config.family, freeze_s=config.freeze_s)
    run_dir = work_dir / f"{mode}-ipv{config.family}"
    run_dir.mkdir(parents=True, exist_ok=True)
    ctr_addr = lab.ctr_v4 if config.family == 4 else lab.ctr_v6
    tag = f"{lab.lab_id}{secrets.token_hex(2)}"
    rules = RuleSet(tag, [Scope(ctr_addr, config.port)], config.queue_num,
                    hook="FORWARD", netns=lab.gw_ns)  # fmt: skip
    children: list[Child] = []
    capture: Child | None = None
    data_capture: Child | None = None
    binding: QueueBinding | None = None
    sender: RawSender | None = None
    resumed_wall: float | None = None
    try:
        async with trio.open_nursery() as nursery:

            async def start(name: str, ns: str, argv: list[str], **kw: Any) -> Child:
                # the label lets tests find any child left behind by a lab
                env = {LAB_ENV: lab.lab_id}
                argv = netns_command(ns, argv)
                child = await Child.start(name, argv, run_dir, env=env, **kw)
                children.append(child)
                nursery.start_soon(child.read_events)
                return child

            async def start_capture(
                name: str, ns: str, interface: str, file: str, bpf_filter: str
            ) -> Child:
                tcpdump = await start(
                    name,
                    ns,
                    [
                        "tcpdump", "-i", interface, "-s", str(CAPTURE_SNAPLEN),
                        # without immediate mode tcpdump reads packets in
                        # blocks and loses the last block when stopped
                        "-U", "--immediate-mode", "-n",
                        "-w", str(run_dir / file), bpf_filter,
                    ],
                )  # fmt: skip
                await _wait_for_capture(tcpdump)
                return tcpdump

            if config.capture:
                capture = await start_capture(
                    "tcpdump",
                    lab.peer_ns,
                    lab.peer_if,
                    "peer.pcap",
                    f"tcp and src host {ctr_addr} and src port {config.port}",
                )

            for key, value in config.peer_sysctls.items():
                sysctl(lab.peer_ns, key, value)
            for key, value in config.container_sysctls.items():
                sysctl(lab.ctr_ns, key, value)
            server = await start(
                "receiver",
                lab.ctr_ns,
                _python_module(
                    "shieldproxy.lab.stream_server", "listen", "--addr", ctr_addr,
                    "--port", str(config.port),
                    "--rcvbuf", str(config.receiver_rcvbuf_bytes),
                    "--reply", str(config.reply_bytes),
                ),
            )  # fmt: skip
            await server.wait_for("listening", 10)
            counters_before = read_counters(lab.peer_ns)
            container_before = read_counters(lab.ctr_ns, CONTAINER_COUNTERS)
            client = await start(
                "sender", lab.peer_ns, _client_command(config, ctr_addr)
            )
            accepted = await server.wait_for("accepted", 10)
            await trio.sleep(max(0.0, config.warmup_s - PEER_DATA_LEAD_S))
            if config.capture:
                # The peer's data is captured where it reaches the container,
                # and only from just before the freeze, because all of it would
                # make a capture of hundreds of MB.
                peer_addr = lab.peer_v4 if config.family == 4 else lab.peer_v6
                data_capture = await start_capture(
                    "tcpdump-peer-data",
                    lab.ctr_ns,
                    lab.ctr_if,
                    "peer-data.pcap",
                    f"tcp and src host {peer_addr} and dst port {config.port}",
                )
            await trio.sleep(min(config.warmup_s, PEER_DATA_LEAD_S))

            # engage: divert or drop the peer's packets before the socket stops
            shield: Shield | None = None
            daemon = _DaemonClient(config) if config.daemon_socket else None
            if daemon is not None:
                await daemon.call(command="freeze", dumps=[])
            elif config.shielded:
                with enter_netns(lab.gw_ns):
                    sender = RawSender()
                    shield = Shield(sender, trickle=config.trickle)
                    handler = _handler(shield)
                    binding = QueueBinding(config.queue_num, handler)
                nursery.start_soon(binding.serve)
                nursery.start_soon(shield.run_timers)
                rules.install("queue")
            else:
                rules.install("drop")

            # checkpoint: the receiver reports exactly what it consumed, then the
            # socket is dumped in repair mode and the process killed
            server.signal(signal.SIGUSR1)
            paused = await server.wait_for("paused", 10)
            sock = take_socket(accepted["pid"], accepted["fd"])
            try:
                dump = dump_socket(sock)
                frozen_at = time.monotonic()
                result.timeline["frozen"] = frozen_at
                # The peer's packets wait unanswered in the queue until the flow
                # is added, so add it before the slow steps: a wait past the
                # peer's 200 ms minimum RTO would cost a retransmission timeout.
                if shield is not None:
                    shield.add_flow(dump.flow_snapshot(), time.monotonic())
                save_dump(dump, run_dir / "socket.json")
                if daemon is not None:
                    dump_path = str(run_dir / "socket.json")
                    await daemon.call(command="freeze", dumps=[dump_path])
                await server.stop()
            finally:
                sock.close()  # in repair mode: no FIN, no RST

            # freeze; the restoring process starts ahead so that the hand-over
            # does not wait for interpreter start-up
            restored_server = await start(
                "restored-receiver",
                lab.ctr_ns,
                _python_module("shieldproxy.lab.stream_server", "restore"),
                stdin=True,
            )
            mid_freeze = config.mid_freeze
            while (elapsed := time.monotonic() - frozen_at) < config.freeze_s:
                if mid_freeze is not None and elapsed >= config.freeze_s / 2:
                    await mid_freeze()
                    mid_freeze = None
                    continue
                if progress is not None:
                    totals = shield.totals() if shield else {}
                    if daemon is not None:
                        totals = await daemon.scope_status()
                    progress(mode, elapsed, config.freeze_s,
                             totals.get("bytes_absorbed", 0),
                             totals.get("acks_sent", 0))  # fmt: skip
                await trio.sleep(min(0.5, config.freeze_s - elapsed))
            await restored_server.wait_for("ready", 10)

            # hand over and restore in the new process
            request: dict[str, Any] = {
                "dump": str(run_dir / "socket.json"),
                "offset": paused["received"],
                "reply_bytes": config.reply_bytes,
            }
            result.stream_end_offset = paused["received"] + len(dump.recv_queue)
            if shield is not None or daemon is not None:
                if daemon is not None:
                    totals = await daemon.scope_status()
                    result.bytes_absorbed = totals["bytes_absorbed"]
                    result.acks_sent = totals["acks_sent"]
                    handover, handover_at = await daemon.thaw(run_dir / "handover")
                else:
                    assert shield is not None
                    handover_at = time.monotonic()
                    handover = shield.handover(dump.key, handover_at)
                (run_dir / "absorbed.bin").write_bytes(handover.data)
                result.bytes_handed_over = len(handover.data)
                result.stream_end_offset += len(handover.data)
                result.handover_fin = handover.fin
                result.handover_reset = handover.reset
                if handover.fin or handover.reset:
                    # the restore delivers them at the restored rcv_nxt
                    request["peer_close"] = "fin" if handover.fin else "rst"
                    request["peer_tsval"] = handover.ts_recent
                fresh_edge = restored_right_edge(
                    handover,
                    window_bytes=dump.rcv_wnd,
                    rcvbuf_bytes=dump.rcvbuf,
                    queued_bytes=len(dump.recv_queue) + len(handover.data),
                    scale_unit=1 << (dump.rcv_wscale if dump.wscale_ok else 0),
                )
                request.update(
                    window_probe=False,
                    extra=str(run_dir / "absorbed.bin"),
                    right_edge=fresh_edge,
                    tsval=handover.tsval,
                    tsval_at=handover_at,
                )
            await restored_server.send_line(json.dumps(request))
            restored = await restored_server.wait_for("restored", 20)
            result.timeline["restored"] = restored["t"]

            # The shield announces the restored window while the socket is
            # still in repair mode, so every segment the kernel sends later
            # shows that edge or a larger one. The rules stop dropping the
            # container's packets, as CRIU unlocks the network before switching
            # repair off. Repair goes off without the kernel's window probe,
            # because a Linux peer drops that probe as old (its sequence number
            # is snd_una - 1). Only then do the held packets go through: data
            # that reached the socket in repair mode was not acknowledged until
            # the peer retransmitted it.
            window = {
                "rcv_nxt": restored["rcv_nxt"],
                "right_edge": restored["right_edge"],
            }
            if shield is not None:
                flow_stats = shield.flows[dump.key].stats
                result.bytes_absorbed = flow_stats.bytes_absorbed
                result.acks_sent = flow_stats.acks_sent
                if not result.handover_reset:
                    shield.announce(
                        dump.key,
                        time.monotonic(),
                        restored_rcv_nxt=window["rcv_nxt"],
                        restored_right_edge=window["right_edge"],
                    )
            if daemon is None:
                action: Action = "queue-in" if shield is not None else "drop"
                await trio.to_thread.run_sync(rules.switch, action)
            else:
                # a peer that reset the connection needs no window update
                announced = {} if result.handover_reset else {str(dump.key): window}
                await daemon.call(command="announce", restored=announced)
            await restored_server.send_line("go")
            resumed = await restored_server.wait_for("resumed", 10)
            result.timeline["resumed"] = resumed["t"]
            # pcap times are wall-clock times
            resumed_wall = time.time() - (time.monotonic() - resumed["t"])
            if daemon is not None:
                await daemon.call(command="release")
            if shield is not None:
                shield.release(dump.key, time.monotonic())
                result.shield_counters = shield.totals()
            # iptables-restore takes milliseconds; in a thread, so the queue
            # reader keeps letting the peer's packets through meanwhile
            await trio.to_thread.run_sync(rules.remove)
            result.timeline["released"] = time.monotonic()
            if binding is not None:
                binding.drain()
                binding.close()
                binding = None

            outcome = await _wait_outcome(restored_server, client, config)
            if config.peer_close is not None or config.reply_bytes:
                # the peer reports after reading the reply up to the EOF
                result.peer_done = await client.wait_for("done", 30)
            first_new = restored_server.last("first-new-byte")
            if first_new is not None:
                result.resume_gap_s = first_new["t"] - resumed["t"]
                result.timeline["first_new_byte"] = first_new["t"]
            result.peer_counters = _diff(read_counters(lab.peer_ns), counters_before)
            container_after = read_counters(lab.ctr_ns, CONTAINER_COUNTERS)
            result.container_counters = _diff(container_after, container_before)
            done = client.last("done") or client.last("progress") or {}
            result.bytes_sent = done.get("sent", 0)
            result.integrity_ok, result.integrity, result.bytes_received = outcome
            if result.integrity_ok and result.bytes_received != result.bytes_sent:
                result.integrity_ok = False
                result.integrity = (
                    f"received {result.bytes_received} of {result.bytes_sent} bytes"
                )
            nursery.cancel_scope.cancel()
    except Exception as exc:
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            inner = exc.exceptions[0]
            if not isinstance(inner, Exception):
                break
            exc = inner
        result.error = f"{type(exc).__name__}: {exc}"
        result.integrity_ok = False
        result.integrity = f"run failed: {exc}"
        log.error("%s run failed", mode, exc_info=exc)
    finally:
        with trio.CancelScope(shield=True):
            if binding is not None:
                binding.close()
            rules.remove()
            if sender is not None:
                sender.close()
            for child in children:
                if child is not capture and child is not data_capture:
                    await child.stop()
            for tcpdump in (capture, data_capture):
                if tcpdump is not None:
                    # tcpdump flushes its file on SIGINT
                    tcpdump.signal(signal.SIGINT)
                    await tcpdump.stop(timeout=5)
    if capture is not None and (run_dir / "peer.pcap").exists():
        _check_capture(result, run_dir / "peer.pcap", (ctr_addr, config.port))
    data_path = run_dir / "peer-data.pcap"
    if data_capture is not None and data_path.exists():
        if resumed_wall is not None:
            _measure_wire_gap(result, data_path, (ctr_addr, config.port), resumed_wall)
    return result


def _measure_wire_gap(
    result: ScenarioResult, path: Path, receiver: tuple[str, int], resumed_wall: float
) -> None:
    from .pcapcheck import CaptureError, first_new_data_at

    try:
        sent_at = first_new_data_at(path, receiver, resumed_wall)
    except CaptureError as exc:
        log.warning("cannot measure the resume gap in %s: %s", path, exc)
        return
    if sent_at is not None:
        result.wire_resume_gap_s = sent_at - resumed_wall


class _DaemonClient:
    """Control calls to a running daemon, made from a thread to keep trio free."""

    def __init__(self, config: ScenarioConfig) -> None:
        assert config.daemon_socket is not None
        self.socket = config.daemon_socket
        self.scope = config.daemon_scope

    async def call(self, **request: Any) -> Any:
        from .control import call

        request["scope"] = self.scope
        return await trio.to_thread.run_sync(call, self.socket, request)

    async def scope_status(self) -> dict[str, Any]:
        from .control import call

        status = await trio.to_thread.run_sync(call, self.socket, {"command": "status"})
        scope: dict[str, Any] = status["scopes"][self.scope]
        return scope

    async def thaw(self, folder: Path) -> tuple[FlowHandover, float]:
        from .handover import load_handover

        result = await self.call(command="thaw", out_dir=str(folder))
        (path,) = result["handovers"]
        return load_handover(Path(path))


def _check_capture(
    result: ScenarioResult, path: Path, container: tuple[str, int]
) -> None:
    from .pcapcheck import CaptureError, check_capture

    try:
        report = check_capture(path, only_from=container)
    except CaptureError as exc:
        result.error = result.error or f"capture check failed: {exc}"
        return
    result.max_right_edge_retraction = max(
        (d.max_right_edge_retraction for d in report.directions), default=0
    )
    result.capture_violations = report.violation_count
    result.ack_regressions = sum(d.ack_regressions for d in report.directions)
    result.tsval_regressions = sum(d.tsval_regressions for d in report.directions)


def _handler(shield: Shield) -> Callable[[QueuedPacket], None]:
    def handle(packet: QueuedPacket) -> None:
        shield.handle_packet(packet, time.monotonic())

    return handle


async def _wait_for_capture(capture: Child) -> None:
    # tcpdump prints "listening on IFACE" to stderr once its socket is open
    for _ in range(100):
        if "listening on" in capture.stderr_tail(2000):
            return
        if capture.process.returncode is not None:
            break
        await trio.sleep(0.05)
    raise RuntimeError(f"tcpdump did not start: {capture.stderr_tail()}")


async def _wait_outcome(
    server: Child, client: Child, config: ScenarioConfig
) -> tuple[bool, str, int]:
    """Wait for the stream to end at the receiver; return (ok, verdict, bytes)."""
    # the sender stops after warmup + freeze + after_s; allow for a baseline
    # peer whose backed-off retransmission timer fires long after the restore
    timeout = config.after_s + max(60.0, config.freeze_s * 2.5) + 30
    with trio.move_on_after(timeout):
        while True:
            for name in ("eof", "mismatch", "error"):
                event = server.last(name)
                if event is not None:
                    break
            else:
                await trio.sleep(0.1)
                continue
            break
    event = server.last("eof")
    if event is not None:
        return True, "ok", int(event["received"])
    mismatch = server.last("mismatch")
    progress = server.last("progress") or {}
    received = int(progress.get("received", 0))
    if mismatch is not None:
        return False, f"wrong byte at stream offset {mismatch['offset']}", received
    error = server.last("error")
    if error is not None:
        received = int(error.get("received", received))
        return False, f"receiver error: {error.get('error')}", received
    return False, f"stream did not finish within {timeout:.0f} s", received


def _client_command(config: ScenarioConfig, ctr_addr: str) -> list[str]:
    """Build the peer's stream_client command line for one run."""
    duration = config.warmup_s + config.freeze_s + config.after_s + 120
    total = int(config.rate_bytes_per_s * (duration - 120))
    # the freeze starts about warmup_s after the client connects
    close_at = config.warmup_s + config.freeze_s / 2
    if config.peer_close == "fin":
        duration = close_at
    argv = [
        "--addr", ctr_addr, "--port", str(config.port),
        "--rate", str(config.rate_bytes_per_s), "--total", str(total),
        "--duration", str(duration),
        "--close-timeout", str(config.freeze_s + config.after_s + 60),
    ]  # fmt: skip
    if config.peer_close == "rst":
        argv += ["--abort-at", str(close_at)]
    if config.client_mss:
        argv += ["--mss", str(config.client_mss)]
    if config.client_keepalive is not None:
        argv += ["--keepalive", ",".join(map(str, config.client_keepalive))]
    if config.client_user_timeout_ms:
        argv += ["--user-timeout-ms", str(config.client_user_timeout_ms)]
    if config.client_idle_s:
        idle_from = max(0.0, config.warmup_s - 0.5)
        argv += ["--idle-from", str(idle_from), "--idle", str(config.client_idle_s)]
    return _python_module("shieldproxy.lab.stream_client", *argv)


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after}


# the command


@dataclass
class DemoReport:
    """Both runs of one demo invocation."""

    freeze_s: float
    family: int
    runs: list[ScenarioResult]
    started: str
    machine: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for run, raw in zip(self.runs, data["runs"], strict=True):
            raw["peer_rto_timeouts"] = run.peer_rto_timeouts
            raw["peer_retransmits"] = run.peer_retransmits
        return data


def machine_facts() -> dict[str, Any]:
    return {
        "kernel": os.uname().release,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def format_table(report: DemoReport) -> str:
    """Side-by-side table of the runs for the terminal."""
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[str]) -> None:
        rows.append((label, values))

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} s"

    def retraction(run: ScenarioResult) -> str:
        if run.max_right_edge_retraction is None:
            return "not captured"
        return f"{run.max_right_edge_retraction} bytes"

    def shield_only(run: ScenarioResult, value: int) -> str:
        return f"{value:,}" if run.mode == "shielded" else "-"

    runs = report.runs
    row("", [run.mode for run in runs])
    row("freeze", [f"{run.freeze_s:.1f} s" for run in runs])
    row(
        "resume gap (repair off to the peer's first new byte)",
        [seconds(run.wire_resume_gap_s) for run in runs],
    )
    row(
        "application reads its first new byte",
        [seconds(run.resume_gap_s) for run in runs],
    )
    row("peer RTO timeouts", [str(run.peer_rto_timeouts) for run in runs])
    row("peer retransmitted segments", [str(run.peer_retransmits) for run in runs])
    probes = [run.peer_counters.get("TcpExtTCPWinProbe", 0) for run in runs]
    row("peer zero-window probes", [str(count) for count in probes])
    absorbed = [shield_only(run, run.bytes_absorbed) for run in runs]
    row("bytes absorbed by the shield", absorbed)
    handed_over = [shield_only(run, run.bytes_handed_over) for run in runs]
    row("bytes handed over", handed_over)
    row("ACKs sent by the shield", [shield_only(run, run.acks_sent) for run in runs])
    row("largest right-edge retraction on the wire", [retraction(run) for run in runs])
    sent = [f"{run.bytes_sent:,} / {run.bytes_received:,}" for run in runs]
    row("bytes sent / received", sent)
    row("integrity", [run.integrity for run in runs])
    width = max(len(label) for label, _ in rows)
    columns = [max(len(values[i]) for _, values in rows) for i in range(len(runs))]
    lines = []
    for label, values in rows:
        cells = "  ".join(v.ljust(columns[i]) for i, v in enumerate(values))
        lines.append(f"{label.ljust(width)}  {cells}".rstrip())
    return "\n".join(lines)


def print_progress(stream: Any) -> ProgressCallback:
    interactive = stream.isatty()
    last_line = [0.0]

    def report(
        mode: str, elapsed: float, freeze: float, absorbed: int, acks: int
    ) -> None:
        text = f"[{mode}] frozen {elapsed:5.1f}/{freeze:.0f} s  "
        if mode == "shielded":
            text += f"absorbed {absorbed:>12,} bytes  ACKs sent {acks:>7,}"
        else:
            text += "peer packets dropped, as CRIU's network lock does"
        if interactive:
            stream.write("\r" + text)
            stream.flush()
        elif elapsed - last_line[0] >= 2.0 or elapsed < 0.5:
            last_line[0] = elapsed
            stream.write(text + "\n")
            stream.flush()

    return report


async def run_demo(
    lab: Lab,
    settings: DemoConfig,
    work_dir: Path,
    progress: ProgressCallback | None = None,
) -> DemoReport:
    """Run the shielded scenario, then the baseline unless turned off."""
    runs = []
    modes = [True, False] if settings.baseline else [True]
    for index, shielded in enumerate(modes):
        config = ScenarioConfig(
            shielded=shielded,
            freeze_s=settings.freeze_s,
            family=settings.ip_version,
            queue_num=index,
            rate_bytes_per_s=settings.rate_bytes_per_s,
            warmup_s=settings.warmup_s,
            after_s=settings.after_s,
            receiver_rcvbuf_bytes=settings.receiver_rcvbuf_bytes,
        )
        runs.append(await run_scenario(lab, config, work_dir, progress))
        if progress is not None and sys.stderr.isatty():
            sys.stderr.write("\n")
    return DemoReport(
        freeze_s=settings.freeze_s,
        family=settings.ip_version,
        runs=runs,
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        machine=machine_facts(),
    )


async def _until_sigterm(
    main: Callable[[], Awaitable[DemoReport]],
) -> DemoReport | None:
    """Run ``main``; on SIGTERM cancel it so every cleanup path runs.

    SIGINT needs no handler: trio raises KeyboardInterrupt, which unwinds
    through the same cleanup.
    """
    result: list[DemoReport] = []
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


def demo_main(
    settings: DemoConfig, *, json_path: Path | None, keep_dir: Path | None
) -> int:
    """Run the demo in a fresh lab and print the comparison; return exit status."""
    if os.geteuid() != 0:
        print("shieldproxy demo needs root: it creates network namespaces",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="shieldproxy-demo-") as tmp:
            work_dir = keep_dir if keep_dir is not None else Path(tmp)
            work_dir.mkdir(parents=True, exist_ok=True)
            report = _demo_in_lab(settings, work_dir)
    except BaseException as exc:
        if not _is_interrupt(exc):
            raise
        print("\ninterrupted by SIGINT; the lab and its rules were removed",
              file=sys.stderr)  # fmt: skip
        return 130
    if report is None:
        print("\ninterrupted by SIGTERM; the lab and its rules were removed",
              file=sys.stderr)  # fmt: skip
        return 143
    print()
    print(format_table(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"\nresults written to {json_path}")
    shielded = report.runs[0]
    if shielded.error:
        print(f"\nshielded run failed: {shielded.error}", file=sys.stderr)
    return 0 if shielded.integrity_ok else 1


def _demo_in_lab(settings: DemoConfig, work_dir: Path) -> DemoReport | None:
    """Run the demo in a new lab, removed afterwards; None after SIGTERM."""
    from .lab.topology import lab as lab_context

    with lab_context() as lab:
        v4 = settings.ip_version == 4
        print(
            f"lab {lab.lab_id}: peer {lab.peer_v4 if v4 else lab.peer_v6}"
            f" -> gateway -> container {lab.ctr_v4 if v4 else lab.ctr_v6},"
            f" freeze {settings.freeze_s:g} s",
            flush=True,
        )
        report: DemoReport | None = trio.run(
            _until_sigterm,
            lambda: run_demo(
                lab, settings, work_dir, progress=print_progress(sys.stderr)
            ),
        )
    return report


def _is_interrupt(exc: BaseException) -> bool:
    """Return True for Ctrl-C, also when trio wrapped it in an exception group."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(KeyboardInterrupt)
        return rest is None
    return False
