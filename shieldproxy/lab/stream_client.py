"""Stream sender for lab runs: writes the offset pattern at a paced rate.

Reports on stdout as JSON lines: ``connected``, ``progress`` (bytes written so
far) and ``done``. Sending stops at ``--total`` bytes or ``--duration`` seconds,
whichever comes first; then it half-closes (shutdown(SHUT_WR)) and reads what
the receiver sends back until the receiver closes. ``done`` reports the reply's
length and whether it matched the pattern. With ``--abort-at`` the sender
resets the connection instead (close() with SO_LINGER 0) at that time.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

from shieldproxy.lab.stream import StreamVerifier, pattern

PROGRESS_INTERVAL_S = 0.1
REPLY_READ_SIZE = 65536


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def keepalive_setting(text: str) -> tuple[int, int, int]:
    """Parse ``IDLE,INTERVAL,COUNT`` (seconds, seconds, probes)."""
    try:
        idle, interval, count = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid keepalive setting {text!r}: expected IDLE,INTERVAL,COUNT"
        ) from None
    return idle, interval, count


def connect(args: argparse.Namespace) -> socket.socket:
    """Open the connection with the socket options the arguments ask for."""
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if args.mss:
        # before connect(), so the SYN announces it and it clamps both ways
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, args.mss)
    if args.keepalive:
        idle, interval, count = args.keepalive
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    if args.user_timeout_ms:
        sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, args.user_timeout_ms
        )
    sock.settimeout(10)
    try:
        sock.connect((args.addr, args.port))
    except OSError:
        sock.close()
        raise
    return sock


def active_seconds(elapsed: float, idle_from: float, idle_s: float) -> float:
    """Return the sending time in ``elapsed``, leaving out the idle period."""
    if idle_s <= 0 or elapsed <= idle_from:
        return elapsed
    return max(idle_from, elapsed - idle_s)


def read_reply(sock: socket.socket) -> tuple[str, int, bool]:
    """Read until the receiver closes; return (status, reply bytes, pattern ok)."""
    verifier = StreamVerifier(0)
    try:
        while data := sock.recv(REPLY_READ_SIZE):
            verifier.feed(data)
        status = "closed"
    except TimeoutError:
        status = "timed out waiting for the receiver to close"
    except ConnectionError as exc:
        status = f"error: {exc}"
    return status, verifier.offset, verifier.ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--addr", required=True, help="receiver address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=int, required=True, help="bytes per second")
    parser.add_argument("--total", type=int, required=True, help="bytes to send")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--chunk", type=int, default=16 * 1024, help="write size")
    parser.add_argument(
        "--close-timeout", type=float, default=30.0, help="seconds to wait for EOF"
    )
    parser.add_argument("--mss", type=int, default=0, help="TCP_MAXSEG in bytes")
    parser.add_argument(
        "--keepalive",
        type=keepalive_setting,
        help="turn keepalive on: TCP_KEEPIDLE,TCP_KEEPINTVL (s),TCP_KEEPCNT",
    )
    parser.add_argument(
        "--user-timeout-ms",
        type=int,
        default=0,
        help="TCP_USER_TIMEOUT in milliseconds, set before connect (0: off)",
    )
    parser.add_argument(
        "--idle-from", type=float, default=0.0, help="seconds until sending pauses"
    )
    parser.add_argument(
        "--idle", type=float, default=0.0, help="seconds the pause lasts"
    )
    parser.add_argument(
        "--abort-at",
        type=float,
        help="seconds after connecting to reset the connection (SO_LINGER 0)",
    )
    args = parser.parse_args(argv)

    sock = connect(args)
    sock.settimeout(None)
    emit("connected", local=list(sock.getsockname()[:2]))
    start = time.monotonic()
    deadline = start + args.duration
    abort_at = None if args.abort_at is None else start + args.abort_at
    sent = 0
    last_report = 0.0
    while sent < args.total:
        now = time.monotonic()
        if now >= deadline:
            break
        if abort_at is not None and now >= abort_at:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            sock.close()
            emit("done", sent=sent, status="reset sent")
            return 0
        if now - last_report >= PROGRESS_INTERVAL_S:
            emit("progress", sent=sent)
            last_report = now
        elapsed = now - start
        if args.idle_from <= elapsed < args.idle_from + args.idle:
            time.sleep(0.01)
            continue
        active = active_seconds(elapsed, args.idle_from, args.idle)
        allowed = int(active * args.rate) - sent
        if allowed <= 0:
            time.sleep(min(0.01, deadline - now))
            continue
        size = min(args.chunk, allowed, args.total - sent)
        # A blocking send waits here while the receiver's window is closed.
        sock.settimeout(max(0.01, deadline - now))
        try:
            sent += sock.send(pattern(sent, size))
        except TimeoutError as exc:
            # A send timeout (socket.timeout) has no errno, but a connection
            # the kernel aborted raises TimeoutError with ETIMEDOUT.
            if exc.errno is None:
                continue
            emit("done", sent=sent, status=f"error: {exc}")
            sock.close()
            return 1
        except ConnectionError as exc:
            emit("done", sent=sent, status=f"error: {exc}")
            sock.close()
            return 1
    emit("progress", sent=sent)
    sock.settimeout(args.close_timeout)
    sock.shutdown(socket.SHUT_WR)
    status, reply_bytes, reply_ok = read_reply(sock)
    emit("done", sent=sent, status=status, reply=reply_bytes, reply_ok=reply_ok)
    sock.close()
    return 0 if status == "closed" and reply_ok else 1


if __name__ == "__main__":
    sys.exit(main())
