"""A documented subset of regular expressions, turned into grammar over JSON string text.

Supported: literal characters; escaped punctuation (``\\.``, ``\\(`` ...); ``\\t \\n
\\r \\f \\v \\0 \\xHH \\uHHHH``; ``.``; classes ``[...]`` and ``[^...]`` with ranges;
``\\d \\w \\s`` and ``\\D \\W \\S`` (inside classes too); groups ``(...)``,
``(?:...)``, ``(?<name>...)``, ``(?P<name>...)``; alternation ``|``; quantifiers
``* + ? {m} {m,} {m,n}`` (a lazy ``?`` suffix is accepted: it does not change
which strings match); ``^`` at the start and ``$`` at the end of a top-level
alternative. Everything else (lookaround, backreferences, word boundaries,
``\\p{...}``, possessive quantifiers, anchors elsewhere) raises ``SchemaError``.

JSON Schema patterns are not anchored: an alternative without ``^`` may be
preceded, and one without ``$`` followed, by any text.

The grammar matches a subset of what both ECMA-262 and Python's ``re`` accept,
because validators differ: ``\\d``, ``\\w`` and ``\\s`` produce only their ASCII
members, while ``\\D``, ``\\W``, ``\\S``, negated classes and ``.`` exclude the
Unicode members too (and ``.`` excludes every line terminator).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .gbnf import MAX_REPEAT, CharSet, Expr, SchemaError, alt, rep, seq
from .primitives import JsonRules

__all__ = ["pattern_expr", "MAX_PATTERN_LENGTH"]

MAX_PATTERN_LENGTH = 4096
MAX_GROUP_DEPTH = 32

_ASCII_DIGIT = CharSet(((0x30, 0x39),))
_ASCII_WORD = CharSet.of([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
_ASCII_SPACE = CharSet.of([(0x09, 0x0D), (0x20, 0x20)])
_LINE_ENDS = CharSet.of([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)])
_JS_SPACE = CharSet.of([(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680),
                        (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                        (0x3000, 0x3000), (0xFEFF, 0xFEFF)])


@functools.cache
def _unicode_class(kind: str) -> CharSet:
    """Python's Unicode meaning of \\d, \\w or \\s (computed once, on demand)."""
    test = {"d": str.isdecimal, "w": lambda c: c.isalnum() or c == "_", "s": str.isspace}[kind]
    ranges: list[tuple[int, int]] = []
    start = None
    for cp in range(0x110000 + 1):
        hit = cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF and test(chr(cp))
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            ranges.append((start, cp - 1))
            start = None
    return CharSet(tuple(ranges))


def _wide(kind: str) -> CharSet:
    """Every code point some validator could count as \\d, \\w or \\s."""
    ascii_set = {"d": _ASCII_DIGIT, "w": _ASCII_WORD, "s": _JS_SPACE}[kind]
    return CharSet.of(list(ascii_set.ranges) + list(_unicode_class(kind).ranges))


def _narrow(kind: str) -> CharSet:
    return {"d": _ASCII_DIGIT, "w": _ASCII_WORD, "s": _ASCII_SPACE}[kind]


@dataclass
class _Item:
    """A class member: what it surely matches (narrow) and what it might (wide)."""

    narrow: CharSet
    wide: CharSet


_SIMPLE_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B}
_QUANT = re.compile(r"\{(\d+)(?:(,)(\d*))?\}")


class _Parser:
    def __init__(self, pattern: str, rules: JsonRules, pointer: str) -> None:
        self.p = pattern
        self.i = 0
        self.rules = rules
        self.pointer = pointer
        self.depth = 0

    def fail(self, what: str) -> SchemaError:
        return SchemaError(f"pattern {self.p!r}: {what} (at offset {self.i}) is not supported; "
                           "see the documented regex subset", self.pointer)

    def peek(self) -> str:
        return self.p[self.i] if self.i < len(self.p) else ""

    # --------------------------------------------------------------- structure

    def top(self) -> Expr:
        anything = rep(self.rules.char, 0, None)
        branches: list[Expr] = []
        while True:
            start = self.peek() == "^"
            if start:
                self.i += 1
            body = self.sequence(top=True)
            end = self.peek() == "$"
            if end:
                self.i += 1
            if self.peek() not in ("|", ""):
                raise self.fail("'$' anchor before the end of the pattern")
            branches.append(seq(*(() if start else (anything,)), body,
                                *(() if end else (anything,))))
            if self.peek() == "":
                return alt(*branches)
            self.i += 1  # '|'

    def alternation(self) -> Expr:
        options = [self.sequence(top=False)]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence(top=False))
        return alt(*options)

    def sequence(self, top: bool) -> Expr:
        items: list[Expr] = []
        while True:
            c = self.peek()
            if c in ("", "|", ")"):
                if c == ")" and top:
                    raise self.fail("unbalanced ')'")
                return seq(*items)
            if c == "$":
                if top:
                    return seq(*items)
                raise self.fail("'$' anchor inside a group")
            if c == "^":
                raise self.fail("'^' anchor that is not at the start of the pattern")
            atom = self.atom()
            items.append(self.quantified(atom))

    def quantified(self, atom: Expr) -> Expr:
        c = self.peek()
        lo: int
        hi: int | None
        if c == "*":
            lo, hi, self.i = 0, None, self.i + 1
        elif c == "+":
            lo, hi, self.i = 1, None, self.i + 1
        elif c == "?":
            lo, hi, self.i = 0, 1, self.i + 1
        elif c == "{" and (m := _QUANT.match(self.p, self.i)):
            lo = int(m.group(1))
            hi = lo if not m.group(2) else (int(m.group(3)) if m.group(3) else None)
            if hi is not None and hi < lo:
                raise self.fail(f"quantifier {m.group(0)} with maximum below minimum")
            if lo > MAX_REPEAT or (hi or 0) > MAX_REPEAT:
                raise self.fail(f"quantifier {m.group(0)} above {MAX_REPEAT}")
            self.i = m.end()
        else:
            return atom
        if self.peek() == "?":
            self.i += 1  # lazy: same language
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and _QUANT.match(self.p, self.i)):
            raise self.fail("a quantifier after a quantifier (possessive or nested)")
        return rep(atom, lo, hi)

    def atom(self) -> Expr:
        c = self.peek()
        if c == "(":
            return self.group()
        if c == "[":
            return self.rules.chars(self.char_class())
        if c == ".":
            self.i += 1
            return self.rules.chars(_LINE_ENDS.complement())
        if c in ("*", "+", "?"):
            raise self.fail(f"quantifier {c!r} with nothing to repeat")
        if c == "{" and _QUANT.match(self.p, self.i):
            raise self.fail("quantifier with nothing to repeat")
        if c == "{" and re.match(r"\{,\d*\}", self.p[self.i:]):
            raise self.fail("quantifier '{,n}' (read differently by different engines)")
        if c == "\\":
            item = self.escape(in_class=False)
            return self.rules.chars(item.narrow)
        self.i += 1
        return self.rules.chars(CharSet(((ord(c), ord(c)),)))

    def group(self) -> Expr:
        self.i += 1
        self.depth += 1
        if self.depth > MAX_GROUP_DEPTH:
            raise self.fail(f"groups nested deeper than {MAX_GROUP_DEPTH}")
        if self.p.startswith("?", self.i):
            rest = self.p[self.i:]
            named = re.match(r"\?P?<[A-Za-z_][A-Za-z0-9_]*>", rest)
            if rest.startswith("?:"):
                self.i += 2
            elif named:
                self.i += named.end()
            elif rest[:2] in ("?=", "?!") or rest[:3] in ("?<=", "?<!"):
                raise self.fail("lookaround")
            else:
                raise self.fail("group flags or extension '(?" + rest[1:2] + "'")
        inner = self.alternation()
        if self.peek() != ")":
            raise self.fail("missing ')'")
        self.i += 1
        self.depth -= 1
        return inner

    def escape(self, in_class: bool) -> _Item:
        self.i += 1
        c = self.peek()
        if not c:
            raise self.fail("trailing backslash")
        self.i += 1
        if c in "dws":
            return _Item(_narrow(c), _wide(c))
        if c in "DWS":
            k = c.lower()
            return _Item(_wide(k).complement(), _narrow(k).complement())
        if c in _SIMPLE_ESCAPES:
            return _single(_SIMPLE_ESCAPES[c])
        if c == "b" and in_class:
            return _single(0x08)
        if c == "0" and not self.peek().isdigit():
            return _single(0)
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"escape '\\{c}' without {n} hex digits")
            self.i += n
            cp = int(digits, 16)
            if 0xD800 <= cp <= 0xDFFF:
                raise self.fail("a surrogate code point")
            return _single(cp)
        if c.isdigit():
            raise self.fail("backreference")
        if c in "bB":
            raise self.fail("word boundary")
        if c in "pP":
            raise self.fail("Unicode property escape")
        if c.isascii() and c.isalnum() or not c.isascii() or c == "_":
            raise self.fail(f"escape '\\{c}'")
        return _single(ord(c))

    def char_class(self) -> CharSet:
        self.i += 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        items: list[_Item] = []
        first = True
        while True:
            c = self.peek()
            if not c:
                raise self.fail("unterminated character class")
            if c == "]" and not first:
                self.i += 1
                break
            if c == "[" and self.p.startswith(("[:", "[=", "[."), self.i):
                raise self.fail("POSIX class syntax")
            first = False
            lo_item = self._class_atom()
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                hi_item = self._class_atom()
                lo, hi = _as_char(lo_item), _as_char(hi_item)
                if lo is None or hi is None:
                    raise self.fail("a class range with an escape class at one end")
                if hi < lo:
                    raise self.fail("a class range out of order")
                items.append(_Item(CharSet(((lo, hi),)), CharSet(((lo, hi),))))
            else:
                items.append(lo_item)
        if negated:
            return CharSet.of([r for it in items for r in it.wide.ranges]).complement()
        return CharSet.of([r for it in items for r in it.narrow.ranges])

    def _class_atom(self) -> _Item:
        if self.peek() == "\\":
            return self.escape(in_class=True)
        c = self.peek()
        self.i += 1
        return _single(ord(c))


def _single(cp: int) -> _Item:
    cs = CharSet(((cp, cp),))
    return _Item(cs, cs)


def _as_char(item: _Item) -> int | None:
    r = item.narrow.ranges
    if len(r) == 1 and r[0][0] == r[0][1] and item.wide == item.narrow:
        return r[0][0]
    return None


def pattern_expr(pattern: str, rules: JsonRules, pointer: str) -> Expr:
    """The JSON string body (between the quotes) of strings the pattern matches."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise SchemaError(f"pattern is longer than {MAX_PATTERN_LENGTH} characters", pointer)
    return _Parser(pattern, rules, pointer).top()
