"""A byte stream whose every byte names its own offset, and its verifier.

Byte ``p`` of the stream is byte ``p % 8`` of the big-endian 64-bit integer
``p // 8``. A lost, repeated or reordered run of bytes therefore shows up at the
first byte that lands at the wrong offset, so a receiver can check integrity
without knowing what was sent.
"""

from __future__ import annotations

import sys
from array import array


def pattern(offset: int, length: int) -> bytes:
    """Return stream bytes [offset, offset + length)."""
    if length <= 0:
        return b""
    first = offset // 8
    last = (offset + length + 7) // 8
    words = array("Q", range(first, last))
    if sys.byteorder == "little":
        words.byteswap()
    start = offset - first * 8
    return words.tobytes()[start : start + length]


class StreamVerifier:
    """Check received bytes against the pattern, starting at a given offset."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.mismatch_at: int | None = None

    @property
    def ok(self) -> bool:
        return self.mismatch_at is None

    def feed(self, data: bytes) -> bool:
        """Check the next bytes; return False once any byte was wrong."""
        if self.mismatch_at is not None:
            return False
        expected = pattern(self.offset, len(data))
        if data != expected:
            index = next(
                i for i, (a, b) in enumerate(zip(data, expected, strict=True)) if a != b
            )
            self.mismatch_at = self.offset + index
            return False
        self.offset += len(data)
        return True
