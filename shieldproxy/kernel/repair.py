"""Dump and rebuild ESTABLISHED TCP sockets through the kernel's TCP_REPAIR interface.

The restore follows the order of CRIU's libsoccr: socket, repair on, bind, queue
sequence numbers, connect, options, timestamp clock, queues, window. Every call
here needs CAP_NET_ADMIN in the socket's network namespace.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import ipaddress
import json
import logging
import math
import os
import socket
import struct
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from shieldproxy.kernel.rawsock import RawSender
from shieldproxy.tcp.segment import ACK, FIN, RST, Segment, TcpOptions, build_packet
from shieldproxy.tcp.seq import seq_add, seq_diff, seq_ge, seq_max
from shieldproxy.tcp.snapshot import FlowKey, FlowSnapshot

log = logging.getLogger(__name__)

# Socket options from include/uapi/linux/tcp.h.
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29

# Values of TCP_REPAIR.
TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0
TCP_REPAIR_OFF_NO_WP = -1

# Values of TCP_REPAIR_QUEUE.
TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2

# Option codes accepted by TCP_REPAIR_OPTIONS (RFC 9293, RFC 7323, RFC 2018).
TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8

# Bits of tcp_info.tcpi_options.
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

# ioctl numbers from asm-generic, shared by x86-64 and aarch64.
SIOCINQ = 0x541B
"""Bytes in the receive queue not yet read by the application (FIONREAD)."""
SIOCOUTQ = 0x5411
"""Bytes in the send queue not yet acknowledged by the peer (TIOCOUTQ)."""
SIOCOUTQNSD = 0x894B
"""Bytes in the send queue not yet sent."""

SO_SNDBUFFORCE = 32
"""SO_SNDBUF for CAP_NET_ADMIN, not capped by net.core.wmem_max."""
SO_RCVBUFFORCE = 33
"""SO_RCVBUF for CAP_NET_ADMIN, not capped by net.core.rmem_max."""
SO_BUF_LOCK = 72
"""Linux 5.14+: SOCK_SNDBUF_LOCK (1) and SOCK_RCVBUF_LOCK (2) of sk_userlocks."""
SO_MEMINFO = 55
_SK_MEMINFO_RMEM_ALLOC = 0

_TCP_INFO_PREFIX = struct.Struct("=7B")
_REPAIR_WINDOW = struct.Struct("=5I")
_REPAIR_OPT = struct.Struct("=2I")

SYS_PIDFD_GETFD = 438
"""pidfd_getfd(2); the number is the same on every architecture except alpha."""

RECV_CHUNK = 64 * 1024
"""Bytes per receive-queue write. The kernel takes at most 69,632 bytes per send()
in repair mode, because it builds one skb per call."""

_SEND_CHUNK = 64 * 1024
_WRITE_ATTEMPTS_PER_CHUNK = 4

_pending_unsent: weakref.WeakKeyDictionary[socket.socket, bytes] = (
    weakref.WeakKeyDictionary()
)
"""Never-sent send-queue bytes of restored sockets, written by finish_restore."""

DUMP_FORMAT = "shieldproxy-socket-dump"
DUMP_VERSION = 1

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}
TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8

PeerClose = Literal["fin", "rst"]
"""Peer's end of a connection while the socket was away: its FIN or its RST."""

PEER_CLOSE_ATTEMPTS = 3
"""Times the peer's FIN or RST is sent to a restored socket before giving up."""
PEER_CLOSE_WAIT_S = 0.2
"""Seconds to wait after each attempt for the socket to take the segment. The
segment goes through the namespace's loopback, which took it within a
millisecond in the lab tests."""


class RepairError(OSError):
    """A TCP_REPAIR step failed, with the operation, the errno and the flow."""

    def __init__(
        self,
        operation: str,
        errno_value: int,
        flow: FlowKey | str | None = None,
        detail: str | None = None,
    ) -> None:
        self.operation = operation
        self.flow = flow
        message = f"{operation} failed: {os.strerror(errno_value)}"
        if flow is not None:
            message += f" (flow {flow})"
        if detail:
            message += f". {detail}"
        super().__init__(errno_value, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UnsupportedStateError(RepairError):
    """The socket is in a TCP state that dump_socket cannot handle yet."""

    def __init__(self, state: int, flow: FlowKey | str | None) -> None:
        self.state = state
        name = TCP_STATES.get(state, f"unknown state {state}")
        super().__init__(
            "dump socket",
            errno.EOPNOTSUPP,
            flow,
            f"The socket is in state {name}, but only ESTABLISHED sockets can be "
            "dumped",
        )


class ReceiveBufferFull(RepairError):
    """The restored receive queue cannot hold all the bytes to inject."""

    def __init__(
        self, flow: FlowKey, fitted: int, total: int, rmem_needed: int, reason: str
    ) -> None:
        self.fitted = fitted
        self.total = total
        self.rmem_needed = rmem_needed
        super().__init__(
            "write receive queue",
            errno.ENOBUFS,
            flow,
            f"Only {fitted} of {total} bytes fit into the receive queue ({reason}). "
            f"Raise the third value of the sysctl net.ipv4.tcp_rmem in the socket's "
            f"network namespace to at least {rmem_needed} and restore again",
        )


class SnapshotFileError(ValueError):
    """A socket dump file is unreadable, of the wrong format or has an invalid
    field."""


@dataclass(frozen=True)
class SocketDump:
    """Everything needed to rebuild one TCP socket, seen from the container.

    Sequence numbers are raw 32-bit values. Buffer sizes are what getsockopt
    returns, which is twice the value given to setsockopt.
    """

    family: int
    """IP version, 4 or 6."""
    state: int
    """TCP state number as in tcp_info.tcpi_state (1 is ESTABLISHED)."""
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    rcv_nxt: int
    """Sequence number after the last byte of the receive queue."""
    write_seq: int
    """Sequence number after the last byte of the send queue."""
    snd_una: int
    """Oldest unacknowledged sequence number, write_seq minus SIOCOUTQ."""
    unsent_len: int
    """Bytes at the end of the send queue never sent (SIOCOUTQNSD)."""
    recv_queue: bytes
    """Received bytes the application has not read yet."""
    send_queue: bytes
    """Bytes written by the application and not yet acknowledged by the peer."""
    mss_clamp: int
    """TCP_MAXSEG read in repair mode, which is the kernel's mss_clamp."""
    snd_wscale: int
    rcv_wscale: int
    sack_ok: bool
    timestamps_ok: bool
    wscale_ok: bool
    tsval: int
    """Socket's TCP timestamp clock (TCP_TIMESTAMP, ms) at ``taken_at``."""
    taken_at: float
    """CLOCK_MONOTONIC seconds of this host at which ``tsval`` was read."""
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    rcvbuf: int
    """SO_RCVBUF."""
    sndbuf: int
    """SO_SNDBUF."""
    buf_lock: int
    """SO_BUF_LOCK bits: 1 when SO_SNDBUF, 2 when SO_RCVBUF was set explicitly."""
    version: int = DUMP_VERSION

    @property
    def key(self) -> FlowKey:
        return FlowKey.create(
            self.local_addr, self.local_port, self.remote_addr, self.remote_port
        )

    @property
    def socket_family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.family == 6 else socket.AF_INET

    def flow_snapshot(self) -> FlowSnapshot:
        """Build the shield's starting state for this flow."""
        return FlowSnapshot(
            key=self.key,
            rcv_nxt=self.rcv_nxt,
            rcv_wup=self.rcv_wup,
            rcv_wnd=self.rcv_wnd,
            snd_una=self.snd_una,
            snd_nxt=seq_add(self.write_seq, -self.unsent_len),
            rcv_wscale=self.rcv_wscale if self.wscale_ok else 0,
            snd_wscale=self.snd_wscale if self.wscale_ok else 0,
            mss=self.mss_clamp,
            sack_ok=self.sack_ok,
            timestamps_ok=self.timestamps_ok,
            tsval=self.tsval,
            taken_at=self.taken_at,
        )


# --- small socket helpers ---------------------------------------------------


def _flow_of(sock: socket.socket) -> str:
    try:
        local = sock.getsockname()
        remote = sock.getpeername()
    except OSError:
        return f"fd {sock.fileno()}"
    return str(FlowKey.create(local[0], local[1], remote[0], remote[1]))


def _setsockopt(
    sock: socket.socket,
    level: int,
    option: int,
    value: int | bytes,
    operation: str,
    flow: FlowKey | str,
) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        raise RepairError(operation, exc.errno or errno.EIO, flow) from exc


def _set_tcp_int(
    sock: socket.socket, option: int, value: int, operation: str, flow: FlowKey | str
) -> None:
    # Packed by hand because socket.setsockopt takes only a C int, and sequence
    # numbers are unsigned 32-bit while TCP_REPAIR_OFF_NO_WP is -1.
    packed = struct.pack("=i" if value < 0 else "=I", value)
    _setsockopt(sock, socket.IPPROTO_TCP, option, packed, operation, flow)


def _get_tcp_int(
    sock: socket.socket, option: int, operation: str, flow: FlowKey | str
) -> int:
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, option, 4)
    except OSError as exc:
        raise RepairError(operation, exc.errno or errno.EIO, flow) from exc
    value: int = struct.unpack("=I", raw)[0]
    return value


def _ioctl_int(sock: socket.socket, request: int, operation: str, flow: str) -> int:
    buf = bytearray(4)
    try:
        fcntl.ioctl(sock.fileno(), request, buf)
    except OSError as exc:
        raise RepairError(operation, exc.errno or errno.EIO, flow) from exc
    value: int = struct.unpack("=i", buf)[0]
    return value


def _rmem_alloc(sock: socket.socket) -> int:
    """Return sk_rmem_alloc: the receive memory charged to the socket, in bytes."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 9 * 4)
    value: int = struct.unpack_from("=I", raw, _SK_MEMINFO_RMEM_ALLOC * 4)[0]
    return value


def _tcp_rmem_max() -> int:
    """Read tcp_rmem[2] of the calling thread's network namespace."""
    # /proc/sys/net shows the namespace of the thread that opens the file.
    path = Path("/proc/sys/net/ipv4/tcp_rmem")
    try:
        return int(path.read_text().split()[2])
    except (OSError, IndexError, ValueError):
        # 6 MiB is the kernel's default tcp_rmem[2].
        log.debug("cannot read %s, assuming 6 MiB", path)
        return 6 * 1024 * 1024


def _sockaddr(family: int, addr: str, port: int) -> tuple[Any, ...]:
    return (addr, port, 0, 0) if family == 6 else (addr, port)


# --- dump -------------------------------------------------------------------


def dump_socket(sock: socket.socket) -> SocketDump:
    """Switch ``sock`` into repair mode and read its complete state.

    The socket is left in repair mode: closing it then sends neither FIN nor RST,
    so the caller closes it once the dump is stored. Raises UnsupportedStateError
    for any state but ESTABLISHED, and RepairError when a kernel call fails.
    """
    flow = _flow_of(sock)
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_PREFIX.size)
    state, _ca, _retrans, _probes, _backoff, options, wscales = _TCP_INFO_PREFIX.unpack(
        info
    )
    if state != TCP_ESTABLISHED:
        raise UnsupportedStateError(state, flow)

    _set_tcp_int(sock, TCP_REPAIR, TCP_REPAIR_ON, "switch on TCP_REPAIR", flow)
    # A FIN or RST may have arrived between the first TCP_INFO and repair mode, so
    # the state is read again now that the kernel keeps the socket still.
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_PREFIX.size)
    state, _ca, _retrans, _probes, _backoff, options, wscales = _TCP_INFO_PREFIX.unpack(
        info
    )
    if state != TCP_ESTABLISHED:
        raise UnsupportedStateError(state, flow)

    local = sock.getsockname()
    remote = sock.getpeername()
    family = 6 if sock.family == socket.AF_INET6 else 4

    outq_len = _ioctl_int(sock, SIOCOUTQ, "read send queue length (SIOCOUTQ)", flow)
    unsent_len = _ioctl_int(sock, SIOCOUTQNSD, "read unsent length (SIOCOUTQNSD)", flow)
    inq_len = _ioctl_int(sock, SIOCINQ, "read receive queue length (SIOCINQ)", flow)

    # In repair mode TCP_MAXSEG returns mss_clamp, not the current mss_cache.
    mss_clamp = _get_tcp_int(sock, socket.TCP_MAXSEG, "read TCP_MAXSEG", flow)
    timestamps_ok = bool(options & TCPI_OPT_TIMESTAMPS)
    sack_ok = bool(options & TCPI_OPT_SACK)
    wscale_ok = bool(options & TCPI_OPT_WSCALE)
    # tcpi_snd_wscale and tcpi_rcv_wscale are 4-bit fields, snd in the low nibble
    # on little-endian machines.
    snd_wscale = wscales & 0x0F if wscale_ok else 0
    rcv_wscale = wscales >> 4 if wscale_ok else 0

    tsval = _get_tcp_int(sock, TCP_TIMESTAMP, "read TCP_TIMESTAMP", flow)
    taken_at = time.monotonic()

    try:
        raw_window = sock.getsockopt(
            socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _REPAIR_WINDOW.size
        )
    except OSError as exc:
        raise RepairError(
            "read TCP_REPAIR_WINDOW", exc.errno or errno.EIO, flow
        ) from exc
    snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = _REPAIR_WINDOW.unpack(raw_window)

    rcv_nxt, recv_queue = _peek_queue(sock, TCP_RECV_QUEUE, inq_len, flow)
    write_seq, send_queue = _peek_queue(sock, TCP_SEND_QUEUE, outq_len, flow)

    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    buf_lock = sock.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK)

    dump = SocketDump(
        family=family,
        state=state,
        local_addr=str(ipaddress.ip_address(local[0])),
        local_port=local[1],
        remote_addr=str(ipaddress.ip_address(remote[0])),
        remote_port=remote[1],
        rcv_nxt=rcv_nxt,
        write_seq=write_seq,
        snd_una=seq_add(write_seq, -outq_len),
        unsent_len=unsent_len,
        recv_queue=recv_queue,
        send_queue=send_queue,
        mss_clamp=mss_clamp,
        snd_wscale=snd_wscale,
        rcv_wscale=rcv_wscale,
        sack_ok=sack_ok,
        timestamps_ok=timestamps_ok,
        wscale_ok=wscale_ok,
        tsval=tsval,
        taken_at=taken_at,
        snd_wl1=snd_wl1,
        snd_wnd=snd_wnd,
        max_window=max_window,
        rcv_wnd=rcv_wnd,
        rcv_wup=rcv_wup,
        rcvbuf=rcvbuf,
        sndbuf=sndbuf,
        buf_lock=buf_lock,
    )
    log.debug(
        "dumped %s: rcv_nxt=%d write_seq=%d inq=%d outq=%d unsent=%d",
        flow,
        rcv_nxt,
        write_seq,
        inq_len,
        outq_len,
        unsent_len,
    )
    return dump


def _peek_queue(
    sock: socket.socket, queue: int, length: int, flow: str
) -> tuple[int, bytes]:
    """Return the queue's sequence number and its bytes, read with MSG_PEEK.

    One byte more than expected is requested so that a queue longer than its
    ioctl length is detected instead of silently cut.
    """
    name = "receive" if queue == TCP_RECV_QUEUE else "send"
    _set_tcp_int(
        sock, TCP_REPAIR_QUEUE, queue, f"select the {name} queue for repair", flow
    )
    seq = _get_tcp_int(sock, TCP_QUEUE_SEQ, f"read the {name} queue sequence", flow)
    if length == 0:
        return seq, b""
    try:
        data = sock.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError as exc:
        raise RepairError(
            f"read the {name} queue", exc.errno or errno.EIO, flow
        ) from exc
    if len(data) != length:
        raise RepairError(
            f"read the {name} queue",
            errno.EIO,
            flow,
            f"Peeked {len(data)} bytes but the ioctl reported {length}",
        )
    return seq, data


# --- snapshot file ----------------------------------------------------------

_BYTES_FIELDS = {"recv_queue", "send_queue"}
_BOOL_FIELDS = {"sack_ok", "timestamps_ok", "wscale_ok"}
_FLOAT_FIELDS = {"taken_at"}
_STR_FIELDS = {"local_addr", "remote_addr"}
_U32_FIELDS = {
    "rcv_nxt",
    "write_seq",
    "snd_una",
    "unsent_len",
    "mss_clamp",
    "tsval",
    "snd_wl1",
    "snd_wnd",
    "max_window",
    "rcv_wnd",
    "rcv_wup",
}
_PORT_FIELDS = {"local_port", "remote_port"}
_INT_RANGES: dict[str, tuple[int, int]] = {
    "state": (1, 11),
    "snd_wscale": (0, 14),
    "rcv_wscale": (0, 14),
    "rcvbuf": (0, 2**31 - 1),
    "sndbuf": (0, 2**31 - 1),
    "buf_lock": (0, 3),
}


def save_dump(dump: SocketDump, path: str | os.PathLike[str]) -> None:
    """Write ``dump`` to ``path`` as JSON, atomically.

    The document is written to a temporary file in the same folder, fsynced and
    renamed over ``path``, so a reader sees the old file or the whole new one.
    """
    target = Path(path)
    document: dict[str, Any] = {"format": DUMP_FORMAT}
    for name, value in asdict(dump).items():
        if name in _BYTES_FIELDS:
            document[name] = base64.b64encode(value).decode("ascii")
        else:
            document[name] = value
    payload = json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"

    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_dump(path: str | os.PathLike[str]) -> SocketDump:
    """Read a file written by save_dump, validating every field.

    Raises SnapshotFileError naming the file, the field and the expected value.
    """
    source = Path(path)
    try:
        document = json.loads(source.read_bytes())
    except OSError as exc:
        raise SnapshotFileError(f"{source}: cannot read: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotFileError(f"{source}: not a JSON document: {exc}") from exc
    if not isinstance(document, dict):
        raise SnapshotFileError(
            f"{source}: expected a JSON object, found {type(document).__name__}"
        )

    def fail(name: str, expected: str) -> SnapshotFileError:
        if name not in document:
            return SnapshotFileError(
                f"{source}: field {name!r} is missing ({expected})"
            )
        return SnapshotFileError(
            f"{source}: field {name!r} is invalid: found {document[name]!r}, "
            f"expected {expected}"
        )

    if document.get("format") != DUMP_FORMAT:
        raise fail("format", f"the string {DUMP_FORMAT!r}")
    version = document.get("version")
    if type(version) is not int or version != DUMP_VERSION:
        raise fail("version", f"{DUMP_VERSION}, the only version this code reads")

    values: dict[str, Any] = {}
    for field in fields(SocketDump):
        values[field.name] = _load_field(document, field.name, fail)

    if values["family"] == 6:
        address_type: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = (
            ipaddress.IPv6Address
        )
    else:
        address_type = ipaddress.IPv4Address
    for name in ("local_addr", "remote_addr"):
        try:
            values[name] = str(address_type(values[name]))
        except ValueError:
            raise fail(name, f"an IPv{values['family']} address") from None
    if len(values["send_queue"]) < values["unsent_len"]:
        raise fail("unsent_len", "at most the length of send_queue")
    if seq_add(values["write_seq"], -len(values["send_queue"])) != values["snd_una"]:
        raise fail("snd_una", "write_seq minus the length of send_queue")
    return SocketDump(**values)


def _load_field(
    document: dict[str, Any],
    name: str,
    fail: Callable[[str, str], SnapshotFileError],
) -> Any:
    if name == "version":
        return document["version"]
    if name not in document:
        raise fail(name, "required")
    value = document[name]
    if name in _BYTES_FIELDS:
        if not isinstance(value, str):
            raise fail(name, "a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise fail(name, "a base64 string") from None
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise fail(name, "true or false")
        return value
    if name in _FLOAT_FIELDS:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise fail(name, "a finite number of seconds")
        return float(value)
    if name in _STR_FIELDS:
        if not isinstance(value, str):
            raise fail(name, "an IP address string")
        return value
    if name == "family":
        if type(value) is not int or value not in (4, 6):
            raise fail(name, "4 or 6")
        return value
    if name in _U32_FIELDS:
        low, high = 0, 2**32 - 1
    elif name in _PORT_FIELDS:
        low, high = 1, 65535
    else:
        low, high = _INT_RANGES[name]
    if type(value) is not int or not low <= value <= high:
        raise fail(name, f"an integer from {low} to {high}")
    return value


# --- restore ----------------------------------------------------------------


def restore_socket(
    dump: SocketDump,
    *,
    extra_receive: bytes = b"",
    right_edge: int | None = None,
    tsval: int | None = None,
    peer_close: PeerClose | None = None,
    peer_tsval: int | None = None,
) -> socket.socket:
    """Rebuild the dumped socket and return it, still in repair mode.

    ``extra_receive`` are bytes acknowledged to the peer after the dump. They
    follow the dump's receive queue, so the restored rcv_nxt is
    ``dump.rcv_nxt + len(extra_receive)``. ``right_edge`` is the largest
    ``ack + window`` advertised to the peer, and the restored window never ends
    before it. ``tsval`` is the TCP timestamp clock to continue from (ms),
    by default ``dump.tsval``.

    ``peer_close`` delivers a FIN or RST that the peer sent after the last of
    those bytes and that was acknowledged or accepted in the socket's name. The
    socket then reads as closed by the peer (FIN: CLOSE_WAIT, the application
    reads every queued byte, then EOF, and can still send) or reset (RST:
    CLOSE, the application reads every queued byte, then ECONNRESET).
    ``peer_tsval`` is the last TSval the peer sent; the crafted segment carries
    it, so the peer's later segments pass the socket's PAWS check.

    The caller releases its network rules, then calls finish_restore. The returned
    socket is blocking. On any failure the new socket is closed and RepairError
    (ReceiveBufferFull when the receive queue does not fit) is raised.
    """
    if dump.state != TCP_ESTABLISHED:
        raise UnsupportedStateError(dump.state, dump.key)
    flow = dump.key
    sock = socket.socket(dump.socket_family, socket.SOCK_STREAM)
    try:
        window = _restore_into(sock, dump, extra_receive, right_edge, tsval)
        if peer_close is not None:
            rcv_nxt = seq_add(dump.rcv_nxt, len(extra_receive))
            _deliver_peer_close(sock, dump, rcv_nxt, peer_close, peer_tsval)
        _restore_buffers(sock, dump, window)
        sock.setblocking(True)
    except BaseException:
        _pending_unsent.pop(sock, None)
        sock.close()
        raise
    log.debug(
        "restored %s with %d + %d receive bytes",
        flow,
        len(dump.recv_queue),
        len(extra_receive),
    )
    return sock


def _restore_into(
    sock: socket.socket,
    dump: SocketDump,
    extra_receive: bytes,
    right_edge: int | None,
    tsval: int | None,
) -> int:
    """Rebuild the connection in SOCK; return the window it advertises, in bytes."""
    flow = dump.key
    # Non-blocking, so a queue write that does not fit fails instead of waiting for
    # buffer space that a socket in repair mode never frees.
    sock.setblocking(False)
    # TCP_REPAIR forces port reuse, so the bind succeeds while the dumped socket,
    # or the shield's rules for its port, still exist. SO_REUSEADDR must not be set
    # after this, because it would undo that.
    _set_tcp_int(sock, TCP_REPAIR, TCP_REPAIR_ON, "switch on TCP_REPAIR", flow)
    try:
        sock.bind(_sockaddr(dump.family, dump.local_addr, dump.local_port))
    except OSError as exc:
        raise RepairError("bind", exc.errno or errno.EIO, flow) from exc

    # TCP_QUEUE_SEQ is accepted only before connect. Writing a queue later advances
    # its sequence number by the bytes written, so each starts that far back.
    recv_start = seq_add(dump.rcv_nxt, -len(dump.recv_queue))
    send_start = seq_add(dump.write_seq, -len(dump.send_queue))
    _set_queue_seq(sock, TCP_RECV_QUEUE, recv_start, flow)
    _set_queue_seq(sock, TCP_SEND_QUEUE, send_start, flow)

    # In repair mode connect sends no SYN and moves straight to ESTABLISHED.
    result = sock.connect_ex(_sockaddr(dump.family, dump.remote_addr, dump.remote_port))
    if result not in (0, errno.EINPROGRESS):
        raise RepairError("connect", result, flow)

    _set_repair_options(sock, dump, flow)
    if dump.timestamps_ok:
        clock = dump.tsval if tsval is None else tsval
        # The kernel stores clock - now as the socket's offset, so TSval continues
        # from ``clock``. Since Linux 6.7 the lowest bit of the value selects
        # microsecond timestamps (it reads back set for such sockets), so it is
        # taken from the dump: an odd millisecond clock would switch the restored
        # socket to microseconds, and its TSval would run 1000 times too fast.
        clock = (clock & ~1) | (dump.tsval & 1)
        _set_tcp_int(sock, TCP_TIMESTAMP, clock & 0xFFFFFFFF, "set TCP_TIMESTAMP", flow)

    _write_receive_queue(sock, dump, dump.recv_queue + extra_receive)
    _write_send_queue(sock, dump)
    return _set_window(sock, dump, len(extra_receive), right_edge)


def _set_queue_seq(sock: socket.socket, queue: int, seq: int, flow: FlowKey) -> None:
    name = "receive" if queue == TCP_RECV_QUEUE else "send"
    _set_tcp_int(
        sock, TCP_REPAIR_QUEUE, queue, f"select the {name} queue for repair", flow
    )
    _set_tcp_int(sock, TCP_QUEUE_SEQ, seq, f"set the {name} queue sequence", flow)


def _set_repair_options(sock: socket.socket, dump: SocketDump, flow: FlowKey) -> None:
    options = [_REPAIR_OPT.pack(TCPOPT_MSS, dump.mss_clamp)]
    # Without the window option the socket keeps the receive window scale that
    # connect() chose for a handshake with scaling, and it would advertise its
    # window shifted by it to a peer that does not scale (seen on Linux 6.18).
    # Scales of 0 restore a connection without window scaling.
    if dump.wscale_ok:
        scales = dump.snd_wscale | dump.rcv_wscale << 16
    else:
        scales = 0
    options.append(_REPAIR_OPT.pack(TCPOPT_WINDOW, scales))
    if dump.sack_ok:
        options.append(_REPAIR_OPT.pack(TCPOPT_SACK_PERM, 0))
    if dump.timestamps_ok:
        options.append(_REPAIR_OPT.pack(TCPOPT_TIMESTAMP, 0))
    _setsockopt(
        sock,
        socket.IPPROTO_TCP,
        TCP_REPAIR_OPTIONS,
        b"".join(options),
        "set TCP_REPAIR_OPTIONS",
        flow,
    )


def _write_receive_queue(sock: socket.socket, dump: SocketDump, data: bytes) -> None:
    """Append ``data`` to the receive queue; each write advances rcv_nxt.

    The kernel charges each chunk's skb truesize to sk_rmem_alloc and rejects a
    chunk once sk_rcvbuf is reached, so the receive buffer is first forced to
    the size needed, at most tcp_rmem[2] or the dumped socket's own receive
    buffer, whichever is larger: a socket with SO_RCVBUF above tcp_rmem[2]
    advertised a window that only its own buffer holds. _restore_buffers sets
    the dumped size back afterwards, which leaves the queued bytes in place.
    """
    flow = dump.key
    if not data:
        return
    _set_tcp_int(
        sock, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "select the receive queue", flow
    )
    rmem_max = _tcp_rmem_max()
    estimate = _rmem_estimate(len(data))
    buffer_size = min(max(estimate, dump.rcvbuf), max(rmem_max, dump.rcvbuf))
    force_receive_buffer(sock, buffer_size, flow)
    view = memoryview(data)
    written = 0
    while written < len(data):
        chunk = view[written : written + RECV_CHUNK]
        try:
            sent = sock.send(chunk)
        except OSError as exc:
            if exc.errno in (errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN):
                needed = _rmem_needed(sock, written, len(data))
                reason = f"receive buffer {buffer_size} bytes"
                raise ReceiveBufferFull(
                    flow, written, len(data), max(needed, rmem_max + 1), reason
                ) from exc
            raise RepairError(
                "write receive queue", exc.errno or errno.EIO, flow
            ) from exc
        if sent <= 0:
            raise RepairError("write receive queue", errno.EIO, flow)
        written += sent


def _rmem_estimate(length: int) -> int:
    """Estimate the receive memory that ``length`` queued bytes are charged.

    A RECV_CHUNK-sized skb was charged its data plus 104 bytes on kernel 6.18
    x86-64 (measured with SO_MEMINFO); 512 bytes per chunk leaves room for other
    builds.
    """
    chunks = -(-length // RECV_CHUNK)
    return length + chunks * 512 + 4096


def _rmem_needed(sock: socket.socket, written: int, total: int) -> int:
    try:
        charged = _rmem_alloc(sock)
    except OSError:
        return _rmem_estimate(total)
    if written == 0 or charged == 0:
        return _rmem_estimate(total)
    return max(_rmem_estimate(total), math.ceil(charged * total / written) + 4096)


def _write_send_queue(sock: socket.socket, dump: SocketDump) -> None:
    """Write the bytes the peer may already have into the send queue.

    They are written in repair mode, so the kernel counts them as sent and
    retransmits them until acknowledged. The never-sent tail is kept for
    finish_restore: libsoccr writes it with repair off during the restore, but
    on kernel 6.18 the kernel then transmits it at once, before the caller has
    released its network rules.
    """
    flow = dump.key
    if not dump.send_queue:
        return
    # A socket in repair mode never frees send buffer space, so a send queue larger
    # than sk_sndbuf would make the writes fail with EAGAIN.
    _ensure_sndbuf(sock, 2 * len(dump.send_queue) + 64 * 1024, flow)
    sent_len = len(dump.send_queue) - dump.unsent_len
    view = memoryview(dump.send_queue)
    if sent_len:
        _set_tcp_int(
            sock, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "select the send queue", flow
        )
        _send_all(sock, view[:sent_len], "write sent send-queue bytes", flow)
    if dump.unsent_len:
        _pending_unsent[sock] = dump.send_queue[sent_len:]


def _ensure_sndbuf(sock: socket.socket, needed: int, flow: FlowKey | str) -> None:
    current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if current < needed:
        _setsockopt(
            sock,
            socket.SOL_SOCKET,
            SO_SNDBUFFORCE,
            (needed + 1) // 2,
            "set SO_SNDBUFFORCE",
            flow,
        )


def _send_all(
    sock: socket.socket, data: memoryview, operation: str, flow: FlowKey | str
) -> None:
    written = 0
    attempts = 0
    max_attempts = _WRITE_ATTEMPTS_PER_CHUNK * (len(data) // _SEND_CHUNK + 1)
    while written < len(data):
        attempts += 1
        if attempts > max_attempts:
            raise RepairError(operation, errno.EAGAIN, flow)
        try:
            written += sock.send(data[written : written + _SEND_CHUNK])
        except OSError as exc:
            detail = None
            if exc.errno == errno.EAGAIN:
                detail = f"{written} of {len(data)} bytes fit into the send buffer"
            raise RepairError(operation, exc.errno or errno.EIO, flow, detail) from exc


def _set_window(
    sock: socket.socket, dump: SocketDump, extra_len: int, right_edge: int | None
) -> int:
    """Set TCP_REPAIR_WINDOW so the advertised right edge never moves left.

    Returns the window past the restored rcv_nxt, in bytes.

    After the hand-over the last ACK the peer saw came from the shield, for the
    restored rcv_nxt. So rcv_wup, the ack of the last window update, becomes the
    restored rcv_nxt (the kernel rejects any later value), and rcv_wnd reaches
    the largest edge advertised by the container or the shield. The kernel never
    advertises less than rcv_wup + rcv_wnd - rcv_nxt afterwards, unless the
    sysctl net.ipv4.tcp_shrink_window is on.
    """
    rcv_nxt = seq_add(dump.rcv_nxt, extra_len)
    edge = seq_add(dump.rcv_wup, dump.rcv_wnd)
    if right_edge is not None:
        edge = seq_max(edge, right_edge & 0xFFFFFFFF)
    edge = seq_max(edge, rcv_nxt)
    if extra_len == 0 and seq_ge(dump.rcv_nxt, dump.rcv_wup) and right_edge is None:
        rcv_wup, rcv_wnd = dump.rcv_wup, dump.rcv_wnd
    else:
        rcv_wup, rcv_wnd = rcv_nxt, seq_diff(edge, rcv_nxt)
    window = _REPAIR_WINDOW.pack(
        dump.snd_wl1, dump.snd_wnd, max(dump.max_window, dump.snd_wnd), rcv_wnd, rcv_wup
    )
    _setsockopt(
        sock,
        socket.IPPROTO_TCP,
        TCP_REPAIR_WINDOW,
        window,
        "set TCP_REPAIR_WINDOW",
        dump.key,
    )
    return seq_diff(seq_add(rcv_wup, rcv_wnd), rcv_nxt)


def _deliver_peer_close(
    sock: socket.socket,
    dump: SocketDump,
    rcv_nxt: int,
    kind: PeerClose,
    peer_tsval: int | None,
) -> None:
    """Send the restored socket a FIN or RST from the peer, at exactly rcv_nxt.

    The segment is sent through a raw socket of the calling thread's network
    namespace, from the peer's address to the socket's own, so it goes through
    loopback and never reaches the peer. It carries the shield's mark, which
    the shield's rules and CRIU's network lock let through. CRIU's libsoccr
    restores a socket dumped in CLOSE_WAIT the same way, also in repair mode.
    The socket takes it before its receive buffer is set back to the dumped
    size, because a FIN must be charged to a receive buffer with room left.

    Raises RepairError when the socket has not reached CLOSE_WAIT (FIN) or
    CLOSE (RST) after every attempt.
    """
    flow = dump.key
    flags = ACK | (FIN if kind == "fin" else RST)
    expected = TCP_CLOSE_WAIT if kind == "fin" else TCP_CLOSE
    timestamp = None
    if dump.timestamps_ok and peer_tsval is not None:
        echo = _get_tcp_int(sock, TCP_TIMESTAMP, "read TCP_TIMESTAMP", flow)
        timestamp = (peer_tsval & 0xFFFFFFFF, echo)
    # The socket takes the window of a segment past snd_wl1, so the segment
    # repeats the peer's window from the dump. A zero window would stall the
    # application's reply until the socket's next zero-window probe.
    window = dump.snd_wnd >> (dump.snd_wscale if dump.wscale_ok else 0)
    version, src, dst = dump.family, dump.remote_addr, dump.local_addr
    mapped_src = ipaddress.ip_address(src)
    mapped_dst = ipaddress.ip_address(dst)
    if (
        isinstance(mapped_src, ipaddress.IPv6Address)
        and isinstance(mapped_dst, ipaddress.IPv6Address)
        and mapped_src.ipv4_mapped is not None
        and mapped_dst.ipv4_mapped is not None
    ):
        # an IPv6 socket with IPv4-mapped addresses talks IPv4 on the wire
        version = 4
        src, dst = str(mapped_src.ipv4_mapped), str(mapped_dst.ipv4_mapped)
    segment = Segment(
        version=version,
        src=src,
        dst=dst,
        sport=dump.remote_port,
        dport=dump.local_port,
        seq=rcv_nxt,
        # snd_una of the restored socket: it acknowledges nothing new
        ack=seq_add(dump.write_seq, -len(dump.send_queue)),
        flags=flags,
        window=min(window, 0xFFFF),
        options=TcpOptions(timestamp=timestamp),
    )
    packet = build_packet(segment)
    state = _tcp_state(sock)
    with RawSender() as sender:
        for _attempt in range(PEER_CLOSE_ATTEMPTS):
            sender.send(packet, version, dst)
            deadline = time.monotonic() + PEER_CLOSE_WAIT_S
            while True:
                state = _tcp_state(sock)
                if state == expected or time.monotonic() >= deadline:
                    break
                time.sleep(0.005)
            if state == expected:
                log.debug("delivered the peer's %s to %s", kind.upper(), flow)
                return
    raise RepairError(
        f"deliver the peer's {kind.upper()}",
        errno.ETIMEDOUT,
        flow,
        f"The socket is in state {TCP_STATES.get(state, state)} after "
        f"{PEER_CLOSE_ATTEMPTS} attempts, expected {TCP_STATES[expected]}",
    )


def _tcp_state(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_PREFIX.size)
    state: int = info[0]
    return state


def _restore_buffers(sock: socket.socket, dump: SocketDump, window: int) -> None:
    """Set the dumped buffer sizes and SO_BUF_LOCK bits.

    SO_*BUFFORCE locks a buffer size, and SO_BUF_LOCK then clears the lock where
    the dumped socket had none, so autotuning resumes. The receive buffer grows
    past the dumped size where the queued bytes leave too little room for the
    WINDOW bytes the socket advertises (see ensure_window_room).
    """
    flow = dump.key
    for option, size in (
        (SO_RCVBUFFORCE, dump.rcvbuf),
        (SO_SNDBUFFORCE, dump.sndbuf),
    ):
        _setsockopt(
            sock, socket.SOL_SOCKET, option, size // 2, "restore buffer size", flow
        )
    ensure_window_room(sock, window, flow)
    _setsockopt(
        sock, socket.SOL_SOCKET, SO_BUF_LOCK, dump.buf_lock, "set SO_BUF_LOCK", flow
    )


WINDOW_MEMORY_FACTOR = 2
"""Receive memory per window byte that ensure_window_room reserves. Linux 6.6+
starts each socket from the same ratio (TCP_DEFAULT_SCALING_RATIO, half of the
free receive buffer) until it has measured its real skb overhead."""


def force_receive_buffer(sock: socket.socket, size: int, flow: FlowKey | str) -> None:
    """Set sk_rcvbuf to at least SIZE bytes, past net.core.rmem_max if need be."""
    # SO_RCVBUFFORCE doubles its argument, and bypasses net.core.rmem_max.
    _setsockopt(
        sock,
        socket.SOL_SOCKET,
        SO_RCVBUFFORCE,
        (size + 1) // 2,
        "set SO_RCVBUFFORCE",
        flow,
    )


def ensure_window_room(sock: socket.socket, window: int, flow: FlowKey | str) -> int:
    """Grow the receive buffer so WINDOW more bytes fit after the queued ones.

    A restored socket advertises the window the container and the shield showed,
    but the bytes written in repair mode already take its memory. When the peer
    fills that window and sk_rmem_alloc passes sk_rcvbuf, Linux drops the data
    and advertises a zero window left of the edge it showed. So sk_rcvbuf
    becomes at least the memory charged now plus WINDOW_MEMORY_FACTOR times
    WINDOW plus one page. This overrides a smaller SO_RCVBUF the application
    set, which is logged. Returns the receive buffer size afterwards.
    """
    current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    needed = _rmem_alloc(sock) + WINDOW_MEMORY_FACTOR * max(0, window) + 4096
    if current >= needed:
        return current
    force_receive_buffer(sock, needed, flow)
    grown: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    log.info(
        "%s: receive buffer raised from %d to %d bytes, so the %d-byte window "
        "it advertises fits after the queued bytes",
        flow,
        current,
        grown,
        window,
    )
    return grown


def finish_restore(sock: socket.socket, *, window_probe: bool = True) -> None:
    """Switch repair mode off, then queue the dump's never-sent bytes normally.

    With ``window_probe`` the kernel sends one window probe (a pure ACK for
    rcv_nxt with seq snd_una - 1), so the peer replies with an ACK at once. The
    never-sent bytes, stored per socket by restore_socket, are sent as soon as the
    peer's window allows, with or without the probe.
    """
    flow = _flow_of(sock)
    value = TCP_REPAIR_OFF if window_probe else TCP_REPAIR_OFF_NO_WP
    _set_tcp_int(sock, TCP_REPAIR, value, "switch off TCP_REPAIR", flow)
    unsent = _pending_unsent.pop(sock, b"")
    if not unsent:
        return
    if _tcp_state(sock) == TCP_CLOSE:
        log.info(
            "dropped %d never-sent bytes of %s: the peer reset the connection",
            len(unsent),
            flow,
        )
        return
    sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    buf_lock = sock.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK)
    _ensure_sndbuf(sock, sndbuf + 2 * len(unsent) + 64 * 1024, flow)
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        _send_all(sock, memoryview(unsent), "write unsent send-queue bytes", flow)
    finally:
        sock.settimeout(timeout)
    _setsockopt(
        sock, socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf // 2, "set SO_SNDBUF", flow
    )
    _setsockopt(sock, socket.SOL_SOCKET, SO_BUF_LOCK, buf_lock, "set SO_BUF_LOCK", flow)


# --- taking another process's socket ----------------------------------------


def take_socket(pid: int, fd: int) -> socket.socket:
    """Duplicate descriptor ``fd`` of process ``pid`` into this process.

    Uses pidfd_open and pidfd_getfd (Linux 5.6+), which need ptrace access to the
    target (same user with kernel.yama.ptrace_scope 0, or CAP_SYS_PTRACE).
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise OSError(
            exc.errno, f"take socket: pidfd_open of pid {pid} failed: {exc.strerror}"
        ) from exc
    try:
        new_fd = _pidfd_getfd(pidfd, fd)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EPERM:
            hint = "; taking a descriptor needs ptrace access (CAP_SYS_PTRACE)"
        raise OSError(
            exc.errno,
            f"take socket: pidfd_getfd of fd {fd} in pid {pid} failed: "
            f"{exc.strerror}{hint}",
        ) from exc
    finally:
        os.close(pidfd)
    try:
        sock = socket.socket(fileno=new_fd)
    except OSError as exc:
        os.close(new_fd)
        raise OSError(
            exc.errno,
            f"take socket: fd {fd} in pid {pid} is not a socket: {exc.strerror}",
        ) from exc
    if sock.type != socket.SOCK_STREAM or sock.family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        description = f"{sock.family!r} {sock.type!r}"
        sock.close()
        raise OSError(
            errno.EPROTOTYPE,
            f"take socket: fd {fd} in pid {pid} is {description}, "
            "expected a TCP socket",
        )
    return sock


_libc: ctypes.CDLL | None = None


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    result = int(
        syscall(
            ctypes.c_long(SYS_PIDFD_GETFD),
            ctypes.c_int(pidfd),
            ctypes.c_int(fd),
            ctypes.c_uint(0),
        )
    )
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result
