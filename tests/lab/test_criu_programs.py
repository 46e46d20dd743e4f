"""Real programs checkpointed by CRIU for 30 s while their peers keep sending.

Each program runs twice in one lab: once with CRIU's action script driving the
shield daemon at the gateway, once with CRIU's own network lock only. The
shielded run must keep every byte and leave the peer with no RTO timeout; the
numbers of both runs are printed side by side.
"""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shieldproxy.kernel.netns import netns_command
from shieldproxy.lab.topology import lab
from shieldproxy.pcapcheck import check_capture

from .criu_support import (
    Capture,
    CriuTree,
    counters_delta,
    criu_failure,
    peer_counters,
    resume_gap,
    wait_listening,
)
from .daemon_support import RunningDaemon

pytestmark = pytest.mark.lab

FREEZE_S = 30.0
WARMUP_S = 3.0
AFTER_S = 8.0
"""Seconds the peer goes on sending after the restore."""
SEND_S = WARMUP_S + FREEZE_S + AFTER_S
HERE = Path(__file__).parent


def run_checkpoint(
    created, daemon, work, program, shielded, freeze_s=FREEZE_S, placement="inside"
):
    """Dump PROGRAM's server with CRIU, wait FREEZE_S, restore it in place.

    Returns (the program's own result, the peer's view).
    """
    work.mkdir(parents=True)
    capture = Capture(created, work / "peer.pcap", program.port)
    argv = program.server_argv(created, work)
    tree = CriuTree(created, work, argv, placement=placement)
    client = None
    try:
        program.wait_listening(created)
        client = program.start_client(created, work)
        time.sleep(WARMUP_S)
        before = peer_counters(created)
        hook_socket = daemon.socket if shielded else None
        images = work / "images"
        dumped = tree.dump(images, hook_socket)
        assert dumped.returncode == 0, criu_failure(images / "dump.log", dumped)
        frozen_at = time.monotonic()
        time.sleep(max(0.0, frozen_at + freeze_s - time.monotonic()))
        restored = tree.restore(images, hook_socket)
        restored_at = time.time()
        assert restored.returncode == 0, criu_failure(images / "restore.log", restored)
        result = program.finish(created, client, tree, work)
        after = peer_counters(created)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        tree.kill()
        capture.stop()
    delta = counters_delta(before, after)
    report = check_capture(work / "peer.pcap", only_from=("198.18.2.2", program.port))
    view = {
        "mode": "shielded" if shielded else "criu lock",
        "rto_timeouts": delta["TcpExtTCPTimeouts"],
        "retransmits": delta["TcpRetransSegs"],
        "resume_gap_s": resume_gap(
            work / "peer.pcap", ("198.18.2.2", program.port), restored_at
        ),
        "edge_retraction": sum(d.max_right_edge_retraction for d in report.directions),
        "tsval_regressions": sum(d.tsval_regressions for d in report.directions),
    }
    print(json.dumps({"program": program.name, **view, **result}))
    return result, view


def _peer(created, argv, stdout):
    return subprocess.Popen(
        netns_command(created.peer_ns, argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
    )


class Iperf3:
    def __init__(self, send_s=SEND_S):
        self.send_s = send_s

    name = "iperf3"
    port = 5201

    def server_argv(self, created, work):
        return ["iperf3", "-s", "-1", "-B", created.ctr_v4, "-p", str(self.port)]

    def wait_listening(self, created):
        wait_listening(created, self.port)

    def start_client(self, created, work):
        self.output = work / "iperf3-client.json"
        argv = ["iperf3", "-c", created.ctr_v4, "-p", str(self.port)]
        argv += ["-t", str(int(self.send_s)), "-i", "0.5", "-b", "100M", "--json"]
        return _peer(created, argv, self.output.open("wb"))

    def finish(self, created, client, tree, work):
        client.wait(timeout=self.send_s + 180)
        report = json.loads(self.output.read_text())
        stall = 0.0
        longest = 0.0
        for interval in report.get("intervals", []):
            total = interval["sum"]
            if total["bytes"] == 0:
                stall += total["seconds"]
                longest = max(longest, stall)
            else:
                stall = 0.0
        return {
            "exit_status": client.returncode,
            "error": report.get("error"),
            "longest_stall_s": round(longest, 2),
        }


class Redis:
    def __init__(self, send_s=SEND_S):
        self.send_s = send_s

    name = "redis"
    port = 6379
    rate = 500

    def server_argv(self, created, work):
        return [
            "redis-server", "--bind", created.ctr_v4, "--port", str(self.port),
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--daemonize", "no", "--dir", str(work),
        ]  # fmt: skip

    def wait_listening(self, created):
        wait_listening(created, self.port)

    def start_client(self, created, work):
        self.output = work / "redis-writer.json"
        argv = [sys.executable, str(HERE / "redis_writer.py")]
        argv += ["--addr", created.ctr_v4, "--port", str(self.port)]
        argv += ["--seconds", str(self.send_s), "--rate", str(self.rate)]
        return _peer(created, argv, self.output.open("wb"))

    def finish(self, created, client, tree, work):
        client.wait(timeout=self.send_s + 240)
        return json.loads(self.output.read_text().strip().splitlines()[-1])


class Socat:
    def __init__(self, send_s=SEND_S, rate=512 * 1024):
        self.send_s = send_s
        self.rate = rate

    name = "socat"
    port = 7000

    def server_argv(self, created, work):
        self.received = work / "received.bin"
        return [
            "socat", "-u", f"TCP4-LISTEN:{self.port},bind={created.ctr_v4},reuseaddr",
            f"CREATE:{self.received}",
        ]  # fmt: skip

    def wait_listening(self, created):
        wait_listening(created, self.port)

    def start_client(self, created, work):
        self.digest = work / "sent.json"
        writer = (
            f"{sys.executable} {HERE / 'pattern_writer.py'} --seconds {self.send_s} "
            f"--rate {self.rate} --digest {self.digest}"
        )
        pipeline = f"{writer} | socat -u STDIN TCP4:{created.ctr_v4}:{self.port}"
        return _peer(created, ["sh", "-c", pipeline], subprocess.DEVNULL)

    def finish(self, created, client, tree, work):
        client.wait(timeout=self.send_s + 240)
        # socat exits once it has written everything after the peer's EOF
        assert tree.wait_exit(60), "socat did not exit after the peer's EOF"
        sent = json.loads(self.digest.read_text())
        data = self.received.read_bytes()
        return {
            "exit_status": client.returncode,
            "sent_bytes": sent["bytes"],
            "received_bytes": len(data),
            "checksum_matches": hashlib.sha256(data).hexdigest() == sent["sha256"],
        }


def both_runs(tmp_path, program):
    scope = {
        "name": "app",
        "addresses": ["198.18.2.2"],
        "ports": [program.port],
    }
    (tmp_path / "daemon").mkdir()
    with lab() as created:
        daemon = RunningDaemon(created, tmp_path / "daemon", scopes=[scope])
        try:
            shielded = run_checkpoint(
                created, daemon, tmp_path / "shielded", program, shielded=True
            )
            status = json.loads(daemon.cli("status").stdout)
            baseline = run_checkpoint(
                created, daemon, tmp_path / "baseline", program, shielded=False
            )
        finally:
            daemon.stop()
    assert status["scopes"]["app"]["state"] == "idle"
    return shielded, baseline


def check_shield_difference(shielded_view, baseline_view):
    # CRIU's lock leaves the peer to back off its RTO, about 7 times in 30 s
    assert baseline_view["rto_timeouts"] >= 5
    # NOTE: from pre-dump until CRIU has written a socket's image (about
    # 0.15 s for these small trees) the shield holds the peer's packets
    # without answering. On a loaded machine that can pass the peer's 200 ms
    # minimum RTO, hence one timeout is tolerated.
    assert shielded_view["rto_timeouts"] <= 1
    assert shielded_view["resume_gap_s"] is not None
    # the capture checker's invariants hold on the wire
    assert shielded_view["edge_retraction"] == 0
    assert shielded_view["tsval_regressions"] == 0


def test_iperf3_server_checkpointed(tmp_path):
    (result, view), (base_result, base_view) = both_runs(tmp_path, Iperf3())
    assert result["exit_status"] == 0
    assert result["error"] is None
    assert result["longest_stall_s"] <= FREEZE_S + 1.0
    check_shield_difference(view, base_view)


def test_redis_server_checkpointed(tmp_path):
    (result, view), (base_result, base_view) = both_runs(tmp_path, Redis())
    assert result["errors"] == []
    assert result["replies"] == 2 * result["written"]
    assert result["list_in_order"] is True
    assert result["keys_present"] is True
    check_shield_difference(view, base_view)


def test_socat_stream_checkpointed(tmp_path):
    program = Socat()
    (result, view), (base_result, base_view) = both_runs(tmp_path, program)
    assert result["exit_status"] == 0
    assert result["received_bytes"] == result["sent_bytes"]
    assert result["checksum_matches"] is True
    assert base_result["checksum_matches"] is True
    check_shield_difference(view, base_view)


def test_socat_with_external_namespace(tmp_path):
    """CRIU in the root namespace, the container's namespace external to it."""
    program = Socat(send_s=WARMUP_S + 10.0 + AFTER_S)
    scope = {"name": "app", "addresses": ["198.18.2.2"], "ports": [program.port]}
    (tmp_path / "daemon").mkdir()
    with lab() as created:
        daemon = RunningDaemon(created, tmp_path / "daemon", scopes=[scope])
        try:
            result, view = run_checkpoint(
                created,
                daemon,
                tmp_path / "shielded",
                program,
                shielded=True,
                freeze_s=10.0,
                placement="external",
            )
        finally:
            daemon.stop()
    assert result["checksum_matches"] is True
    assert result["received_bytes"] == result["sent_bytes"]
    assert view["rto_timeouts"] <= 1
    assert view["edge_retraction"] == 0
    assert view["tsval_regressions"] == 0
    dump_log = (tmp_path / "shielded" / "images" / "dump.log").read_text()
    assert "network-lock: froze scopes app" in dump_log


def test_peer_closes_during_freeze(tmp_path):
    """The peer sends its last byte and its FIN while the server is frozen."""
    freeze_s = 10.0
    # 16 KiB/s for 3 s fits the receive window (about 100 KiB here), so the
    # shield takes the FIN during the freeze
    program = Socat(send_s=WARMUP_S + 3.0, rate=16 * 1024)
    scope = {"name": "app", "addresses": ["198.18.2.2"], "ports": [program.port]}
    (tmp_path / "daemon").mkdir()
    with lab() as created:
        daemon = RunningDaemon(created, tmp_path / "daemon", scopes=[scope])
        try:
            result, view = run_checkpoint(
                created,
                daemon,
                tmp_path / "shielded",
                program,
                shielded=True,
                freeze_s=freeze_s,
            )
        finally:
            daemon.stop()
    # socat exits only after reading EOF, so the FIN reached the restored socket
    assert result["checksum_matches"] is True
    assert result["received_bytes"] == result["sent_bytes"]
    log_text = (tmp_path / "daemon" / "daemon.log").read_text()
    assert "the peer's FIN" in log_text
