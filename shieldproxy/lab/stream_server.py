"""Stream receiver for lab runs: listens, or continues a restored connection.

It reports on stdout as JSON lines, which the demo and the tests read. The
events are ``listening``, ``accepted``, ``progress``, ``paused``, ``restored``,
``resumed``, ``first-new-byte``, ``mismatch``, ``error``, ``eof`` and
``replied``. ``accepted`` carries the pid and socket fd, so another process can
take the socket for a TCP_REPAIR dump. ``paused`` comes after SIGUSR1 with the
exact count of bytes the application consumed, so a restore can continue from
it. With a reply size, the receiver sends that many pattern bytes after the
peer's EOF, then closes, as a request-response server does after a
half-close.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from shieldproxy.kernel.repair import (
    TCP_REPAIR_WINDOW,
    finish_restore,
    load_dump,
    restore_socket,
)
from shieldproxy.lab.stream import StreamVerifier, pattern
from shieldproxy.tcp.flow import restore_tsval
from shieldproxy.tcp.seq import seq_add

PROGRESS_INTERVAL_S = 0.2
READ_SIZE = 256 * 1024
_pause_requested = False


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def _request_pause(signum: int, frame: object) -> None:
    global _pause_requested
    _pause_requested = True


def receive(
    sock: socket.socket,
    verifier: StreamVerifier,
    new_data_from: int | None,
    reply_bytes: int = 0,
) -> int:
    """Read and verify until EOF, then send the reply; return the exit status."""
    received_before = verifier.offset
    last_report = 0.0
    first_new_seen = new_data_from is None
    while True:
        if _pause_requested:
            emit("paused", received=verifier.offset)
            while True:  # wait to be killed; the socket now belongs to the dump
                time.sleep(3600)
        ready, _, _ = select.select([sock], [], [], 0.05)
        now = time.monotonic()
        if now - last_report >= PROGRESS_INTERVAL_S:
            emit("progress", received=verifier.offset)
            last_report = now
        if not ready:
            continue
        try:
            data = sock.recv(READ_SIZE)
        except ConnectionError as exc:
            emit("error", received=verifier.offset, error=str(exc))
            return 4
        if not data:
            emit(
                "eof", received=verifier.offset, total=verifier.offset - received_before
            )
            return send_reply(sock, reply_bytes)
        if not verifier.feed(data):
            emit("mismatch", offset=verifier.mismatch_at)
            return 3
        if not first_new_seen and new_data_from is not None:
            if verifier.offset > new_data_from:
                first_new_seen = True
                emit("first-new-byte", offset=new_data_from)


def send_reply(sock: socket.socket, reply_bytes: int) -> int:
    """Send ``reply_bytes`` pattern bytes after the peer's EOF; return the status."""
    if not reply_bytes:
        return 0
    try:
        sock.sendall(pattern(0, reply_bytes))
    except OSError as exc:
        emit("error", error=f"sending the reply failed: {exc}")
        return 4
    emit("replied", bytes=reply_bytes)
    return 0


def listen(args: argparse.Namespace) -> int:
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.rcvbuf:
        # SO_RCVBUFFORCE ignores net.core.rmem_max; the window scale is chosen
        # from this size at the handshake, so it must be set before listen().
        server.setsockopt(socket.SOL_SOCKET, 33, args.rcvbuf)
    server.bind((args.addr, args.port))
    server.listen(1)
    emit("listening", pid=os.getpid())
    conn, peer = server.accept()
    server.close()
    emit("accepted", pid=os.getpid(), fd=conn.fileno(), peer=list(peer[:2]))
    return receive(conn, StreamVerifier(0), None, args.reply)


def restore(args: argparse.Namespace) -> int:
    """Restore a dumped connection from parameters on stdin, then keep receiving.

    The process starts ahead of time and waits for one JSON line of restore
    parameters, so the hand-over does not wait for interpreter start-up while
    the peer's packets are held. A second line, ``go``, switches repair off.
    A ``peer_close`` of ``fin`` or ``rst`` delivers the peer's FIN or RST that
    the shield took after the handed-over bytes.
    """
    emit("ready")
    request = json.loads(sys.stdin.readline() or "{}")
    dump = load_dump(request["dump"])
    extra = Path(request["extra"]).read_bytes() if request.get("extra") else b""
    tsval = None
    if request.get("tsval") is not None:
        # Continue the clock the shield used, so TSval never goes back.
        tsval = restore_tsval(
            int(request["tsval"]), float(request["tsval_at"]), time.monotonic()
        )
    peer_close = request.get("peer_close")
    if peer_close not in (None, "fin", "rst"):
        emit("error", error=f"invalid peer_close {peer_close!r}")
        return 5
    sock = restore_socket(
        dump,
        extra_receive=extra,
        right_edge=request.get("right_edge"),
        tsval=tsval,
        peer_close=peer_close,
        peer_tsval=request.get("peer_tsval"),
    )
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, 20)
    _wl1, _snd_wnd, _max_window, rcv_wnd, rcv_wup = struct.unpack("=5I", raw)
    # a delivered FIN takes one sequence number past the queued bytes
    rcv_nxt = seq_add(dump.rcv_nxt, len(extra) + (peer_close == "fin"))
    emit(
        "restored",
        rcv_nxt=rcv_nxt,
        right_edge=seq_add(rcv_wup, rcv_wnd),
        queued=len(dump.recv_queue) + len(extra),
    )
    if sys.stdin.readline().strip() != "go":
        emit("error", error="expected 'go' on stdin")
        return 5
    # With a shield, the shield announces the restored window itself once repair
    # is off, so the kernel's own probe (which Linux peers drop as old) is skipped.
    finish_restore(sock, window_probe=bool(request.get("window_probe", True)))
    emit("resumed")
    offset = int(request["offset"])
    queued_end = offset + len(dump.recv_queue) + len(extra)
    reply_bytes = int(request.get("reply_bytes", 0))
    return receive(sock, StreamVerifier(offset), queued_end, reply_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("listen", help="accept one connection and verify its stream")
    p.add_argument("--addr", required=True, help="address to listen on")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF in bytes")
    p.add_argument(
        "--reply",
        type=int,
        default=0,
        help="bytes to send back after the peer's EOF, before closing",
    )
    sub.add_parser(
        "restore",
        help="wait for restore parameters on stdin, restore the socket, go on",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGUSR1, _request_pause)
    if args.command == "listen":
        return listen(args)
    return restore(args)


if __name__ == "__main__":
    sys.exit(main())
