"""Checkpoints with peers that close, reset or run other TCP settings.

Each test freezes the receiving socket of the demo scenario while a real Linux
peer in its own namespace keeps using the connection, then checks the restored
stream and, in the peer's capture, the segments sent in the container's name.
"""

import errno
import fcntl
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from shieldproxy.config import WindowConfig
from shieldproxy.demo import LAB_ENV, ScenarioConfig, run_scenario
from shieldproxy.kernel import repair
from shieldproxy.kernel.netns import netns_command
from shieldproxy.kernel.repair import SocketDump, load_dump
from shieldproxy.lab.children import Child
from shieldproxy.lab.topology import lab
from shieldproxy.pcapcheck import read_packets
from shieldproxy.tcp.flow import TricklePolicy
from shieldproxy.tcp.segment import FIN, RST, SYN, parse_packet_untrusted

from .test_demo_scenario import assert_no_shield_rules, checked_lab, leftovers, run

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


# A peer with TCP_USER_TIMEOUT under a freeze six times as long, once per window
# policy. Both runs share one 60 s freeze, each in its own lab, so each peer's
# nstat counters count only its own connection.
USER_TIMEOUT_S = 10
USER_TIMEOUT_FREEZE_S = 60.0
# A small receive window, so that the peer at 1 MiB/s fills it within a second
# of the dump and then receives a zero window.
USER_TIMEOUT_RCVBUF = 256 * 1024
# The defaults of window.trickle_step_bytes and window.trickle_interval_s,
# which the README recommends for a peer with a 10 s user timeout.
TRICKLE_DEFAULTS = WindowConfig()
TRICKLE = TricklePolicy(
    step_bytes=TRICKLE_DEFAULTS.trickle_step_bytes,
    interval_s=TRICKLE_DEFAULTS.trickle_interval_s,
)
# Slack for the peer's process to see the abort on a loaded machine.
ABORT_SLACK_S = 5.0
# A segment from the shield within this time after a zero-window probe
# counts as its acknowledgment.
PROBE_ACK_S = 1.0
PEER_CAPTURE_SNAPLEN = 128


@pytest.fixture
def second_lab():
    """Another lab beside ``checked_lab``, removed and checked the same way."""
    with lab() as created:
        yield created
    assert leftovers(created.lab_id) == []


async def run_with_peer_capture(created, work_dir, config):
    """Run the scenario while tcpdump records both directions at the peer.

    The scenario's own capture contains only the container's side. This one
    also contains the peer's data, zero-window probes and resets.
    """
    work_dir.mkdir(parents=True)
    pcap = work_dir / "peer-both.pcap"
    argv = netns_command(
        created.peer_ns,
        [
            "tcpdump", "-i", created.peer_if, "-s", str(PEER_CAPTURE_SNAPLEN),
            "-U", "--immediate-mode", "-n", "-w", str(pcap),
            f"tcp port {config.port}",
        ],
    )  # fmt: skip
    # the label lets the leftovers check find a tcpdump left behind
    env = {LAB_ENV: created.lab_id}
    capture = await Child.start("tcpdump-both", argv, work_dir, env=env)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(capture.read_events)
        try:
            with trio.fail_after(10):
                while "listening on" not in capture.stderr_tail(2000):
                    assert capture.process.returncode is None, capture.stderr_tail()
                    await trio.sleep(0.05)
            result = await run_scenario(created, config, work_dir)
        finally:
            with trio.CancelScope(shield=True):
                capture.signal(signal.SIGINT)  # tcpdump flushes its file on SIGINT
                await capture.stop(timeout=5)
    return result, pcap


def captured_segments(pcap):
    """Return (CLOCK_MONOTONIC seconds, segment) for each TCP segment in PCAP."""
    # pcap timestamps are CLOCK_REALTIME, the scenario's timeline is monotonic
    realtime_ahead = time.time() - time.monotonic()
    return [
        (timestamp - realtime_ahead, parse_packet_untrusted(ip))
        for _, timestamp, ip, _ in read_packets(pcap)
    ]


@dataclass
class FreezeView:
    """What the peer sent and received between the dump and the restore.

    Times are seconds after the dump.
    """

    window_closed_s: float | None = None
    """First zero window the peer received."""
    probes_s: list[float] = field(default_factory=list)
    """Zero-window probes the peer sent: segments without payload."""
    unacknowledged_probes: int = 0
    """Probes with no segment from the shield within PROBE_ACK_S."""
    window_openings: int = 0
    """Times a zero window opened again."""
    max_closed_s: float = 0.0
    """Maximum time from a zero window to the peer's next data segment, or to
    the restore."""


def freeze_view(result, segments, peer_addr):
    frozen = result.timeline["frozen"]
    restored = result.timeline["restored"]
    during = [(t - frozen, s) for t, s in segments if frozen <= t <= restored]
    view = FreezeView()
    closed_since = None
    opened = False
    for t, segment in during:
        if segment.src != peer_addr:
            if segment.window == 0 and closed_since is None:
                closed_since = t
                opened = False
                if view.window_closed_s is None:
                    view.window_closed_s = t
            elif segment.window and closed_since is not None and not opened:
                view.window_openings += 1
                opened = True
        elif segment.payload:
            if closed_since is not None:
                view.max_closed_s = max(view.max_closed_s, t - closed_since)
                closed_since = None
        elif not segment.flags & (SYN | FIN | RST):
            view.probes_s.append(t)
            acknowledged = any(
                s.src != peer_addr and t < u <= t + PROBE_ACK_S for u, s in during
            )
            view.unacknowledged_probes += not acknowledged
    if closed_since is not None:
        view.max_closed_s = max(view.max_closed_s, restored - frozen - closed_since)
    return view


def resets_from(segments, address):
    """Return the times at which ADDRESS sent an RST."""
    return [
        t for t, segment in segments if segment.src == address and segment.flags & RST
    ]


def test_user_timeout_peer_trickle_and_hold(checked_lab, second_lab, tmp_path):
    def config(trickle):
        return ScenarioConfig(
            shielded=True,
            freeze_s=USER_TIMEOUT_FREEZE_S,
            rate_bytes_per_s=SLOW_RATE,
            receiver_rcvbuf_bytes=USER_TIMEOUT_RCVBUF,
            reply_bytes=REPLY_BYTES,
            trickle=trickle,
            client_user_timeout_ms=USER_TIMEOUT_S * 1000,
        )

    runs = {}

    async def run_one(name, created, trickle):
        runs[name] = await run_with_peer_capture(
            created, tmp_path / name, config(trickle)
        )

    async def run_both():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_one, "trickle", checked_lab, TRICKLE)
            nursery.start_soon(run_one, "hold", second_lab, None)

    trio.run(run_both)

    # trickle: every byte arrives, the peer reads the reply, nothing resets
    result, pcap = runs["trickle"]
    check_stream(result)
    assert result.peer_done is not None
    assert result.peer_done["status"] == "closed"
    assert result.peer_done["reply"] == REPLY_BYTES
    assert result.peer_done["reply_ok"]
    segments = captured_segments(pcap)
    assert resets_from(segments, checked_lab.peer_v4) == []
    assert resets_from(segments, checked_lab.ctr_v4) == []
    view = freeze_view(result, segments, checked_lab.peer_v4)
    assert view.window_closed_s is not None, view
    assert view.window_openings >= USER_TIMEOUT_FREEZE_S / TRICKLE.interval_s / 2, view
    # Every time the window closed, the peer sent data again before its user
    # timeout ran out.
    assert view.max_closed_s < USER_TIMEOUT_S, view
    assert_no_shield_rules(checked_lab)

    # hold: the peer's kernel aborts the connection although the shield
    # acknowledged every zero-window probe
    result, pcap = runs["hold"]
    assert result.error is None
    assert result.peer_counters["TcpExtTCPAbortOnTimeout"] == 1
    assert result.peer_done is not None
    timed_out = f"[Errno {errno.ETIMEDOUT}] {os.strerror(errno.ETIMEDOUT)}"
    assert result.peer_done["status"] == f"error: {timed_out}"
    segments = captured_segments(pcap)
    view = freeze_view(result, segments, second_lab.peer_v4)
    assert view.window_closed_s is not None, view
    assert view.probes_s, view
    assert view.unacknowledged_probes == 0, view
    assert view.window_openings == 0, view
    aborted_s = result.peer_done["t"] - result.timeline["frozen"]
    assert aborted_s - view.window_closed_s >= USER_TIMEOUT_S, view
    assert aborted_s - view.window_closed_s < USER_TIMEOUT_S + ABORT_SLACK_S, view
    assert max(view.probes_s) < aborted_s, view
    # After the restore, the first segment sent in the container's name meets
    # no socket at the peer, whose kernel replies with an RST. The restored
    # application reads every handed-over byte, then the reset.
    peer_resets = resets_from(segments, second_lab.peer_v4)
    assert peer_resets, "no RST from the peer"
    assert min(peer_resets) >= result.timeline["restored"]
    assert resets_from(segments, second_lab.ctr_v4) == []
    reset = f"[Errno {errno.ECONNRESET}] {os.strerror(errno.ECONNRESET)}"
    assert result.integrity == f"receiver error: {reset}"
    assert result.bytes_handed_over == result.bytes_absorbed
    assert result.bytes_received == result.stream_end_offset
    check_capture(result)
    assert_no_shield_rules(second_lab)
