"""Receive-side reassembly of one direction of a TCP stream.

Positions are byte offsets from the sequence number the buffer started at, so the
arithmetic here is plain integers. The caller converts sequence numbers with
:func:`shieldproxy.tcp.seq.seq_diff`, which is exact while the buffer stays below
2**31 bytes, far above any TCP window.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass


class _Block:
    """Out-of-order bytes from ``start`` to ``end``, as the chunks they came in.

    The chunks are contiguous and cover the block exactly. They are joined only
    when the contiguous prefix reaches the block, so storing data next to a
    held block never copies the bytes held before.
    """

    # stored_at: number of the last insert that extended the block, which
    # orders the SACK blocks
    __slots__ = ("start", "end", "chunks", "stored_at")

    def __init__(
        self, start: int, end: int, chunks: list[bytes], stored_at: int
    ) -> None:
        self.start = start
        self.end = end
        self.chunks = chunks
        self.stored_at = stored_at

    def append_from(self, target: bytearray, offset: int) -> None:
        """Append the block's bytes from ``offset`` to its end to ``target``."""
        position = self.start
        for chunk in self.chunks:
            chunk_end = position + len(chunk)
            if chunk_end > offset:
                if position >= offset:
                    target += chunk
                else:
                    target += memoryview(chunk)[offset - position :]
            position = chunk_end


def _block_start(block: _Block) -> int:
    return block.start


def _block_stored_at(block: _Block) -> int:
    return block.stored_at


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

    __slots__ = ("_prefix", "_blocks", "_inserts", "_out_of_order_bytes")

    def __init__(self) -> None:
        self._prefix = bytearray()
        # Held blocks by start offset, created at the first out-of-order insert,
        # because a shield keeps one buffer per flow and most never need it.
        self._blocks: list[_Block] | None = None
        # inserts past a gap so far, which numbers each block's last extension
        # (RFC 2018 section 4 orders SACK blocks by recency)
        self._inserts = 0
        # total size of the held blocks, so that buffered_bytes costs O(1)
        self._out_of_order_bytes = 0

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
        return self._out_of_order_bytes

    @property
    def buffered_bytes(self) -> int:
        return len(self._prefix) + self._out_of_order_bytes

    def prefix(self, end: int | None = None) -> bytes:
        """Return the contiguous bytes from offset 0 up to ``end`` (default: all)."""
        if end is None:
            return bytes(self._prefix)
        if not 0 <= end <= len(self._prefix):
            raise ValueError(f"end {end} is outside the prefix of {len(self._prefix)}")
        return bytes(self._prefix[:end])

    def out_of_order_ranges(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Held blocks as (start, end) offsets, most recently extended first.

        With ``limit``, only that many of the most recent.
        """
        blocks = self._blocks
        if not blocks:
            return []
        if limit is None:
            recent = sorted(blocks, key=_block_stored_at, reverse=True)
        else:
            recent = heapq.nlargest(limit, blocks, key=_block_stored_at)
        return [(block.start, block.end) for block in recent]

    def insert(self, offset: int, data: bytes) -> InsertResult:
        """Store ``data`` found at ``offset``, trimming whatever is already held."""
        if offset < 0:
            raise ValueError(f"offset {offset} is before the start of the buffer")
        # Held blocks keep references to the input, which must not change later.
        # bytes() returns a bytes object itself, without a copy.
        data = bytes(data)
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
        prefix = self._prefix
        start = len(prefix)
        prefix += data
        input_end = len(prefix)
        overlap = 0
        blocks = self._blocks
        while blocks and blocks[0].start <= len(prefix):
            block = blocks.pop(0)
            self._out_of_order_bytes -= block.end - block.start
            overlap += max(0, min(block.end, input_end) - block.start)
            if block.end > len(prefix):
                block.append_from(prefix, len(prefix))
        return len(data) - overlap, overlap, len(prefix) - start

    def _store_block(self, offset: int, data: bytes) -> tuple[int, int]:
        """Store a block past the gap, returning (new bytes, bytes already held).

        The input merges with every held block it overlaps or touches. The
        merged block reuses the chunk list of a block that starts at or before
        the input, and takes only the parts of the input between held blocks.
        """
        end = offset + len(data)
        blocks = self._blocks
        if blocks is None:
            blocks = self._blocks = []
        self._inserts += 1
        index = bisect.bisect_right(blocks, offset, key=_block_start)
        # merge with the block before when it touches or overlaps
        if index > 0 and blocks[index - 1].end >= offset:
            index -= 1
        last = index
        while last < len(blocks) and blocks[last].start <= end:
            last += 1
        if last == index:
            blocks.insert(index, _Block(offset, end, [data], self._inserts))
            self._out_of_order_bytes += len(data)
            return len(data), 0

        merging = blocks[index:last]
        known = 0
        for block in merging:
            known += max(0, min(block.end, end) - max(block.start, offset))
        first = merging[0]
        if first.start <= offset:
            merged = first
            rest = merging[1:]
        else:
            merged = _Block(offset, offset, [], 0)
            rest = merging
        chunks = merged.chunks
        # cursor: end of the merged bytes so far, never before offset
        cursor = merged.end
        for block in rest:
            if block.start > cursor:
                chunks.append(data[cursor - offset : block.start - offset])
            chunks += block.chunks
            cursor = block.end
        if end > cursor:
            chunks.append(data[cursor - offset :])
            cursor = end
        merged.end = cursor
        merged.stored_at = self._inserts
        blocks[index:last] = [merged]
        self._out_of_order_bytes += len(data) - known
        return len(data) - known, known
