"""String formats with a fixed shape: date, time, date-time, uuid.

Each is exact for RFC 3339 / RFC 4122 as parsed by Python's ``datetime`` and
``uuid``: months have their real number of days, 29 February only in leap
years, year 0000 excluded, and a time always carries its offset (``Z`` or
``+hh:mm``). Leap seconds (``:60``) and lowercase ``t``/``z`` are valid but
never produced.
"""

from __future__ import annotations

from .gbnf import CharSet, Expr, Lit, alt, opt, rep, seq

__all__ = ["FORMATS", "format_expr"]

_D = CharSet(((0x30, 0x39),))
_HEX = CharSet.of([(0x30, 0x39), (0x61, 0x66), (0x41, 0x46)])


def _r(lo: str, hi: str) -> CharSet:
    return CharSet(((ord(lo), ord(hi)),))


def _date() -> Expr:
    # Years 0001..9999.
    year = alt(seq(_D, _D, _D, _r("1", "9")), seq(_D, _D, _r("1", "9"), Lit("0")),
               seq(_D, _r("1", "9"), Lit("00")), seq(_r("1", "9"), Lit("000")))
    by4 = alt(seq(Lit("0"), CharSet.of([(0x34, 0x34), (0x38, 0x38)])),
              seq(CharSet.of([(0x32, 0x32), (0x34, 0x34), (0x36, 0x36), (0x38, 0x38)]),
                  CharSet.of([(0x30, 0x30), (0x34, 0x34), (0x38, 0x38)])),
              seq(CharSet.of([(0x31, 0x31), (0x33, 0x33), (0x35, 0x35), (0x37, 0x37), (0x39, 0x39)]),
                  CharSet.of([(0x32, 0x32), (0x36, 0x36)])))
    leap_year = alt(seq(_D, _D, by4), seq(by4, Lit("00")))
    day28 = alt(seq(Lit("0"), _r("1", "9")), seq(Lit("1"), _D), seq(Lit("2"), _r("0", "8")))
    day30 = alt(day28, Lit("29"), Lit("30"))
    day31 = alt(day30, Lit("31"))
    m31 = alt(*(Lit(m) for m in ("01", "03", "05", "07", "08", "10", "12")))
    m30 = alt(*(Lit(m) for m in ("04", "06", "09", "11")))
    month_day = alt(seq(m31, Lit("-"), day31), seq(m30, Lit("-"), day30), seq(Lit("02-"), day28))
    return alt(seq(year, Lit("-"), month_day), seq(leap_year, Lit("-02-29")))


def _time() -> Expr:
    hour = alt(seq(_r("0", "1"), _D), seq(Lit("2"), _r("0", "3")))
    minute = seq(_r("0", "5"), _D)
    frac = opt(seq(Lit("."), rep(_D, 1, 6)))
    offset = alt(Lit("Z"), seq(CharSet.of([(0x2B, 0x2B), (0x2D, 0x2D)]), hour, Lit(":"), minute))
    return seq(hour, Lit(":"), minute, Lit(":"), minute, frac, offset)


def _uuid() -> Expr:
    return seq(rep(_HEX, 8, 8), Lit("-"), rep(_HEX, 4, 4), Lit("-"), rep(_HEX, 4, 4), Lit("-"),
               rep(_HEX, 4, 4), Lit("-"), rep(_HEX, 12, 12))


FORMATS = ("date", "time", "date-time", "uuid")


def format_expr(name: str) -> Expr | None:
    """The string body (without quotes) for a supported format, else None."""
    if name == "date":
        return _date()
    if name == "time":
        return _time()
    if name == "date-time":
        return seq(_date(), Lit("T"), _time())
    if name == "uuid":
        return _uuid()
    return None
