"""A shield daemon run as a subprocess in a lab, for the lab tests."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from shieldproxy.control import ControlError, call
from shieldproxy.kernel.rules import save

FROZEN_PORT = 5001
RUNNING_PORT = 5002


def free_loopback_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def running_address(created, mode):
    """Return the running scope's address: the second container behind a gateway."""
    if mode == "gateway" and created.ctr2_v4 is not None:
        return created.ctr2_v4
    return created.ctr_v4


def default_scopes(created, mode):
    """Return a "frozen" scope on the container and a "running" one beside it."""
    running = running_address(created, mode)
    return [
        {"name": "frozen", "addresses": [created.ctr_v4], "ports": [FROZEN_PORT]},
        {"name": "running", "addresses": [running], "ports": [RUNNING_PORT]},
    ]


def write_config(path, created, socket_path, state_dir, metrics_port, mode, scopes):
    config = {
        "mode": mode,
        "netns": created.gw_ns if mode == "gateway" else created.ctr_ns,
        "scopes": scopes or default_scopes(created, mode),
        "queues": {"first": 4, "last": 4},
        "control": {"socket_path": str(socket_path)},
        "state_dir": str(state_dir),
        "logging": {"level": "INFO"},
        "metrics": {"address": f"127.0.0.1:{metrics_port}"},
    }
    path.write_text(json.dumps(config))  # JSON is valid YAML


def shield_chains(created):
    return [
        line
        for family in (4, 6)
        for line in save(created.gw_ns, family).splitlines()
        if line.startswith(":SP-")
    ]


class RunningDaemon:
    def __init__(self, created, tmp_path, mode="gateway", scopes=None):
        self.socket = tmp_path / "control.sock"
        self.config = tmp_path / "shield.yaml"
        self.metrics_port = free_loopback_port()
        write_config(
            self.config,
            created,
            self.socket,
            tmp_path / "state",
            self.metrics_port,
            mode,
            scopes,
        )
        self.log_path = tmp_path / "daemon.log"
        self.start()

    def start(self):
        self.log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shieldproxy", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                call(self.socket, {"command": "status"})
                return
            except ControlError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(
                        "daemon did not start: " + self.log_path.read_text()[-2000:]
                    ) from None
                time.sleep(0.1)

    def scrape(self):
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def cli(self, *args):
        return subprocess.run(
            [sys.executable, "-m", "shieldproxy", *args, "--socket", str(self.socket)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def stop(self, signum=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode
