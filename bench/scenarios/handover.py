"""Hand-over of many flows: restore each socket with the bytes the shield absorbed.

Every flow is a real connection from the lab peer to the container, and this
process plays both ends. Each peer first sends bytes that stay unread in the
container's receive queue. The container's sockets are then dumped with
TCP_REPAIR and closed in repair mode, the shield absorbs more bytes from each
peer, and finally each socket is restored with those bytes and released. Every
flow must then deliver exactly what its peer sent, also after the release.
"""

from __future__ import annotations

import resource
import secrets
import socket
import struct
import time
from contextlib import ExitStack
from dataclasses import dataclass

import trio

from bench.context import Context
from bench.report import Figure, ScenarioReport
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
from shieldproxy.lab.stream import pattern
from shieldproxy.shield import Shield
from shieldproxy.tcp.flow import restore_tsval
from shieldproxy.tcp.seq import seq_add

PORT = 5501
QUEUE = 5
QUEUED_BYTES = 4096
"""Bytes per flow left unread in the container's receive queue at the dump."""
ABSORBED_BYTES = 8192
"""Bytes per flow the peer sends during the freeze, for the shield to absorb."""
AFTER_BYTES = 1024
"""Bytes per flow the peer sends after the release."""
STREAM_STRIDE = 1 << 20
"""Each flow carries the stream pattern from its own offset, index * stride."""
WAIT_TIMEOUT_S = 30.0

MEASURES = (
    "{flows:,} real connections from the peer to the container. Each peer sends "
    f"{QUEUED_BYTES:,} bytes that stay in the container's receive queue; the "
    "container's sockets are dumped with TCP_REPAIR and closed in repair mode; "
    f"the shield absorbs {ABSORBED_BYTES:,} more bytes from each peer. "
    "**Restore**: handing each flow over and rebuilding its socket with "
    "TCP_REPAIR, the absorbed bytes appended to its receive queue. **Release**: "
    "announcing each restored window, switching repair off, letting held packets "
    "through and removing the rules. Afterwards every flow must deliver exactly "
    f"its {QUEUED_BYTES + ABSORBED_BYTES:,} bytes, then {AFTER_BYTES:,} bytes "
    "sent after the release. CRIU's drop lock absorbs nothing, so there is no "
    "baseline here."
)


@dataclass
class Flow:
    index: int
    peer: socket.socket
    container: socket.socket | None = None
    dump: SocketDump | None = None
    restored: socket.socket | None = None

    def expected(self, start: int, length: int) -> bytes:
        return pattern(self.index * STREAM_STRIDE + start, length)


async def run(context: Context) -> ScenarioReport:
    count = context.preset.handover_flows
    report = ScenarioReport(
        name="handover",
        title="Hand-over of many flows",
        measures=MEASURES.format(flows=count),
        baseline_label="drop lock",
    )
    _raise_file_limit(4 * count + 1024)
    timings: dict[str, float] = {}
    with ExitStack() as sockets:
        flows = _connect(context, count, sockets)
        context.progress.step(f"  {count:,} connections up")
        for flow in flows:
            flow.peer.sendall(flow.expected(0, QUEUED_BYTES))
        await _wait_queued(flows)
        intact = await _freeze_and_restore(context, flows, sockets, timings)
    report.data = {"flows": count, "seconds": timings, "intact_flows": intact}
    per_flow_us = {name: value / count * 1e6 for name, value in timings.items()}
    report.data["per_flow_us"] = per_flow_us
    report.figures = [
        Figure(f"dump, {count:,} flows", timings["dump"] * 1000, unit="ms", digits=1),
        Figure(
            f"restore with absorbed bytes, {count:,} flows",
            timings["restore"] * 1000,
            unit="ms",
            digits=1,
        ),
        Figure("restore per flow", per_flow_us["restore"], unit="µs", digits=0),
        Figure(
            f"release, {count:,} flows", timings["release"] * 1000, unit="ms", digits=1
        ),
        Figure(
            "flows that delivered every byte once and in order",
            f"{intact:,} of {count:,}",
            target="all",
            met=intact == count,
        ),
    ]
    return report


def _raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def _connect(context: Context, count: int, sockets: ExitStack) -> list[Flow]:
    """Open COUNT connections from the peer to the container namespace."""
    lab = context.lab
    with enter_netns(lab.ctr_ns):
        listener = sockets.enter_context(socket.socket())
    listener.bind((lab.ctr_v4, PORT))
    listener.listen(count)
    listener.settimeout(WAIT_TIMEOUT_S)
    flows = []
    for index in range(count):
        with enter_netns(lab.peer_ns):
            peer = sockets.enter_context(socket.socket())
        peer.setblocking(False)
        peer.connect_ex((lab.ctr_v4, PORT))
        flows.append(Flow(index, peer))
    by_port = {}
    for _ in range(count):
        conn, address = listener.accept()
        sockets.enter_context(conn)
        by_port[address[1]] = conn
    listener.close()
    for flow in flows:
        flow.peer.setblocking(True)
        flow.peer.settimeout(WAIT_TIMEOUT_S)
        flow.container = by_port[flow.peer.getsockname()[1]]
    return flows


async def _wait_queued(flows: list[Flow]) -> None:
    """Wait until every container socket contains its peer's first bytes."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    for flow in flows:
        assert flow.container is not None
        while _inq(flow.container) < QUEUED_BYTES:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"flow {flow.index} has {_inq(flow.container)} of "
                    f"{QUEUED_BYTES} bytes queued after {WAIT_TIMEOUT_S:.0f} s"
                )
            await trio.sleep(0.01)


def _inq(sock: socket.socket) -> int:
    import fcntl
    import termios

    buffer = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buffer)
    value: int = struct.unpack("=i", buffer)[0]
    return value


async def _freeze_and_restore(
    context: Context,
    flows: list[Flow],
    sockets: ExitStack,
    timings: dict[str, float],
) -> int:
    """Engage, absorb, restore and release every flow; return the intact ones."""
    lab = context.lab
    tag = f"b{lab.lab_id}{secrets.token_hex(2)}"
    rules = RuleSet(
        tag, [Scope(lab.ctr_v4, PORT)], QUEUE, hook="FORWARD", netns=lab.gw_ns
    )
    with ExitStack() as stack:
        with enter_netns(lab.gw_ns):
            sender = stack.enter_context(RawSender())
            shield = Shield(sender)
            binding = stack.enter_context(
                QueueBinding(
                    QUEUE, lambda packet: shield.handle_packet(packet, time.monotonic())
                )
            )
        stack.callback(rules.remove)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(binding.serve)
            nursery.start_soon(shield.run_timers)
            rules.install("queue")

            started = time.perf_counter()
            for flow in flows:
                assert flow.container is not None
                flow.dump = dump_socket(flow.container)
                shield.add_flow(flow.dump.flow_snapshot(), time.monotonic())
                flow.container.close()  # in repair mode: no FIN, no RST
            timings["dump"] = time.perf_counter() - started

            context.progress.step(f"  absorbing {ABSORBED_BYTES:,} bytes per flow")
            await _send_all(flows, QUEUED_BYTES, ABSORBED_BYTES)
            await _wait_absorbed(shield, len(flows) * ABSORBED_BYTES)

            context.progress.step(f"  restoring {len(flows):,} flows")
            windows = _restore(lab.ctr_ns, shield, flows, sockets, timings)
            started = time.perf_counter()
            for flow, (rcv_nxt, right_edge) in zip(flows, windows, strict=True):
                assert flow.dump is not None
                shield.announce(
                    flow.dump.key,
                    time.monotonic(),
                    restored_rcv_nxt=rcv_nxt,
                    restored_right_edge=right_edge,
                )
            rules.switch("queue-in")
            for flow in flows:
                assert flow.restored is not None and flow.dump is not None
                finish_restore(flow.restored, window_probe=False)
                shield.release(flow.dump.key, time.monotonic())
            rules.remove()
            timings["release"] = time.perf_counter() - started
            binding.drain()
            nursery.cancel_scope.cancel()
    start = QUEUED_BYTES + ABSORBED_BYTES
    await _send_all(flows, start, AFTER_BYTES)
    return await _count_intact(flows, start + AFTER_BYTES)


def _restore(
    ctr_ns: str,
    shield: Shield,
    flows: list[Flow],
    sockets: ExitStack,
    timings: dict[str, float],
) -> list[tuple[int, int]]:
    """Hand over and restore each flow; return each (rcv_nxt, right edge)."""
    windows = []
    started = time.perf_counter()
    for flow in flows:
        dump = flow.dump
        assert dump is not None
        handover_at = time.monotonic()
        handover = shield.handover(dump.key, handover_at)
        edge = restored_right_edge(
            handover,
            window_bytes=dump.rcv_wnd,
            rcvbuf_bytes=dump.rcvbuf,
            queued_bytes=len(dump.recv_queue) + len(handover.data),
        )
        tsval = restore_tsval(handover.tsval, handover_at, time.monotonic())
        with enter_netns(ctr_ns):
            restored = restore_socket(
                dump, extra_receive=handover.data, right_edge=edge, tsval=tsval
            )
        flow.restored = sockets.enter_context(restored)
        raw = restored.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, 20)
        _wl1, _snd_wnd, _max_window, rcv_wnd, rcv_wup = struct.unpack("=5I", raw)
        rcv_nxt = seq_add(dump.rcv_nxt, len(handover.data))
        windows.append((rcv_nxt, seq_add(rcv_wup, rcv_wnd)))
    timings["restore"] = time.perf_counter() - started
    return windows


async def _send_all(flows: list[Flow], start: int, length: int) -> None:
    """Send bytes [start, start + length) of each flow's stream from its peer."""
    pending = {flow.index: (flow, 0) for flow in flows}
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while pending:
        for index, (flow, done) in list(pending.items()):
            data = flow.expected(start + done, length - done)
            try:
                sent = flow.peer.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if done + sent >= length:
                del pending[index]
            else:
                pending[index] = (flow, done + sent)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"timed out: {len(pending)} peers could not send their bytes "
                f"within {WAIT_TIMEOUT_S:.0f} s"
            )
        await trio.sleep(0.001 if pending else 0)


async def _wait_absorbed(shield: Shield, expected: int) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while (absorbed := shield.totals().get("bytes_absorbed", 0)) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the shield absorbed {absorbed:,} of {expected:,} bytes within "
                f"{WAIT_TIMEOUT_S:.0f} s"
            )
        await trio.sleep(0.02)


async def _count_intact(flows: list[Flow], total: int) -> int:
    """Read every restored socket; return how many delivered exactly their bytes."""
    received = {flow.index: bytearray() for flow in flows}
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    waiting = [flow for flow in flows if flow.restored is not None]
    while waiting and time.monotonic() < deadline:
        still = []
        for flow in waiting:
            assert flow.restored is not None
            data = received[flow.index]
            try:
                data += flow.restored.recv(total - len(data), socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            if len(data) < total:
                still.append(flow)
        waiting = still
        await trio.sleep(0.005 if waiting else 0)
    return sum(
        1 for flow in flows if bytes(received[flow.index]) == flow.expected(0, total)
    )
