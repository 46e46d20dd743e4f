"""Half-closed connections and two-way streams checkpointed by CRIU, shielded.

A server in the container and a peer each send their own reproducible stream
and read the other's until EOF (duplex_app.py). CRIU dumps the server through
the shield's action script while its socket is in the state under test, often
with bytes it wrote still unsent because the peer stopped reading. After the
restore each side must have read the other's stream exactly once: same length,
same SHA-256.
"""

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shieldproxy.criu.images import TCP_STATES, read_tcp_flows
from shieldproxy.kernel.netns import netns_command
from shieldproxy.lab.topology import lab
from shieldproxy.pcapcheck import check_capture

from .criu_support import (
    Capture,
    CriuTree,
    counters_delta,
    criu_failure,
    peer_counters,
    wait_listening,
)
from .daemon_support import RunningDaemon

pytestmark = pytest.mark.lab

PORT = 5001
FREEZE_S = 5.0
STATE_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 60.0
APP = Path(__file__).parent / "duplex_app.py"
SMALL_RCVBUF = 64 * 1024
"""Peer receive buffer that the server's stream fills within a second."""


@dataclass(frozen=True)
class Case:
    ss_state: str
    """State name as ``ss state`` takes it, which the server's socket must reach."""
    image_state: str
    """The same state as CRIU's images record it."""
    server: list[str]
    peer: list[str]
    unsent_at_dump: bool
    """The server's socket has bytes it never sent when CRIU dumps it."""
    peer_sends_while_frozen: bool
    notes: list[str] = field(default_factory=list)


CASES = {
    # Both sides stream at 1 MiB/s through the freeze.
    "established-both-ways": Case(
        ss_state="established",
        image_state="ESTABLISHED",
        server=["--send", str(12 << 20), "--rate", str(1 << 20)],
        peer=["--send", str(12 << 20), "--rate", str(1 << 20), "--shutdown-after-send"],
        unsent_at_dump=False,
        peer_sends_while_frozen=True,
    ),
    # The peer sends a little and closes at once but stops reading, so the
    # server's 8 MiB stall in its send queue behind the peer's closed window.
    "close-wait-unsent": Case(
        ss_state="close-wait",
        image_state="CLOSE_WAIT",
        server=["--send", str(8 << 20)],
        peer=[
            "--send",
            str(256 << 10),
            "--shutdown-after-send",
            "--rcvbuf",
            str(SMALL_RCVBUF),
            "--read-after",
            "{read_after}",
        ],
        unsent_at_dump=True,
        peer_sends_while_frozen=False,
    ),  # fmt: skip
    # As above, but the server's 1 MiB fit its send buffer, so it shut down
    # its end too: its FIN waits behind the unsent bytes.
    "last-ack-unsent": Case(
        ss_state="last-ack",
        image_state="LAST_ACK",
        server=[
            "--send",
            str(1 << 20),
            "--sndbuf",
            str(2 << 20),
            "--hold-open",
            "{hold_open}",
        ],
        peer=[
            "--send",
            str(256 << 10),
            "--shutdown-after-send",
            "--rcvbuf",
            str(SMALL_RCVBUF),
            "--read-after",
            "{read_after}",
        ],
        unsent_at_dump=True,
        peer_sends_while_frozen=False,
    ),  # fmt: skip
    # The server wrote 1 MiB and shut down its end. The peer does not read yet
    # but goes on sending through the freeze, so the shield takes its bytes.
    "fin-wait1-unsent": Case(
        ss_state="fin-wait-1",
        image_state="FIN_WAIT1",
        server=[
            "--send",
            str(1 << 20),
            "--sndbuf",
            str(2 << 20),
            "--shutdown-after-send",
        ],
        peer=[
            "--send",
            str(3 << 20),
            "--rate",
            str(256 << 10),
            "--rcvbuf",
            str(SMALL_RCVBUF),
            "--read-after",
            "{read_after}",
        ],
        unsent_at_dump=True,
        peer_sends_while_frozen=True,
    ),  # fmt: skip
    # The peer read the server's bytes and its FIN, and goes on sending.
    "fin-wait2": Case(
        ss_state="fin-wait-2",
        image_state="FIN_WAIT2",
        server=["--send", str(64 << 10), "--shutdown-after-send"],
        peer=["--send", str(3 << 20), "--rate", str(256 << 10)],
        unsent_at_dump=False,
        peer_sends_while_frozen=True,
    ),
}


def _wait_state(created, state):
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while True:
        listing = created.run(
            "ctr", ["ss", "-Htn", "state", state, f"( sport = :{PORT} )"]
        ).stdout
        if listing.strip():
            return
        all_states = created.run("ctr", ["ss", "-Htan", f"( sport = :{PORT} )"])
        assert time.monotonic() < deadline, (
            f"the server's socket did not reach {state}: {all_states.stdout}"
        )
        time.sleep(0.05)


def _wait_file(path, timeout):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run_case(tmp_path, case):
    """Dump the server in CASE's state, restore it, and return what each side saw."""
    work = tmp_path / "run"
    work.mkdir()
    (tmp_path / "daemon").mkdir()
    read_after = work / "peer-may-read"
    hold_open = work / "server-may-close"
    peer_args = [arg.format(read_after=read_after) for arg in case.peer]
    server_args = [arg.format(hold_open=hold_open) for arg in case.server]
    scope = {"name": "app", "addresses": ["198.18.2.2"], "ports": [PORT]}
    observed = {}
    with lab() as created:
        daemon = RunningDaemon(created, tmp_path / "daemon", scopes=[scope])
        capture = Capture(created, work / "peer.pcap", PORT)
        tree = CriuTree(
            created,
            work,
            [sys.executable, str(APP), "serve", created.ctr_v4, str(PORT),
             *server_args, "--result", str(work / "server.json")],
        )  # fmt: skip
        peer = None
        try:
            wait_listening(created, PORT)
            with (work / "peer.log").open("wb") as log:
                peer = subprocess.Popen(
                    netns_command(
                        created.peer_ns,
                        [sys.executable, str(APP), "connect", created.ctr_v4,
                         str(PORT), *peer_args, "--result", str(work / "peer.json")],
                    ),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            _wait_state(created, case.ss_state)

            # let the streams fill the windows and queues
            time.sleep(1.0)
            before = peer_counters(created)
            images = work / "images"
            dumped = tree.dump(images, daemon.socket)
            assert dumped.returncode == 0, criu_failure(images / "dump.log", dumped)
            frozen_at = time.monotonic()
            observed["flows"] = read_tcp_flows(images)

            read_after.touch()
            time.sleep(max(0.0, frozen_at + FREEZE_S - time.monotonic()))
            observed["status"] = json.loads(daemon.cli("status").stdout)
            restored = tree.restore(images, daemon.socket)
            assert restored.returncode == 0, criu_failure(
                images / "restore.log", restored
            )
            peer.wait(timeout=EXIT_TIMEOUT_S)
            assert _wait_file(work / "server.json", EXIT_TIMEOUT_S), (
                "the restored server did not finish: "
                + (work / "program.log").read_text(errors="replace")
            )

            observed["counters"] = counters_delta(before, peer_counters(created))
            observed["metrics"] = daemon.scrape()
        finally:
            hold_open.touch()
            if peer is not None and peer.poll() is None:
                peer.kill()
                peer.wait()
            tree.kill()
            capture.stop()
            daemon.stop()
    observed["server"] = json.loads((work / "server.json").read_text())
    observed["peer"] = json.loads((work / "peer.json").read_text())
    observed["capture"] = check_capture(
        work / "peer.pcap", only_from=("198.18.2.2", PORT)
    )
    return observed


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_in_state(tmp_path, name):
    case = CASES[name]
    observed = run_case(tmp_path, case)
    server, peer = observed["server"], observed["peer"]
    print(json.dumps({"case": name, "server": server, "peer": peer}))

    (flow,) = observed["flows"]
    assert TCP_STATES[flow.state] == case.image_state
    if case.unsent_at_dump:
        assert flow.unsq_len > 0
    assert observed["status"]["scopes"]["app"]["flows"] == 1

    assert "error" not in server
    assert "error" not in peer
    assert peer["received"] == server["sent"]
    assert peer["received_sha256"] == server["sent_sha256"]
    assert server["received"] == peer["sent"]
    assert server["received_sha256"] == peer["sent_sha256"]

    absorbed = observed["metrics"]["shieldproxy_absorbed_bytes_total{scope=app}"]
    if case.peer_sends_while_frozen:
        assert absorbed > 0
    report = observed["capture"]
    assert sum(d.max_right_edge_retraction for d in report.directions) == 0
    assert sum(d.tsval_regressions for d in report.directions) == 0
    # From pre-dump until CRIU has written the socket's image the shield keeps
    # the peer's packets unanswered. A loaded machine can stretch that past the
    # peer's 200 ms minimum RTO.
    assert observed["counters"]["TcpExtTCPTimeouts"] <= 1
