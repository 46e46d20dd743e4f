"""End-to-end checkpoints of a streaming connection, with real Linux TCP peers."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from shieldproxy.demo import ScenarioConfig, run_scenario
from shieldproxy.kernel.netns import enter_netns
from shieldproxy.kernel.nfqueue import QueueBinding
from shieldproxy.kernel.rules import save
from shieldproxy.lab.topology import lab

pytestmark = pytest.mark.lab

FREEZE_S = 5.0
MIN_ABSORBED_BYTES = 1_000_000


def lab_processes(lab_id):
    """Pids of processes the demo started for a lab, found by their label."""
    label = f"SHIELDPROXY_LAB={lab_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if label in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def leftovers(lab_id):
    """Namespaces, root-namespace links and processes of a lab that still exist."""
    namespaces = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return (
        [line for line in namespaces.splitlines() if lab_id in line]
        + [line for line in links.splitlines() if f"sp{lab_id}" in line]
        + [f"process {pid}" for pid in lab_processes(lab_id)]
    )


@pytest.fixture
def checked_lab():
    with lab() as created:
        yield created
    assert leftovers(created.lab_id) == []


def run(created, tmp_path, **config):
    return trio.run(run_scenario, created, ScenarioConfig(**config), Path(tmp_path))


def assert_no_shield_rules(created):
    for family in (4, 6):
        assert "SP-" not in save(created.gw_ns, family)


def check_shielded_run(result):
    """Check the invariants every shielded run must keep, whatever the timing."""
    assert result.error is None
    assert result.integrity == "ok"
    assert result.integrity_ok
    assert result.bytes_received == result.bytes_sent
    assert result.bytes_absorbed >= MIN_ABSORBED_BYTES
    assert result.bytes_handed_over == result.bytes_absorbed
    assert result.peer_counters["TcpExtTCPAbortOnTimeout"] == 0
    assert result.peer_counters["TcpExtPAWSEstab"] == 0
    assert result.max_right_edge_retraction == 0
    assert result.tsval_regressions == 0
    # The container's Linux kernel itself sends an ACK a segment out of order
    # now and then while streaming (8 in one 5 s run here, long after the
    # release, two ACKs 9 us apart), so ACK regressions on the wire are only
    # counted. The shield's own ACKs never go back: the flow tests check that.
    assert result.ack_regressions is not None
    assert result.resume_gap_s is not None
    assert result.wire_resume_gap_s is not None


@pytest.mark.parametrize("family", [4, 6])
def test_shielded_freeze_loses_nothing(checked_lab, tmp_path, family):
    result = run(checked_lab, tmp_path, shielded=True, freeze_s=FREEZE_S, family=family)
    check_shielded_run(result)
    assert result.peer_rto_timeouts == 0
    assert result.container_counters["TcpExtTCPRcvQDrop"] == 0
    assert_no_shield_rules(checked_lab)


def test_unshielded_freeze_shows_retransmissions(checked_lab, tmp_path):
    result = run(checked_lab, tmp_path, shielded=False, freeze_s=FREEZE_S)
    assert result.error is None
    # CRIU-style drop lock: the stream survives, but only after the peer's
    # retransmission timer backed off
    assert result.integrity == "ok"
    assert result.peer_rto_timeouts > 0
    assert result.peer_retransmits > 0
    assert result.resume_gap_s is not None
    assert result.resume_gap_s > 0.2
    # the peer's first new byte waited for its next retransmission timeout
    assert result.wire_resume_gap_s is not None
    assert result.wire_resume_gap_s > 0.2
    assert_no_shield_rules(checked_lab)


def test_failed_engage_leaves_no_rules(checked_lab, tmp_path):
    # Hold the queue number the scenario wants, so binding it fails mid-run.
    with enter_netns(checked_lab.gw_ns):
        blocker = QueueBinding(3, lambda packet: packet.accept())
    try:
        result = run(checked_lab, tmp_path, shielded=True, freeze_s=1.0, queue_num=3)
    finally:
        blocker.close()
    assert result.error is not None
    assert "NFQUEUE 3" in result.error
    assert not result.integrity_ok
    assert_no_shield_rules(checked_lab)
    assert lab_processes(checked_lab.lab_id) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_demo_interrupted_leaves_nothing(signum):
    demo = subprocess.Popen(
        [sys.executable, "-m", "shieldproxy", "demo", "--freeze", "30",
         "--no-baseline"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        first_line = demo.stdout.readline()
        assert first_line.startswith("lab "), first_line
        lab_id = first_line.split()[1].rstrip(":")
        # let it reach the freeze, with the shield's rules installed
        time.sleep(6)
        assert demo.poll() is None
        demo.send_signal(signum)
        demo.wait(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    # 128 + the signal's number, as a shell reports a process it ended
    assert demo.returncode == 128 + signum
    stderr = demo.stderr.read()
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    assert "Traceback" not in stderr
    assert leftovers(lab_id) == []
