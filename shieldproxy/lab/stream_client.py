"""Stream sender for lab runs: writes the offset pattern at a paced rate.

Reports on stdout as JSON lines: ``connected``, ``progress`` (bytes written so
far) and ``done``. Sending stops at ``--total`` bytes or ``--duration`` seconds,
whichever comes first; then it half-closes and waits for the receiver to close.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from shieldproxy.lab.stream import pattern

PROGRESS_INTERVAL_S = 0.1


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


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
    args = parser.parse_args(argv)

    sock = socket.create_connection((args.addr, args.port), timeout=10)
    sock.settimeout(None)
    emit("connected", local=list(sock.getsockname()[:2]))
    start = time.monotonic()
    deadline = start + args.duration
    sent = 0
    last_report = 0.0
    while sent < args.total:
        now = time.monotonic()
        if now >= deadline:
            break
        if now - last_report >= PROGRESS_INTERVAL_S:
            emit("progress", sent=sent)
            last_report = now
        allowed = int((now - start) * args.rate) - sent
        if allowed <= 0:
            time.sleep(min(0.01, deadline - now))
            continue
        size = min(args.chunk, allowed, args.total - sent)
        # A blocking send waits here while the receiver's window is closed.
        sock.settimeout(max(0.01, deadline - now))
        try:
            sent += sock.send(pattern(sent, size))
        except TimeoutError:
            continue
    emit("progress", sent=sent)
    sock.settimeout(args.close_timeout)
    sock.shutdown(socket.SHUT_WR)
    try:
        while sock.recv(65536):
            pass
        status = "closed"
    except TimeoutError:
        status = "timed out waiting for the receiver to close"
    except ConnectionError as exc:
        status = f"error: {exc}"
    emit("done", sent=sent, status=status)
    sock.close()
    return 0 if status == "closed" else 1


if __name__ == "__main__":
    sys.exit(main())
