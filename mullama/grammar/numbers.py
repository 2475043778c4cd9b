"""Integer ranges as digit patterns, so ``minimum``/``maximum`` hold exactly.

A range of non-negative integers is split by number of digits; each
same-length range ``[x, y]`` is matched digit by digit (the usual construction
behind "numeric range to regex"). Negative values are ``-`` followed by a range
of magnitudes. ``-0`` and leading zeros are never produced.
"""

from __future__ import annotations

from .gbnf import CharSet, Expr, Lit, alt, rep, seq
from .primitives import MAX_INT_DIGITS

__all__ = ["integer_range"]

_DIGIT = CharSet(((0x30, 0x39),))


def _digits(lo: str, hi: str) -> CharSet:
    return CharSet(((ord(lo), ord(hi)),))


def _same_length(x: str, y: str) -> Expr:
    """Decimal strings of len(x) == len(y) digits between x and y inclusive."""
    if x == y:
        return Lit(x)
    n = len(x)
    if n == 1:
        return _digits(x, y)
    if x[0] == y[0]:
        return seq(Lit(x[0]), _same_length(x[1:], y[1:]))
    low_full = x[1:] == "0" * (n - 1)
    high_full = y[1:] == "9" * (n - 1)
    parts: list[Expr] = []
    first = ord(x[0]) if low_full else ord(x[0]) + 1
    last = ord(y[0]) if high_full else ord(y[0]) - 1
    if not low_full:
        parts.append(seq(Lit(x[0]), _same_length(x[1:], "9" * (n - 1))))
    if first <= last:
        parts.append(seq(CharSet(((first, last),)), rep(_DIGIT, n - 1, n - 1)))
    if not high_full:
        parts.append(seq(Lit(y[0]), _same_length("0" * (n - 1), y[1:])))
    return alt(*parts)


def _non_negative(lo: int, hi: int | None) -> list[Expr]:
    """Alternatives for the integers in [lo, hi]; hi None means up to the digit cap
    (or the length of lo, when that is longer)."""
    max_len = len(str(hi)) if hi is not None else max(MAX_INT_DIGITS, len(str(lo)))
    parts: list[Expr] = []
    for n in range(len(str(lo)), max_len + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = 10 ** n - 1 if hi is None else min(hi, 10 ** n - 1)
        if a <= b:
            parts.append(_same_length(str(a).rjust(n, "0"), str(b)))
    return parts


def integer_range(lo: int | None, hi: int | None) -> Expr:
    """JSON integers v with lo <= v <= hi (None: unbounded on that side).

    The caller checks lo <= hi. Unbounded sides stop at the digit cap of the
    plain integer rule; every produced number is inside the range.
    """
    parts: list[Expr] = []
    if hi is None or hi >= 0:
        parts += _non_negative(max(lo, 0) if lo is not None else 0, hi)
    if lo is None or lo < 0:
        top = -1 if hi is None else min(hi, -1)
        mag_lo, mag_hi = -top, (None if lo is None else -lo)
        if mag_hi is None or mag_lo <= mag_hi:
            neg = _non_negative(mag_lo, mag_hi)
            if neg:
                parts.append(seq(Lit("-"), alt(*neg)))
    return alt(*parts)
