"""Write a reproducible byte stream to stdout at a bounded rate, then its digest.

Run as ``python pattern_writer.py --seconds S --rate BYTES_PER_S --digest FILE``.
The digest file gets ``{"bytes": N, "sha256": HEX}`` once every byte is written.
"""

import argparse
import hashlib
import json
import sys
import time

CHUNK = 16 * 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate", type=int, required=True, help="bytes per second")
    parser.add_argument("--digest", required=True)
    args = parser.parse_args()
    digest = hashlib.sha256()
    total = 0
    counter = 0
    start = time.monotonic()
    out = sys.stdout.buffer
    while time.monotonic() - start < args.seconds:
        # Each chunk differs, so a repeated or skipped chunk changes the digest.
        seed = hashlib.sha256(counter.to_bytes(8, "big")).digest()
        chunk = seed * (CHUNK // len(seed))
        out.write(chunk)
        digest.update(chunk)
        total += len(chunk)
        counter += 1
        ahead = total / args.rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    out.flush()
    with open(args.digest, "w") as file:
        json.dump({"bytes": total, "sha256": digest.hexdigest()}, file)


if __name__ == "__main__":
    main()
