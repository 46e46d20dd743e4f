"""Sequence-number arithmetic modulo 2**32 (RFC 9293 section 3.4, RFC 1982).

Two sequence numbers compare by the sign of their 32-bit difference, so every
comparison is only meaningful for values less than 2**31 apart. TCP windows are
far smaller than that (at most 2**30 bytes with window scaling).
"""

from __future__ import annotations

SEQ_MOD = 1 << 32
_HALF = 1 << 31
_MASK = SEQ_MOD - 1


def seq_add(seq: int, delta: int) -> int:
    """Add a (possibly negative) byte count to a sequence number."""
    return (seq + delta) & _MASK


def seq_diff(a: int, b: int) -> int:
    """Return the signed distance a - b, in the range [-2**31, 2**31)."""
    d = (a - b) & _MASK
    return d - SEQ_MOD if d >= _HALF else d


def seq_lt(a: int, b: int) -> bool:
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    return seq_diff(a, b) <= 0


def seq_gt(a: int, b: int) -> bool:
    return seq_diff(a, b) > 0


def seq_ge(a: int, b: int) -> bool:
    return seq_diff(a, b) >= 0


def seq_max(a: int, b: int) -> int:
    return a if seq_ge(a, b) else b


def seq_min(a: int, b: int) -> int:
    return a if seq_le(a, b) else b


def seq_in_window(seq: int, left: int, right: int) -> bool:
    """Return True when left <= seq < right."""
    return seq_le(left, seq) and seq_lt(seq, right)
