"""A small GBNF builder: expressions, named rules, checks, and text output.

Converters build grammars as expression trees instead of strings, so that the
whole grammar can be checked before llama.cpp sees it:

* every rule must derive some finite string (a ``$ref`` cycle without a base
  case would otherwise give a grammar that can never complete);
* no rule may be left-recursive (llama.cpp refuses those when the sampler is
  created, far from the schema that caused it);
* an unbounded repetition must not repeat something that can be empty
  (llama.cpp's rewrite of ``x*`` would then be left-recursive);
* the grammar, counted after llama.cpp expands ``{m,n}`` into rules, stays
  under a size cap.

Rendering escapes every literal and character class so the text is valid for
the parser at the pinned llama.cpp (which only knows the escapes ``\\x``,
``\\u``, ``\\U``, ``\\t``, ``\\r``, ``\\n``, ``\\\\``, ``\\"``, ``\\[``, ``\\]``
and ``\\-``), and rewrites large repetition counts into nested blocks because
the parser silently turns a maximum above 2000 into "unbounded".
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Union

from mullama.errors import SchemaError

__all__ = [
    "SchemaError",
    "Lit",
    "CharSet",
    "Ref",
    "Seq",
    "Alt",
    "Rep",
    "Expr",
    "EMPTY",
    "seq",
    "alt",
    "opt",
    "rep",
    "Grammar",
    "MAX_CODEPOINT",
]

MAX_CODEPOINT = 0x10FFFF
# Largest repetition count written directly as {m,n}; larger ones are split into blocks.
_DIRECT_REPEAT = 400
# Largest count supported at all (two levels of blocks).
MAX_REPEAT = _DIRECT_REPEAT * _DIRECT_REPEAT
# Deeper inline groups become rules of their own (the engine caps nesting).
_MAX_INLINE_DEPTH = 24
MAX_RULES = 20_000
# The engine refuses grammar text above 1 MiB.
MAX_GRAMMAR_BYTES = 1 << 20
# Cap on the grammar after llama.cpp's expansion of repetitions (elements + generated rules).
DEFAULT_MAX_GRAMMAR_UNITS = 200_000


@dataclass(frozen=True)
class Lit:
    """A literal string (code points)."""

    text: str


@dataclass(frozen=True)
class CharSet:
    """One code point out of sorted, disjoint, non-adjacent inclusive ranges."""

    ranges: tuple[tuple[int, int], ...]

    @staticmethod
    def of(ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> "CharSet":
        return CharSet(normalize_ranges(ranges))

    def complement(self) -> "CharSet":
        out: list[tuple[int, int]] = []
        nxt = 0
        for lo, hi in self.ranges:
            if lo > nxt:
                out.append((nxt, lo - 1))
            nxt = hi + 1
        if nxt <= MAX_CODEPOINT:
            out.append((nxt, MAX_CODEPOINT))
        return CharSet(tuple(out))

    def intersect(self, other: "CharSet") -> "CharSet":
        out: list[tuple[int, int]] = []
        for a, b in self.ranges:
            for c, d in other.ranges:
                lo, hi = max(a, c), min(b, d)
                if lo <= hi:
                    out.append((lo, hi))
        return CharSet.of(out)

    def contains(self, cp: int) -> bool:
        return any(lo <= cp <= hi for lo, hi in self.ranges)


@dataclass(frozen=True)
class Ref:
    """A reference to a named rule."""

    name: str


@dataclass(frozen=True)
class Seq:
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class Alt:
    options: tuple["Expr", ...]


@dataclass(frozen=True)
class Rep:
    """``item`` repeated between ``min`` and ``max`` times (``max`` None: unbounded)."""

    item: "Expr"
    min: int
    max: int | None


Expr = Union[Lit, CharSet, Ref, Seq, Alt, Rep]
EMPTY: Expr = Seq(())


def normalize_ranges(ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] <= r[1]):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def seq(*items: Expr) -> Expr:
    """A sequence, flattening nested sequences and merging adjacent literals."""
    flat: list[Expr] = []
    for it in items:
        parts = it.items if isinstance(it, Seq) else (it,)
        for p in parts:
            if isinstance(p, Lit):
                if not p.text:
                    continue
                if flat and isinstance(flat[-1], Lit):
                    flat[-1] = Lit(flat[-1].text + p.text)
                    continue
            flat.append(p)
    return flat[0] if len(flat) == 1 else Seq(tuple(flat))


def alt(*options: Expr) -> Expr:
    """An alternation, flattening nested alternations and dropping duplicates."""
    flat: list[Expr] = []
    for o in options:
        for p in (o.options if isinstance(o, Alt) else (o,)):
            if p not in flat:
                flat.append(p)
    return flat[0] if len(flat) == 1 else Alt(tuple(flat))


def opt(item: Expr) -> Expr:
    return Rep(item, 0, 1)


def rep(item: Expr, lo: int, hi: int | None) -> Expr:
    if hi is not None and hi < lo:
        raise ValueError("repetition maximum below minimum")
    if hi == 0:
        return EMPTY
    if lo == 1 and hi == 1:
        return item
    return Rep(item, lo, hi)


@dataclass
class Grammar:
    """Named rules, with the JSON pointer (or other origin) each was built for."""

    rules: dict[str, Expr] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    max_units: int = DEFAULT_MAX_GRAMMAR_UNITS
    _helpers: dict[str, str] = field(default_factory=dict)
    _next_suffix: dict[str, int] = field(default_factory=dict)
    _units: int = 0
    _depth: int = 0

    def new_name(self, hint: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-").lower() or "r"
        base = base[:40].rstrip("-") or "r"
        if len(self.rules) >= MAX_RULES:
            raise SchemaError(f"the generated grammar is too large (over {MAX_RULES} rules); "
                              "simplify the schema")
        name, i = base, self._next_suffix.get(base, 1)
        while name in self.rules:
            i += 1
            name = f"{base}-{i}"
        self._next_suffix[base] = i
        self.rules[name] = EMPTY  # reserve
        return name

    def define(self, name: str, expr: Expr, origin: str = "") -> Ref:
        self.rules[name] = expr
        self.origins.setdefault(name, origin)
        return Ref(name)

    def add(self, hint: str, expr: Expr, origin: str = "") -> Ref:
        return self.define(self.new_name(hint), expr, origin)

    # ------------------------------------------------------------------ checks

    def check(self, root: str = "root") -> None:
        """Refuse rules that derive nothing finite, left recursion, and nullable loops."""
        productive = self._fixpoint(_productive)
        barren = [n for n in self.rules if n not in productive]
        if barren:
            # Name the part of the schema most likely at fault: a definition over the root.
            where = next((self.origins[n] for n in barren if self.origins.get(n)), "")
            raise SchemaError("this part of the schema cannot produce any finite JSON value "
                              "(a $ref cycle with no base case, or constraints that exclude "
                              "everything)", where)
        nullable = self._fixpoint(_nullable)
        for name, expr in self.rules.items():
            bad = _nullable_loop(expr, nullable)
            if bad:
                raise SchemaError("a repeated part can match the empty string "
                                  "(for example '(a*)*' in a pattern)", self.origins.get(name) or "")
        graph = {n: _first_refs(e, nullable) for n, e in self.rules.items()}
        state: dict[str, int] = {}
        for start in self.rules:
            if state.get(start):
                continue
            stack = [(start, iter(graph[start]))]
            state[start] = 1
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[node] = 2
                    stack.pop()
                elif state.get(nxt) == 1:
                    raise SchemaError("the schema is left-recursive (a $ref reaches itself "
                                      "before any character is produced)", self.origins.get(nxt) or "")
                elif not state.get(nxt):
                    state[nxt] = 1
                    stack.append((nxt, iter(graph[nxt])))

    def _fixpoint(self, test) -> set[str]:
        """The least set of rules for which ``test`` holds, re-testing a rule only when a
        rule it refers to joins the set (linear in the grammar, whatever the order)."""
        users: dict[str, set[str]] = {n: set() for n in self.rules}
        for name, expr in self.rules.items():
            for ref in _refs(expr):
                users.setdefault(ref, set()).add(name)
        known: set[str] = set()
        queue = list(self.rules)
        while queue:
            name = queue.pop()
            if name not in known and test(self.rules[name], known):
                known.add(name)
                queue.extend(u for u in users.get(name, ()) if u not in known)
        return known

    # ------------------------------------------------------------------ output

    def render(self, root: str = "root") -> str:
        """The GBNF text, ``root`` first; raises SchemaError when over the size cap."""
        self._units = 0
        out: list[str] = []
        done: set[str] = set()
        # Helper rules created while rendering are added to self.rules; loop until none is new.
        while len(done) < len(self.rules):
            names = [root] if root not in done else []
            names += [n for n in list(self.rules) if n not in done and n != root]
            for name in names:
                done.add(name)
                out.append(f"{name} ::= {self._render_top(self.rules[name])}")
            if self._units > self.max_units:
                raise SchemaError(f"the generated grammar is too large (over {self.max_units} "
                                  "rules and symbols after expansion); simplify the schema "
                                  "or lower its repetition counts")
        text = "\n".join(out) + "\n"
        if len(text.encode()) > MAX_GRAMMAR_BYTES:
            raise SchemaError(f"the generated grammar is over {MAX_GRAMMAR_BYTES} bytes; simplify the schema")
        return text

    def _render_top(self, expr: Expr) -> str:
        if isinstance(expr, Alt):
            return " | ".join(self._render(o) for o in expr.options)
        return self._render(expr)

    def _render(self, expr: Expr) -> str:
        self._depth += 1
        try:
            return self._render_inner(expr)
        finally:
            self._depth -= 1

    def _render_inner(self, expr: Expr) -> str:
        self._units += 1
        if isinstance(expr, Lit):
            self._units += len(expr.text)
            return '""' if not expr.text else '"' + "".join(_lit_char(ord(c)) for c in expr.text) + '"'
        if isinstance(expr, CharSet):
            self._units += len(expr.ranges)
            return _render_charset(expr)
        if isinstance(expr, Ref):
            return expr.name
        if isinstance(expr, Seq):
            if not expr.items:
                return '""'
            return " ".join(self._render_atom(i) for i in expr.items)
        if isinstance(expr, Alt):
            if self._depth > _MAX_INLINE_DEPTH:
                return self._symbol(expr)  # keeps parenthesis nesting shallow
            return "(" + " | ".join(self._render(o) for o in expr.options) + ")"
        if isinstance(expr, Rep):
            return self._render_rep(expr)
        raise TypeError(f"not a grammar expression: {expr!r}")

    def _render_atom(self, expr: Expr) -> str:
        text = self._render(expr)
        return f"({text})" if isinstance(expr, Seq) and len(expr.items) > 1 else text

    def _symbol(self, item: Expr) -> str:
        """Render ``item`` as one symbol for a repetition (a group would multiply
        llama.cpp's repetition budget by its inner rule count)."""
        if isinstance(item, (Lit, CharSet, Ref)):
            return self._render(item)
        saved, self._depth = self._depth, 0
        key = self._render(item)
        self._depth = saved
        name = self._helpers.get(key)
        if name is None:
            name = self.new_name("rep")
            self.rules[name] = item
            self._helpers[key] = name
        return name

    def _render_rep(self, r: Rep) -> str:
        lo, hi = r.min, r.max
        if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
            raise SchemaError(f"a repetition count above {MAX_REPEAT} is not supported")
        sym = self._symbol(r.item)
        if lo <= _DIRECT_REPEAT and (hi is None or hi <= _DIRECT_REPEAT):
            self._units += (hi if hi is not None else lo + 1) * 2
            if hi is None:
                return {0: f"{sym}*", 1: f"{sym}+"}.get(lo, f"{sym}{{{lo},}}")
            if (lo, hi) == (0, 1):
                return f"{sym}?"
            return f"{sym}{{{lo}}}" if lo == hi else f"{sym}{{{lo},{hi}}}"
        # Large counts: x{lo} = block{q} x{r}, block = x{k}; x{0,t} split likewise.
        k = _DIRECT_REPEAT
        block = self._symbol(Rep(Ref(sym), k, k))
        b, x = Ref(block), Ref(sym)
        q, r = divmod(lo, k)
        parts: list[Expr] = [rep(b, q, q), rep(x, r, r)]
        if hi is None:
            parts.append(rep(x, 0, None))
        elif hi > lo:
            t = hi - lo
            if t <= k:
                parts.append(rep(x, 0, t))
            else:
                q2, r2 = divmod(t, k)
                parts.append(alt(seq(rep(b, 0, q2 - 1), rep(x, 0, k - 1)),
                                 seq(rep(b, q2, q2), rep(x, 0, r2))))
        kept = [p for p in parts if p != EMPTY]
        return " ".join(self._render_atom(p) for p in kept) or '""'


# ---------------------------------------------------------------------- analyses

def _productive(expr: Expr, known: set[str]) -> bool:
    if isinstance(expr, Lit):
        return True
    if isinstance(expr, CharSet):
        return bool(expr.ranges)
    if isinstance(expr, Ref):
        return expr.name in known
    if isinstance(expr, Seq):
        return all(_productive(i, known) for i in expr.items)
    if isinstance(expr, Alt):
        return any(_productive(o, known) for o in expr.options)
    return expr.min == 0 or _productive(expr.item, known)


def _nullable(expr: Expr, known: set[str]) -> bool:
    if isinstance(expr, Lit):
        return not expr.text
    if isinstance(expr, CharSet):
        return False
    if isinstance(expr, Ref):
        return expr.name in known
    if isinstance(expr, Seq):
        return all(_nullable(i, known) for i in expr.items)
    if isinstance(expr, Alt):
        return any(_nullable(o, known) for o in expr.options)
    return expr.min == 0 or _nullable(expr.item, known)


def _first_refs(expr: Expr, nullable: set[str]) -> set[str]:
    if isinstance(expr, Ref):
        return {expr.name}
    if isinstance(expr, Seq):
        out: set[str] = set()
        for item in expr.items:
            out |= _first_refs(item, nullable)
            if not _nullable(item, nullable):
                break
        return out
    if isinstance(expr, Alt):
        return set().union(*(_first_refs(o, nullable) for o in expr.options))
    if isinstance(expr, Rep):
        return _first_refs(expr.item, nullable) if expr.max != 0 else set()
    return set()


def _refs(expr: Expr) -> set[str]:
    if isinstance(expr, Ref):
        return {expr.name}
    if isinstance(expr, Seq):
        return set().union(*(_refs(i) for i in expr.items))
    if isinstance(expr, Alt):
        return set().union(*(_refs(o) for o in expr.options))
    if isinstance(expr, Rep):
        return _refs(expr.item)
    return set()


def _nullable_loop(expr: Expr, nullable: set[str]) -> bool:
    if isinstance(expr, Seq):
        return any(_nullable_loop(i, nullable) for i in expr.items)
    if isinstance(expr, Alt):
        return any(_nullable_loop(o, nullable) for o in expr.options)
    if isinstance(expr, Rep):
        if expr.max is None and _nullable(expr.item, nullable):
            return True
        return _nullable_loop(expr.item, nullable)
    return False


# ---------------------------------------------------------------------- escaping

def _hex_escape(cp: int) -> str:
    if cp < 0x100:
        return f"\\x{cp:02X}"
    if cp < 0x10000:
        return f"\\u{cp:04X}"
    return f"\\U{cp:08X}"


def _lit_char(cp: int) -> str:
    if cp == 0x22:
        return '\\"'
    if cp == 0x5C:
        return "\\\\"
    if 0x20 <= cp < 0x7F:
        return chr(cp)
    return _hex_escape(cp)


def _class_char(cp: int) -> str:
    c = chr(cp)
    if c.isascii() and c.isalnum():
        return c
    return _hex_escape(cp)


@functools.lru_cache(maxsize=1024)
def _render_charset(cs: CharSet) -> str:
    if not cs.ranges:
        raise SchemaError("internal: empty character class")
    comp = cs.complement()
    # A negated class is shorter for sets like "anything but a quote".
    negate = 0 < len(comp.ranges) < len(cs.ranges)
    ranges = comp.ranges if negate else cs.ranges
    parts = []
    for lo, hi in ranges:
        if lo == hi:
            parts.append(_class_char(lo))
        elif hi == lo + 1:
            parts.append(_class_char(lo) + _class_char(hi))
        else:
            parts.append(f"{_class_char(lo)}-{_class_char(hi)}")
    return "[" + ("^" if negate else "") + "".join(parts) + "]"
