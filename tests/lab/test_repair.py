"""TCP_REPAIR dump and restore against real loopback connections.

Tests marked lab need root (CAP_NET_ADMIN). A dumped socket is closed while in
repair mode, so the kernel sends neither FIN nor RST and the peer keeps its
connection state for the restored socket.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shieldproxy.kernel import repair
from shieldproxy.tcp.seq import seq_add, seq_diff

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="TCP_REPAIR needs root")

TIMEOUT = 5.0

Closer = Callable[[socket.socket], socket.socket]


@pytest.fixture
def track() -> Iterator[Closer]:
    """Register sockets to close when the test ends, on every path."""
    sockets: list[socket.socket] = []

    def add(sock: socket.socket) -> socket.socket:
        sockets.append(sock)
        return sock

    yield add
    for sock in sockets:
        sock.close()


def connected_pair(
    track: Closer, family: socket.AddressFamily, peer_rcvbuf: int | None = None
) -> tuple[socket.socket, socket.socket]:
    """Return (container, peer) ends of a loopback TCP connection."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    listener = track(socket.socket(family, socket.SOCK_STREAM))
    listener.bind((host, 0))
    listener.listen(1)
    peer = track(socket.socket(family, socket.SOCK_STREAM))
    if peer_rcvbuf is not None:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
    peer.settimeout(TIMEOUT)
    peer.connect(listener.getsockname()[:2])
    container, _ = listener.accept()
    track(container)
    listener.close()
    return container, peer


def ioctl_int(sock: socket.socket, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), request, buf)
    value: int = struct.unpack("=i", buf)[0]
    return value


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def recv_exactly(sock: socket.socket, length: int) -> bytes:
    sock.settimeout(TIMEOUT)
    data = b""
    deadline = time.monotonic() + TIMEOUT
    while len(data) < length and time.monotonic() < deadline:
        chunk = sock.recv(length - len(data))
        if not chunk:
            break
        data += chunk
    return data


def assert_nothing_more(sock: socket.socket) -> None:
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        extra = sock.recv(65536)
        pytest.fail(f"unexpected {len(extra)} more bytes: {extra[:40]!r}")


def read_window(sock: socket.socket) -> tuple[int, ...]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR_WINDOW, 20)
    return struct.unpack("=5I", raw)


def fill_peer(container: socket.socket, stream: bytearray) -> None:
    """Send from the container until the peer's window closes, keeping a copy."""
    container.setblocking(False)
    for index in range(4096):
        block = bytes([index % 251]) * 8192
        try:
            sent = container.send(block)
        except BlockingIOError:
            break
        stream += block[:sent]
    container.setblocking(True)
    wait_until(
        lambda: (
            ioctl_int(container, repair.SIOCOUTQNSD) > 0
            and ioctl_int(container, repair.SIOCOUTQ)
            == ioctl_int(container, repair.SIOCOUTQNSD)
        ),
        "the container holds only unsent bytes",
    )


def as_shield_dump(
    dump: repair.SocketDump, absorbed: int, unacked_prefix: bytes
) -> repair.SocketDump:
    """Rewrite a dump as if the shield had acknowledged its last ``absorbed``
    received bytes, and as if ``unacked_prefix`` (bytes the peer already holds)
    were still unacknowledged. Both are what a dump taken slightly earlier
    would contain."""
    rcv_nxt = seq_add(dump.rcv_nxt, -absorbed)
    return dataclasses.replace(
        dump,
        recv_queue=dump.recv_queue[: len(dump.recv_queue) - absorbed],
        rcv_nxt=rcv_nxt,
        rcv_wup=rcv_nxt if seq_diff(dump.rcv_wup, rcv_nxt) > 0 else dump.rcv_wup,
        send_queue=unacked_prefix + dump.send_queue,
        snd_una=seq_add(dump.snd_una, -len(unacked_prefix)),
    )


def round_trip(track: Closer, family: socket.AddressFamily, tmp_path: Path) -> None:
    container, peer = connected_pair(track, family, peer_rcvbuf=8192)
    before_dump = b"A" * 1000
    absorbed = bytes(range(256)) * 12
    peer.sendall(before_dump + absorbed)
    total_in = len(before_dump) + len(absorbed)
    wait_until(
        lambda: ioctl_int(container, repair.SIOCINQ) == total_in,
        "the container has the peer's bytes queued",
    )
    stream = bytearray()
    fill_peer(container, stream)

    dump = repair.dump_socket(container)
    assert dump.state == 1
    assert dump.recv_queue == before_dump + absorbed
    assert dump.unsent_len > 0
    assert dump.send_queue == bytes(stream[len(stream) - len(dump.send_queue) :])
    assert dump.snd_una == seq_add(dump.write_seq, -len(dump.send_queue))
    assert dump.family == (6 if family == socket.AF_INET6 else 4)
    snapshot = dump.flow_snapshot()
    assert snapshot.snd_nxt == seq_add(dump.write_seq, -dump.unsent_len)
    assert snapshot.key.container_port == container.getsockname()[1]
    container.close()

    path = tmp_path / "dump.json"
    repair.save_dump(dump, path)
    assert repair.load_dump(path) == dump

    acked_len = len(stream) - len(dump.send_queue)
    unacked_prefix = bytes(stream[acked_len - 2000 : acked_len])
    shield_dump = as_shield_dump(dump, len(absorbed), unacked_prefix)
    right_edge = seq_add(dump.rcv_nxt, 100_000)
    restored = track(
        repair.restore_socket(
            shield_dump, extra_receive=absorbed, right_edge=right_edge
        )
    )
    repair.finish_restore(restored)

    assert recv_exactly(restored, total_in) == before_dump + absorbed
    peer.sendall(b"after restore")
    assert recv_exactly(restored, 13) == b"after restore"

    received = recv_exactly(peer, len(stream))
    assert len(received) == len(stream)
    assert received == bytes(stream)
    restored.sendall(b"reply")
    assert recv_exactly(peer, 5) == b"reply"
    assert_nothing_more(peer)
    assert_nothing_more(restored)


@pytest.mark.lab
@needs_root
def test_round_trip_ipv4(track: Closer, tmp_path: Path) -> None:
    round_trip(track, socket.AF_INET, tmp_path)


@pytest.mark.lab
@needs_root
def test_round_trip_ipv6(track: Closer, tmp_path: Path) -> None:
    round_trip(track, socket.AF_INET6, tmp_path)


@pytest.mark.lab
@needs_root
def test_window_never_retracts(track: Closer) -> None:
    container, peer = connected_pair(track, socket.AF_INET)
    absorbed = b"z" * 5000
    peer.sendall(absorbed)
    wait_until(lambda: ioctl_int(container, repair.SIOCINQ) == 5000, "data queued")
    dump = repair.dump_socket(container)
    container.close()

    shield_dump = as_shield_dump(dump, len(absorbed), b"")
    right_edge = seq_add(dump.rcv_nxt, 300_000)
    restored = track(
        repair.restore_socket(
            shield_dump, extra_receive=absorbed, right_edge=right_edge
        )
    )
    _snd_wl1, _snd_wnd, _max_window, rcv_wnd, rcv_wup = read_window(restored)
    assert rcv_wup == dump.rcv_nxt
    assert seq_diff(seq_add(rcv_wup, rcv_wnd), right_edge) >= 0

    # Once repair is off, rcv_wup and rcv_wnd are the window of the last segment
    # the socket sent, which must still reach right_edge.
    repair.finish_restore(restored)
    peer.sendall(b"x")
    assert recv_exactly(restored, 5001) == absorbed + b"x"
    restored.setsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR, 1)
    _snd_wl1, _snd_wnd, _max_window, rcv_wnd, rcv_wup = read_window(restored)
    restored.setsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR, struct.pack("=i", -1))
    assert seq_diff(seq_add(rcv_wup, rcv_wnd), right_edge) >= 0


@pytest.mark.lab
@needs_root
def test_timestamp_continues_from_tsval(track: Closer) -> None:
    container, peer = connected_pair(track, socket.AF_INET)
    dump = repair.dump_socket(container)
    container.close()
    assert dump.timestamps_ok
    clock = (dump.tsval + 1_000_000) & 0xFFFFFFFF
    restored = track(repair.restore_socket(dump, tsval=clock))
    raw = restored.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP, 4)
    now = struct.unpack("=I", raw)[0]
    assert seq_diff(now, clock) >= 0
    assert seq_diff(now, clock) < 1000
    repair.finish_restore(restored)
    peer.sendall(b"ping")
    assert recv_exactly(restored, 4) == b"ping"


@pytest.mark.lab
@needs_root
def test_odd_tsval_keeps_millisecond_clock(track: Closer) -> None:
    container, peer = connected_pair(track, socket.AF_INET)
    dump = repair.dump_socket(container)
    container.close()
    # an odd value would select microsecond timestamps on Linux 6.7 and later
    clock = (dump.tsval + 1001) & 0xFFFFFFFF
    restored = track(repair.restore_socket(dump, tsval=clock))
    repair.finish_restore(restored)

    def read_clock() -> int:
        raw = restored.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP, 4)
        value: int = struct.unpack("=I", raw)[0]
        return value

    before = read_clock()
    time.sleep(0.2)
    after = read_clock()
    assert before & 1 == dump.tsval & 1
    # 200 ms later a millisecond clock moved about 200, a microsecond one 200000
    assert 150 <= seq_diff(after, before) <= 1000


@pytest.mark.lab
@needs_root
def test_dump_rejects_close_wait(track: Closer) -> None:
    container, peer = connected_pair(track, socket.AF_INET)
    peer.shutdown(socket.SHUT_WR)
    wait_until(
        lambda: container.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 8,
        "the container is in CLOSE_WAIT",
    )
    with pytest.raises(repair.UnsupportedStateError, match="CLOSE_WAIT"):
        repair.dump_socket(container)


# --- receive buffer limit, in a namespace of its own --------------------------

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns failed: {os.strerror(code)}")


@contextmanager
def inside_new_netns(rmem_max: int) -> Iterator[str]:
    """Move this thread into a new network namespace with tcp_rmem[2] lowered."""
    name = f"sp-rtest-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (
            ["ip", "link", "set", "lo", "up"],
            ["sysctl", "-q", "-w", f"net.ipv4.tcp_rmem=4096 131072 {rmem_max}"],
        ):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True)
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield name
            finally:
                _setns(original)
        finally:
            os.close(target)
            os.close(original)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


@pytest.mark.lab
@needs_root
def test_receive_buffer_full_message(track: Closer) -> None:
    rmem_max = 1 << 20
    with inside_new_netns(rmem_max):
        container, _peer = connected_pair(track, socket.AF_INET)
        dump = repair.dump_socket(container)
        container.close()
        extra = b"q" * (2 * rmem_max)
        with pytest.raises(repair.ReceiveBufferFull) as caught:
            track(repair.restore_socket(dump, extra_receive=extra))
    error = caught.value
    message = str(error)
    assert error.total == len(extra)
    assert 0 < error.fitted <= rmem_max + repair.RECV_CHUNK
    assert error.rmem_needed > len(extra)
    assert f"{dump.remote_addr}:{dump.remote_port}" in message
    assert f"{dump.local_addr}:{dump.local_port}" in message
    assert f"Only {error.fitted} of {len(extra)} bytes" in message
    assert "net.ipv4.tcp_rmem" in message
    assert str(error.rmem_needed) in message


# --- taking a socket from another process ------------------------------------

CHILD = """
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(sock.fileno(), flush=True)
sys.stdin.read()
"""


@pytest.mark.lab
@needs_root
def test_take_socket_from_child(track: Closer) -> None:
    listener = track(socket.socket())
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        fd = int(child.stdout.readline())
        accepted, _ = listener.accept()
        track(accepted)
        taken = track(repair.take_socket(child.pid, fd))
        assert taken.getpeername() == accepted.getsockname()
        taken.sendall(b"from the copy")
        assert recv_exactly(accepted, 13) == b"from the copy"

        with pytest.raises(OSError, match=f"fd 999 in pid {child.pid}") as caught:
            repair.take_socket(child.pid, 999)
        assert caught.value.errno == errno.EBADF
    finally:
        child.communicate(timeout=TIMEOUT)


# --- snapshot files -------------------------------------------------------------


def sample_dump() -> repair.SocketDump:
    return repair.SocketDump(
        family=6,
        state=1,
        local_addr="2001:2::1",
        local_port=8080,
        remote_addr="2001:2::2",
        remote_port=40000,
        rcv_nxt=4_294_967_000,
        write_seq=10,
        snd_una=5,
        unsent_len=2,
        recv_queue=b"\x00\xffrecv",
        send_queue=b"12345",
        mss_clamp=1440,
        snd_wscale=7,
        rcv_wscale=9,
        sack_ok=True,
        timestamps_ok=True,
        wscale_ok=True,
        tsval=123456,
        taken_at=12.5,
        snd_wl1=4_294_966_000,
        snd_wnd=65535,
        max_window=65535,
        rcv_wnd=131072,
        rcv_wup=4_294_967_000,
        rcvbuf=131072,
        sndbuf=87040,
        buf_lock=0,
    )


def write_document(path: Path, change: Callable[[dict[str, object]], None]) -> None:
    good = path.with_suffix(".good")
    repair.save_dump(sample_dump(), good)
    document = json.loads(good.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "dump.json"
    repair.save_dump(sample_dump(), path)
    assert repair.load_dump(path) == sample_dump()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump.json"]
    document = json.loads(path.read_text())
    assert document["format"] == "shieldproxy-socket-dump"
    assert document["version"] == 1


@pytest.mark.parametrize(
    ("field", "change", "expected"),
    [
        ("rcv_nxt", lambda d: d.pop("rcv_nxt"), "missing"),
        ("version", lambda d: d.update(version=2), "only version"),
        ("format", lambda d: d.update(format="criu"), "shieldproxy-socket-dump"),
        ("recv_queue", lambda d: d.update(recv_queue="not base64!"), "base64"),
        ("local_port", lambda d: d.update(local_port="80"), "integer"),
        ("sack_ok", lambda d: d.update(sack_ok=1), "true or false"),
        ("rcv_wnd", lambda d: d.update(rcv_wnd=2**32), "integer"),
        ("local_addr", lambda d: d.update(local_addr="10.0.0.1"), "IPv6"),
        ("snd_una", lambda d: d.update(snd_una=6), "write_seq minus"),
    ],
)
def test_load_rejects_bad_field(
    tmp_path: Path,
    field: str,
    change: Callable[[dict[str, object]], None],
    expected: str,
) -> None:
    path = tmp_path / "bad.json"
    write_document(path, change)
    with pytest.raises(repair.SnapshotFileError) as caught:
        repair.load_dump(path)
    message = str(caught.value)
    assert str(path) in message
    assert repr(field) in message
    assert expected in message


def test_load_rejects_non_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b"\x00not json")
    with pytest.raises(repair.SnapshotFileError, match="not a JSON document"):
        repair.load_dump(path)


def test_load_rejects_non_object(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]")
    with pytest.raises(repair.SnapshotFileError, match="expected a JSON object"):
        repair.load_dump(path)


@pytest.mark.lab
@needs_root
def test_unsent_bytes_wait_for_finish(track: Closer) -> None:
    container, peer = connected_pair(track, socket.AF_INET)
    dump = repair.dump_socket(container)
    container.close()
    unsent = b"U" * 3000
    # The same dump, as if the application had written 3000 bytes that the
    # kernel had not sent yet.
    pending = dataclasses.replace(
        dump,
        send_queue=unsent,
        unsent_len=len(unsent),
        write_seq=seq_add(dump.write_seq, len(unsent)),
    )
    restored = track(repair.restore_socket(pending))
    time.sleep(0.5)
    assert ioctl_int(peer, repair.SIOCINQ) == 0
    repair.finish_restore(restored)
    assert recv_exactly(peer, len(unsent)) == unsent
    assert_nothing_more(peer)
