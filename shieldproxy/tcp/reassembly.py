"""Receive-side reassembly of one direction of a TCP stream.

Positions are byte offsets from the sequence number the buffer started at, so the
arithmetic here is plain integers. The caller converts sequence numbers with
:func:`shieldproxy.tcp.seq.seq_diff`, which is exact while the buffer stays below
2**31 bytes, far above any TCP window.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass
class _Block:
    start: int
    data: bytearray

    @property
    def end(self) -> int:
        return self.start + len(self.data)


@dataclass(frozen=True)
class InsertResult:
    """Byte counts of one insert into the buffer."""

    new: int
    """Input bytes that were not held before."""
    duplicate: int
    """Input bytes already held, trimmed away."""
    prefix_growth: int
    """How far the contiguous prefix grew, including held blocks it reached."""


class Reassembler:
    """A contiguous prefix of received bytes plus out-of-order blocks past a gap.

    Every byte offered is stored at most once: duplicates and overlaps are trimmed
    against the prefix and the held blocks, so each offset is delivered once and in
    order when the gap before it fills.
    """

    def __init__(self) -> None:
        self._prefix = bytearray()
        self._blocks: list[_Block] = []
        # Starts of held blocks, most recently extended first (RFC 2018 section 4
        # orders SACK blocks by recency).
        self._recent: list[int] = []

    @property
    def contiguous_end(self) -> int:
        """Offset one past the last byte of the contiguous prefix."""
        return len(self._prefix)

    @property
    def held_end(self) -> int:
        """Offset one past the last byte held, in order or past a gap."""
        if self._blocks:
            return self._blocks[-1].end
        return len(self._prefix)

    @property
    def out_of_order_bytes(self) -> int:
        return sum(len(block.data) for block in self._blocks)

    @property
    def buffered_bytes(self) -> int:
        return len(self._prefix) + self.out_of_order_bytes

    def prefix(self, end: int | None = None) -> bytes:
        """Return the contiguous bytes from offset 0 up to ``end`` (default: all)."""
        if end is None:
            return bytes(self._prefix)
        if not 0 <= end <= len(self._prefix):
            raise ValueError(f"end {end} is outside the prefix of {len(self._prefix)}")
        return bytes(self._prefix[:end])

    def out_of_order_ranges(self) -> list[tuple[int, int]]:
        """Held blocks as (start, end) offsets, most recently extended first."""
        by_start = {block.start: block for block in self._blocks}
        return [(start, by_start[start].end) for start in self._recent]

    def insert(self, offset: int, data: bytes) -> InsertResult:
        """Store ``data`` found at ``offset``, trimming whatever is already held."""
        if offset < 0:
            raise ValueError(f"offset {offset} is before the start of the buffer")
        end = offset + len(data)
        duplicate = 0

        # trim what the prefix already covers
        prefix_end = len(self._prefix)
        if offset < prefix_end:
            cut = min(end, prefix_end) - offset
            duplicate += cut
            data = data[cut:]
            offset += cut
        if not data:
            return InsertResult(0, duplicate, 0)

        if offset == prefix_end:
            new, overlap, growth = self._extend_prefix(data)
            return InsertResult(new, duplicate + overlap, growth)
        new, overlap = self._store_block(offset, data)
        return InsertResult(new, duplicate + overlap, 0)

    def _extend_prefix(self, data: bytes) -> tuple[int, int, int]:
        """Append at the prefix end, absorbing the held blocks it reaches.

        Returns (new bytes, bytes of the input already held, prefix growth).
        """
        start = len(self._prefix)
        input_end = start + len(data)
        end = input_end
        overlap = 0
        merged = bytearray(data)
        while self._blocks and self._blocks[0].start <= end:
            block = self._blocks.pop(0)
            self._recent.remove(block.start)
            overlap += max(0, min(block.end, input_end) - block.start)
            if block.end > end:
                merged += block.data[end - block.start :]
                end = block.end
        self._prefix += merged
        return len(data) - overlap, overlap, end - start

    def _store_block(self, offset: int, data: bytes) -> tuple[int, int]:
        """Store a block past the gap, returning (new bytes, bytes already held)."""
        end = offset + len(data)
        starts = [block.start for block in self._blocks]
        index = bisect.bisect_right(starts, offset)
        # merge with the block before when it touches or overlaps
        if index > 0 and self._blocks[index - 1].end >= offset:
            index -= 1
        merged_start = offset
        merged = bytearray(data)
        known = 0
        while index < len(self._blocks) and self._blocks[index].start <= end:
            block = self._blocks.pop(index)
            self._recent.remove(block.start)
            overlap_start = max(block.start, merged_start)
            overlap_end = min(block.end, merged_start + len(merged))
            known += max(0, overlap_end - overlap_start)
            if block.start < merged_start:
                merged = block.data[: merged_start - block.start] + merged
                merged_start = block.start
            if block.end > merged_start + len(merged):
                merged += block.data[merged_start + len(merged) - block.start :]
        self._blocks.insert(index, _Block(merged_start, merged))
        self._recent.insert(0, merged_start)
        return len(data) - known, known
