"""The daemon in a lab: control commands drive freeze, thaw and release."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from shieldproxy.demo import ScenarioConfig, run_scenario
from shieldproxy.kernel.netns import netns_command
from shieldproxy.kernel.rules import save
from shieldproxy.lab.topology import lab

from .daemon_support import FROZEN_PORT, RUNNING_PORT, RunningDaemon, shield_chains

pytestmark = pytest.mark.lab


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


def test_status_lists_idle_scopes(daemon_lab):
    created, daemon = daemon_lab
    completed = daemon.cli("status")
    assert completed.returncode == 0, completed.stderr
    status = json.loads(completed.stdout)
    assert status["mode"] == "gateway"
    assert status["scopes"]["frozen"]["state"] == "idle"
    assert status["scopes"]["running"]["flows"] == 0
    assert shield_chains(created) == []


def test_unknown_scope_rejected(daemon_lab):
    _, daemon = daemon_lab
    completed = daemon.cli("freeze", "--scope", "nope")
    assert completed.returncode == 1
    assert "scope 'nope' not found; configured: frozen, running" in completed.stderr


def start_plain_stream(created, netns, address, port, seconds):
    """Stream the offset pattern to ADDRESS in NETNS, with no checkpoint at all."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        netns_command(
            netns,
            [sys.executable, "-m", "shieldproxy.lab.stream_server", "listen",
             "--addr", address, "--port", str(port)],
        ),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert json.loads(server.stdout.readline())["event"] == "listening"
    rate = 1024 * 1024
    client = subprocess.Popen(
        netns_command(
            created.peer_ns,
            [sys.executable, "-m", "shieldproxy.lab.stream_client",
             "--addr", address, "--port", str(port), "--rate", str(rate),
             "--total", str(rate * seconds), "--duration", str(seconds)],
        ),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    return server, client


def finish_plain_stream(server, client):
    """Return (bytes sent, last server event) once both ends are done."""
    client_out, _ = client.communicate(timeout=60)
    server_out, _ = server.communicate(timeout=30)
    sent = json.loads(client_out.strip().splitlines()[-1])["sent"]
    return sent, json.loads(server_out.strip().splitlines()[-1])


def test_gateway_shields_one_container_of_two(daemon_lab, tmp_path):
    created, daemon = daemon_lab
    # The second container's stream runs normally for the whole test: the
    # daemon must neither queue any of its packets nor send any in its place.
    server, client = start_plain_stream(
        created, created.ctr2_ns, created.ctr2_v4, RUNNING_PORT, seconds=10
    )
    rules_during = []

    async def record_rules():
        rules_during.append(save(created.gw_ns, 4))

    try:
        config = ScenarioConfig(
            shielded=True,
            freeze_s=4.0,
            port=FROZEN_PORT,
            receiver_rcvbuf_bytes=2 * 1024 * 1024,
            daemon_socket=daemon.socket,
            daemon_scope="frozen",
            mid_freeze=record_rules,
        )
        shielded = trio.run(run_scenario, created, config, tmp_path / "shielded")
        sent, last_event = finish_plain_stream(server, client)
    finally:
        for process in (client, server):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert shielded.error is None
    assert shielded.integrity == "ok"
    assert shielded.bytes_received == shielded.bytes_sent
    assert shielded.bytes_absorbed > 0
    assert shielded.bytes_handed_over == shielded.bytes_absorbed
    assert shielded.max_right_edge_retraction == 0
    # while the first container was frozen, no rule matched the second one
    assert len(rules_during) == 1
    assert created.ctr_v4 in rules_during[0]
    assert created.ctr2_v4 not in rules_during[0]
    assert last_event["event"] == "eof"
    assert last_event["received"] == sent
    assert sent > 0
    metrics = daemon.scrape()
    absorbed = metrics["shieldproxy_absorbed_bytes_total{scope=frozen}"]
    assert absorbed == shielded.bytes_absorbed
    handed_over = metrics["shieldproxy_handed_over_bytes_total{scope=frozen}"]
    assert handed_over == shielded.bytes_handed_over
    assert metrics["shieldproxy_freeze_duration_seconds_count{scope=frozen}"] == 1
    assert metrics["shieldproxy_scope_frozen{scope=frozen}"] == 0
    assert metrics["shieldproxy_absorbed_bytes_total{scope=running}"] == 0
    status = json.loads(daemon.cli("status").stdout)
    assert status["scopes"]["frozen"]["state"] == "idle"
    assert status["scopes"]["running"]["state"] == "idle"
    assert status["scopes"]["running"]["flows"] == 0
    assert shield_chains(created) == []


def test_sigterm_idle_removes_rules(daemon_lab):
    created, daemon = daemon_lab
    assert daemon.cli("freeze", "--scope", "frozen").returncode == 0
    assert len(shield_chains(created)) == 1
    assert daemon.cli("release", "--scope", "frozen", "--force").returncode == 0
    assert shield_chains(created) == []
    assert daemon.stop() == 0
    assert shield_chains(created) == []
    assert not daemon.socket.exists()


def test_sigterm_frozen_leaves_drop_rules(daemon_lab):
    created, daemon = daemon_lab
    assert daemon.cli("freeze", "--scope", "frozen").returncode == 0
    assert daemon.stop() == 0
    text = save(created.gw_ns, 4)
    # fail closed: the frozen scope's peers meet DROP, never the container
    assert "NFQUEUE" not in text
    assert f"--dport {FROZEN_PORT}" in text
    assert "-j DROP" in text
    completed = subprocess.run(
        [sys.executable, "-m", "shieldproxy", "release", "--force",
         "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert shield_chains(created) == []


def test_restart_during_freeze_loses_nothing(daemon_lab, tmp_path):
    created, daemon = daemon_lab
    drop_rules_between = []

    def restart():
        assert daemon.stop() == 0
        text = save(created.gw_ns, 4)
        drop_rules_between.append("NFQUEUE" not in text and "-j DROP" in text)
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
    assert drop_rules_between == [True]
    assert result.error is None
    assert result.integrity == "ok"
    assert result.bytes_received == result.bytes_sent
    # the hand-over carries what the first daemon absorbed, too
    assert result.bytes_handed_over >= result.bytes_absorbed
    assert result.bytes_handed_over > 0
    assert result.peer_counters["TcpExtTCPAbortOnTimeout"] == 0
    assert result.max_right_edge_retraction == 0
    assert "resumed frozen scope frozen with 1 flows" in daemon.log_path.read_text()
    assert not (tmp_path / "state" / "frozen").exists()
    assert shield_chains(created) == []


def test_sidecar_shields_in_container_namespace(tmp_path):
    with lab() as created:
        daemon = RunningDaemon(created, tmp_path, mode="sidecar")
        rules_during = []

        async def look_at_rules():
            rules_during.append(save(created.ctr_ns, 4))
            rules_during.append(save(created.gw_ns, 4))

        try:
            config = ScenarioConfig(
                shielded=True,
                freeze_s=4.0,
                port=FROZEN_PORT,
                receiver_rcvbuf_bytes=2 * 1024 * 1024,
                daemon_socket=daemon.socket,
                daemon_scope="frozen",
                mid_freeze=look_at_rules,
            )
            result = trio.run(run_scenario, created, config, tmp_path / "run")
        finally:
            assert daemon.stop() == 0
        assert result.error is None
        assert result.integrity == "ok"
        assert result.bytes_received == result.bytes_sent
        assert result.bytes_absorbed > 0
        assert result.bytes_handed_over == result.bytes_absorbed
        assert result.max_right_edge_retraction == 0
        assert result.peer_rto_timeouts == 0
        # the sidecar's rules live in the container's namespace, none in the gateway
        container_rules, gateway_rules = rules_during
        assert "-A INPUT -j SP-d-frozen" in container_rules
        assert "-A OUTPUT -j SP-d-frozen" in container_rules
        assert "NFQUEUE" in container_rules
        assert "SP-" not in gateway_rules
        for family in (4, 6):
            assert "SP-" not in save(created.ctr_ns, family)


def test_sighup_reload_keeps_frozen_scope(daemon_lab):
    created, daemon = daemon_lab
    assert daemon.cli("freeze", "--scope", "frozen").returncode == 0
    config = json.loads(daemon.config.read_text())
    config["scopes"] = [
        # the frozen scope now names another port: it must keep the old one
        {"name": "frozen", "addresses": [created.ctr_v4], "ports": [6001]},
        {"name": "extra", "addresses": [created.ctr_v6], "ports": [7000]},
    ]
    daemon.config.write_text(json.dumps(config))
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        status = json.loads(daemon.cli("status").stdout)
        if "extra" in status["scopes"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(status["scopes"]) == {"frozen", "extra"}
    assert status["scopes"]["frozen"]["state"] == "frozen"
    assert status["scopes"]["extra"]["state"] == "idle"
    assert f"--dport {FROZEN_PORT}" in save(created.gw_ns, 4)
    log_text = daemon.log_path.read_text()
    assert "reload: removed scope running" in log_text
    assert "its old definition stays until it is released" in log_text
    assert daemon.cli("release", "--force").returncode == 0
    assert shield_chains(created) == []


def test_sighup_bad_config_keeps_running(daemon_lab):
    _, daemon = daemon_lab
    daemon.config.write_text("mode: gateway\nscopes: []\n")
    daemon.process.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert daemon.process.poll() is None
    status = json.loads(daemon.cli("status").stdout)
    assert set(status["scopes"]) == {"frozen", "running"}
    assert "reload failed, keeping the running config" in daemon.log_path.read_text()


def test_cli_drives_freeze_thaw_release(daemon_lab, tmp_path):
    created, daemon = daemon_lab
    assert daemon.cli("freeze", "--scope", "frozen").returncode == 0
    status = json.loads(daemon.cli("status").stdout)
    assert status["scopes"]["frozen"]["state"] == "frozen"
    assert status["scopes"]["frozen"]["frozen_for_s"] >= 0
    completed = daemon.cli("thaw", "--scope", "frozen", "--out", str(tmp_path / "h"))
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == {"scope": "frozen", "handovers": []}
    status = json.loads(daemon.cli("status").stdout)
    assert status["scopes"]["frozen"]["state"] == "handed-over"
    # thawing twice is refused with the scope's state named
    again = daemon.cli("thaw", "--scope", "frozen", "--out", str(tmp_path / "h"))
    assert again.returncode == 1
    assert "is handed-over, not frozen" in again.stderr
    completed = daemon.cli("announce", "--scope", "frozen")
    assert completed.returncode == 0, completed.stderr
    assert "NFQUEUE" in save(created.gw_ns, 4)
    completed = daemon.cli("release", "--scope", "frozen")
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == {"released": ["frozen"]}
    assert shield_chains(created) == []
