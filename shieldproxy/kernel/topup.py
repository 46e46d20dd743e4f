"""Append bytes to sockets that CRIU has restored but not yet let go of.

CRIU restores TCP sockets in repair mode and runs the ``post-restore`` action
script before it switches repair off. Bytes the shield acknowledged after the
images were written can still join the receive queue then, so the shield goes
on acknowledging the peers while CRIU restores. This module finds the restored sockets
of a process tree (pidfd_getfd, which needs ptrace rights over the tree) and
appends to a socket's receive queue with TCP_REPAIR_QUEUE, then moves its
window and timestamp clock so neither goes back from what the shield showed.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from pathlib import Path

from ..tcp.seq import seq_add, seq_diff, seq_lt, seq_max
from ..tcp.snapshot import FlowKey
from .repair import (
    RECV_CHUNK,
    SIOCINQ,
    TCP_QUEUE_SEQ,
    TCP_RECV_QUEUE,
    TCP_REPAIR,
    TCP_REPAIR_QUEUE,
    TCP_REPAIR_WINDOW,
    TCP_TIMESTAMP,
    _get_tcp_int,
    _ioctl_int,
    _set_tcp_int,
    _setsockopt,
    ensure_window_room,
    force_receive_buffer,
    take_socket,
)

log = logging.getLogger(__name__)

_REPAIR_WINDOW = struct.Struct("=5I")
_MAX_PROCESSES = 10_000


class TopUpError(OSError):
    """A restored socket could not be found or given its bytes."""


def tree_pids(root: int) -> list[int]:
    """Return ROOT and every descendant, from /proc/<pid>/task/*/children."""
    pids = [root]
    index = 0
    while index < len(pids) and len(pids) < _MAX_PROCESSES:
        pid = pids[index]
        index += 1
        tasks = Path(f"/proc/{pid}/task")
        try:
            task_ids = [entry.name for entry in tasks.iterdir()]
        except OSError:
            continue
        for task in task_ids:
            try:
                children = (tasks / task / "children").read_text().split()
            except OSError:
                continue
            pids.extend(int(child) for child in children if int(child) not in pids)
    return pids


def restored_sockets(root: int, keys: set[FlowKey]) -> dict[FlowKey, socket.socket]:
    """Take the TCP sockets of KEYS from the process tree under ROOT.

    Each socket is taken once even when several descriptors share it. Sockets
    of other flows are closed again at once.

    Raises:
        TopUpError: ROOT does not exist in this PID namespace. Descriptors
            that cannot be taken are skipped, so a missing key is missing
            from the result.
    """
    if not Path(f"/proc/{root}").exists():
        raise TopUpError(
            errno.ESRCH, f"restored process {root} not found in this PID namespace"
        )
    found: dict[FlowKey, socket.socket] = {}
    seen: set[str] = set()
    for pid in tree_pids(root):
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            entries = list(fd_dir.iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                target = os.readlink(entry)
            except OSError:
                continue
            if not target.startswith("socket:") or target in seen:
                continue
            seen.add(target)
            try:
                sock = take_socket(pid, int(entry.name))
            except OSError:
                continue  # not a TCP socket, or gone
            key = _key_of(sock)
            if key in keys and key not in found:
                found[key] = sock
            else:
                sock.close()
        if len(found) == len(keys):
            break
    return found


def _key_of(sock: socket.socket) -> FlowKey | None:
    try:
        local = sock.getsockname()
        peer = sock.getpeername()
    except OSError:
        return None
    return FlowKey.create(local[0], local[1], peer[0], peer[1])


def top_up(
    sock: socket.socket,
    *,
    key: FlowKey,
    expected_rcv_nxt: int,
    data: bytes,
    right_edge: int,
    tsval_floor: int | None,
) -> tuple[int, int]:
    """Append DATA to a restored socket in repair mode; return (rcv_nxt, edge).

    The socket's rcv_nxt must be EXPECTED_RCV_NXT, where DATA starts. The
    window's right edge ends at or past RIGHT_EDGE and never before the edge
    the socket already had. With TSVAL_FLOOR the timestamp clock is moved up
    to it, keeping the lowest bit (Linux 6.7+ reads it as the microsecond
    flag).

    Raises:
        TopUpError: the socket is not in repair mode, its rcv_nxt differs, or
            the kernel rejected a write of the queue.
        RepairError: a socket option could not be read or set.
    """
    if _get_tcp_int(sock, TCP_REPAIR, "read TCP_REPAIR", key) != 1:
        raise TopUpError(
            errno.EINVAL, f"{key}: the restored socket is not in repair mode"
        )
    _set_tcp_int(
        sock, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "select the receive queue", key
    )
    rcv_nxt = _get_tcp_int(sock, TCP_QUEUE_SEQ, "read rcv_nxt", key)
    if rcv_nxt != expected_rcv_nxt:
        raise TopUpError(
            errno.EINVAL,
            f"{key}: the restored socket's rcv_nxt is {rcv_nxt}, expected "
            f"{expected_rcv_nxt}; the images and the shield disagree",
        )
    if data:
        _grow_receive_buffer(sock, len(data), key)
        _send_all(sock, data, key)
    new_rcv_nxt = seq_add(rcv_nxt, len(data))
    edge = _set_window(sock, new_rcv_nxt, right_edge, key)
    ensure_window_room(sock, seq_diff(edge, new_rcv_nxt), key)
    if tsval_floor is not None:
        clock = _get_tcp_int(sock, TCP_TIMESTAMP, "read TCP_TIMESTAMP", key)
        if seq_lt(clock, tsval_floor):
            raised = ((tsval_floor & ~1) | (clock & 1)) & 0xFFFFFFFF
            _set_tcp_int(sock, TCP_TIMESTAMP, raised, "set TCP_TIMESTAMP", key)
    log.info(
        "topped up %s: %d bytes, rcv_nxt %d, right edge %d",
        key,
        len(data),
        new_rcv_nxt,
        edge,
    )
    return new_rcv_nxt, edge


def _grow_receive_buffer(sock: socket.socket, length: int, key: FlowKey) -> None:
    # The repair queue write fails with ENOBUFS once sk_rmem_alloc passes
    # sk_rcvbuf, and CRIU sets the buffer size on restore, which stops the
    # kernel from growing it. Each 64 KiB skb was
    # charged about 104 bytes beyond its data on Linux 6.18.
    queued = _ioctl_int(sock, SIOCINQ, "read SIOCINQ", str(key))
    needed = 2 * (queued + length) + 64 * 1024
    current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if current < needed:
        force_receive_buffer(sock, needed, key)


def _send_all(sock: socket.socket, data: bytes, key: FlowKey) -> None:
    view = memoryview(data)
    written = 0
    while written < len(data):
        try:
            sent = sock.send(view[written : written + RECV_CHUNK])
        except OSError as exc:
            raise TopUpError(
                exc.errno or errno.EIO,
                f"{key}: writing {len(data)} bytes to the receive queue failed "
                f"after {written}: {exc.strerror}",
            ) from exc
        if sent <= 0:
            raise TopUpError(errno.EIO, f"{key}: the receive queue took no bytes")
        written += sent


def _set_window(
    sock: socket.socket, rcv_nxt: int, right_edge: int, key: FlowKey
) -> int:
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _REPAIR_WINDOW.size)
    snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = _REPAIR_WINDOW.unpack(raw)
    edge = seq_max(seq_add(rcv_wup, rcv_wnd), right_edge & 0xFFFFFFFF)
    edge = seq_max(edge, rcv_nxt)
    window = _REPAIR_WINDOW.pack(
        snd_wl1, snd_wnd, max(max_window, snd_wnd), seq_diff(edge, rcv_nxt), rcv_nxt
    )
    _setsockopt(sock, socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, window, "set window", key)
    return edge
