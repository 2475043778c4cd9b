"""Integer ranges as digit patterns, so ``minimum``/``maximum`` hold exactly.

A range of non-negative integers is split by number of digits; each
same-length range ``[x, y]`` is matched digit by digit (the usual construction
behind "numeric range to regex"). Negative values are ``-`` followed by a range
of magnitudes. ``-0`` and leading zeros are never produced.

Bounded ``number``s are decimals without exponent: an integer part (as above)
and a fraction whose digits are compared with the bound's digit by digit, so
``0.5 < x <= 2.25`` holds exactly.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from .gbnf import EMPTY, CharSet, Expr, Lit, alt, rep, seq
from .primitives import MAX_FRACTION_DIGITS, MAX_INT_DIGITS

__all__ = ["integer_range", "number_range"]

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


# ------------------------------------------------------------------ decimals

Bound = tuple[Decimal, bool]  # (value, strict)


def _split(d: Decimal) -> tuple[int, str]:
    """A non-negative decimal as (integer part, fraction digits without trailing zeros)."""
    text = format(d, "f")
    whole, _, frac = text.partition(".")
    return int(whole), frac.rstrip("0")


def _zero_ok(lo: tuple[str, bool] | None, hi: tuple[str, bool] | None) -> bool:
    """Whether a fraction of value 0 satisfies both fraction bounds."""
    lo_ok = lo is None or (lo[0] == "" and not lo[1])
    hi_ok = hi is None or hi[0] != "" or not hi[1]
    return lo_ok and hi_ok


def _frac_digits(lo: tuple[str, bool] | None, hi: tuple[str, bool] | None, n: int) -> Expr | None:
    """Digit strings s of length 1..n with lo <= 0.s <= hi (strict where flagged);
    bounds are fraction digits. None when there is no such string."""
    if n <= 0:
        return None
    groups: dict[tuple[Any, Any], list[int]] = {}
    for c in range(10):
        key = []
        for bound, above in ((lo, True), (hi, False)):
            if bound is None:
                key.append("free")
                continue
            digits, strict = bound
            d = int(digits[0]) if digits else 0
            if c == d:
                key.append((digits[1:], strict))
            elif (c > d) == above:
                key.append("free")
            else:
                key.append("fail")
        if "fail" not in key:
            groups.setdefault((key[0], key[1]), []).append(c)
    options: list[Expr] = []
    for (klo, khi), cs in groups.items():
        first = CharSet.of([(0x30 + c, 0x30 + c) for c in cs])
        nlo = None if klo == "free" else klo
        nhi = None if khi == "free" else khi
        if nlo is None and nhi is None:
            options.append(seq(first, rep(_DIGIT, 0, n - 1)))
            continue
        tails: list[Expr] = []
        if _zero_ok(nlo, nhi):
            tails.append(EMPTY)
        more = _frac_digits(nlo, nhi, n - 1)
        if more is not None:
            tails.append(more)
        if tails:
            options.append(seq(first, alt(*tails)))
    return alt(*options) if options else None


def _fraction(lo: tuple[str, bool] | None, hi: tuple[str, bool] | None) -> Expr | None:
    options: list[Expr] = []
    if _zero_ok(lo, hi):
        options.append(EMPTY)
    digits = _frac_digits(lo, hi, MAX_FRACTION_DIGITS)
    if digits is not None:
        options.append(seq(Lit("."), digits))
    return alt(*options) if options else None


def _non_negative_decimal(lo: Bound, hi: Bound | None) -> list[Expr]:
    li, lf = _split(lo[0])
    flo = (lf, lo[1])
    any_frac = _fraction(None, None)
    assert any_frac is not None
    parts: list[Expr] = []
    if hi is None:
        f = _fraction(flo, None)
        if f is not None:
            parts.append(seq(Lit(str(li)), f))
        parts.append(seq(alt(*_non_negative(li + 1, None)), any_frac))
        return parts
    ui, uf = _split(hi[0])
    fhi = (uf, hi[1])
    if li == ui:
        f = _fraction(flo, fhi)
        return [seq(Lit(str(li)), f)] if f is not None else []
    f = _fraction(flo, None)
    if f is not None:
        parts.append(seq(Lit(str(li)), f))
    if li + 1 <= ui - 1:
        parts.append(seq(alt(*_non_negative(li + 1, ui - 1)), any_frac))
    f = _fraction(None, fhi)
    if f is not None:
        parts.append(seq(Lit(str(ui)), f))
    return parts


def number_range(lo: Bound | None, hi: Bound | None) -> Expr | None:
    """JSON numbers (no exponent) between the bounds; None when none exists."""
    zero = Decimal(0)
    parts: list[Expr] = []
    if hi is None or hi[0] > zero or (hi[0] == zero and not hi[1]):
        nlo = lo if lo is not None and lo[0] >= zero else (zero, False)
        parts += _non_negative_decimal(nlo, hi)
    if lo is None or lo[0] < zero:
        # x = -m with m > 0: bounds on x become bounds on m, mirrored.
        mlo: Bound = (zero, True) if hi is None or hi[0] >= zero else (-hi[0], hi[1])
        mhi: Bound | None = None if lo is None else (-lo[0], lo[1])
        neg = _non_negative_decimal(mlo, mhi)
        if neg:
            parts.append(seq(Lit("-"), alt(*neg)))
    return alt(*parts) if parts else None
