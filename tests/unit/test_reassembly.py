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
