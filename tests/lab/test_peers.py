"""Checkpoints with peers that close, reset or run other TCP settings.

Each test freezes the receiving socket of the demo scenario while a real Linux
peer in its own namespace keeps using the connection, then checks the restored
stream and, in the peer's capture, the segments sent in the container's name.
"""

import fcntl
import socket
import struct
import time
from pathlib import Path

import pytest

from shieldproxy.kernel import repair
from shieldproxy.kernel.repair import SocketDump, load_dump

from .test_demo_scenario import assert_no_shield_rules, checked_lab, run

__all__ = ["checked_lab"]

pytestmark = pytest.mark.lab

FREEZE_S = 4.0
SLOW_RATE = 1024 * 1024
FAST_RATE = 8 * 1024 * 1024
REPLY_BYTES = 100_000
MIN_ABSORBED_BYTES = 100_000
SIXTEEN_MB = 16 * 1024 * 1024
LARGE_BUFFERS = {
    "net.ipv4.tcp_rmem": f"4096 131072 {SIXTEEN_MB}",
    "net.ipv4.tcp_wmem": f"4096 16384 {SIXTEEN_MB}",
}


LOOPBACK_TIMEOUT_S = 5.0
# (listening address, connecting family and address) of a loopback connection
LOOPBACK = {
    "ipv4": ("127.0.0.1", socket.AF_INET, "127.0.0.1"),
    "ipv6": ("::1", socket.AF_INET6, "::1"),
    "ipv4-mapped": ("::", socket.AF_INET, "127.0.0.1"),
}


@pytest.fixture
def sockets():
    """Sockets to close when the test ends, on every path."""
    opened = []
    yield opened
    for sock in opened:
        sock.close()


def queued_bytes(sock):
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), repair.SIOCINQ, buf)
    return struct.unpack("=i", buf)[0]


def tcp_state(sock):
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def loopback_dump(sockets, kind, queued):
    """Dump the receiving end of a loopback connection holding QUEUED bytes."""
    listen_addr, family, connect_addr = LOOPBACK[kind]
    listener = socket.socket(socket.AF_INET6 if ":" in listen_addr else socket.AF_INET)
    sockets.append(listener)
    listener.bind((listen_addr, 0))
    listener.listen(1)
    peer = socket.socket(family)
    sockets.append(peer)
    peer.settimeout(LOOPBACK_TIMEOUT_S)
    peer.connect((connect_addr, listener.getsockname()[1]))
    receiver, _ = listener.accept()
    sockets.append(receiver)
    peer.sendall(queued)
    deadline = time.monotonic() + LOOPBACK_TIMEOUT_S
    while queued_bytes(receiver) < len(queued):
        assert time.monotonic() < deadline, "the queued bytes did not arrive"
        time.sleep(0.01)
    dump = repair.dump_socket(receiver)
    # in repair mode, so closing sends nothing and frees the 4-tuple
    receiver.close()
    return dump


def read_all(sock):
    """Read until EOF; return the bytes and the exception that ended it."""
    sock.settimeout(LOOPBACK_TIMEOUT_S)
    data = b""
    while len(data) < 10_000_000:
        try:
            chunk = sock.recv(65536)
        except OSError as exc:
            return data, exc
        if not chunk:
            return data, None
        data += chunk
    raise AssertionError("more bytes than were queued")


@pytest.mark.parametrize("kind", LOOPBACK)
def test_restore_delivers_peer_fin(sockets, kind):
    dump = loopback_dump(sockets, kind, b"q" * 3000)
    restored = repair.restore_socket(dump, extra_receive=b"e" * 500, peer_close="fin")
    sockets.append(restored)
    assert tcp_state(restored) == repair.TCP_CLOSE_WAIT
    repair.finish_restore(restored, window_probe=False)
    data, error = read_all(restored)
    assert data == b"q" * 3000 + b"e" * 500
    assert error is None
    # half-closed by the peer: the application can still send
    assert restored.send(b"reply") == 5


@pytest.mark.parametrize("kind", LOOPBACK)
def test_restore_delivers_peer_reset(sockets, kind):
    dump = loopback_dump(sockets, kind, b"q" * 3000)
    restored = repair.restore_socket(dump, extra_receive=b"e" * 500, peer_close="rst")
    sockets.append(restored)
    assert tcp_state(restored) == repair.TCP_CLOSE
    repair.finish_restore(restored, window_probe=False)
    data, error = read_all(restored)
    assert data == b"q" * 3000 + b"e" * 500
    assert isinstance(error, ConnectionResetError)


def dumped_socket(tmp_path, family=4) -> SocketDump:
    return load_dump(Path(tmp_path) / f"shielded-ipv{family}" / "socket.json")


def check_capture(result):
    """The segments sent in the container's name never move back on the wire."""
    assert result.capture_violations is not None
    assert result.max_right_edge_retraction == 0
    assert result.tsval_regressions == 0


def check_stream(result):
    """Every byte arrived once and in order, and the peer never timed out."""
    assert result.error is None
    assert result.integrity == "ok"
    assert result.bytes_received == result.bytes_sent
    assert result.bytes_handed_over == result.bytes_absorbed
    assert result.peer_rto_timeouts == 0
    assert result.peer_counters["TcpExtTCPAbortOnTimeout"] == 0
    assert result.peer_counters["TcpExtPAWSEstab"] == 0
    assert result.container_counters["TcpExtTCPRcvQDrop"] == 0
    check_capture(result)


@pytest.mark.parametrize("family", [4, 6])
def test_peer_fin_during_freeze(checked_lab, tmp_path, family):
    result = run(
        checked_lab,
        tmp_path,
        shielded=True,
        freeze_s=FREEZE_S,
        family=family,
        rate_bytes_per_s=SLOW_RATE,
        peer_close="fin",
        reply_bytes=REPLY_BYTES,
    )
    assert result.error is None
    assert result.handover_fin
    assert not result.handover_reset
    # the application read every byte, then EOF
    assert result.integrity == "ok"
    assert result.bytes_received == result.bytes_sent
    assert result.bytes_received == result.stream_end_offset
    # and its reply after the EOF reached the half-closed peer
    assert result.peer_done is not None
    assert result.peer_done["status"] == "closed"
    assert result.peer_done["reply"] == REPLY_BYTES
    assert result.peer_done["reply_ok"]
    assert result.peer_counters["TcpExtTCPAbortOnTimeout"] == 0
    assert result.peer_counters["TcpExtPAWSEstab"] == 0
    check_capture(result)
    # the window update after the restore acknowledges the FIN again
    assert result.ack_regressions == 0
    assert_no_shield_rules(checked_lab)


def test_peer_reset_during_freeze(checked_lab, tmp_path):
    result = run(
        checked_lab,
        tmp_path,
        shielded=True,
        freeze_s=FREEZE_S,
        rate_bytes_per_s=SLOW_RATE,
        peer_close="rst",
    )
    assert result.error is None
    assert result.handover_reset
    assert not result.handover_fin
    assert result.peer_done is not None
    assert result.peer_done["status"] == "reset sent"
    # the application read every byte up to the RST, then the reset
    assert result.integrity == "receiver error: [Errno 104] Connection reset by peer"
    assert result.bytes_received == result.stream_end_offset
    assert result.bytes_received <= result.bytes_sent
    check_capture(result)
    assert_no_shield_rules(checked_lab)


VARIANTS = {
    "timestamps-off": (
        {"peer_sysctls": {"net.ipv4.tcp_timestamps": 0}},
        lambda dump: not dump.timestamps_ok,
    ),
    "sack-off": (
        {"peer_sysctls": {"net.ipv4.tcp_sack": 0}},
        lambda dump: not dump.sack_ok,
    ),
    "window-scaling-off": (
        {"peer_sysctls": {"net.ipv4.tcp_window_scaling": 0}},
        lambda dump: not dump.wscale_ok,
    ),
    "mss-536": (
        {"client_mss": 536, "rate_bytes_per_s": SLOW_RATE},
        lambda dump: dump.mss_clamp <= 536,
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_peer_variant_freeze(checked_lab, tmp_path, variant):
    settings, negotiated = VARIANTS[variant]
    result = run(checked_lab, tmp_path, shielded=True, freeze_s=FREEZE_S, **settings)
    check_stream(result)
    assert result.bytes_absorbed >= MIN_ABSORBED_BYTES
    # the setting took effect on the connection that was frozen
    assert negotiated(dumped_socket(tmp_path))
    assert_no_shield_rules(checked_lab)


def test_large_window_freeze(checked_lab, tmp_path):
    result = run(
        checked_lab,
        tmp_path,
        shielded=True,
        freeze_s=FREEZE_S,
        rate_bytes_per_s=FAST_RATE,
        receiver_rcvbuf_bytes=SIXTEEN_MB,
        peer_sysctls=LARGE_BUFFERS,
        container_sysctls=LARGE_BUFFERS,
    )
    check_stream(result)
    assert result.bytes_absorbed >= MIN_ABSORBED_BYTES
    dump = dumped_socket(tmp_path)
    assert dump.rcv_wscale >= 9
    assert dump.snd_wscale >= 9
    # a window larger than tcp_rmem[2], which only SO_RCVBUF allows
    assert dump.rcv_wnd > SIXTEEN_MB
    assert_no_shield_rules(checked_lab)


def test_keepalive_peer_survives_freeze(checked_lab, tmp_path):
    # Three unanswered probes 1 s apart after 1 s idle abort the connection
    # well within the freeze, so it survives only if the shield acknowledges them.
    freeze_s = 6.0
    result = run(
        checked_lab,
        tmp_path,
        shielded=True,
        freeze_s=freeze_s,
        client_keepalive=(1, 1, 3),
        client_idle_s=freeze_s + 2,
    )
    check_stream(result)
    assert result.acks_sent > 0
    assert_no_shield_rules(checked_lab)
