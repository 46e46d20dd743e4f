"""Raw-socket sender for the segments the shield transmits in the container's name."""

from __future__ import annotations

import errno
import logging
import socket

log = logging.getLogger(__name__)

# CRIU's network lock lets packets with this mark through (criu/netfilter.c), so
# the shield can answer even while CRIU's own lock is in place.
SHIELD_MARK = 0xC114


class RawSender:
    """Send complete IPv4 and IPv6 packets, IP header included.

    The sockets belong to the network namespace that was current when the sender
    was created: create it inside the namespace whose routing table should carry
    the packets (the gateway, or the pod for a sidecar).
    """

    def __init__(self, mark: int = SHIELD_MARK) -> None:
        self.sent = 0
        self.send_errors = 0
        self._v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            self._v6 = socket.socket(
                socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW
            )
        except OSError:
            self._v4.close()
            raise
        for sock in (self._v4, self._v6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.setblocking(False)

    def send(self, packet: bytes, version: int, dst: str) -> bool:
        """Send one packet; return False (and count it) when the kernel refused it."""
        try:
            if version == 4:
                self._v4.sendto(packet, (dst, 0))
            else:
                self._v6.sendto(packet, (dst, 0, 0, 0))
        except OSError as exc:
            self.send_errors += 1
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                log.error(
                    "sending %d-byte packet to %s failed: %s", len(packet), dst, exc
                )
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._v4.close()
        self._v6.close()

    def __enter__(self) -> RawSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
