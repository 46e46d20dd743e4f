"""Send a reproducible byte stream each way over one TCP connection, with digests.

``python duplex_app.py serve ADDR PORT ...`` accepts one connection,
``python duplex_app.py connect ADDR PORT ...`` makes it. Each side sends
``--send`` bytes at ``--rate`` bytes per second (0: as fast as the socket
takes them) and reads until EOF. With ``--shutdown-after-send`` a side shuts
down its sending half (SHUT_WR) as soon as its bytes are written. Without it,
the side waits for the other side's EOF first. ``--read-after FILE``
delays the reading until FILE exists. When both halves are done the side
writes ``{"sent": N, "sent_sha256": HEX, "received": N, "received_sha256":
HEX}`` to ``--result``, plus ``"error"`` if a socket call failed. With
``--hold-open FILE`` it then keeps the socket open until FILE exists, so a
socket whose halves are both shut down stays the process's (LAST_ACK)
instead of an orphan.
"""

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time

CHUNK = 16 * 1024
DEADLINE_S = 180.0
"""Maximum seconds a side waits for a connection, data or a file before it
gives up, so a broken test cannot hang."""


def chunk(counter, label):
    """Return the COUNTER-th chunk of LABEL's stream; every chunk differs."""
    seed = hashlib.sha256(label + counter.to_bytes(8, "big")).digest()
    return seed * (CHUNK // len(seed))


def send_stream(connection, args, label, report):
    digest = hashlib.sha256()
    sent = 0
    counter = 0
    start = time.monotonic()
    while sent < args.send:
        data = chunk(counter, label)[: args.send - sent]
        connection.sendall(data)
        digest.update(data)
        sent += len(data)
        counter += 1
        if args.rate:
            ahead = sent / args.rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    report["sent"] = sent
    report["sent_sha256"] = digest.hexdigest()


def wait_for_file(path):
    deadline = time.monotonic() + DEADLINE_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def receive_stream(connection, args, report):
    if args.read_after:
        wait_for_file(args.read_after)
    digest = hashlib.sha256()
    received = 0
    while True:
        data = connection.recv(65536)
        if not data:
            break
        digest.update(data)
        received += len(data)
    report["received"] = received
    report["received_sha256"] = digest.hexdigest()


def run_halves(connection, args, label):
    report = {}
    errors = []
    received = threading.Event()

    def guarded(function, *extra):
        try:
            function(connection, args, *extra)
        except OSError as exc:
            errors.append(f"{function.__name__}: {exc!r}")

    def sender():
        guarded(send_stream, label, report)
        if not args.shutdown_after_send:
            received.wait(DEADLINE_S)
        try:
            connection.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(f"shutdown: {exc!r}")

    def receiver():
        guarded(receive_stream, report)
        received.set()

    threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S)
    if errors:
        report["error"] = "; ".join(errors)
    return report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["serve", "connect"])
    parser.add_argument("address")
    parser.add_argument("port", type=int)
    parser.add_argument("--send", type=int, required=True, help="bytes to send")
    parser.add_argument("--rate", type=int, default=0, help="bytes per second")
    parser.add_argument("--shutdown-after-send", action="store_true")
    parser.add_argument("--read-after", help="file whose creation starts reading")
    parser.add_argument("--hold-open", help="file whose creation allows the close")
    parser.add_argument("--rcvbuf", type=int, help="SO_RCVBUF in bytes")
    parser.add_argument("--sndbuf", type=int, help="SO_SNDBUF in bytes")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # set before listen or connect, so the window scale fits the buffer
    if args.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    if args.sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
    if args.role == "serve":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.address, args.port))
        sock.listen(1)
        sock.settimeout(DEADLINE_S)
        connection, _ = sock.accept()
        sock.close()
        label = b"server"
    else:
        sock.settimeout(DEADLINE_S)
        sock.connect((args.address, args.port))
        connection = sock
        label = b"client"
    connection.settimeout(DEADLINE_S)
    report = run_halves(connection, args, label)
    with open(args.result + ".tmp", "w") as file:
        json.dump(report, file)
    os.replace(args.result + ".tmp", args.result)
    if args.hold_open:
        wait_for_file(args.hold_open)
    connection.close()
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
