"""Real CRIU dumps and restores of a TCP echo server in a lab container namespace.

The server accepts one connection and reads nothing until a release file
appears, so bytes the peer sent before the dump stay in its receive queue and
go into the tcp-stream image. CRIU runs inside the container namespace
(nsenter, which keeps the mount namespace), so its network lock is one DROP
rule pair per connection in that namespace, removed by the restore.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shieldproxy.criu import (
    CriuNotFoundError,
    ImageFlow,
    find_criu,
    read_tcp_flows,
    rewrite_tcp_flow,
)
from shieldproxy.lab.topology import Lab, lab
from shieldproxy.tcp.seq import seq_add, seq_diff, seq_max

pytestmark = pytest.mark.lab

PORT = 5001
TIMEOUT = 10.0
CRIU_TIMEOUT = 60.0
SIOCOUTQ = 0x5411

SERVER = r"""
import os, socket, sys, time
host, port, release = sys.argv[1], int(sys.argv[2]), sys.argv[3]
listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(1)
connection, _ = listener.accept()
deadline = time.monotonic() + 120
while not os.path.exists(release):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.05)
connection.settimeout(120)
while True:
    data = connection.recv(65536)
    if not data:
        break
    connection.sendall(data)
"""
"""Echo server: wait for the release file, then echo until the peer closes."""


@dataclass
class Server:
    lab: Lab
    process: subprocess.Popen[bytes]
    address: str
    release: Path
    images: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def criu(self, criu: Path, *argv: str) -> None:
        """Run CRIU in the container namespace; fail with its log on errors."""
        action = argv[0]
        log_name = f"{action}.log"
        result = self.lab.run(
            "ctr",
            [str(criu), *argv, "-D", str(self.images), "-o", log_name, "-v4"],
            check=False,
            timeout=CRIU_TIMEOUT,
        )
        if result.returncode != 0:
            log = (self.images / log_name).read_text(errors="replace")
            pytest.fail(
                f"criu {action} exited {result.returncode}: {result.stderr}\n"
                f"last lines of {log_name}:\n" + "\n".join(log.splitlines()[-30:])
            )


@pytest.fixture
def criu() -> Path:
    try:
        return find_criu()
    except CriuNotFoundError as exc:
        pytest.skip(str(exc))


def _is_server(pid: int, release: Path) -> bool:
    """Return True when PID runs the server whose release file is RELEASE."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(release).encode() in cmdline.split(b"\0")


def _kill_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(timeout=TIMEOUT)
    # A restored server has the original pid, and --restore-sibling makes it
    # our child, so it is reaped here. The command line check guards against
    # a reused pid.
    if _is_server(server.pid, server.release):
        os.kill(server.pid, signal.SIGKILL)
    try:
        os.waitpid(server.pid, 0)
    except ChildProcessError:
        pass
    deadline = time.monotonic() + TIMEOUT
    while _is_server(server.pid, server.release):
        if time.monotonic() > deadline:
            raise AssertionError(f"server pid {server.pid} still runs after SIGKILL")
        time.sleep(0.05)


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """Start the echo server as a session leader in a new lab's ctr namespace."""
    images = tmp_path / "images"
    images.mkdir()
    release = tmp_path / "release"
    with lab() as created:
        address = created.ctr_v4 if request.param == 4 else created.ctr_v6
        process = created.popen(
            "ctr",
            [sys.executable, "-c", SERVER, address, str(PORT), str(release)],
            new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started = Server(created, process, address, release, images)
        try:
            yield started
        finally:
            _kill_server(started)


def connect_peer(server: Server) -> socket.socket:
    family = socket.AF_INET6 if ":" in server.address else socket.AF_INET
    deadline = time.monotonic() + TIMEOUT
    while True:
        # A socket whose connect failed cannot connect again, so each attempt
        # takes a new one.
        with server.lab.enter("peer"):
            peer = socket.socket(family, socket.SOCK_STREAM)
        peer.settimeout(TIMEOUT)
        try:
            peer.connect((server.address, PORT))
            return peer
        except ConnectionRefusedError:
            peer.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_acknowledged(peer: socket.socket) -> None:
    """Wait until the server's kernel acknowledged everything the peer sent."""
    deadline = time.monotonic() + TIMEOUT
    buffer = bytearray(4)
    while True:
        fcntl.ioctl(peer.fileno(), SIOCOUTQ, buffer)
        if struct.unpack("=i", buffer)[0] == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError("the server did not acknowledge the peer's bytes")
        time.sleep(0.01)


def recv_exactly(peer: socket.socket, length: int) -> bytes:
    data = b""
    deadline = time.monotonic() + TIMEOUT
    while len(data) < length and time.monotonic() < deadline:
        chunk = peer.recv(length - len(data))
        if not chunk:
            break
        data += chunk
    return data


def assert_nothing_more(peer: socket.socket) -> None:
    peer.settimeout(0.5)
    with pytest.raises(TimeoutError):
        extra = peer.recv(65536)
        pytest.fail(f"unexpected {len(extra)} more bytes: {extra[:40]!r}")


def dump(server: Server, criu: Path) -> None:
    server.criu(criu, "dump", "-t", str(server.pid), "--tcp-established")
    # CRIU kills the dumped process. It must be reaped before the restore,
    # which gives the restored process the same pid.
    assert server.process.wait(timeout=TIMEOUT) == -signal.SIGKILL


def restore(server: Server, criu: Path) -> None:
    server.criu(
        criu, "restore", "--tcp-established", "--restore-detached", "--restore-sibling"
    )


def only_flow(server: Server, peer: socket.socket) -> ImageFlow:
    flows = read_tcp_flows(server.images)
    assert len(flows) == 1, flows
    flow = flows[0]
    peer_addr, peer_port = peer.getsockname()[:2]
    assert flow.family == (6 if ":" in server.address else 4)
    assert (flow.local_addr, flow.local_port) == (server.address, PORT)
    assert (flow.remote_addr, flow.remote_port) == (peer_addr, peer_port)
    return flow


def test_dump_read_restore(server, criu):
    peer = connect_peer(server)
    with peer:
        peer.sendall(b"before-dump")
        wait_acknowledged(peer)
        dump(server, criu)

        flow = only_flow(server, peer)
        assert flow.recv_queue == b"before-dump"
        assert flow.inq_len == len(b"before-dump")
        assert flow.send_queue == b""
        assert flow.timestamps_ok
        assert seq_diff(seq_add(flow.rcv_wup, flow.rcv_wnd), flow.inq_seq) > 0

        restore(server, criu)
        assert _is_server(server.pid, server.release)
        server.release.touch()
        assert recv_exactly(peer, 11) == b"before-dump"
        peer.sendall(b"after-restore")
        assert recv_exactly(peer, 13) == b"after-restore"
        assert_nothing_more(peer)


def test_rewritten_image_delivers_extra_bytes(server, criu, tmp_path):
    before = bytes(range(256)) * 128
    extra = b"hello-from-shield"
    peer = connect_peer(server)
    with peer:
        peer.sendall(before)
        wait_acknowledged(peer)
        dump(server, criu)
        # CRIU's lock drops these, and the peer retransmits them until the
        # restored socket acknowledges them as already received: the hand-over
        # a shield does after it acknowledged them itself.
        peer.sendall(extra)

        flow = only_flow(server, peer)
        assert flow.recv_queue == before
        rcv_nxt = seq_add(flow.inq_seq, len(extra))
        right_edge = seq_max(seq_add(flow.rcv_wup, flow.rcv_wnd), rcv_nxt)
        elapsed_ms = int(max(0.0, time.time() - flow.dumped_at) * 1000)
        rewritten = rewrite_tcp_flow(
            server.images,
            flow.inode,
            extra_bytes=extra,
            rcv_wnd=seq_diff(right_edge, rcv_nxt),
            rcv_wup=rcv_nxt,
            timestamp=seq_add(flow.timestamp, elapsed_ms),
            backup_dir=tmp_path / "backup",
        )
        assert read_tcp_flows(server.images) == [rewritten]
        assert rewritten.recv_queue == before + extra

        restore(server, criu)
        server.release.touch()
        assert recv_exactly(peer, len(before) + len(extra)) == before + extra
        peer.sendall(b"after-restore")
        assert recv_exactly(peer, 13) == b"after-restore"
        assert_nothing_more(peer)
