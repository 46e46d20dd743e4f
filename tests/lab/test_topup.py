"""Appending to a socket in repair mode, as the shield does after CRIU restores."""

import socket
import struct
import subprocess
import sys
import time

import pytest

from shieldproxy.kernel.repair import (
    TCP_QUEUE_SEQ,
    TCP_RECV_QUEUE,
    TCP_REPAIR,
    TCP_REPAIR_QUEUE,
    TCP_REPAIR_WINDOW,
    TCP_TIMESTAMP,
)
from shieldproxy.kernel.topup import TopUpError, restored_sockets, top_up, tree_pids
from shieldproxy.lab.topology import lab
from shieldproxy.tcp.seq import seq_add, seq_diff
from shieldproxy.tcp.snapshot import FlowKey

pytestmark = pytest.mark.lab

WINDOW = struct.Struct("=5I")


def get_u32(sock, option):
    return struct.unpack("=I", sock.getsockopt(socket.IPPROTO_TCP, option, 4))[0]


@pytest.fixture
def connection():
    """A connected pair on loopback in a lab namespace, the server end in repair."""
    with lab() as created, created.enter("ctr"):
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        listener.close()
        try:
            client.sendall(b"before the dump|")
            time.sleep(0.1)
            server.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
            server.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            yield client, server
        finally:
            client.close()
            server.close()


def key_of(sock):
    local, peer = sock.getsockname(), sock.getpeername()
    return FlowKey.create(local[0], local[1], peer[0], peer[1])


def test_top_up_appends_and_moves_window(connection):
    client, server = connection
    key = key_of(server)
    rcv_nxt = get_u32(server, TCP_QUEUE_SEQ)
    clock = get_u32(server, TCP_TIMESTAMP)
    late = b"acknowledged by the shield during the restore"
    requested_edge = seq_add(rcv_nxt, 500_000)
    new_rcv_nxt, edge = top_up(
        server,
        key=key,
        expected_rcv_nxt=rcv_nxt,
        data=late,
        right_edge=requested_edge,
        tsval_floor=seq_add(clock, 5000),
    )
    assert new_rcv_nxt == seq_add(rcv_nxt, len(late))
    assert get_u32(server, TCP_QUEUE_SEQ) == new_rcv_nxt
    raw = server.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, WINDOW.size)
    _, _, _, rcv_wnd, rcv_wup = WINDOW.unpack(raw)
    assert rcv_wup == new_rcv_nxt
    assert seq_add(rcv_wup, rcv_wnd) == edge
    assert seq_diff(edge, requested_edge) >= 0
    assert seq_diff(get_u32(server, TCP_TIMESTAMP), seq_add(clock, 5000)) >= 0
    # the low bit selects microsecond timestamps on Linux 6.7+, so it stays
    assert get_u32(server, TCP_TIMESTAMP) & 1 == clock & 1
    server.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, -1)
    server.settimeout(5)
    received = b""
    while len(received) < len(b"before the dump|") + len(late):
        received += server.recv(4096)
    assert received == b"before the dump|" + late


def test_top_up_rejects_other_rcv_nxt(connection):
    _, server = connection
    rcv_nxt = get_u32(server, TCP_QUEUE_SEQ)
    with pytest.raises(TopUpError, match="images and the shield disagree"):
        top_up(
            server,
            key=key_of(server),
            expected_rcv_nxt=seq_add(rcv_nxt, 1),
            data=b"x",
            right_edge=rcv_nxt,
            tsval_floor=None,
        )
    assert get_u32(server, TCP_QUEUE_SEQ) == rcv_nxt


def test_top_up_requires_repair_mode(connection):
    _, server = connection
    server.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, -1)
    with pytest.raises(TopUpError, match="not in repair mode"):
        top_up(
            server,
            key=key_of(server),
            expected_rcv_nxt=0,
            data=b"x",
            right_edge=0,
            tsval_floor=None,
        )


def test_restored_sockets_found_in_child():
    holder = (
        "import socket, sys, time\n"
        "listener = socket.create_server(('127.0.0.1', 0))\n"
        "client = socket.create_connection(listener.getsockname())\n"
        "server, _ = listener.accept()\n"
        "print(*server.getsockname(), *server.getpeername(), flush=True)\n"
        "time.sleep(30)\n"
    )
    with lab() as created:
        child = created.popen(
            "ctr", [sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True
        )
        try:
            local, local_port, peer, peer_port = child.stdout.readline().split()
            flow_key = FlowKey.create(local, int(local_port), peer, int(peer_port))
            other = FlowKey.create("127.0.0.1", 1, "127.0.0.1", 2)
            assert child.pid in tree_pids(child.pid)
            found = restored_sockets(child.pid, {flow_key, other})
            try:
                assert set(found) == {flow_key}
                assert key_of(found[flow_key]) == flow_key
            finally:
                for sock in found.values():
                    sock.close()
        finally:
            child.kill()
            child.wait()


def test_restored_sockets_missing_process():
    with pytest.raises(TopUpError, match="not found in this PID namespace"):
        restored_sockets(2**22 + 1, set())
