"""Shared rules for JSON text: bounded whitespace, strings, numbers, any value.

Whitespace between tokens is bounded on purpose: a small model that is allowed
unlimited whitespace can spend its whole budget on spaces or newlines. A
separator is at most one space or tab, or one newline followed by up to
``MAX_INDENT`` spaces or tabs (enough for pretty-printed JSON ten levels deep
with two-space indents).

Strings never contain raw control characters. Escapes are allowed, except that
a ``\\u`` escape may not name a UTF-16 surrogate: a surrogate pair would be one
character to a JSON parser but two to the grammar, which would break length
limits. Characters outside the Basic Multilingual Plane are written raw.
"""

from __future__ import annotations

from .gbnf import CharSet, Expr, Grammar, Lit, Ref, alt, opt, rep, seq

__all__ = ["JsonRules", "MAX_INDENT", "MAX_INT_DIGITS", "MAX_FRACTION_DIGITS"]

MAX_INDENT = 20
MAX_INT_DIGITS = 16
MAX_FRACTION_DIGITS = 20
MAX_EXPONENT_DIGITS = 2  # keeps every number finite as a double (at most ~1e115)

DIGIT = CharSet(((0x30, 0x39),))
NONZERO = CharSet(((0x31, 0x39),))
HEX = CharSet.of([(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)])
_SURROGATES = (0xD800, 0xDFFF)
# Code points a JSON string may hold unescaped (no controls, quote or backslash).
SAFE = CharSet.of([(0x20, 0x21), (0x23, 0x5B), (0x5D, 0xD7FF), (0xE000, 0x10FFFF)])
_SHORT_ESCAPES = {0x08: "b", 0x09: "t", 0x0A: "n", 0x0C: "f", 0x0D: "r"}


class JsonRules:
    """Creates the shared JSON rules in a grammar on first use."""

    def __init__(self, grammar: Grammar) -> None:
        self.g = grammar
        self._made: dict[str, Ref] = {}

    def _rule(self, name: str, build) -> Ref:
        ref = self._made.get(name)
        if ref is None:
            ref = self._made[name] = Ref(self.g.new_name(name))
            self.g.define(ref.name, build(), origin="")
        return ref

    @property
    def ws(self) -> Ref:
        blank = CharSet.of([(0x09, 0x09), (0x20, 0x20)])
        return self._rule("ws", lambda: opt(alt(blank, seq(Lit("\n"), rep(blank, 0, MAX_INDENT)))))

    @property
    def char(self) -> Ref:
        """One character of a JSON string, raw or escaped."""
        def build() -> Expr:
            not_surrogate = alt(seq(CharSet.of([(0x30, 0x39), (0x41, 0x43), (0x45, 0x46),
                                                (0x61, 0x63), (0x65, 0x66)]), HEX, HEX, HEX),
                                seq(CharSet.of([(0x44, 0x44), (0x64, 0x64)]),
                                    CharSet(((0x30, 0x37),)), HEX, HEX))
            escape = seq(Lit("\\"), alt(CharSet.of([(ord(c), ord(c)) for c in '"\\/bfnrt']),
                                         seq(Lit("u"), not_surrogate)))
            return alt(SAFE, escape)
        return self._rule("char", build)

    @property
    def control_escape(self) -> Ref:
        """Any control character U+0000..U+001F, escaped."""
        return self._rule("ctl-escape", lambda: seq(Lit("\\"), alt(
            CharSet.of([(ord(c), ord(c)) for c in "bfnrt"]),
            seq(Lit("u00"), CharSet(((0x30, 0x31),)), HEX))))

    @property
    def string(self) -> Ref:
        return self._rule("string", lambda: seq(Lit('"'), rep(self.char, 0, None), Lit('"')))

    @property
    def integer(self) -> Ref:
        return self._rule("integer", lambda: alt(
            Lit("0"), seq(opt(Lit("-")), NONZERO, rep(DIGIT, 0, MAX_INT_DIGITS - 1))))

    @property
    def number(self) -> Ref:
        def build() -> Expr:
            whole = alt(Lit("0"), seq(NONZERO, rep(DIGIT, 0, MAX_INT_DIGITS - 1)))
            frac = opt(seq(Lit("."), rep(DIGIT, 1, MAX_FRACTION_DIGITS)))
            exp = opt(seq(CharSet.of([(0x45, 0x45), (0x65, 0x65)]),
                          opt(CharSet.of([(0x2B, 0x2B), (0x2D, 0x2D)])),
                          rep(DIGIT, 1, MAX_EXPONENT_DIGITS)))
            return seq(opt(Lit("-")), whole, frac, exp)
        return self._rule("number", build)

    @property
    def boolean(self) -> Ref:
        return self._rule("boolean", lambda: alt(Lit("true"), Lit("false")))

    @property
    def null(self) -> Expr:
        return Lit("null")

    @property
    def value(self) -> Ref:
        """Any JSON value."""
        if "value" in self._made:
            return self._made["value"]
        ref = self._made["value"] = Ref(self.g.new_name("value"))
        self.g.define(ref.name, alt(self.any_object, self.any_array, self.string, self.number,
                                    self.boolean, self.null))
        return ref

    @property
    def any_object(self) -> Ref:
        if "object" in self._made:
            return self._made["object"]
        ref = self._made["object"] = Ref(self.g.new_name("object"))
        member = seq(self.string, self.ws, Lit(":"), self.ws, self.value)
        self.g.define(ref.name, self.delimited("{", "}", member))
        return ref

    @property
    def any_array(self) -> Ref:
        if "array" in self._made:
            return self._made["array"]
        ref = self._made["array"] = Ref(self.g.new_name("array"))
        self.g.define(ref.name, self.delimited("[", "]", self.value))
        return ref

    def delimited(self, open_: str, close: str, item: Expr) -> Expr:
        """``open item ("," item)* close`` or an empty pair, with bounded whitespace."""
        ws = self.ws
        more = rep(seq(Lit(","), ws, item), 0, None)
        return alt(seq(Lit(open_), ws, Lit(close)),
                   seq(Lit(open_), ws, item, more, ws, Lit(close)))

    def chars(self, cs: CharSet) -> Expr:
        """One JSON string character whose decoded value is in ``cs`` (raw where JSON
        allows it, escaped otherwise)."""
        parts: list[Expr] = []
        safe = cs.intersect(SAFE)
        if safe.ranges:
            if len(safe.ranges) == 1 and safe.ranges[0][0] == safe.ranges[0][1]:
                parts.append(Lit(chr(safe.ranges[0][0])))
            else:
                parts.append(safe)
        if cs.contains(0x22):
            parts.append(Lit('\\"'))
        if cs.contains(0x5C):
            parts.append(Lit("\\\\"))
        controls = [c for c in range(0x20) if cs.contains(c)]
        if len(controls) == 0x20:
            parts.append(self.control_escape)
        else:
            for c in controls:
                parts.append(Lit("\\" + _SHORT_ESCAPES[c]) if c in _SHORT_ESCAPES
                             else Lit(f"\\u{c:04x}"))
        if not parts:
            return CharSet(())
        return alt(*parts)
