"""NFQUEUE binding driven by trio.

The kernel holds each queued packet until userspace gives a verdict. The packet
handler gets every packet as a :class:`QueuedPacket` and must call ``accept`` or
``drop`` on it, now or later; packets still without a verdict when the binding
closes are dropped by the kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio
from netfilterqueue import NetfilterQueue

log = logging.getLogger(__name__)

# Packets the kernel keeps queued before it drops new ones. The rules use no
# --queue-bypass, so an overflow drops packets and the peer never gets a reset.
DEFAULT_QUEUE_MAXLEN = 4096
# Netlink receive buffer; packets past it are lost with ENOBUFS.
DEFAULT_SOCKET_BUFFER_BYTES = 8 * 1024 * 1024


class QueuedPacket(Protocol):
    """The part of netfilterqueue's Packet the shield uses."""

    def get_payload(self) -> bytes: ...
    def retain(self) -> None: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...


PacketHandler = Callable[[QueuedPacket], None]


class QueueBinding:
    """One NFQUEUE queue number bound in the current network namespace."""

    def __init__(
        self,
        queue_num: int,
        handler: PacketHandler,
        *,
        max_len: int = DEFAULT_QUEUE_MAXLEN,
        socket_buffer_bytes: int = DEFAULT_SOCKET_BUFFER_BYTES,
    ) -> None:
        self.queue_num = queue_num
        self.handler_errors = 0
        self._handler = handler
        self._nfq = NetfilterQueue()
        try:
            self._nfq.bind(
                queue_num,
                self._dispatch,
                max_len=max_len,
                sock_len=socket_buffer_bytes,
            )
        except OSError as exc:
            self._nfq.unbind()
            raise OSError(
                exc.errno,
                f"binding NFQUEUE {queue_num} failed: {exc}; another process may "
                "hold it, pick a free queue number",
            ) from exc
        self._closed = False
        log.info("bound NFQUEUE %d", queue_num)

    def _dispatch(self, packet: QueuedPacket) -> None:
        # An exception escaping into netfilterqueue's C callback would be lost;
        # count it and drop the packet instead, which is the fail-closed verdict.
        try:
            self._handler(packet)
        except Exception:
            self.handler_errors += 1
            log.exception("packet handler failed on NFQUEUE %d", self.queue_num)
            try:
                packet.drop()
            except Exception:  # the handler may already have given a verdict
                pass

    async def serve(self, after_batch: Callable[[], None] | None = None) -> None:
        """Read packets until cancelled, running ``after_batch`` after each read."""
        fd = self._nfq.get_fd()
        while True:
            await trio.lowlevel.wait_readable(fd)
            self._nfq.run(block=False)
            if after_batch is not None:
                after_batch()

    def drain(self) -> None:
        """Give a verdict to every packet already waiting in the socket.

        Call this before :meth:`close` once the rules stop queueing: the kernel
        drops packets that are still queued when the binding goes away.
        """
        if not self._closed:
            self._nfq.run(block=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._nfq.unbind()
        log.info("unbound NFQUEUE %d", self.queue_num)

    def __enter__(self) -> QueueBinding:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
