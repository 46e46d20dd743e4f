"""The daemon killed mid-freeze: its journal keeps every acknowledged byte."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import trio
from scapy.layers.inet import TCP
from scapy.utils import rdpcap

from shieldproxy.demo import ScenarioConfig, read_counters, run_scenario
from shieldproxy.kernel.netns import run_in_netns
from shieldproxy.kernel.repair import load_dump
from shieldproxy.kernel.rules import save
from shieldproxy.lab.topology import lab
from shieldproxy.tcp.seq import seq_diff

from .daemon_support import FROZEN_PORT, RunningDaemon, shield_chains

pytestmark = pytest.mark.lab

# How long the daemon stays dead before the restart begins. The peer's minimum
# RTO is 200 ms, so it retransmits meanwhile into rules that no process reads.
DEAD_S = 0.5
# Long enough that the peer, backed off while the daemon was dead, retransmits
# to the restarted daemon before the thaw. With Linux's minimum RTO of 200 ms
# it retransmits about 0.2, 0.6, 1.4, 3.0 and 6.2 s after its last ACK.
FREEZE_S = 12.0
PEER_RESET_COUNTERS = ("TcpEstabResets", "TcpExtTCPAbortOnData", "TcpRetransSegs")
CONTAINER_COUNTERS = ("TcpInSegs", "TcpOutRsts")
RST = 0x04
ACK = 0x10


@pytest.fixture
def daemon_lab(tmp_path):
    with lab(second_container=True) as created:
        daemon = RunningDaemon(created, tmp_path)
        try:
            yield created, daemon
        finally:
            daemon.stop()
            # a test that failed halfway may leave a scope frozen
            subprocess.run(
                [sys.executable, "-m", "shieldproxy", "release", "--force",
                 "--config", str(daemon.config)],
                capture_output=True,
                timeout=30,
            )  # fmt: skip


def queued_packets(created):
    """Return the packet count of the frozen scope's NFQUEUE rules in the gateway."""
    text = run_in_netns(created.gw_ns, ["iptables-save", "-c", "-t", "filter"]).stdout
    total = 0
    for line in text.splitlines():
        match = re.match(r"\[(\d+):\d+\] -A SP-d-frozen .*-j NFQUEUE", line)
        if match:
            total += int(match.group(1))
    return total


def scope_status(daemon):
    completed = daemon.cli("status")
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)["scopes"]["frozen"]


def capture_packets(run_dir):
    """Return (time, flags, ack) of each container segment the peer captured."""
    return [
        (float(packet.time), int(packet[TCP].flags), packet[TCP].ack)
        for packet in rdpcap(str(run_dir / "peer.pcap"))
        if TCP in packet
    ]


@pytest.mark.parametrize(
    ("rate", "rcvbuf", "window_full"),
    [
        # the window is still open at the kill: both processes absorb bytes
        (1024 * 1024, 8 * 1024 * 1024, False),
        # the peer filled the window before the kill
        (4 * 1024 * 1024, 2 * 1024 * 1024, True),
    ],
    ids=["window-open", "window-full"],
)
def test_kill_during_freeze_loses_nothing(
    daemon_lab, tmp_path, rate, rcvbuf, window_full
):
    created, daemon = daemon_lab
    gap = {}

    def kill_and_restart():
        gap["absorbed_before_kill"] = scope_status(daemon)["bytes_absorbed"]
        peer_before = read_counters(created.peer_ns, PEER_RESET_COUNTERS)
        container_before = read_counters(created.ctr_ns, CONTAINER_COUNTERS)
        queued_before = queued_packets(created)
        gap["killed_at"] = time.time()
        gap["returncode"] = daemon.stop(signal.SIGKILL)
        gap["queue_rules_kept"] = "NFQUEUE" in save(created.gw_ns, 4)
        time.sleep(DEAD_S)
        gap["queued_while_dead"] = queued_packets(created) - queued_before
        container_after = read_counters(created.ctr_ns, CONTAINER_COUNTERS)
        gap["container_segments_while_dead"] = (
            container_after["TcpInSegs"] - container_before["TcpInSegs"]
        )
        peer_after = read_counters(created.peer_ns, PEER_RESET_COUNTERS)
        gap["peer_retransmits_while_dead"] = (
            peer_after["TcpRetransSegs"] - peer_before["TcpRetransSegs"]
        )
        daemon.start()
        gap["recovered"] = scope_status(daemon)["bytes_recovered"]

    async def kill_in_thread():
        await trio.to_thread.run_sync(kill_and_restart)

    peer_before = read_counters(created.peer_ns, PEER_RESET_COUNTERS)
    container_before = read_counters(created.ctr_ns, CONTAINER_COUNTERS)
    config = ScenarioConfig(
        shielded=True,
        freeze_s=FREEZE_S,
        rate_bytes_per_s=rate,
        port=FROZEN_PORT,
        receiver_rcvbuf_bytes=rcvbuf,
        daemon_socket=daemon.socket,
        daemon_scope="frozen",
        mid_freeze=kill_in_thread,
    )
    result = trio.run(run_scenario, created, config, tmp_path / "run")
    run_dir = tmp_path / "run" / "shielded-ipv4"
    peer_after = read_counters(created.peer_ns, PEER_RESET_COUNTERS)
    container_after = read_counters(created.ctr_ns, CONTAINER_COUNTERS)

    assert gap["returncode"] == -signal.SIGKILL
    assert result.error is None
    assert result.integrity == "ok"
    assert result.bytes_received == result.bytes_sent

    # every byte the first process acknowledged came back from its journal
    rcv_nxt = load_dump(run_dir / "socket.json").rcv_nxt
    acked_before_kill = max(
        seq_diff(ack, rcv_nxt)
        for at, flags, ack in capture_packets(run_dir)
        if at < gap["killed_at"] and flags & ACK
    )
    assert acked_before_kill > 0
    assert gap["recovered"] >= acked_before_kill
    assert gap["absorbed_before_kill"] > 0
    assert result.bytes_handed_over == gap["recovered"] + result.bytes_absorbed
    if not window_full:
        assert result.bytes_absorbed > 0

    # while no process read the queue, the rules dropped the peer's packets
    assert gap["queue_rules_kept"]
    assert gap["container_segments_while_dead"] == 0
    if not window_full:
        # a peer facing a full window sends only backed-off window probes,
        # maybe none while the daemon is dead
        assert gap["queued_while_dead"] > 0
        assert gap["peer_retransmits_while_dead"] > 0

    # and no end ever reset the connection
    resets = [flags for _, flags, _ in capture_packets(run_dir) if flags & RST]
    assert resets == []
    assert container_after["TcpOutRsts"] == container_before["TcpOutRsts"]
    assert peer_after["TcpEstabResets"] == peer_before["TcpEstabResets"]
    assert peer_after["TcpExtTCPAbortOnData"] == peer_before["TcpExtTCPAbortOnData"]
    assert result.peer_counters["TcpExtTCPAbortOnTimeout"] == 0
    assert result.max_right_edge_retraction == 0

    log_text = daemon.log_path.read_text()
    assert "resumed frozen scope frozen with 1 flows" in log_text
    assert "from its journal" in log_text
    assert not (tmp_path / "state" / "frozen").exists()
    assert shield_chains(created) == []


def test_memory_mode_restart_keeps_saved_flows(daemon_lab, tmp_path):
    created, daemon = daemon_lab
    daemon.stop()
    config = json.loads(daemon.config.read_text())
    config["durability"] = "memory"
    daemon.config.write_text(json.dumps(config))
    daemon.start()
    journal_seen = []

    def restart():
        assert daemon.stop() == 0
        journal_seen.append((tmp_path / "state" / "frozen" / "journal").exists())
        daemon.start()

    async def restart_in_thread():
        await trio.to_thread.run_sync(restart)

    config = ScenarioConfig(
        shielded=True,
        freeze_s=6.0,
        port=FROZEN_PORT,
        receiver_rcvbuf_bytes=2 * 1024 * 1024,
        daemon_socket=daemon.socket,
        daemon_scope="frozen",
        mid_freeze=restart_in_thread,
    )
    result = trio.run(run_scenario, created, config, tmp_path / "run")
    assert journal_seen == [False]
    assert result.error is None
    assert result.integrity == "ok"
    assert result.bytes_received == result.bytes_sent
    assert result.bytes_handed_over > result.bytes_absorbed
    assert result.max_right_edge_retraction == 0
    assert "from saved files" in daemon.log_path.read_text()
    assert not (tmp_path / "state" / "frozen").exists()
    assert shield_chains(created) == []


def test_kill_after_thaw_resumes_handed_over(daemon_lab, tmp_path):
    created, daemon = daemon_lab
    assert daemon.cli("freeze", "--scope", "frozen").returncode == 0
    completed = daemon.cli("thaw", "--scope", "frozen", "--out", str(tmp_path / "h"))
    assert completed.returncode == 0, completed.stderr
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    # the rules still queue, and with no reader the queue drops
    assert "NFQUEUE" in save(created.gw_ns, 4)
    daemon.start()
    status = scope_status(daemon)
    assert status["state"] == "handed-over"
    assert "NFQUEUE" in save(created.gw_ns, 4)
    completed = daemon.cli("announce", "--scope", "frozen")
    assert completed.returncode == 0, completed.stderr
    completed = daemon.cli("release", "--scope", "frozen")
    assert completed.returncode == 0, completed.stderr
    assert shield_chains(created) == []
    assert not (tmp_path / "state" / "frozen").exists()
