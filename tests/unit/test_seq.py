from hypothesis import given
from hypothesis import strategies as st

from shieldproxy.tcp.seq import (
    SEQ_MOD,
    seq_add,
    seq_diff,
    seq_ge,
    seq_gt,
    seq_in_window,
    seq_le,
    seq_lt,
    seq_max,
    seq_min,
)

seqs = st.integers(min_value=0, max_value=SEQ_MOD - 1)
# Distances for which comparisons are defined: strictly less than 2**31 apart.
distances = st.integers(min_value=-(2**31) + 1, max_value=2**31 - 1)


@given(seqs, st.integers(min_value=-(2**40), max_value=2**40))
def test_add_matches_big_integers(seq, delta):
    assert seq_add(seq, delta) == (seq + delta) % SEQ_MOD


@given(seqs, distances)
def test_diff_inverts_add(seq, delta):
    assert seq_diff(seq_add(seq, delta), seq) == delta


@given(seqs, distances)
def test_comparisons_match_big_integers(base, delta):
    # Compare base and base+delta as unbounded integers, then wrap both.
    other = seq_add(base, delta)
    assert seq_lt(base, other) == (base < base + delta)
    assert seq_le(base, other) == (base <= base + delta)
    assert seq_gt(base, other) == (base > base + delta)
    assert seq_ge(base, other) == (base >= base + delta)
    assert seq_max(base, other) == (other if delta > 0 else base)
    assert seq_min(base, other) == (base if delta > 0 else other)


def test_comparisons_across_wrap():
    assert seq_lt(SEQ_MOD - 10, 5)
    assert seq_gt(5, SEQ_MOD - 10)
    assert seq_diff(5, SEQ_MOD - 10) == 15
    assert seq_in_window(2, SEQ_MOD - 3, 7)
    assert not seq_in_window(7, SEQ_MOD - 3, 7)
    assert seq_in_window(SEQ_MOD - 3, SEQ_MOD - 3, 7)
