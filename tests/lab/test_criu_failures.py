"""CRIU with the shield's action script when something goes wrong."""

import hashlib
import json
import time

import pytest

from shieldproxy.lab.topology import lab

from .criu_support import CriuTree
from .daemon_support import RunningDaemon
from .test_criu_programs import Socat

pytestmark = pytest.mark.lab

SEND_S = 12.0


@pytest.fixture
def running(tmp_path):
    """A lab with the daemon at the gateway and a socat stream into the container."""
    program = Socat(send_s=SEND_S)
    scope = {"name": "app", "addresses": ["198.18.2.2"], "ports": [program.port]}
    (tmp_path / "daemon").mkdir()
    with lab() as created:
        daemon = RunningDaemon(created, tmp_path / "daemon", scopes=[scope])
        work = tmp_path / "run"
        work.mkdir()
        tree = CriuTree(created, work, program.server_argv(created, work))
        client = None
        try:
            program.wait_listening(created)
            client = program.start_client(created, work)
            time.sleep(1.0)
            yield created, daemon, tree, program, client, work
        finally:
            if client is not None and client.poll() is None:
                client.kill()
                client.wait()
            tree.kill()
            daemon.stop()


def test_hook_without_daemon_aborts_dump(running):
    created, daemon, tree, program, client, work = running
    daemon.stop()
    dumped = tree.dump(work / "images", hook_socket=daemon.socket)
    assert dumped.returncode != 0
    log_text = (work / "images" / "dump.log").read_text()
    assert "stage pre-dump" in log_text
    assert f"no shieldproxy daemon is listening on {daemon.socket}" in log_text
    # CRIU gives up before freezing, so the program goes on serving
    assert tree.alive()
    client.wait(timeout=SEND_S + 30)
    assert tree.wait_exit(30)
    sent = json.loads(program.digest.read_text())
    data = program.received.read_bytes()
    assert hashlib.sha256(data).hexdigest() == sent["sha256"]


def test_corrupt_image_fails_then_retry_succeeds(running):
    created, daemon, tree, program, client, work = running
    images = work / "images"
    dumped = tree.dump(images, hook_socket=daemon.socket)
    assert dumped.returncode == 0, dumped.stderr
    (stream,) = images.glob("tcp-stream-*.img")
    pristine = stream.read_bytes()
    stream.write_bytes(pristine[: len(pristine) // 2])
    time.sleep(2.0)

    failed = tree.restore(images, hook_socket=daemon.socket)
    assert failed.returncode != 0
    log_text = (images / "restore.log").read_text()
    assert "stage pre-restore failed" in log_text
    assert str(stream) in log_text
    assert "truncated" in log_text
    assert "the restore can be tried again" in log_text
    # the shield still answers and keeps what it absorbed, and the hand-over
    # files are kept
    status = json.loads(daemon.cli("status").stdout)
    assert status["scopes"]["app"]["state"] == "frozen"
    handover = images / "shieldproxy" / "handover-app"
    assert (handover / "complete.json").exists()

    stream.write_bytes(pristine)
    restored = tree.restore(images, hook_socket=daemon.socket)
    assert restored.returncode == 0, restored.stderr
    client.wait(timeout=SEND_S + 60)
    assert tree.wait_exit(30)
    sent = json.loads(program.digest.read_text())
    data = program.received.read_bytes()
    assert len(data) == sent["bytes"]
    assert hashlib.sha256(data).hexdigest() == sent["sha256"]
    status = json.loads(daemon.cli("status").stdout)
    assert status["scopes"]["app"]["state"] == "idle"


def test_missing_stream_image_named(running):
    created, daemon, tree, program, client, work = running
    images = work / "images"
    dumped = tree.dump(images, hook_socket=daemon.socket)
    assert dumped.returncode == 0, dumped.stderr
    (stream,) = images.glob("tcp-stream-*.img")
    moved = stream.with_name("moved-away")
    stream.rename(moved)
    failed = tree.restore(images, hook_socket=daemon.socket)
    assert failed.returncode != 0
    log_text = (images / "restore.log").read_text()
    assert str(stream) in log_text
    assert "stage pre-restore failed" in log_text
    moved.rename(stream)
    restored = tree.restore(images, hook_socket=daemon.socket)
    assert restored.returncode == 0, restored.stderr
    client.wait(timeout=SEND_S + 60)
    assert tree.wait_exit(30)
    sent = json.loads(program.digest.read_text())
    assert hashlib.sha256(program.received.read_bytes()).hexdigest() == sent["sha256"]
