"""The shield against new connections, many flows at once and a non-Linux peer.

These tests build the checkpoint from the lower-level pieces instead of the
demo scenario: the shield's rules in the gateway, a :class:`Shield` on its
NFQUEUE, and sockets of this process in the container namespace. The sockets
are dumped with TCP_REPAIR, closed, and restored with the absorbed bytes. The
release follows the demo's order: announce the restored window, let the
container's packets out, switch repair off without the kernel's window probe,
let held packets through, remove the rules.
"""

import random
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from scapy.layers.inet import IP, TCP
from scapy.utils import PcapReader

from shieldproxy.demo import read_counters
from shieldproxy.handover import restored_right_edge
from shieldproxy.kernel.netns import enter_netns
from shieldproxy.kernel.nfqueue import QueueBinding
from shieldproxy.kernel.rawsock import RawSender
from shieldproxy.kernel.repair import (
    TCP_REPAIR_WINDOW,
    SocketDump,
    dump_socket,
    finish_restore,
    restore_socket,
)
from shieldproxy.kernel.rules import RuleSet, Scope
from shieldproxy.lab.topology import Lab, lab, sysctl
from shieldproxy.lab.user_tcp import UserTcpClient, rst_drop_rule
from shieldproxy.shield import Shield
from shieldproxy.tcp.flow import FlowLimits, restore_tsval
from shieldproxy.tcp.seq import seq_add, seq_diff, seq_ge
from shieldproxy.tcp.snapshot import FlowKey

from .test_demo_scenario import assert_no_shield_rules, checked_lab, leftovers

__all__ = ["checked_lab"]

pytestmark = pytest.mark.lab

PORT = 5201
QUEUE = 7
TCP_SYN_SENT = 2
# Offset of tcpi_total_retrans in struct tcp_info (include/uapi/linux/tcp.h).
_TCP_INFO_TOTAL_RETRANS = 100
# Bounds on every wait, so a broken shield fails the test instead of hanging it.
WAIT_S = 20.0
PEER_COUNTERS = (
    "TcpEstabResets",
    "TcpExtTCPAbortOnTimeout",
    "TcpExtTCPAbortOnData",
    "TcpExtPAWSEstab",
    "TcpExtTCPTimeouts",
)


@dataclass
class Gateway:
    """The shield's rules, NFQUEUE binding and raw sender in a lab's gateway."""

    lab: Lab
    shield: Shield
    rules: RuleSet
    binding: QueueBinding
    sender: RawSender
    closed: bool = False

    @classmethod
    def open(cls, created: Lab, scopes: list[Scope]) -> "Gateway":
        rules = RuleSet(f"{created.lab_id}cf", scopes, QUEUE, netns=created.gw_ns)
        with enter_netns(created.gw_ns):
            sender = RawSender()
            shield = Shield(sender)
            try:
                binding = QueueBinding(
                    QUEUE, lambda packet: shield.handle_packet(packet, time.monotonic())
                )
            except BaseException:
                sender.close()
                raise
        return cls(created, shield, rules, binding, sender)

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.binding.serve)
        nursery.start_soon(self.shield.run_timers)
        self.rules.install("queue")

    def close(self) -> None:
        """Remove everything the gateway installed; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            self.binding.close()
        finally:
            try:
                self.rules.remove()
            finally:
                self.sender.close()


@dataclass
class Frozen:
    """A dumped receiving socket and what its application read before the dump."""

    dump: SocketDump
    consumed: bytes


def freeze(
    gateway: Gateway, receivers: list[tuple[socket.socket, bytes]]
) -> list[Frozen]:
    """Dump each receiving socket, start shielding it, then close it.

    The rules must already queue the peers' packets. Each socket stays in
    repair mode, so closing it sends neither FIN nor RST.
    """
    frozen = []
    for sock, consumed in receivers:
        dump = dump_socket(sock)
        gateway.shield.add_flow(dump.flow_snapshot(), time.monotonic())
        frozen.append(Frozen(dump, consumed))
    for sock, _ in receivers:
        sock.close()
    return frozen


async def restore_and_release(
    gateway: Gateway,
    frozen: list[Frozen],
    *,
    close: bool = True,
) -> dict[FlowKey, socket.socket]:
    """Restore every frozen socket with its absorbed bytes, then release.

    With CLOSE false the gateway keeps its shield and binding for another
    freeze.
    """
    shield = gateway.shield
    restored: dict[FlowKey, socket.socket] = {}
    try:
        with enter_netns(gateway.lab.ctr_ns):
            for item in frozen:
                dump = item.dump
                handover_at = time.monotonic()
                handover = shield.handover(dump.key, handover_at)
                edge = restored_right_edge(
                    handover,
                    window_bytes=dump.rcv_wnd,
                    rcvbuf_bytes=dump.rcvbuf,
                    queued_bytes=len(dump.recv_queue) + len(handover.data),
                )
                tsval = restore_tsval(handover.tsval, handover_at, time.monotonic())
                sock = restore_socket(
                    dump, extra_receive=handover.data, right_edge=edge, tsval=tsval
                )
                restored[dump.key] = sock
                raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, 20)
                _wl1, _snd_wnd, _max_window, rcv_wnd, rcv_wup = struct.unpack(
                    "=5I", raw
                )
                shield.announce(
                    dump.key,
                    time.monotonic(),
                    restored_rcv_nxt=handover.rcv_nxt,
                    restored_right_edge=seq_add(rcv_wup, rcv_wnd),
                )
        await trio.to_thread.run_sync(gateway.rules.switch, "queue-in")
        for sock in restored.values():
            finish_restore(sock, window_probe=False)
        for key in restored:
            shield.release(key, time.monotonic())
        # SYNs of new connections go to the reopened listener
        shield.release_unknown(lambda key: True)
        await trio.to_thread.run_sync(gateway.rules.remove)
        gateway.binding.drain()
    except BaseException:
        for sock in restored.values():
            sock.close()
        raise
    if close:
        gateway.close()
    return restored


def tcp_info_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def total_retrans(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("=I", info, _TCP_INFO_TOTAL_RETRANS)[0]


def listen(created: Lab, backlog: int = 16) -> socket.socket:
    with enter_netns(created.ctr_ns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((created.ctr_v4, PORT))
    listener.listen(backlog)
    return listener


def peer_socket(created: Lab, source: str) -> socket.socket:
    with enter_netns(created.peer_ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    return sock


class Capture:
    """tcpdump in the lab's peer namespace, writing a pcap file."""

    def __init__(self, created: Lab, path: Path, expression: str) -> None:
        self.path = path
        self.process = created.popen(
            "peer",
            ["tcpdump", "-i", created.peer_if, "-U", "--immediate-mode", "-n",
             "-w", str(path), expression],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stderr is not None
        # tcpdump prints "listening on IFACE" to stderr once its socket is open
        ready, _, _ = select.select([self.process.stderr], [], [], WAIT_S)
        line = self.process.stderr.readline().decode() if ready else "(nothing)"
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"tcpdump did not start: {line!r}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT flushes the file
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def packets(self) -> list:
        """Return (wall-clock time, IP packet) for each captured TCP packet."""
        found = []
        with PcapReader(str(self.path)) as reader:
            for packet in reader:
                if IP in packet and TCP in packet[IP]:
                    found.append((float(packet.time), packet[IP]))
        return found


# 1. new connections to a frozen listening port
#
# The demo's receiver closes its listener after the first accept, and its
# restored process creates none, so these tests use a listener of their own:
# closed at the freeze, as the killed process's would be, and opened again at
# the restore.


@dataclass
class NewConnection:
    """What a client that connected during the freeze went through."""

    syns_during_freeze: int
    """SYNs the client had sent when the restore began."""
    syns_total: int
    """SYNs the client sent in all, from TCP_INFO."""
    captured_syns: int
    resets: int
    """RSTs from the container's address in the peer's capture."""
    syn_acks_before_release: int
    syn_acks_after_release: int
    connect_error: BaseException | None
    echoed: bool
    """The reopened listener accepted the connection and received its data."""
    old_flow_data: bytes


@pytest.fixture
def new_connection(checked_lab, tmp_path):
    observed = trio.run(_syn_during_freeze, checked_lab, tmp_path)
    assert_no_shield_rules(checked_lab)
    return observed


def test_syn_during_freeze_held_unanswered(new_connection):
    assert new_connection.syns_during_freeze >= 1
    assert new_connection.resets == 0
    assert new_connection.syn_acks_before_release == 0
    assert new_connection.syn_acks_after_release >= 1
    assert new_connection.connect_error is None
    assert new_connection.echoed
    assert new_connection.old_flow_data == b"beforeafter"


def test_syn_during_freeze_connects_at_release(new_connection):
    # connected from a SYN held during the freeze, not from a later one
    assert new_connection.syns_total == new_connection.syns_during_freeze
    assert new_connection.captured_syns == new_connection.syns_during_freeze


async def _syn_during_freeze(created: Lab, tmp_path: Path) -> NewConnection:
    capture = Capture(created, tmp_path / "peer.pcap", f"tcp port {PORT}")
    sockets: list[socket.socket] = []
    gateway = Gateway.open(created, [Scope(created.ctr_v4, PORT)])
    try:
        listener = listen(created)
        sockets.append(listener)
        # one established connection, shielded and restored as usual
        old_client = peer_socket(created, created.peer_v4)
        sockets.append(old_client)
        old_client.settimeout(WAIT_S)
        old_client.connect((created.ctr_v4, PORT))
        receiver, _ = listener.accept()
        sockets.append(receiver)
        old_client.sendall(b"before")
        wait_queued(receiver, len(b"before"))
        async with trio.open_nursery() as nursery:
            gateway.start(nursery)
            frozen = freeze(gateway, [(receiver, b"")])
            listener.close()  # the container's process is gone

            new_client = peer_socket(created, created.peer_v4)
            sockets.append(new_client)
            new_port = new_client.getsockname()[1]
            new_client.settimeout(WAIT_S)
            connected: list[BaseException | None] = []

            def connect() -> None:
                try:
                    new_client.connect((created.ctr_v4, PORT))
                    connected.append(None)
                except OSError as exc:
                    connected.append(exc)

            nursery.start_soon(trio.to_thread.run_sync, connect)
            # The first SYN and its retransmission after 1 s reach the shield.
            # The next retransmission would come 2 s after that, so the release
            # below has about 1.5 s to finish even on a loaded machine.
            await trio.sleep(1.5)
            assert connected == []
            assert tcp_info_state(new_client) == TCP_SYN_SENT
            syns_during_freeze = 1 + total_retrans(new_client)
            assert gateway.shield.totals()["held"] >= syns_during_freeze

            # The listener comes back first, as CRIU restores it: once repair
            # mode is off, the restored socket's port no longer allows reuse.
            reopened = listen(created)
            sockets.append(reopened)
            released_at = time.time()
            restored = await restore_and_release(gateway, frozen)
            sockets.extend(restored.values())
            with trio.fail_after(WAIT_S):
                while not connected:
                    await trio.sleep(0.01)
            syns_total = 1 + total_retrans(new_client)
            echoed = False
            if connected == [None]:
                reopened.settimeout(WAIT_S)
                accepted, _ = reopened.accept()
                sockets.append(accepted)
                new_client.sendall(b"hello")
                echoed = accepted.recv(16) == b"hello"
            old_client.sendall(b"after")
            old_client.shutdown(socket.SHUT_WR)
            (restored_sock,) = restored.values()
            old_flow_data, _ = await trio.to_thread.run_sync(
                read_until_eof, restored_sock
            )
            nursery.cancel_scope.cancel()
    finally:
        gateway.close()
        for sock in sockets:
            sock.close()
        capture.stop()
    packets = capture.packets()
    from_container = [(t, p) for t, p in packets if p.src == created.ctr_v4]
    syn_acks = [
        t for t, p in from_container if p[TCP].dport == new_port and p[TCP].flags.S
    ]
    client_syns = [
        p for _, p in packets
        if p.dst == created.ctr_v4 and p[TCP].sport == new_port and p[TCP].flags.S
    ]  # fmt: skip
    return NewConnection(
        syns_during_freeze=syns_during_freeze,
        syns_total=syns_total,
        captured_syns=len(client_syns),
        resets=len([p for _, p in from_container if p[TCP].flags.R]),
        syn_acks_before_release=len([t for t in syn_acks if t < released_at]),
        syn_acks_after_release=len([t for t in syn_acks if t >= released_at]),
        connect_error=connected[0],
        echoed=echoed,
        old_flow_data=old_flow_data,
    )


def read_until_eof(sock: socket.socket, limit: int = 1 << 20) -> tuple[bytes, str]:
    sock.settimeout(WAIT_S)
    data = b""
    while len(data) <= limit:
        try:
            chunk = sock.recv(65536)
        except OSError as exc:
            return data, str(exc)
        if not chunk:
            return data, "eof"
        data += chunk
    return data, "limit"


PART = 2000
# The shield acknowledges within milliseconds, and the peer retransmits
# several times within this bound if it does not.
ABSORB_WAIT_S = 5.0


def test_same_flow_frozen_twice(checked_lab):
    trio.run(_frozen_twice, checked_lab)
    assert_no_shield_rules(checked_lab)


async def _frozen_twice(created: Lab) -> None:
    """Freeze one connection twice with the same shield, as a daemon does."""
    stream = random.Random(3).randbytes(5 * PART)
    sockets: list[socket.socket] = []
    gateway = Gateway.open(created, [Scope(created.ctr_v4, PORT)])
    try:
        listener = listen(created)
        sockets.append(listener)
        client = peer_socket(created, created.peer_v4)
        sockets.append(client)
        client.settimeout(WAIT_S)
        client.connect((created.ctr_v4, PORT))
        receiver, _ = listener.accept()
        sockets.append(receiver)
        listener.close()
        client.sendall(stream[:PART])
        wait_queued(receiver, PART)
        async with trio.open_nursery() as nursery:
            gateway.start(nursery)
            absorbed = [0, 0]
            for freeze_number in range(2):
                if freeze_number:
                    await trio.to_thread.run_sync(gateway.rules.install, "queue")
                frozen = freeze(gateway, [(receiver, b"")])
                flow = gateway.shield.flows[frozen[0].dump.key]
                during = 1 + 2 * freeze_number
                client.sendall(stream[during * PART : (during + 1) * PART])
                with trio.move_on_after(ABSORB_WAIT_S):
                    while flow.stats.bytes_absorbed < PART:
                        await trio.sleep(0.02)
                absorbed[freeze_number] = flow.stats.bytes_absorbed
                # bytes the shield absorbed in each freeze so far
                assert absorbed[: freeze_number + 1] == [PART] * (freeze_number + 1)
                restored = await restore_and_release(
                    gateway, frozen, close=freeze_number == 1
                )
                sockets.extend(restored.values())
                (receiver,) = restored.values()
                client.sendall(stream[(during + 1) * PART : (during + 2) * PART])
                wait_queued(receiver, (during + 2) * PART)
            client.shutdown(socket.SHUT_WR)
            data, end = await trio.to_thread.run_sync(read_until_eof, receiver)
            nursery.cancel_scope.cancel()
    finally:
        gateway.close()
        for sock in sockets:
            sock.close()
    assert end == "eof"
    assert data == stream


# 2. many flows from many addresses, frozen and restored together

FLOW_COUNT = 1000
PEER_ADDRESSES = 50
# Bytes per flow: read by the application before the dump, left in its
# receive queue, sent during the freeze, and sent after the release.
READ_BEFORE = 700
QUEUED_BEFORE = 900
DURING = 3000
AFTER = 800
SEND_BATCH = 100
# Peer-namespace sysctls for successive groups of connections. Each socket
# keeps the options it negotiated when the sysctls change for the next group.
OPTION_GROUPS = [
    {},
    {"net.ipv4.tcp_timestamps": 0},
    {"net.ipv4.tcp_timestamps": 1, "net.ipv4.tcp_sack": 0},
    {"net.ipv4.tcp_sack": 1, "net.ipv4.tcp_window_scaling": 0},
    {"net.ipv4.tcp_timestamps": 0, "net.ipv4.tcp_sack": 0},
]
MSS_536_EVERY = 3


@pytest.fixture
def many_address_lab():
    with lab(extra_peer_addresses=PEER_ADDRESSES - 1) as created:
        yield created
    assert leftovers(created.lab_id) == []


def flow_bytes(index: int) -> bytes:
    """Return every byte flow INDEX sends, distinct from every other flow's."""
    size = READ_BEFORE + QUEUED_BEFORE + DURING + AFTER
    return random.Random(index).randbytes(size)


def test_thousand_flows_freeze_together(many_address_lab):
    trio.run(_thousand_flows, many_address_lab)
    assert_no_shield_rules(many_address_lab)


async def _thousand_flows(created: Lab) -> None:
    sources = [created.peer_v4, *created.extra_peer_v4]
    assert len(sources) == PEER_ADDRESSES
    sockets: list[socket.socket] = []
    gateway = Gateway.open(created, [Scope(created.ctr_v4, PORT)])
    try:
        listener = listen(created, backlog=FLOW_COUNT)
        sockets.append(listener)
        listener.settimeout(WAIT_S)
        clients: list[socket.socket] = []
        receivers: dict[tuple[str, int], socket.socket] = {}
        per_group = FLOW_COUNT // len(OPTION_GROUPS)
        for index in range(FLOW_COUNT):
            if index % per_group == 0:
                for key, value in OPTION_GROUPS[index // per_group].items():
                    sysctl(created.peer_ns, key, value)
            client = peer_socket(created, sources[index % PEER_ADDRESSES])
            sockets.append(client)
            if index % MSS_536_EVERY == 0:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
            client.settimeout(WAIT_S)
            client.connect((created.ctr_v4, PORT))
            clients.append(client)
            receiver, address = listener.accept()
            sockets.append(receiver)
            receivers[address[:2]] = receiver
        before_counters = read_counters(created.peer_ns, PEER_COUNTERS)

        # before the freeze: the application reads part, the rest stays queued
        ordered: list[tuple[socket.socket, bytes]] = []
        for index, client in enumerate(clients):
            data = flow_bytes(index)
            client.sendall(data[: READ_BEFORE + QUEUED_BEFORE])
            receiver = receivers[client.getsockname()[:2]]
            receiver.settimeout(WAIT_S)
            consumed = read_exactly(receiver, READ_BEFORE)
            ordered.append((receiver, consumed))
        for receiver, _ in ordered:
            wait_queued(receiver, QUEUED_BEFORE)
        index_of = {client.getsockname()[:2]: i for i, client in enumerate(clients)}

        async with trio.open_nursery() as nursery:
            gateway.start(nursery)
            frozen = freeze(gateway, ordered)
            options = {
                (f.dump.timestamps_ok, f.dump.sack_ok, f.dump.wscale_ok) for f in frozen
            }
            # every option mix took effect on some flow
            assert len(options) == len(OPTION_GROUPS)
            start = READ_BEFORE + QUEUED_BEFORE
            for first in range(0, FLOW_COUNT, SEND_BATCH):
                for index in range(first, min(FLOW_COUNT, first + SEND_BATCH)):
                    clients[index].sendall(flow_bytes(index)[start : start + DURING])
                # let the queue reader keep up, so the queue never overflows
                await trio.sleep(0.05)
            with trio.fail_after(WAIT_S):
                while gateway.shield.totals().get("bytes_absorbed", 0) < (
                    FLOW_COUNT * DURING
                ):
                    await trio.sleep(0.05)
            per_flow = {
                key: flow.stats.bytes_absorbed
                for key, flow in gateway.shield.flows.items()
            }
            assert len(per_flow) == FLOW_COUNT
            assert sorted(set(per_flow.values())) == [DURING]

            restored = await restore_and_release(gateway, frozen)
            sockets.extend(restored.values())
            for index, client in enumerate(clients):
                client.sendall(flow_bytes(index)[start + DURING :])
                client.shutdown(socket.SHUT_WR)
            outcome = await trio.to_thread.run_sync(read_all_until_eof, restored)
            counters = read_counters(created.peer_ns, PEER_COUNTERS)
            nursery.cancel_scope.cancel()
    finally:
        gateway.close()
        for sock in sockets:
            sock.close()
    assert len(outcome) == FLOW_COUNT
    wrong = []
    for item in frozen:
        key = item.dump.key
        data, end = outcome[key]
        expected = flow_bytes(index_of[key.peer_addr, key.peer_port])
        if end != "eof" or item.consumed + data != expected:
            wrong.append((str(key), end, len(item.consumed) + len(data)))
    assert wrong == []
    for name in PEER_COUNTERS:
        assert counters[name] - before_counters[name] == 0, name


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "EOF before the expected bytes"
        data += chunk
    return data


def wait_queued(sock: socket.socket, size: int) -> None:
    """Wait until SIZE bytes are in the socket's receive queue."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            queued = len(sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            queued = 0
        if queued >= size:
            return
        assert time.monotonic() < deadline, "the queued bytes did not arrive"
        time.sleep(0.005)


def read_all_until_eof(
    sockets: dict[FlowKey, socket.socket],
) -> dict[FlowKey, tuple[bytes, str]]:
    """Read every socket until EOF; return its bytes and how reading ended."""
    by_fd = {sock.fileno(): (key, sock) for key, sock in sockets.items()}
    data = {key: b"" for key in sockets}
    ended: dict[FlowKey, tuple[bytes, str]] = {}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + WAIT_S
    while by_fd and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            key, sock = by_fd[fd]
            try:
                chunk = sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as exc:
                chunk, end = b"", str(exc)
            else:
                end = "eof"
            if chunk:
                data[key] += chunk
                continue
            ended[key] = (data[key], end)
            poller.unregister(fd)
            del by_fd[fd]
    for key, _ in by_fd.values():
        ended[key] = (data[key], "timed out")
    return ended


# 3. a peer that is not the Linux kernel

USER_PORT = 40123
USER_PREFIX = 1500
USER_DURING = 1000
# More than the container's receive window, so the peer closes it.
USER_REST = 200_000


def right_edges(client: UserTcpClient, segments) -> list[int]:
    return [seq_add(s.ack, s.window << client.peer_wscale) for s in segments]


def check_answers(client: UserTcpClient, segments) -> None:
    """The segments sent in the container's name never move back."""
    # a SYN-ACK's window is never scaled, so it has no place in the comparison
    segments = [s for s in segments if "S" not in s.flags]
    edges = right_edges(client, segments)
    for before, after in zip(edges, edges[1:], strict=False):
        assert seq_ge(after, before)
    acks = [s.ack for s in segments]
    for before, after in zip(acks, acks[1:], strict=False):
        assert seq_ge(after, before)
    tsvals = [s.tsval for s in segments if s.tsval is not None]
    for before, after in zip(tsvals, tsvals[1:], strict=False):
        assert seq_ge(after, before)
    assert [s for s in segments if s.is_rst] == []


# Options of the user-space peer's SYN: none of them, as a minimal stack
# sends it, turns off timestamps, SACK and window scaling for the connection.
NO_OPTIONS = {"timestamps": False, "sack": False, "wscale": None}


@pytest.mark.parametrize(
    ("rcvbuf", "options"),
    [
        pytest.param(65536, {}, id="rcvbuf-64k"),
        pytest.param(65536, NO_OPTIONS, id="rcvbuf-64k-no-options"),
        pytest.param(8192, {}, id="rcvbuf-8k"),
    ],
)
def test_user_space_peer_keepalives_and_probes(checked_lab, rcvbuf, options):
    trio.run(_user_space_peer, checked_lab, rcvbuf, options)
    assert_no_shield_rules(checked_lab)


async def _user_space_peer(
    created: Lab, rcvbuf: int, options: dict[str, object]
) -> None:
    """Run a user-space peer with OPTIONS through a freeze of a listener with
    RCVBUF."""
    rule = rst_drop_rule(created.peer_v4, USER_PORT)
    created.run("peer", ["iptables", "-A", *rule])
    sockets: list[socket.socket] = []
    gateway = Gateway.open(created, [Scope(created.ctr_v4, PORT)])
    stream = random.Random(7).randbytes(USER_PREFIX + USER_REST)
    try:
        listener = listen(created)
        sockets.append(listener)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        listener.settimeout(WAIT_S)
        with enter_netns(created.peer_ns):
            client = UserTcpClient(
                created.peer_v4, USER_PORT, created.ctr_v4, PORT, **options
            )
        with client:
            client.connect(WAIT_S)
            receiver, _ = listener.accept()
            sockets.append(receiver)
            assert client.send_data(stream[:USER_PREFIX], WAIT_S) == USER_PREFIX
            wait_queued(receiver, USER_PREFIX)
            drops_before = read_counters(created.ctr_ns, ("TcpExtTCPRcvQDrop",))
            async with trio.open_nursery() as nursery:
                gateway.start(nursery)
                frozen = freeze(gateway, [(receiver, b"")])
                listener.close()
                dump = frozen[0].dump
                assert dump.timestamps_ok == options.get("timestamps", True)
                assert dump.sack_ok == options.get("sack", True)
                assert dump.wscale_ok == ("wscale" not in options)
                await trio.to_thread.run_sync(_talk_to_shield, client, stream)
                sent = seq_diff(client.snd_nxt, client.iss + 1)
                restored = await restore_and_release(gateway, frozen)
                sockets.extend(restored.values())
                (restored_sock,) = restored.values()
                outcome: list[tuple[bytes, str]] = []

                async def read() -> None:
                    result = await trio.to_thread.run_sync(
                        read_until_eof, restored_sock
                    )
                    outcome.append(result)

                # The peer fills the window the restored socket announced
                # before the application reads, so the restored socket must
                # have room for all of it.
                assert await trio.to_thread.run_sync(client.wait_for_window, WAIT_S)
                window = seq_diff(client.right_edge, client.snd_una)
                filled = await trio.to_thread.run_sync(
                    client.send_data, stream[sent : sent + window], WAIT_S
                )
                assert filled == window
                nursery.start_soon(read)
                # then the rest goes through as the application reads
                rest = stream[sent + window :]
                acked = await trio.to_thread.run_sync(client.send_data, rest, WAIT_S)
                assert acked == len(rest)
                assert client.finish(WAIT_S) is not None
                with trio.fail_after(WAIT_S):
                    while not outcome:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            drops = read_counters(created.ctr_ns, ("TcpExtTCPRcvQDrop",))
            # the restored socket had room for every byte of its window
            assert drops == drops_before
            check_answers(client, client.received)
    finally:
        gateway.close()
        for sock in sockets:
            sock.close()
        created.run("peer", ["iptables", "-D", *rule], check=False)
    ((data, end),) = outcome
    assert end == "eof"
    assert data == stream


def space_zero_length_probe() -> None:
    """Wait as long as a real stack waits between keepalives or probes.

    Like Linux (net.ipv4.tcp_invalid_ratelimit), the shield acknowledges
    zero-length segments outside the window at most once per interval. Real
    stacks send keepalives and window probes seconds or an RTO apart.
    """
    time.sleep(FlowLimits().invalid_ack_interval_s)


def _talk_to_shield(client: UserTcpClient, stream: bytes) -> None:
    """Send data, keepalives and zero-window probes to the frozen container."""
    shield_from = len(client.received)
    offset = seq_diff(client.snd_nxt, client.iss + 1)

    # data inside the window is acknowledged
    chunk = stream[offset : offset + USER_DURING]
    assert client.send_data(chunk, WAIT_S) == len(chunk)
    offset += len(chunk)

    # a keepalive, without and with a garbage byte, gets an ACK of snd_nxt
    for garbage in (False, True):
        space_zero_length_probe()
        client.keepalive(garbage)
        answer = client.wait_for_ack(client.snd_nxt, WAIT_S)
        assert answer is not None
        assert answer.ack == client.snd_nxt
        assert answer.payload == b""

    # fill the window: the shield moves its right edge no further than the
    # container's, so the window closes
    edge_before = client.right_edge
    offset += client.send_data(stream[offset:], 2.0)
    assert client.snd_wnd == 0
    assert seq_ge(client.right_edge, edge_before)
    assert offset < len(stream)

    # zero-window probes as Linux and as BSD-derived stacks send them
    for next_byte in (None, stream[offset : offset + 1]):
        count = len(client.received)
        space_zero_length_probe()
        client.probe_zero_window(next_byte)
        answer = client.wait_for_ack(client.snd_nxt, WAIT_S)
        assert answer is not None
        assert answer.ack == client.snd_nxt
        assert answer.window == 0
        assert len(client.received) > count
    check_answers(client, client.received[shield_from:])
