"""A small TCP client in user space, built on scapy, for peers that are not Linux.

The lab's real peers run the Linux TCP stack, which the shield is tuned
against. This client sends what other stacks send: keepalives with and without
a garbage byte, zero-window probes as Linux sends them (seq snd_una - 1, no
data) and as BSD-derived stacks send them (one new byte past the window). It
records every segment the other end sends, so a test can check each reply.

It sends whole IPv4 packets through a raw socket and reads the replies from a
raw TCP socket, both in the network namespace current when it is created. The
kernel of that namespace has no socket for the connection and would answer the
other end's segments with RST, so the caller must drop those RSTs, for example
with :func:`rst_drop_rule`. IPv4 only; retransmission is a fixed timer, with
no congestion control, SACK blocks or window scaling of its own receive window.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import time
from dataclasses import dataclass

from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from shieldproxy.tcp.seq import seq_add, seq_diff, seq_ge, seq_gt

# Receive window this client advertises, unscaled: it never needs more because
# the other end sends it no data.
RECEIVE_WINDOW = 65535
RETRANSMIT_S = 0.3
_READ_SIZE = 65536


class UserTcpError(RuntimeError):
    """The other end did not reply as TCP requires within the time given."""


@dataclass(frozen=True)
class Received:
    """One segment from the other end, as this client saw it."""

    at: float
    """CLOCK_MONOTONIC seconds at arrival."""
    flags: str
    seq: int
    ack: int
    window: int
    """Window field, unscaled."""
    payload: bytes
    tsval: int | None
    tsecr: int | None
    wscale: int | None = None
    """Window scale option, which only a SYN may carry."""
    mss: int | None = None
    """MSS option, which only a SYN may carry."""

    @property
    def is_rst(self) -> bool:
        return "R" in self.flags


def rst_drop_rule(src: str, sport: int) -> list[str]:
    """Return iptables arguments (after ``-A``/``-D``) that drop the kernel's RSTs.

    Without the rule the namespace's kernel resets the connection at the first
    segment of the other end, because it has no socket for it.
    """
    return [
        "OUTPUT", "-p", "tcp", "-s", src, "--sport", str(sport),
        "--tcp-flags", "RST", "RST", "-j", "DROP",
    ]  # fmt: skip


class UserTcpClient:
    """One TCP connection from SRC:SPORT to DST:DPORT, driven step by step."""

    def __init__(
        self,
        src: str,
        sport: int,
        dst: str,
        dport: int,
        *,
        mss: int = 1460,
        wscale: int | None = 7,
        timestamps: bool = True,
        sack: bool = True,
        iss: int = 0x1F2E3D4C,
    ) -> None:
        if ipaddress.ip_address(src).version != 4:
            raise ValueError(f"invalid source {src!r}: the client supports IPv4 only")
        self.src, self.sport, self.dst, self.dport = src, sport, dst, dport
        self.mss = mss
        self.wscale = wscale
        self.timestamps = timestamps
        self.sack = sack
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.rcv_nxt = 0
        self.peer_wscale = 0
        """Window scale of the other end, 0 when it offered none."""
        self.peer_timestamps = False
        self.segment_size = mss
        """Payload bytes per segment: both MSS options, less the timestamps."""
        self.snd_wnd = 0
        """The other end's last window in bytes, scaled."""
        self.ts_recent = 0
        self.received: list[Received] = []
        self._clock_origin = time.monotonic()
        self._receiver = socket.socket(
            socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP
        )
        try:
            self._sender = socket.socket(
                socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW
            )
        except OSError:
            self._receiver.close()
            raise

    def close(self) -> None:
        self._receiver.close()
        self._sender.close()

    def __enter__(self) -> UserTcpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def right_edge(self) -> int:
        """Sequence number after the last byte the other end's window allows."""
        return seq_add(self.snd_una, self.snd_wnd)

    # sending

    def _tsval(self) -> int:
        return int((time.monotonic() - self._clock_origin) * 1000) + 1

    def send_segment(
        self, seq: int, payload: bytes = b"", flags: str = "A", *, syn: bool = False
    ) -> None:
        """Send one segment with the current ACK, window and timestamp."""
        options: list[tuple[str, object]] = []
        if syn:
            options.append(("MSS", self.mss))
            if self.sack:
                options.append(("SAckOK", b""))
        if self.timestamps and (syn or self.peer_timestamps):
            options.append(("Timestamp", (self._tsval(), self.ts_recent)))
        if syn and self.wscale is not None:
            options += [("NOP", None), ("WScale", self.wscale)]
        segment = TCP(
            sport=self.sport,
            dport=self.dport,
            seq=seq,
            ack=self.rcv_nxt if "A" in flags else 0,
            flags=flags,
            window=RECEIVE_WINDOW,
            options=options,
        )
        packet = IP(src=self.src, dst=self.dst) / segment
        if payload:
            packet = packet / Raw(payload)
        self._sender.sendto(bytes(packet), (self.dst, 0))

    # receiving

    def poll(self, timeout: float) -> Received | None:
        """Wait up to TIMEOUT seconds for the next segment of this connection."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._receiver], [], [], left)
            if not ready:
                return None
            segment = self._parse(self._receiver.recv(_READ_SIZE))
            if segment is not None:
                self._update(segment)
                return segment

    def _parse(self, data: bytes) -> Received | None:
        packet = IP(data)
        if packet.src != self.dst or packet.dst != self.src or TCP not in packet:
            return None
        tcp = packet[TCP]
        if tcp.sport != self.dport or tcp.dport != self.sport:
            return None
        tsval = tsecr = wscale = mss = None
        for name, value in tcp.options:
            if name == "Timestamp":
                tsval, tsecr = value
            elif name == "WScale":
                wscale = int(value)
            elif name == "MSS":
                mss = int(value)
        return Received(
            at=time.monotonic(),
            flags=str(tcp.flags),
            seq=int(tcp.seq),
            ack=int(tcp.ack),
            window=int(tcp.window),
            payload=bytes(tcp.payload),
            tsval=tsval,
            tsecr=tsecr,
            wscale=wscale,
            mss=mss,
        )

    def _update(self, segment: Received) -> None:
        self.received.append(segment)
        if segment.tsval is not None:
            self.ts_recent = segment.tsval
        if "A" in segment.flags and seq_ge(segment.ack, self.snd_una):
            self.snd_una = segment.ack
            if "S" in segment.flags:
                self.snd_wnd = segment.window
            else:
                self.snd_wnd = segment.window << self.peer_wscale
        if segment.payload and segment.seq == self.rcv_nxt:
            self.rcv_nxt = seq_add(self.rcv_nxt, len(segment.payload))

    # connection steps

    def connect(self, timeout: float) -> None:
        """Send a SYN, retransmitted until the SYN-ACK comes, then the ACK.

        Raises:
            UserTcpError: no SYN-ACK within TIMEOUT seconds, or an RST came.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send_segment(self.iss, flags="S", syn=True)
            segment = self.poll(min(1.0, max(0.0, deadline - time.monotonic())))
            while segment is not None:
                if segment.is_rst:
                    raise UserTcpError(f"connect to {self.dst}:{self.dport} reset")
                if "S" in segment.flags and "A" in segment.flags:
                    self._established(segment)
                    return
                segment = self.poll(0.0)
        raise UserTcpError(
            f"no SYN-ACK from {self.dst}:{self.dport} within {timeout:.0f} s"
        )

    def _established(self, syn_ack: Received) -> None:
        self.rcv_nxt = seq_add(syn_ack.seq, 1)
        self.snd_nxt = seq_add(self.iss, 1)
        self.snd_una = self.snd_nxt
        self.peer_timestamps = self.timestamps and syn_ack.tsval is not None
        # the SYN-ACK's window is never scaled
        self.snd_wnd = syn_ack.window
        if self.wscale is not None and syn_ack.wscale is not None:
            self.peer_wscale = syn_ack.wscale
        # RFC 9293: the MSS option excludes TCP options, so timestamps use 12
        # of its bytes
        peer_mss = 536 if syn_ack.mss is None else syn_ack.mss
        self.segment_size = min(self.mss, peer_mss) - 12 * self.peer_timestamps
        self.send_segment(self.snd_nxt)

    def wait_for_ack(self, ack: int, timeout: float) -> Received | None:
        """Wait for a segment that acknowledges ACK or more; None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            segment = self.poll(max(0.0, deadline - time.monotonic()))
            if segment is None:
                return None
            if "A" in segment.flags and seq_ge(segment.ack, ack):
                return segment

    def wait_for_window(self, timeout: float) -> bool:
        """Wait until the other end's window is open; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.snd_wnd == 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll(left)
        return True

    def send_data(self, data: bytes, timeout: float) -> int:
        """Send DATA within the other end's window until it is acknowledged.

        Segments past the window wait; unacknowledged ones are sent again every
        RETRANSMIT_S. Returns the number of bytes acknowledged, which is less
        than ``len(data)`` when the window stayed closed until TIMEOUT.
        """
        start = self.snd_una
        end = seq_add(start, len(data))
        deadline = time.monotonic() + timeout
        while seq_gt(end, self.snd_una) and time.monotonic() < deadline:
            # (re)send everything the window allows, from the oldest byte
            seq = self.snd_una
            limit = end if seq_ge(self.right_edge, end) else self.right_edge
            while seq_gt(limit, seq):
                size = min(self.segment_size, seq_diff(limit, seq))
                offset = seq_diff(seq, start)
                self.send_segment(seq, data[offset : offset + size])
                seq = seq_add(seq, size)
            if seq_gt(seq, self.snd_nxt):
                self.snd_nxt = seq
            answer = self.wait_for_ack(seq, RETRANSMIT_S)
            if answer is None and self.snd_wnd == 0 and self.snd_una == seq:
                break
        return seq_diff(self.snd_una, start)

    def keepalive(self, garbage: bool = False) -> None:
        """Send a keepalive: seq snd_nxt - 1, with one garbage byte if asked."""
        self.send_segment(seq_add(self.snd_nxt, -1), b"\0" if garbage else b"")

    def probe_zero_window(self, next_byte: bytes | None = None) -> None:
        """Send a zero-window probe.

        Without NEXT_BYTE it is the Linux probe: seq snd_una - 1 and no data.
        With it, it is the probe of BSD-derived stacks: that one byte of new
        data at snd_nxt, past the closed window. snd_nxt does not move,
        because the byte is sent again once the window opens.
        """
        if next_byte is None:
            self.send_segment(seq_add(self.snd_una, -1))
        else:
            self.send_segment(self.snd_nxt, next_byte[:1])

    def finish(self, timeout: float) -> Received | None:
        """Send a FIN after the last byte and wait for its ACK."""
        fin_seq = self.snd_nxt
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send_segment(fin_seq, flags="FA")
            acked = self.wait_for_ack(seq_add(fin_seq, 1), RETRANSMIT_S)
            if acked is not None:
                self.snd_nxt = seq_add(fin_seq, 1)
                return acked
        return None
