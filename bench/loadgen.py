"""Many-flow TCP load for the absorb benchmark: one sender, one receiver process.

Run by path (``python bench/loadgen.py receive|send ...``) inside a lab
namespace; it needs nothing but the standard library. Both report JSON lines
on stdout, as the stream programs of :mod:`shieldproxy.lab` do.

``receive`` accepts ``--flows`` connections, reports ``accepted`` with its pid
and the sockets' descriptors, so another process can take them for a
TCP_REPAIR dump, and reads everything until SIGUSR1. Then it reports
``paused`` and stops reading. ``send`` opens ``--flows`` connections and
writes to all of them as fast as they accept for ``--duration`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time

SO_RCVBUFFORCE = 33
READ_SIZE = 256 * 1024
_pause_requested = False


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def _request_pause(signum: int, frame: object) -> None:
    global _pause_requested
    _pause_requested = True


def receive(args: argparse.Namespace) -> int:
    connections = accept_flows(args)
    emit("accepted", pid=os.getpid(), fds=[conn.fileno() for conn in connections])
    received = read_until_paused(connections)
    emit("paused", received=received)
    while True:  # the sockets now belong to the dumps; wait to be killed
        time.sleep(3600)


def accept_flows(args: argparse.Namespace) -> list[socket.socket]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.rcvbuf:
        # before listen(): the window scale is chosen from it at the handshake
        listener.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, args.rcvbuf)
    listener.bind((args.addr, args.port))
    listener.listen(args.flows)
    emit("listening", pid=os.getpid())
    connections = []
    for _ in range(args.flows):
        conn, _peer = listener.accept()
        conn.setblocking(False)
        connections.append(conn)
    listener.close()
    return connections


def read_until_paused(connections: list[socket.socket]) -> int:
    """Read every connection until SIGUSR1; return the bytes read."""
    by_fd = {conn.fileno(): conn for conn in connections}
    selector = selectors.DefaultSelector()
    for conn in connections:
        selector.register(conn, selectors.EVENT_READ)
    received = 0
    while not _pause_requested:
        for key, _events in selector.select(timeout=0.05):
            sock = by_fd[key.fd]
            try:
                data = sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                selector.unregister(sock)
                continue
            received += len(data)
    return received


def send(args: argparse.Namespace) -> int:
    connections = []
    for _ in range(args.flows):
        sock = socket.create_connection((args.addr, args.port), timeout=10)
        sock.setblocking(False)
        connections.append(sock)
    emit("connected", flows=len(connections))
    selector = selectors.DefaultSelector()
    by_fd = {sock.fileno(): sock for sock in connections}
    for sock in connections:
        selector.register(sock, selectors.EVENT_WRITE)
    chunk = memoryview(bytes(args.chunk))
    sent = 0
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        for key, _events in selector.select(timeout=0.05):
            sock = by_fd[key.fd]
            try:
                sent += sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                emit("error", error=str(exc), sent=sent)
                return 1
    emit("done", sent=sent)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    receiver = sub.add_parser("receive", help="accept flows and read them")
    sender = sub.add_parser("send", help="open flows and write to them")
    for command in (receiver, sender):
        command.add_argument("--addr", required=True, help="receiver address")
        command.add_argument("--port", type=int, required=True)
        command.add_argument("--flows", type=int, required=True)
    receiver.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF, bytes")
    sender.add_argument("--duration", type=float, required=True, help="seconds")
    sender.add_argument("--chunk", type=int, default=256 * 1024, help="write size")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGUSR1, _request_pause)
    if args.command == "receive":
        return receive(args)
    return send(args)


if __name__ == "__main__":
    sys.exit(main())
