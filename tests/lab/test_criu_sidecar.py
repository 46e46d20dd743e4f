"""CRIU with the shield as a sidecar in the container's own network namespace.

The server (socat) and the shield share one namespace, as an application
container and a sidecar share a Kubernetes pod's. CRIU runs in that namespace
with the action script. The first restore fails on a truncated tcp-stream
image, the operator releases the scope, and then the intact images are
restored.

The peer sends in three phases: before the dump, during the freeze, and after
the second restore. After each of the first two it waits until every byte is
acknowledged, so it sends nothing while no socket and no rule is there, which
would get it a reset.
"""

import hashlib
import json
import subprocess
import sys
import time

import pytest

from shieldproxy.kernel.netns import netns_command
from shieldproxy.lab.topology import lab

from .criu_support import CriuTree, wait_listening
from .daemon_support import RunningDaemon

pytestmark = pytest.mark.lab

PORT = 7000
PHASE_BYTES = (256 * 1024, 64 * 1024, 256 * 1024)
"""Bytes the peer sends before the dump, during the freeze, after the restore.

With the default window policy the shield keeps the right edge the container
last advertised, so the middle phase must fit that window: at least about
100 KiB on a connection that has carried the first phase.
"""
PEER_RATE = 256 * 1024
"""Bytes per second."""
WAIT_S = 30.0

PEER_PROGRAM = """
import fcntl, hashlib, json, socket, struct, sys, termios, time
from pathlib import Path

address, port, sizes, rate, folder = sys.argv[1:6]
sizes = [int(size) for size in sizes.split(",")]
rate = int(rate)
folder = Path(folder)
deadline = time.monotonic() + 240
digest = hashlib.sha256()
total = 0


def send(sock, count):
    global total
    start = time.monotonic()
    sent = 0
    while sent < count:
        # each chunk differs, so a lost, repeated or reordered chunk shows
        seed = hashlib.sha256(total.to_bytes(8, "big")).digest()
        chunk = (seed * 512)[: min(16384, count - sent)]
        sock.sendall(chunk)
        digest.update(chunk)
        sent += len(chunk)
        total += len(chunk)
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)


def unacknowledged(sock):
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
    return struct.unpack("i", raw)[0]


def wait(condition, description):
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"peer: timed out waiting for {description}")
        time.sleep(0.05)


sock = socket.create_connection((address, int(port)), timeout=10)
sock.settimeout(None)  # a send may block for the whole freeze
for phase, size in enumerate(sizes):
    if phase:
        go = folder / f"go-{phase}"
        wait(go.exists, go)
    send(sock, size)
    if phase < len(sizes) - 1:
        wait(lambda: unacknowledged(sock) == 0, f"the ACK of phase {phase}")
        (folder / f"acked-{phase}").write_text(str(total))
sock.shutdown(socket.SHUT_WR)
sock.settimeout(60)
while sock.recv(4096):
    pass
sock.close()
result = {"bytes": total, "sha256": digest.hexdigest()}
(folder / "sent.json").write_text(json.dumps(result))
"""


class SidecarTree(CriuTree):
    """A tree that CRIU dumps inside its namespace with a chosen network lock."""

    def __init__(self, created, workdir, argv, network_lock):
        super().__init__(created, workdir, argv, placement="inside")
        self.network_lock = network_lock

    def _criu(self, argv, images, hook_socket, pass_fds=()):
        # CRIU 4.2 ignores --network-lock on restore and reuses the dump's
        if argv[0] == "dump" and self.network_lock is not None:
            argv = [*argv, "--network-lock", self.network_lock]
        return super()._criu(argv, images, hook_socket, pass_fds)


def ruleset(created):
    """Return the rule and chain lines of iptables-save and ip6tables-save.

    Every table, in the container's namespace. The built-in chains' policy
    lines are left out.
    """
    lines = []
    for command in ("iptables-save", "ip6tables-save"):
        completed = subprocess.run(
            netns_command(created.ctr_ns, [command]),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        for line in completed.stdout.splitlines():
            builtin = line.split(" ")[0][1:] in ("INPUT", "FORWARD", "OUTPUT")
            if line.startswith("-A") or (line.startswith(":") and not builtin):
                lines.append(f"{command}: {line}")
    return lines


def wait_for(path, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def release(daemon):
    """Release the scope as an operator does after a failed restore."""
    return subprocess.run(
        [sys.executable, "-m", "shieldproxy", "release", "--scope", "app"]
        + ["--force", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def run_failed_restore(tmp_path, network_lock):
    """Dump, fail a restore, release, restore again; return what was seen.

    Every namespace, rule and process of the run is gone when this returns.
    """
    seen = {}
    (tmp_path / "daemon").mkdir()
    work = tmp_path / "run"
    work.mkdir()
    with lab() as created:
        scope = {
            "name": "app",
            "addresses": [created.ctr_v4, created.ctr_v6],
            "ports": [PORT],
        }
        daemon = RunningDaemon(created, tmp_path / "daemon", "sidecar", [scope])
        received = work / "received.bin"
        server = [
            "socat", "-u", f"TCP4-LISTEN:{PORT},bind={created.ctr_v4},reuseaddr",
            f"CREATE:{received}",
        ]  # fmt: skip
        tree = SidecarTree(created, work, server, network_lock)
        peer = None
        try:
            wait_listening(created, PORT)
            sizes = ",".join(str(size) for size in PHASE_BYTES)
            argv = [sys.executable, "-c", PEER_PROGRAM, created.ctr_v4, str(PORT)]
            argv += [sizes, str(PEER_RATE), str(work)]
            with (work / "peer.log").open("wb") as peer_log:
                peer = subprocess.Popen(
                    netns_command(created.peer_ns, argv),
                    stdin=subprocess.DEVNULL,
                    stdout=peer_log,
                    stderr=subprocess.STDOUT,
                )
            assert wait_for(work / "acked-0"), (work / "peer.log").read_text()

            images = work / "images"
            dumped = tree.dump(images, hook_socket=daemon.socket)
            assert dumped.returncode == 0, dumped.stderr
            seen["after dump"] = ruleset(created)
            (work / "go-1").write_text("")
            # the shield acknowledges the freeze phase, unless CRIU's lock
            # drops it first
            seen["freeze phase acknowledged"] = wait_for(work / "acked-1", 10.0)
            status = json.loads(daemon.cli("status").stdout)
            seen["bytes absorbed"] = status["scopes"]["app"]["bytes_absorbed"]

            (stream,) = images.glob("tcp-stream-*.img")
            pristine = stream.read_bytes()
            stream.write_bytes(pristine[: len(pristine) // 2])
            failed = tree.restore(images, hook_socket=daemon.socket)
            seen["failed restore status"] = failed.returncode
            seen["after failed restore"] = ruleset(created)

            released = release(daemon)
            assert released.returncode == 0, released.stderr
            status = json.loads(daemon.cli("status").stdout)
            seen["state after release"] = status["scopes"]["app"]["state"]
            seen["after release"] = ruleset(created)

            stream.write_bytes(pristine)
            restored = tree.restore(images, hook_socket=daemon.socket)
            seen["restore log"] = (images / "restore.log").read_text()
            assert restored.returncode == 0, _errors(seen["restore log"])
            seen["after second restore"] = ruleset(created)
            assert wait_for(work / "acked-1", 60.0), (work / "peer.log").read_text()
            (work / "go-2").write_text("")
            peer.wait(timeout=60)
            assert tree.wait_exit(30), "socat did not exit after the peer's EOF"
            seen["peer exit status"] = peer.returncode
        finally:
            if peer is not None and peer.poll() is None:
                peer.kill()
                peer.wait()
            tree.kill()
            daemon.stop()
    sent = json.loads((work / "sent.json").read_text())
    data = received.read_bytes()
    seen["sent bytes"] = sent["bytes"]
    seen["received bytes"] = len(data)
    seen["checksum matches"] = hashlib.sha256(data).hexdigest() == sent["sha256"]
    return seen


def _errors(log_text):
    return "\n".join(line for line in log_text.splitlines() if "Error" in line)


def shield_lines(lines):
    return [line for line in lines if "SP-" in line or "NFQUEUE" in line]


def criu_lock_lines(lines):
    # CRIU 4.2's per-connection lock: "-m mark ! --mark 0xc114 ... -j DROP"
    return [line for line in lines if "! --mark 0xc114" in line and "DROP" in line]


def test_failed_restore_released_without_lock(tmp_path):
    """With --network-lock skip, as the shield needs in a shared namespace."""
    seen = run_failed_restore(tmp_path, network_lock="skip")
    # the shield's chain is installed in both families, and CRIU adds nothing
    assert any("iptables-save: :SP-" in line for line in seen["after dump"])
    assert any("ip6tables-save: :SP-" in line for line in seen["after dump"])
    assert criu_lock_lines(seen["after dump"]) == []
    assert seen["freeze phase acknowledged"] is True
    assert seen["bytes absorbed"] == PHASE_BYTES[1]

    assert seen["failed restore status"] != 0
    # the shield still holds the flow until the operator releases it
    assert shield_lines(seen["after failed restore"]) != []
    assert seen["state after release"] == "idle"
    # no rule or chain at all: neither the shield's nor a DROP of anyone's
    assert seen["after release"] == []

    assert (
        "released before this restore, with nothing to announce: app"
        in (seen["restore log"])
    )
    assert seen["after second restore"] == []
    assert seen["peer exit status"] == 0
    assert seen["received bytes"] == seen["sent bytes"] == sum(PHASE_BYTES)
    assert seen["checksum matches"] is True


def test_failed_restore_released_with_criu_lock(tmp_path):
    """With CRIU's default iptables lock, whose rules CRIU alone removes.

    CRIU puts one DROP rule per connection at the top of INPUT and OUTPUT, ahead
    of the shield's jump, so no packet of the peer reaches the shield. After the
    failed restore and the shield's release CRIU's two rules remain: they keep
    the peer from a reset while the socket is missing, and only a successful
    restore of these images deletes them, at its network-unlock step.
    """
    seen = run_failed_restore(tmp_path, network_lock=None)
    after_dump = seen["after dump"]
    criu_rules = criu_lock_lines(after_dump)
    assert len(criu_rules) == 2
    first_input = next(line for line in after_dump if "-A INPUT" in line)
    assert first_input in criu_rules
    assert seen["freeze phase acknowledged"] is False
    assert seen["bytes absorbed"] == 0

    assert seen["failed restore status"] != 0
    assert criu_lock_lines(seen["after failed restore"]) == criu_rules
    assert seen["state after release"] == "idle"
    assert shield_lines(seen["after release"]) == []
    # CRIU's rules are still there after the shield's release
    assert seen["after release"] == criu_rules

    assert seen["after second restore"] == []
    assert seen["peer exit status"] == 0
    assert seen["received bytes"] == seen["sent bytes"] == sum(PHASE_BYTES)
    assert seen["checksum matches"] is True
