import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shieldproxy.tcp.reassembly import Reassembler

STREAM = bytes(range(256)) * 8


@st.composite
def chunked_stream(draw):
    """A stream cut into overlapping pieces, offered in a random order with repeats."""
    length = draw(st.integers(min_value=1, max_value=600))
    pieces = []
    covered = 0
    while covered < length:
        start = draw(st.integers(min_value=max(0, covered - 20), max_value=covered))
        end = draw(
            st.integers(min_value=covered + 1, max_value=min(length, covered + 90))
        )
        pieces.append((start, end))
        covered = end
    extra = draw(
        st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=length - 1),
                st.integers(min_value=1, max_value=60),
            ),
            max_size=10,
        )
    )
    pieces += [(start, min(length, start + size)) for start, size in extra]
    order = draw(st.permutations(pieces))
    return length, order


# Drawing many pieces is slow by hypothesis' measure; that is expected here.
@settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(chunked_stream())
def test_every_byte_comes_out_once_in_order(case):
    length, pieces = case
    buffer = Reassembler()
    new_total = 0
    growth_total = 0
    for start, end in pieces:
        result = buffer.insert(start, STREAM[start:end])
        assert result.new + result.duplicate == end - start
        new_total += result.new
        growth_total += result.prefix_growth
        assert buffer.buffered_bytes == new_total
    assert buffer.prefix() == STREAM[:length]
    assert new_total == length
    assert growth_total == length
    assert buffer.out_of_order_ranges() == []


def test_out_of_order_blocks_merge_and_order_by_recency():
    buffer = Reassembler()
    buffer.insert(10, b"b" * 5)
    buffer.insert(30, b"d" * 5)
    buffer.insert(20, b"c" * 5)
    assert buffer.out_of_order_ranges() == [(20, 25), (30, 35), (10, 15)]
    result = buffer.insert(15, b"x" * 5)
    assert result.new == 5
    assert buffer.out_of_order_ranges() == [(10, 25), (30, 35)]
    result = buffer.insert(0, b"a" * 12)
    assert result.new == 10
    assert result.duplicate == 2
    assert result.prefix_growth == 25
    assert buffer.contiguous_end == 25
    assert buffer.out_of_order_ranges() == [(30, 35)]


def test_out_of_order_ranges_limit_keeps_most_recent():
    buffer = Reassembler()
    for offset in (50, 10, 30, 70):
        buffer.insert(offset, b"x" * 5)
    assert buffer.out_of_order_ranges(2) == [(70, 75), (30, 35)]
    assert buffer.out_of_order_ranges(9) == buffer.out_of_order_ranges()
    assert buffer.out_of_order_ranges(0) == []


def test_duplicate_of_prefix_counts_as_duplicate():
    buffer = Reassembler()
    buffer.insert(0, b"abc")
    result = buffer.insert(1, b"bc")
    assert result.new == 0
    assert result.duplicate == 2
    assert buffer.prefix() == b"abc"


def test_negative_offset_rejected():
    with pytest.raises(ValueError, match="before the start"):
        Reassembler().insert(-1, b"x")


def test_prefix_end_outside_rejected():
    buffer = Reassembler()
    buffer.insert(0, b"abc")
    assert buffer.prefix(2) == b"ab"
    with pytest.raises(ValueError, match="outside the prefix"):
        buffer.prefix(4)


class ReferenceBuffer:
    """Byte-by-byte model of Reassembler, with blocks as maximal runs."""

    def __init__(self):
        self.byte_at = {}  # offset -> byte, for every byte held
        self.recent = []

    def prefix_end(self):
        end = 0
        while end in self.byte_at:
            end += 1
        return end

    def runs(self):
        start = self.prefix_end()
        offsets = sorted(offset for offset in self.byte_at if offset > start)
        runs = []
        for offset in offsets:
            if runs and runs[-1][1] == offset:
                runs[-1][1] = offset + 1
            else:
                runs.append([offset, offset + 1])
        return [tuple(run) for run in runs]

    def insert(self, offset, data):
        """Return (new, duplicate, prefix growth) and update the recency order."""
        before = self.prefix_end()
        new = 0
        for index, byte in enumerate(data):
            if offset + index not in self.byte_at:
                self.byte_at[offset + index] = byte
                new += 1
        after = self.prefix_end()
        runs = self.runs()
        # Input that starts past the prefix, after trimming, moves its block
        # to the front. Blocks it merged with or that the prefix reached go.
        start = max(offset, before)
        if data and offset + len(data) > before and start > before:
            current = next(run for run in runs if run[0] <= start < run[1])
            unchanged = [run for run in self.recent if run in runs and run != current]
            self.recent = [current, *unchanged]
        else:
            self.recent = [run for run in self.recent if run in runs]
        return new, len(data) - new, after - before


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=200),
            st.integers(min_value=0, max_value=40),
        ),
        max_size=40,
    )
)
def test_matches_byte_by_byte_model(inserts):
    buffer = Reassembler()
    model = ReferenceBuffer()
    for offset, length in inserts:
        data = STREAM[offset : offset + length]
        result = buffer.insert(offset, data)
        new, duplicate, growth = model.insert(offset, data)
        assert result.new == new
        assert result.duplicate == duplicate
        assert result.prefix_growth == growth
        assert buffer.out_of_order_ranges() == model.recent
        assert buffer.out_of_order_ranges(2) == model.recent[:2]
        assert buffer.contiguous_end == model.prefix_end()
        assert buffer.buffered_bytes == len(model.byte_at)
        assert buffer.out_of_order_bytes == len(model.byte_at) - model.prefix_end()
        runs = model.runs()
        assert buffer.held_end == (runs[-1][1] if runs else model.prefix_end())
    assert buffer.prefix() == STREAM[: model.prefix_end()]
    # Filling only the gaps, last gap first, merges the held blocks with each
    # other and then with the prefix, so their own bytes must come out.
    runs = model.runs()
    gap_starts = ([model.prefix_end()] + [end for _, end in runs])[: len(runs)]
    gap_ends = [start for start, _ in runs]
    for start, end in reversed(list(zip(gap_starts, gap_ends, strict=True))):
        assert buffer.insert(start, STREAM[start:end]).new == end - start
    assert buffer.prefix() == STREAM[: buffer.held_end]
    assert buffer.out_of_order_ranges() == []


def test_data_behind_gap_joins_prefix_intact():
    buffer = Reassembler()
    for offset in range(100, 2000, 100):
        result = buffer.insert(offset, STREAM[offset : offset + 100])
        assert result.new == 100
    assert buffer.out_of_order_ranges() == [(100, 2000)]
    assert buffer.out_of_order_bytes == 1900
    result = buffer.insert(0, STREAM[:150])
    assert result.new == 100
    assert result.duplicate == 50
    assert result.prefix_growth == 2000
    assert buffer.prefix() == STREAM[:2000]
    assert buffer.out_of_order_bytes == 0
