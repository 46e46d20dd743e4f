"""Read and rewrite the TCP connections in a CRIU image folder.

CRIU stores every open file of the dumped tree in ``files.img``. A TCP socket is
an INETSK entry whose ``inet_sk_entry`` contains its addresses, ports, TCP state
and socket options. A connected socket dumped with ``--tcp-established`` also
has ``tcp-stream-<inode>.img`` (inode in lowercase hex): one ``tcp_stream_entry``
with the TCP_REPAIR state, then the receive queue bytes, then the send queue
bytes.

Every image file starts with two native-endian 32-bit magic numbers (IMG_COMMON,
then the file's own). Each entry is a 32-bit size, a protobuf payload of that
size, and for some types extra bytes. The message classes and magic numbers come
from pycriu, which scripts/criu.sh builds with CRIU. The framing is parsed here
instead of with ``pycriu.images.load``, because that function accepts truncated
payloads and short queues without an error, and raises bare ``Exception``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import ipaddress
import logging
import os
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shieldproxy.criu.locate import import_pycriu_images
from shieldproxy.kernel.repair import (
    TCP_CLOSE,
    TCP_CLOSE_WAIT,
    TCP_ESTABLISHED,
    TCP_STATES,
)
from shieldproxy.tcp.seq import seq_add, seq_diff, seq_gt, seq_lt
from shieldproxy.tcp.snapshot import FlowKey, FlowSnapshot

log = logging.getLogger(__name__)

FILES_IMAGE = "files.img"

# Bits of tcp_info.tcpi_options, which CRIU stores as opt_mask.
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

# TCP states as CRIU stores them, the kernel's numbers.
_TCP_LISTEN = 10
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_LAST_ACK = 9
TCP_CLOSING = 11

CONNECTED_STATES = frozenset(
    {
        TCP_ESTABLISHED,
        TCP_FIN_WAIT1,
        TCP_FIN_WAIT2,
        TCP_CLOSE_WAIT,
        TCP_LAST_ACK,
        TCP_CLOSING,
    }
)
"""States of the connections CRIU dumps with --tcp-established and a shield
can acknowledge for: ESTABLISHED and the half-closed states."""
_FIN_SENT_STATES = frozenset({TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LAST_ACK, TCP_CLOSING})
_FIN_RECEIVED_STATES = frozenset({TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING})

# inet_sk_entry values, as in the Linux UAPI headers.
_IP_VERSIONS = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}
_ADDRESS_WORDS = {4: 1, 6: 4}
_SOCK_STREAM = 1
_IPPROTO_TCP = 6
_FD_TYPE_INETSK = 4
"""fd_types.INETSK of CRIU's fdinfo.proto."""

_U32 = struct.Struct("=I")
_MAGIC_LEN = 2 * _U32.size
_MAX_U32 = 0xFFFFFFFF
_MAX_WSCALE = 14
"""Largest window scale shift that RFC 7323 allows."""
_WINDOW_FIELDS = ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")

_REDUMP_HINT = "dump the process again, or copy the image folder again"


class ImageError(ValueError):
    """A CRIU image is missing, truncated, corrupt or inconsistent.

    The message names the image file, the problem and what to do.
    """

    def __init__(self, path: Path, problem: str, hint: str = _REDUMP_HINT) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"CRIU image {path}: {problem}; {hint}")


@dataclass(frozen=True)
class ImageFlow:
    """One connected TCP socket as CRIU dumped it, in one of CONNECTED_STATES.

    Local is the dumped process's end, remote the peer's. Sequence numbers are
    raw 32-bit values, as CRIU's libsoccr stores them: ``outq_seq`` counts the
    local FIN in the states after a local close, and ``inq_seq`` counts the
    peer's FIN in the states after the peer's close, but ``outq_len`` and
    ``unsq_len`` count data bytes only.
    """

    inode: int
    """Socket inode, written in hex in the name of the tcp-stream image."""
    family: int
    """IP version of the socket, 4 or 6. An IPv6 socket may use IPv4-mapped
    addresses."""
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    inq_len: int
    """Bytes in the receive queue."""
    inq_seq: int
    """rcv_nxt: the sequence number after the receive queue."""
    outq_len: int
    """Bytes in the send queue, sent but unacknowledged plus never sent."""
    outq_seq: int
    """write_seq: the sequence number after the send queue."""
    unsq_len: int
    """Bytes at the end of the send queue that were never sent."""
    opt_mask: int
    """TCPI_OPT_* bits of tcp_info: the options both ends negotiated."""
    snd_wscale: int
    """Shift the peer applies to its windows, 0 without window scaling."""
    rcv_wscale: int
    """Shift the local end applies to its windows, 0 without window scaling."""
    mss_clamp: int
    timestamp: int
    """TCP_TIMESTAMP clock at the dump, 0 without the timestamp option. Since
    Linux 6.7 a set lowest bit means microsecond timestamps."""
    snd_wl1: int
    """The five window fields are TCP_REPAIR_WINDOW's (Linux 4.8+)."""
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    rcvbuf: int
    """SO_RCVBUF as getsockopt returned it (twice the value set)."""
    sndbuf: int
    """SO_SNDBUF as getsockopt returned it (twice the value set)."""
    recv_queue: bytes
    """Received bytes the process had not read."""
    send_queue: bytes
    """Bytes the process wrote that the peer had not acknowledged."""
    stream_image: Path
    """Path of the flow's tcp-stream image."""
    dumped_at: float
    """Modification time of the tcp-stream image in seconds since the epoch.
    CRIU writes the image right after reading the socket's state, and
    rewrite_tcp_flow keeps the time."""
    state: int = TCP_ESTABLISHED
    """TCP state from ``files.img``, the kernel's number (TCP_STATES)."""

    @property
    def key(self) -> FlowKey:
        """The flow as packets show it, with IPv4-mapped addresses as IPv4."""
        return FlowKey.create(
            _unmapped(self.local_addr),
            self.local_port,
            _unmapped(self.remote_addr),
            self.remote_port,
        )

    @property
    def sack_ok(self) -> bool:
        return bool(self.opt_mask & TCPI_OPT_SACK)

    @property
    def timestamps_ok(self) -> bool:
        return bool(self.opt_mask & TCPI_OPT_TIMESTAMPS)

    @property
    def wscale_ok(self) -> bool:
        return bool(self.opt_mask & TCPI_OPT_WSCALE)

    @property
    def fin_sent(self) -> bool:
        """True when the process had closed its end: its FIN is in the send queue."""
        return self.state in _FIN_SENT_STATES

    @property
    def fin_received(self) -> bool:
        """True when the socket had received the peer's FIN."""
        return self.state in _FIN_RECEIVED_STATES

    @property
    def snd_una(self) -> int:
        """Oldest sequence number the peer has not acknowledged."""
        return self._send_bounds()[0]

    @property
    def snd_nxt(self) -> int:
        """Sequence number after the last byte (or FIN) sent."""
        return self._send_bounds()[1]

    def _send_bounds(self) -> tuple[int, int]:
        return sequence_bounds(self.state, self.outq_seq, self.outq_len, self.unsq_len)


def sequence_bounds(
    state: int, outq_seq: int, outq_len: int, unsq_len: int
) -> tuple[int, int]:
    """Return (snd_una, snd_nxt) of a socket from its tcp-stream image fields.

    In FIN_WAIT1, CLOSING and LAST_ACK the local FIN is sent or queued but not
    acknowledged, one sequence number after the data. In FIN_WAIT2 the peer
    acknowledged it. The image does not show whether a FIN behind no unsent
    data left the host. This assumes it did, because Linux sends it at once
    unless the peer's window is closed to the last byte, and a Linux peer
    accepts an ACK one number beyond its rcv_nxt.
    """
    if state not in _FIN_SENT_STATES:
        return seq_add(outq_seq, -outq_len), seq_add(outq_seq, -unsq_len)
    data_end = seq_add(outq_seq, -1)
    if state == TCP_FIN_WAIT2:
        snd_una = outq_seq
    else:
        snd_una = seq_add(data_end, -outq_len)
    snd_nxt = seq_add(data_end, -unsq_len) if unsq_len else outq_seq
    return snd_una, snd_nxt


def _unmapped(addr: str) -> str:
    parsed = ipaddress.ip_address(addr)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def stream_image_name(inode: int) -> str:
    """Return the file name CRIU gives the tcp-stream image of socket INODE."""
    return f"tcp-stream-{inode:x}.img"


# --- parsing ------------------------------------------------------------------


@dataclass(frozen=True)
class _Pycriu:
    magic: Any
    """pycriu.images.magic: by_name and by_val tables of magic numbers."""
    pb: Any
    """pycriu.images.pb: the generated protobuf message classes."""
    decode_error: type[Exception]
    """google.protobuf.message.Error, the base of DecodeError."""


@functools.cache
def _pycriu() -> _Pycriu:
    images = import_pycriu_images()
    protobuf_message = importlib.import_module("google.protobuf.message")
    return _Pycriu(images.magic, images.pb, protobuf_message.Error)


def _read_file(path: Path, hint: str = _REDUMP_HINT) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(path, "file not found", hint) from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image file", hint) from None
    except OSError as exc:
        raise ImageError(path, f"cannot be read ({exc.strerror})", hint) from exc


def _check_magic(path: Path, data: bytes, name: str) -> None:
    magic = _pycriu().magic
    common = magic.by_name["IMG_COMMON"]
    if len(data) < _MAGIC_LEN:
        raise ImageError(path, f"truncated: {len(data)} bytes, no magic numbers")
    first, second = struct.unpack_from("=2I", data)
    if first == common and second == magic.by_name[name]:
        return
    found = magic.by_val.get(second if first == common else first)
    if found:
        description = f"a {found} image"
    else:
        description = f"magic 0x{first:08x} 0x{second:08x}"
    raise ImageError(path, f"not a {name} image, found {description}")


def _parse_entry(
    path: Path, data: bytes, offset: int, message_class: Any, index: int
) -> tuple[Any, int]:
    """Parse the size-prefixed entry at OFFSET, return it and the offset after it."""
    remaining = len(data) - offset
    if remaining < _U32.size:
        raise ImageError(
            path, f"truncated: entry {index} has {remaining} of 4 size bytes"
        )
    (size,) = _U32.unpack_from(data, offset)
    start = offset + _U32.size
    if size > len(data) - start:
        raise ImageError(
            path,
            f"truncated: entry {index} needs {size} bytes, {len(data) - start} remain",
        )
    message = message_class()
    try:
        message.ParseFromString(data[start : start + size])
    except _pycriu().decode_error as exc:
        raise ImageError(path, f"entry {index} is corrupt ({exc})") from exc
    # ParseFromString does not check proto2 required fields.
    if not message.IsInitialized():
        missing = ", ".join(message.FindInitializationErrors())
        raise ImageError(
            path, f"entry {index} is corrupt, required fields missing: {missing}"
        )
    return message, start + size


def _parse_files(path: Path, data: bytes) -> list[Any]:
    _check_magic(path, data, "FILES")
    file_entry = _pycriu().pb.file_entry
    entries: list[Any] = []
    offset = _MAGIC_LEN
    while offset < len(data):
        entry, offset = _parse_entry(path, data, offset, file_entry, len(entries))
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class _Stream:
    header: bytes
    message: Any
    """The tcp_stream_entry."""
    recv_queue: bytes
    send_queue: bytes


def _load_stream(path: Path, missing_hint: str = _REDUMP_HINT) -> _Stream:
    data = _read_file(path, missing_hint)
    _check_magic(path, data, "TCP_STREAM")
    entry, offset = _parse_entry(
        path, data, _MAGIC_LEN, _pycriu().pb.tcp_stream_entry, 0
    )
    _check_stream_entry(path, entry)
    queues = len(data) - offset
    needed = entry.inq_len + entry.outq_len
    if queues < needed:
        raise ImageError(
            path,
            f"truncated: the receive and send queues need {needed} bytes "
            f"({entry.inq_len} + {entry.outq_len}), {queues} remain",
        )
    if queues > needed:
        raise ImageError(
            path, f"corrupt: {queues - needed} unexpected bytes after the send queue"
        )
    recv_end = offset + entry.inq_len
    return _Stream(
        header=data[:_MAGIC_LEN],
        message=entry,
        recv_queue=data[offset:recv_end],
        send_queue=data[recv_end:],
    )


def _check_stream_entry(path: Path, entry: Any) -> None:
    """Reject what CRIU's restore would reject, and impossible values."""
    # CRIU 4.2 restores no stream without unsq_len (criu/sk-tcp.c).
    if not entry.HasField("unsq_len"):
        raise ImageError(path, "corrupt: unsq_len is missing")
    if entry.unsq_len > entry.outq_len:
        raise ImageError(
            path,
            f"corrupt: unsq_len {entry.unsq_len} exceeds outq_len {entry.outq_len}",
        )
    if entry.opt_mask & TCPI_OPT_WSCALE:
        if not entry.HasField("rcv_wscale"):
            raise ImageError(path, "corrupt: window scaling on but rcv_wscale missing")
        if max(entry.snd_wscale, entry.rcv_wscale) > _MAX_WSCALE:
            raise ImageError(
                path,
                f"corrupt: window scale {entry.snd_wscale}/{entry.rcv_wscale} "
                f"exceeds {_MAX_WSCALE}",
            )
    if entry.opt_mask & TCPI_OPT_TIMESTAMPS and not entry.HasField("timestamp"):
        raise ImageError(path, "corrupt: timestamps on but the timestamp is missing")
    missing = [name for name in _WINDOW_FIELDS if not entry.HasField(name)]
    if missing:
        # CRIU leaves them out only when the kernel lacks TCP_REPAIR_WINDOW.
        raise ImageError(
            path,
            f"the window fields {', '.join(missing)} are missing, so the window "
            "the process advertised is unknown",
            "dump on Linux 4.8 or newer",
        )


def _address(path: Path, version: int, words: Any, what: str) -> str:
    expected = _ADDRESS_WORDS[version]
    if len(words) != expected:
        raise ImageError(
            path,
            f"corrupt: the {what} address has {len(words)} words, IPv{version} "
            f"needs {expected}",
        )
    # CRIU copies the address bytes (network order) into 32-bit words.
    raw = struct.pack(f"={expected}I", *words)
    return str(ipaddress.ip_address(raw))


def _make_flow(
    files_path: Path, socket_entry: Any, stream_path: Path, stream: _Stream
) -> ImageFlow:
    version = _IP_VERSIONS.get(socket_entry.family)
    if version is None:
        raise ImageError(
            files_path,
            f"corrupt: TCP socket inode {socket_entry.ino} has address family "
            f"{socket_entry.family}",
        )
    entry = stream.message
    try:
        dumped_at = stream_path.stat().st_mtime
    except OSError as exc:
        raise ImageError(stream_path, f"cannot be read ({exc.strerror})") from exc
    wscale_ok = bool(entry.opt_mask & TCPI_OPT_WSCALE)
    timestamps_ok = bool(entry.opt_mask & TCPI_OPT_TIMESTAMPS)
    return ImageFlow(
        inode=int(socket_entry.ino),
        family=version,
        local_addr=_address(files_path, version, socket_entry.src_addr, "source"),
        local_port=int(socket_entry.src_port),
        remote_addr=_address(files_path, version, socket_entry.dst_addr, "destination"),
        remote_port=int(socket_entry.dst_port),
        inq_len=int(entry.inq_len),
        inq_seq=int(entry.inq_seq),
        outq_len=int(entry.outq_len),
        outq_seq=int(entry.outq_seq),
        unsq_len=int(entry.unsq_len),
        opt_mask=int(entry.opt_mask),
        snd_wscale=int(entry.snd_wscale) if wscale_ok else 0,
        rcv_wscale=int(entry.rcv_wscale) if wscale_ok else 0,
        mss_clamp=int(entry.mss_clamp),
        timestamp=int(entry.timestamp) if timestamps_ok else 0,
        snd_wl1=int(entry.snd_wl1),
        snd_wnd=int(entry.snd_wnd),
        max_window=int(entry.max_window),
        rcv_wnd=int(entry.rcv_wnd),
        rcv_wup=int(entry.rcv_wup),
        rcvbuf=int(socket_entry.opts.so_rcvbuf),
        sndbuf=int(socket_entry.opts.so_sndbuf),
        recv_queue=stream.recv_queue,
        send_queue=stream.send_queue,
        stream_image=stream_path,
        dumped_at=dumped_at,
        state=int(socket_entry.state),
    )


def _describe(socket_entry: Any) -> str:
    state = TCP_STATES.get(socket_entry.state, f"state {socket_entry.state}")
    return f"TCP socket inode {socket_entry.ino} ({state})"


# --- public API ---------------------------------------------------------------


def read_tcp_flows(image_dir: Path | str) -> list[ImageFlow]:
    """Read every connected TCP socket of a CRIU image folder.

    Returns the flows in CONNECTED_STATES, in the order of ``files.img``. TCP
    sockets in other states (LISTEN, CLOSE, SYN_SENT) are logged and skipped.

    Raises:
        ImageError: ``files.img`` or a flow's tcp-stream image is missing,
            truncated or corrupt.
        CriuNotFoundError: pycriu cannot be imported.
    """
    image_dir = Path(image_dir)
    files_path = image_dir / FILES_IMAGE
    data = _read_file(
        files_path,
        "pass the folder given to `criu dump -D`, and check that the dump succeeded",
    )
    flows: list[ImageFlow] = []
    for file_entry in _parse_files(files_path, data):
        if file_entry.type != _FD_TYPE_INETSK or not file_entry.HasField("isk"):
            continue
        socket_entry = file_entry.isk
        if socket_entry.type != _SOCK_STREAM or socket_entry.proto != _IPPROTO_TCP:
            continue
        if socket_entry.state not in CONNECTED_STATES:
            level = (
                logging.DEBUG
                if socket_entry.state in (_TCP_LISTEN, TCP_CLOSE)
                else logging.INFO
            )
            log.log(level, "%s: skipping %s", image_dir, _describe(socket_entry))
            continue
        stream_path = image_dir / stream_image_name(socket_entry.ino)
        stream = _load_stream(
            stream_path,
            f"{FILES_IMAGE} lists {_describe(socket_entry)}, so its stream image "
            "must be there: copy the complete image folder, or dump again with "
            "--tcp-established",
        )
        flows.append(_make_flow(files_path, socket_entry, stream_path, stream))
    return flows


def to_snapshot(flow: ImageFlow, *, taken_at: float | None = None) -> FlowSnapshot:
    """Build the shield's starting state for FLOW.

    ``taken_at`` is the CLOCK_MONOTONIC time at which ``flow.timestamp`` was
    read. Images do not record it, so by default it is estimated from the
    tcp-stream image's modification time, which assumes the image was written on
    this host and that the wall clock did not jump since. ``ts_recent`` is None
    because images do not contain it.
    """
    if taken_at is None:
        age = max(0.0, time.time() - flow.dumped_at)
        taken_at = time.monotonic() - age
    return FlowSnapshot(
        key=flow.key,
        rcv_nxt=flow.inq_seq,
        rcv_wup=flow.rcv_wup,
        rcv_wnd=flow.rcv_wnd,
        snd_una=flow.snd_una,
        snd_nxt=flow.snd_nxt,
        rcv_wscale=flow.rcv_wscale,
        snd_wscale=flow.snd_wscale,
        mss=flow.mss_clamp,
        sack_ok=flow.sack_ok,
        timestamps_ok=flow.timestamps_ok,
        tsval=flow.timestamp,
        taken_at=taken_at,
        peer_fin=flow.fin_received,
    )


def read_stream_snapshot(
    path: Path | str,
    key: FlowKey,
    *,
    state: int = TCP_ESTABLISHED,
    taken_at: float | None = None,
) -> FlowSnapshot:
    """Build the shield's starting state from one tcp-stream image alone.

    CRIU writes a socket's tcp-stream image as soon as it has read the socket,
    long before ``files.img`` is complete, so a shield that learned KEY
    (the socket's addresses) and STATE (its TCP state, which only
    ``files.img`` records) elsewhere can start answering from it during the
    dump. ``taken_at`` is as for to_snapshot.

    Raises:
        ImageError: the image is missing, still being written, or corrupt.
    """
    path = Path(path)
    stream = _load_stream(path)
    entry = stream.message
    try:
        dumped_at = path.stat().st_mtime
    except OSError as exc:
        raise ImageError(path, f"cannot be read ({exc.strerror})") from exc
    if taken_at is None:
        taken_at = time.monotonic() - max(0.0, time.time() - dumped_at)
    wscale_ok = bool(entry.opt_mask & TCPI_OPT_WSCALE)
    timestamps_ok = bool(entry.opt_mask & TCPI_OPT_TIMESTAMPS)
    snd_una, snd_nxt = sequence_bounds(
        state, int(entry.outq_seq), int(entry.outq_len), int(entry.unsq_len)
    )
    return FlowSnapshot(
        key=key,
        rcv_nxt=int(entry.inq_seq),
        rcv_wup=int(entry.rcv_wup),
        rcv_wnd=int(entry.rcv_wnd),
        snd_una=snd_una,
        snd_nxt=snd_nxt,
        rcv_wscale=int(entry.rcv_wscale) if wscale_ok else 0,
        snd_wscale=int(entry.snd_wscale) if wscale_ok else 0,
        mss=int(entry.mss_clamp),
        sack_ok=bool(entry.opt_mask & TCPI_OPT_SACK),
        timestamps_ok=timestamps_ok,
        tsval=int(entry.timestamp) if timestamps_ok else 0,
        taken_at=taken_at,
        peer_fin=state in _FIN_RECEIVED_STATES,
    )


def rewrite_tcp_flow(
    image_dir: Path | str,
    inode: int,
    *,
    extra_bytes: bytes,
    rcv_wnd: int,
    rcv_wup: int,
    timestamp: int | None,
    backup_dir: Path | str,
) -> ImageFlow:
    """Append EXTRA_BYTES to a flow's receive queue and set its window and clock.

    The restored socket's rcv_nxt is the dumped one plus ``len(extra_bytes)``,
    so the process reads the dumped queue, then EXTRA_BYTES, and the peer's
    retransmissions of them are acknowledged as duplicates. ``rcv_wup`` and
    ``rcv_wnd`` become the restored socket's TCP_REPAIR_WINDOW values.
    ``timestamp`` (None keeps the dumped one) becomes its TCP_TIMESTAMP clock,
    with the dumped lowest bit kept because Linux 6.7+ reads that bit as the
    microsecond-timestamp flag. CRIU ignores the clock of a flow without the
    timestamp option, so then ``timestamp`` is ignored too.

    Before the first change to the tcp-stream image, an untouched copy goes to
    BACKUP_DIR (an existing backup is never overwritten), so restore_backup
    undoes every rewrite. The new image replaces the old one atomically and
    keeps its modification time. Returns the flow as rewritten.

    Raises:
        ImageError: an image is bad, or INODE is not a connected TCP socket
            of the folder.
        ValueError: EXTRA_BYTES is not empty for a socket that had received
            the peer's FIN, a value does not fit in 32 bits, or would make CRIU's
            restore fail because the kernel rejects rcv_wup after rcv_nxt and
            snd_wl1 after rcv_nxt + rcv_wnd. Also raised when the right edge
            rcv_wup + rcv_wnd would be before the dumped one, or the timestamp
            clock before the dumped clock.
    """
    image_dir = Path(image_dir)
    backup_dir = Path(backup_dir)
    for name, value in (("rcv_wnd", rcv_wnd), ("rcv_wup", rcv_wup)):
        _check_u32(name, value)
    if timestamp is not None:
        _check_u32("timestamp", timestamp)

    flow = _find_flow(image_dir, inode)
    if extra_bytes and flow.fin_received:
        raise ValueError(
            f"flow {flow.key} is in state {TCP_STATES[flow.state]}: the peer's FIN "
            f"ends its data, so {len(extra_bytes)} extra bytes cannot follow it"
        )
    stream = _load_stream(flow.stream_image)
    entry = stream.message

    inq_len = flow.inq_len + len(extra_bytes)
    if inq_len > _MAX_U32:
        raise ValueError(
            f"receive queue of {inq_len} bytes does not fit the image's 32-bit "
            f"inq_len: inject at most {_MAX_U32 - flow.inq_len} extra bytes"
        )
    rcv_nxt = seq_add(flow.inq_seq, len(extra_bytes))
    _check_window(
        flow.stream_image,
        flow.snd_wl1,
        flow.rcv_wup,
        flow.rcv_wnd,
        rcv_nxt,
        rcv_wup,
        rcv_wnd,
    )
    clock = _restored_clock(flow, timestamp)

    entry.inq_len = inq_len
    entry.inq_seq = rcv_nxt
    entry.rcv_wnd = rcv_wnd
    entry.rcv_wup = rcv_wup
    if clock is not None:
        entry.timestamp = clock
    payload = entry.SerializeToString()
    data = b"".join(
        (
            stream.header,
            _U32.pack(len(payload)),
            payload,
            stream.recv_queue,
            extra_bytes,
            stream.send_queue,
        )
    )

    original = flow.stream_image.stat()
    _backup_once(flow.stream_image, backup_dir)
    _write_atomically(flow.stream_image, data, original)
    log.info(
        "rewrote %s: %d extra receive bytes, rcv_nxt %d, window %d at %d",
        flow.stream_image,
        len(extra_bytes),
        rcv_nxt,
        rcv_wnd,
        rcv_wup,
    )
    return dataclasses.replace(
        flow,
        inq_len=inq_len,
        inq_seq=rcv_nxt,
        rcv_wnd=rcv_wnd,
        rcv_wup=rcv_wup,
        timestamp=flow.timestamp if clock is None else clock,
        recv_queue=stream.recv_queue + extra_bytes,
    )


def restore_backup(image_dir: Path | str, backup_dir: Path | str) -> list[Path]:
    """Copy every image saved in BACKUP_DIR back into IMAGE_DIR.

    Each file is replaced atomically. Returns the restored image paths, none
    when BACKUP_DIR does not exist. The backups stay in place.
    """
    image_dir = Path(image_dir)
    backup_dir = Path(backup_dir)
    if not backup_dir.is_dir():
        return []
    restored: list[Path] = []
    for backup in sorted(backup_dir.iterdir()):
        # Names starting with a dot are temporary files of an interrupted copy.
        if backup.name.startswith(".") or not backup.is_file():
            continue
        target = image_dir / backup.name
        _write_atomically(target, _read_file(backup), backup.stat())
        restored.append(target)
    if restored:
        log.info(
            "restored %d images of %s from %s", len(restored), image_dir, backup_dir
        )
    return restored


# --- rewrite helpers ----------------------------------------------------------


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= _MAX_U32:
        raise ValueError(f"invalid {name} {value}: must be 0 to {_MAX_U32}")


def _find_flow(image_dir: Path, inode: int) -> ImageFlow:
    flows = read_tcp_flows(image_dir)
    for flow in flows:
        if flow.inode == inode:
            return flow
    known = ", ".join(str(flow.inode) for flow in flows) or "none"
    raise ImageError(
        image_dir / FILES_IMAGE,
        f"no connected TCP socket with inode {inode} (connected inodes: {known})",
        "pass an inode that read_tcp_flows returns for this folder",
    )


def _check_window(
    path: Path,
    snd_wl1: int,
    dumped_wup: int,
    dumped_wnd: int,
    rcv_nxt: int,
    rcv_wup: int,
    rcv_wnd: int,
) -> None:
    """Reject a window that TCP_REPAIR_WINDOW rejects or that shrinks the edge."""
    if seq_gt(rcv_wup, rcv_nxt):
        raise ValueError(
            f"rcv_wup {rcv_wup} is after the restored rcv_nxt {rcv_nxt}: the "
            f"kernel would reject the window of {path} and CRIU's restore fail"
        )
    if seq_gt(snd_wl1, seq_add(rcv_nxt, rcv_wnd)):
        raise ValueError(
            f"snd_wl1 {snd_wl1} is after rcv_nxt + rcv_wnd = "
            f"{seq_add(rcv_nxt, rcv_wnd)}: the kernel would reject the window of "
            f"{path} and CRIU's restore fail"
        )
    right_edge = seq_add(rcv_wup, rcv_wnd)
    dumped_edge = seq_add(dumped_wup, dumped_wnd)
    if seq_lt(right_edge, dumped_edge):
        raise ValueError(
            f"right edge rcv_wup + rcv_wnd = {right_edge} is "
            f"{-seq_diff(right_edge, dumped_edge)} bytes before the dumped edge "
            f"{dumped_edge} of {path}: the restored socket would retract its window"
        )


def _restored_clock(flow: ImageFlow, timestamp: int | None) -> int | None:
    """Return the clock to write, None to leave the image's field alone."""
    if not flow.timestamps_ok:
        return None
    if timestamp is None:
        return flow.timestamp
    clock = (timestamp & ~1) | (flow.timestamp & 1)
    if seq_lt(clock, flow.timestamp):
        raise ValueError(
            f"timestamp {timestamp} is before the dumped clock {flow.timestamp}: "
            "the peer would drop the restored socket's segments (PAWS, RFC 7323)"
        )
    return clock


def _backup_once(path: Path, backup_dir: Path) -> None:
    backup = backup_dir / path.name
    if backup.exists():
        return
    backup_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(backup, _read_file(path), path.stat())


def _write_atomically(path: Path, data: bytes, like: os.stat_result) -> None:
    """Replace PATH with DATA through a synced temporary file and a rename.

    The new file gets the mode and modification time of LIKE.
    """
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), like.st_mode & 0o7777)
            os.fsync(file.fileno())
        os.utime(temporary, ns=(like.st_atime_ns, like.st_mtime_ns))
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
