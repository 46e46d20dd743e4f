"""Write numbered keys to redis in a pipeline, then check that all are there.

Run as ``python redis_writer.py --addr A --port P --seconds S --rate N``. For
each number i it sends ``RPUSH written i`` and ``SET key:i i`` without waiting
for replies, N numbers per second for S seconds. Then it waits for every reply
and checks the list and the keys. It prints one JSON object with the counts.
"""

import argparse
import json
import socket
import threading
import time

REPLY_TIMEOUT = 180.0


def command(*words):
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = str(word).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Replies:
    """Reads RESP replies in a thread, counting them and recording stalls."""

    def __init__(self, sock):
        self.file = sock.makefile("rb")
        self.count = 0
        self.errors = []
        self.max_gap_s = 0.0
        self.last = time.monotonic()
        self.lock = threading.Condition()

    def read_one(self):
        line = self.file.readline()
        if not line:
            raise EOFError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.file.read(size + 2)[:-2]
        if kind == b"*":
            return [self.read_one() for _ in range(int(rest))]
        if kind == b"-":
            self.errors.append(rest.decode())
        return rest

    def run(self, expected):
        for _ in range(expected):
            self.read_one()
            now = time.monotonic()
            with self.lock:
                self.max_gap_s = max(self.max_gap_s, now - self.last)
                self.last = now
                self.count += 1
                self.lock.notify_all()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate", type=int, required=True, help="numbers per second")
    args = parser.parse_args()
    sock = socket.create_connection((args.addr, args.port), timeout=REPLY_TIMEOUT)
    sock.settimeout(None)
    sock.sendall(command("DEL", "written"))
    replies = Replies(sock)
    replies.read_one()
    total = int(args.seconds * args.rate)
    reader = threading.Thread(target=replies.run, args=(2 * total,), daemon=True)
    reader.start()
    start = time.monotonic()
    for i in range(total):
        sock.sendall(command("RPUSH", "written", i) + command("SET", f"key:{i}", i))
        ahead = (i + 1) / args.rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    reader.join(timeout=REPLY_TIMEOUT)
    result = {"written": total, "replies": replies.count, "errors": replies.errors}
    result["max_reply_gap_s"] = round(replies.max_gap_s, 3)
    if replies.count == 2 * total:
        sock.sendall(command("LRANGE", "written", 0, -1))
        listed = replies.read_one()
        result["list_in_order"] = [int(x) for x in listed] == list(range(total))
        keys = [f"key:{i}" for i in range(total)]
        sock.sendall(command("MGET", *keys))
        values = replies.read_one()
        result["keys_present"] = [int(v) for v in values if v is not None] == list(
            range(total)
        )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
