"""NFQUEUE binding driven by trio.

The kernel holds each queued packet until userspace gives a verdict. The packet
handler gets every packet as a :class:`QueuedPacket` and must call ``accept`` or
``drop`` on it, now or later; packets still without a verdict when the binding
closes are dropped by the kernel. A packet waiting for its verdict takes one of
the queue's ``max_len`` slots, and the kernel drops new packets while all slots
are taken.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
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
# Packets read in one batch before other trio tasks get to run. The daemon
# commits the journal after each batch, so this is the shield's default
# commit_max_acks: a smaller batch would commit more often under load.
DEFAULT_BATCH_PACKETS = 1024


class QueuedPacket(Protocol):
    """The part of netfilterqueue's Packet the shield uses."""

    def get_payload(self) -> bytes: ...
    def retain(self) -> None: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...


PacketHandler = Callable[[QueuedPacket], None]


class BatchSocket(socket.socket):
    """A duplicate of the queue's netlink socket that reads in bounded batches.

    ``NetfilterQueue.run_socket`` reads from the socket it is given until
    ``recv`` raises EAGAIN. This socket raises EAGAIN once a batch has used up
    its reads, so ``run_socket`` returns while packets still wait, and those
    stay in the kernel's socket buffer for the next batch. Closing it leaves
    the original descriptor open.
    """

    def __init__(self, fd: int) -> None:
        super().__init__(fileno=os.dup(fd))
        self._reads_left = 0
        self.overflows = 0
        """ENOBUFS errors: the socket buffer overflowed and the kernel lost packets."""

    def start_batch(self, max_reads: int) -> None:
        self._reads_left = max_reads

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        """Read one message without blocking; EAGAIN once the batch is complete."""
        if self._reads_left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch complete")
        self._reads_left -= 1
        try:
            return super().recv(bufsize, flags | socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.overflows += 1
            raise


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

    async def serve(
        self,
        after_batch: Callable[[], None] | None = None,
        *,
        batch_packets: int = DEFAULT_BATCH_PACKETS,
    ) -> None:
        """Read packets until cancelled, running ``after_batch`` after each batch.

        A batch ends when the socket is empty or after BATCH_PACKETS reads.
        Then ``after_batch`` runs and the other trio tasks get their turn, so a
        steady stream of packets cannot hold up timers and the control socket.
        """
        if batch_packets < 1:
            raise ValueError(
                f"invalid batch_packets {batch_packets}: expected 1 or more"
            )
        fd = self._nfq.get_fd()
        sock = BatchSocket(fd)
        next_overflow_log = 1
        try:
            while True:
                # This parks the task until trio's next I/O poll even with
                # packets waiting, so tasks that are ready by then, such as due
                # timers and control requests, run between two batches.
                await trio.lowlevel.wait_readable(fd)
                sock.start_batch(batch_packets)
                self._nfq.run_socket(sock)
                if after_batch is not None:
                    after_batch()
                if sock.overflows >= next_overflow_log:
                    # log the 1st, 10th, 100th ... overflow
                    next_overflow_log = sock.overflows * 10
                    log.warning(
                        "NFQUEUE %d: socket buffer overflowed, the kernel dropped "
                        "queued packets (%d times so far); raise "
                        "socket_buffer_bytes if it repeats",
                        self.queue_num,
                        sock.overflows,
                    )
        finally:
            sock.close()

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
