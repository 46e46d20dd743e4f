"""Sample the lab peer's TCP state (cwnd, bytes acknowledged) while a run goes on.

The stream sender runs in the peer namespace. The probe finds its socket with
``ss -p``, duplicates it into this process with pidfd_getfd, and reads TCP_INFO
from the duplicate every few milliseconds. It can also set TCP_USER_TIMEOUT on
it, which changes the sender's own socket.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from dataclasses import dataclass

import trio

from shieldproxy.kernel.netns import run_in_netns
from shieldproxy.kernel.repair import take_socket

# Offsets in struct tcp_info of include/uapi/linux/tcp.h, up to tcpi_snd_wnd.
_TCP_INFO_SIZE = 232
_FIELDS = {
    "state": (0, "B"),
    "backoff": (4, "B"),
    "rto_us": (8, "I"),
    "rtt_us": (68, "I"),
    "ssthresh": (76, "I"),
    "cwnd": (80, "I"),
    "bytes_acked": (120, "Q"),
    "min_rtt_us": (148, "I"),
    "bytes_sent": (200, "Q"),
    "bytes_retrans": (208, "Q"),
    "snd_wnd": (228, "I"),
}
TCP_ESTABLISHED = 1
_SS_PROCESS_RE = re.compile(r"pid=(\d+),fd=(\d+)")


@dataclass(frozen=True)
class TcpInfo:
    """One TCP_INFO reading of the peer's socket; ``t`` is CLOCK_MONOTONIC."""

    t: float
    state: int
    backoff: int
    rto_us: int
    rtt_us: int
    ssthresh: int
    cwnd: int
    """Congestion window in segments."""
    bytes_acked: int
    min_rtt_us: int
    bytes_sent: int
    """Bytes sent, retransmissions included."""
    bytes_retrans: int
    snd_wnd: int
    """Receive window the other end last advertised, in bytes."""


def read_tcp_info(sock: socket.socket) -> TcpInfo:
    """Read the TCP_INFO fields of :class:`TcpInfo` from a connected socket."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    if len(raw) < _TCP_INFO_SIZE:
        raise OSError(
            f"TCP_INFO returned {len(raw)} bytes, expected {_TCP_INFO_SIZE}: "
            "this kernel does not report tcpi_snd_wnd"
        )
    values = {
        name: struct.unpack_from("=" + code, raw, offset)[0]
        for name, (offset, code) in _FIELDS.items()
    }
    return TcpInfo(t=time.monotonic(), **values)


def find_socket(netns: str, port: int) -> tuple[int, int] | None:
    """Return (pid, fd) of the established socket to remote PORT in NETNS."""
    result = run_in_netns(
        netns, ["ss", "-tnpH", "state", "established", f"( dport = :{port} )"]
    )
    match = _SS_PROCESS_RE.search(result.stdout)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


class PeerProbe:
    """Sampler of the TCP_INFO of the peer's connection to a port."""

    def __init__(
        self,
        netns: str,
        port: int,
        *,
        interval_s: float = 0.01,
        user_timeout_ms: int | None = None,
        find_timeout_s: float = 20.0,
    ) -> None:
        self.netns = netns
        self.port = port
        self.interval_s = interval_s
        self.user_timeout_ms = user_timeout_ms
        self.find_timeout_s = find_timeout_s
        self.samples: list[TcpInfo] = []
        self.user_timeout_set_at: float | None = None
        self.error: str | None = None
        self._sock: socket.socket | None = None

    async def run(self) -> None:
        """Find the socket, configure it, then sample; run it in a nursery."""
        try:
            await self._attach()
        except OSError as exc:
            self.error = f"peer socket probe failed: {exc}"
            return
        assert self._sock is not None
        while True:
            try:
                self.samples.append(read_tcp_info(self._sock))
            except OSError as exc:
                self.error = f"reading TCP_INFO failed: {exc}"
                return
            await trio.sleep(self.interval_s)

    async def _attach(self) -> None:
        deadline = time.monotonic() + self.find_timeout_s
        while True:
            found = await trio.to_thread.run_sync(find_socket, self.netns, self.port)
            if found is not None:
                break
            if time.monotonic() > deadline:
                raise OSError(
                    f"no established connection to port {self.port} in "
                    f"{self.netns} within {self.find_timeout_s:.0f} s"
                )
            await trio.sleep(0.05)
        self._sock = take_socket(*found)
        if self.user_timeout_ms is not None:
            self._sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.user_timeout_ms
            )
            self.user_timeout_set_at = time.monotonic()

    def close(self) -> None:
        """Close the duplicate; the sender's own descriptor stays open."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def at(self, t: float) -> TcpInfo | None:
        """Return the last sample taken at or before ``t``."""
        found = None
        for sample in self.samples:
            if sample.t > t:
                break
            found = sample
        return found

    def between(self, start: float, end: float) -> list[TcpInfo]:
        return [s for s in self.samples if start <= s.t <= end]
