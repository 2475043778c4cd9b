"""JSON Schema -> GBNF (start rule ``root``) for constrained generation.

Every string the grammar produces is a JSON text that validates against the
schema; the converse does not hold. Where the schema allows more than a useful
generator should produce, the grammar produces a subset:

* with ``additionalProperties`` absent, objects carry only the declared
  properties (a property that is only named in ``required`` may hold any value);
* properties appear in declaration order, required ones always, optional ones
  or not, and extra properties (``additionalProperties`` true or a schema) come
  after them, with keys spelled without escapes;
* whitespace between tokens is bounded (see ``primitives``), numbers have at
  most 16 integer and 20 fraction digits (bounded ``number``s no exponent), and
  ``enum``/``const`` values are written in compact form.

A keyword that constrains instances and is not supported raises
``SchemaError`` (a ``ValueError``) naming it and its JSON pointer; nothing that
constrains is ever ignored. Pure annotations are ignored.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from . import schema_merge as sm
from .formats import FORMATS, format_expr
from .gbnf import EMPTY, CharSet, Expr, Grammar, Lit, Ref, SchemaError, alt, opt, rep, seq
from .numbers import integer_range, number_range
from .primitives import SAFE, JsonRules
from .regex import pattern_expr
from .schema_merge import ANNOTATIONS, KNOWN, TYPES, resolve_ref

__all__ = ["json_schema_to_gbnf", "JSON_OBJECT_SCHEMA", "MAX_SCHEMA_BYTES", "MAX_SCHEMA_DEPTH"]

MAX_SCHEMA_BYTES = 256 * 1024
MAX_SCHEMA_DEPTH = 64
MAX_PROPERTIES = 1000
MAX_WORK = 20_000

#: Any JSON object: what OpenAI's ``response_format={"type": "json_object"}`` asks for.
JSON_OBJECT_SCHEMA: Mapping[str, Any] = {"type": "object", "additionalProperties": True}



def json_schema_to_gbnf(schema: Mapping[str, Any] | bool) -> str:
    """Convert a JSON Schema to GBNF text whose start rule is ``root``.

    Raises ``SchemaError`` (a ``ValueError``) for anything outside the supported
    subset, for contradictions (an empty ``enum``, ``minItems`` above
    ``maxItems`` ...), for ``$ref`` cycles that cannot produce a finite value, for
    schemas over 256 KiB of JSON text, and for grammars over the size cap.
    """
    if isinstance(schema, bool):
        pass
    elif not isinstance(schema, Mapping):
        raise SchemaError(f"a JSON Schema must be an object or a boolean, not {type(schema).__name__}")
    if _rough_size(schema, MAX_SCHEMA_BYTES) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the schema is over the limit of {MAX_SCHEMA_BYTES} bytes of JSON text")
    try:
        size = len(json.dumps(schema, allow_nan=False).encode())
    except (TypeError, ValueError, RecursionError) as exc:
        raise SchemaError(f"the schema is not valid JSON data: {exc}") from None
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the schema is {size} bytes of JSON, over the limit of "
                          f"{MAX_SCHEMA_BYTES} bytes")
    return build_grammar(schema).render()


def _rough_size(value: Any, limit: int) -> int:
    """A lower estimate of the JSON text size that stops once past ``limit``, so a
    Python structure that shares sub-objects (small in memory, huge as text) is
    refused without being serialized."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, Mapping):
            total += 2 + 2 * len(v)
            for k, x in v.items():
                total += len(k) + 2 if isinstance(k, str) else 4
                stack.append(x)
        elif isinstance(v, (list, tuple)):
            total += 2 + len(v)
            stack.extend(v)
        elif isinstance(v, str):
            total += len(v) + 2
        else:
            total += 4
    return total


def build_grammar(schema: Mapping[str, Any] | bool) -> Grammar:
    """The checked grammar as expressions (before rendering), for tools and tests."""
    return _Converter(schema).run()


class _Converter:
    def __init__(self, root: Mapping[str, Any] | bool) -> None:
        self.root = root
        self.g = Grammar()
        self.g.new_name("root")
        self.json = JsonRules(self.g)
        self.refs: dict[str, Ref] = {}
        self.work = 0

    def run(self) -> Grammar:
        self.g.define("root", self.schema(self.root, "", 0), origin="")
        self.g.check()
        return self.g

    # ---------------------------------------------------------------- dispatch

    def schema(self, s: Any, ptr: str, depth: int) -> Expr:
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels", ptr)
        self.work += 1
        if self.work > MAX_WORK:
            raise SchemaError(f"the schema expands to more than {MAX_WORK} subschemas (combining "
                              "keywords copy their siblings into every branch); simplify it", ptr)
        if s is True:
            return self.json.value
        if s is False:
            raise SchemaError("the schema 'false' accepts no value here", ptr)
        if not isinstance(s, Mapping):
            raise SchemaError(f"a schema must be an object or a boolean, not {type(s).__name__}", ptr)
        for key in s:
            if key not in KNOWN:
                raise SchemaError(f"unsupported keyword {key!r}", ptr)
        sm.check_shapes(s, ptr)
        if "$ref" in s:
            return self.ref(s, ptr, depth)
        if "allOf" in s:
            return self.schema(sm.merge_all_of(s, self.root, ptr), ptr, depth + 1)
        if "anyOf" in s or "oneOf" in s:
            return self.union(s, ptr, depth)
        if "enum" in s or "const" in s:
            return self.enum(s, ptr)
        types = sm.types_of(s, ptr)
        if "type" not in s and len(types) == len(TYPES):
            return self.json.value
        return alt(*(self.typed(t, s, ptr, depth) for t in types))

    def named(self, hint: str, expr: Expr, ptr: str) -> Expr:
        """``expr`` as a rule of its own unless it is a single symbol: a part used in
        two places is then written once (nested arrays/objects would otherwise
        double the grammar at every level)."""
        if isinstance(expr, (Ref, Lit, CharSet)):
            return expr
        return self.g.add(hint, expr, ptr)

    def ref(self, s: Mapping[str, Any], ptr: str, depth: int) -> Expr:
        target_ptr, target = resolve_ref(s["$ref"], self.root, ptr)
        if any(k not in ANNOTATIONS and k not in ("$ref", "$defs", "definitions") for k in s):
            # Sibling constraints apply together with the target (draft 2019-09 on).
            return self.schema(sm.merge_ref(s, target, ptr), ptr, depth + 1)
        ref = self.refs.get(target_ptr)
        if ref is None:
            hint = target_ptr.rsplit("/", 1)[-1] or "root-ref"
            ref = self.refs[target_ptr] = Ref(self.g.new_name(hint))
            self.g.define(ref.name, self.schema(target, target_ptr, depth + 1), origin=target_ptr)
        return ref

    def union(self, s: Mapping[str, Any], ptr: str, depth: int) -> Expr:
        if "anyOf" in s and "oneOf" in s:
            raise SchemaError("'anyOf' and 'oneOf' in the same schema (or combined through "
                              "'allOf') are not supported", ptr)
        key = "anyOf" if "anyOf" in s else "oneOf"
        branches = s[key]
        if not isinstance(branches, list) or not branches:
            raise SchemaError(f"{key!r} must be a non-empty list of schemas", ptr)
        rest = {k: v for k, v in s.items() if k != key}
        options: list[Expr] = []
        kept: list[Any] = []
        for i, b in enumerate(branches):
            bptr = f"{ptr}/{key}/{i}"
            try:
                merged = sm.merge_siblings(rest, b, bptr)
            except sm.EmptyIntersection:
                continue  # e.g. {"type": "string", "anyOf": [{"type": "null"}, ...]}
            if merged is False:
                continue
            kept.append(b)
            options.append(self.schema(merged, bptr, depth + 1))
        if not options:
            raise SchemaError(f"no branch of {key!r} is compatible with the rest of the schema", ptr)
        if key == "oneOf":
            sm.check_one_of_disjoint(kept, self.root, ptr)
        return alt(*options)

    # ------------------------------------------------------------------- enum

    def enum(self, s: Mapping[str, Any], ptr: str) -> Expr:
        if "const" in s:
            values = [s["const"]]
            if "enum" in s:
                values = [v for v in values if any(_same_json(v, e) for e in s["enum"])]
        else:
            values = s["enum"]
            if not isinstance(values, list):
                raise SchemaError("'enum' must be a list", ptr)
            if not values:
                raise SchemaError("'enum' is empty, so no value can match", ptr)
        extra = [k for k in s if k not in ANNOTATIONS and k not in ("enum", "const", "type")]
        if extra:
            raise SchemaError(f"'enum'/'const' combined with {extra[0]!r} is not supported", ptr)
        types = sm.types_of(s, ptr) if "type" in s else TYPES
        texts: list[Expr] = []
        for v in values:
            if sm.json_type(v) in types or (sm.json_type(v) == "integer" and "number" in types):
                try:
                    texts.append(Lit(json.dumps(v, ensure_ascii=False, allow_nan=False,
                                                separators=(",", ":"))))
                except ValueError:
                    raise SchemaError("'enum'/'const' holds a value that is not JSON (NaN or infinity)",
                                      ptr) from None
        if not texts:
            raise SchemaError("no 'enum'/'const' value has an allowed 'type'", ptr)
        return alt(*texts)

    # ------------------------------------------------------------------ types

    def typed(self, t: str, s: Mapping[str, Any], ptr: str, depth: int) -> Expr:
        if t == "object":
            return self.object(s, ptr, depth)
        if t == "array":
            return self.array(s, ptr, depth)
        if t == "string":
            return self.string(s, ptr)
        if t in ("integer", "number"):
            return self.numeric(t, s, ptr)
        if t == "boolean":
            return self.json.boolean
        return self.json.null

    def numeric(self, t: str, s: Mapping[str, Any], ptr: str) -> Expr:
        if t == "number":
            return self.number(s, ptr)
        lo, hi = sm.integer_bounds(s, ptr)
        if lo is None and hi is None:
            return self.json.integer
        if lo is not None and hi is not None and lo > hi:
            raise SchemaError(f"the integer bounds leave no value (minimum {lo} > maximum {hi})", ptr)
        return integer_range(lo, hi)

    def number(self, s: Mapping[str, Any], ptr: str) -> Expr:
        lo, hi = sm.number_bounds(s, ptr)
        if lo is None and hi is None:
            return self.json.number
        if lo is not None and hi is not None and lo[0] > hi[0]:
            raise SchemaError(f"the number bounds leave no value ({lo[0]} > {hi[0]})", ptr)
        expr = number_range(lo, hi)
        if expr is None:
            raise SchemaError("the number bounds leave no value", ptr)
        return expr

    def string(self, s: Mapping[str, Any], ptr: str) -> Expr:
        quote = Lit('"')
        lo = sm.count(s, "minLength", ptr, 0)
        hi = sm.count(s, "maxLength", ptr, None)
        if hi is not None and lo > hi:
            raise SchemaError(f"minLength {lo} is greater than maxLength {hi}", ptr)
        if "format" in s:
            fmt = s["format"]
            body = format_expr(fmt) if isinstance(fmt, str) else None
            if body is None:
                raise SchemaError(f"unsupported format {fmt!r} (supported: {', '.join(FORMATS)})", ptr)
            others = [k for k in ("pattern", "minLength", "maxLength") if k in s]
            if others:
                raise SchemaError(f"'format' combined with {others[0]!r} is not supported", ptr)
            return seq(quote, body, quote)
        if "pattern" in s:
            if not isinstance(s["pattern"], str):
                raise SchemaError("'pattern' must be a string", ptr)
            if "minLength" in s or "maxLength" in s:
                raise SchemaError("'pattern' combined with 'minLength'/'maxLength' is not supported", ptr)
            return seq(quote, pattern_expr(s["pattern"], self.json, ptr), quote)
        return seq(quote, rep(self.json.char, lo, hi), quote)

    # ----------------------------------------------------------------- arrays

    def array(self, s: Mapping[str, Any], ptr: str, depth: int) -> Expr:
        lo = sm.count(s, "minItems", ptr, 0)
        hi = sm.count(s, "maxItems", ptr, None)
        if hi is not None and lo > hi:
            raise SchemaError(f"minItems {lo} is greater than maxItems {hi}", ptr)
        items = s.get("items", None)
        prefix_key = "prefixItems" if "prefixItems" in s else None
        rest_key = "items"
        if isinstance(items, list):  # draft 4-2019 tuple form
            if prefix_key:
                raise SchemaError("'items' must be a schema when 'prefixItems' is present", ptr)
            prefix_key, rest_key = "items", "additionalItems"
        elif "additionalItems" in s:
            raise SchemaError("'additionalItems' without a list-form 'items'", ptr)
        prefix = list(s[prefix_key]) if prefix_key else []
        if prefix_key and not isinstance(s[prefix_key], list):
            raise SchemaError(f"{prefix_key!r} must be a list of schemas", ptr)
        rest_schema = s.get(rest_key, None if prefix else True)
        rest: Expr | None = None
        if rest_schema is not None and rest_schema is not False:
            rest = self.named("item", self.schema(rest_schema, f"{ptr}/{rest_key}", depth + 1),
                              f"{ptr}/{rest_key}")
        if hi is not None:
            prefix = prefix[:hi]
        elems: list[Expr | None] = []
        for i, p in enumerate(prefix):
            eptr = f"{ptr}/{prefix_key}/{i}"
            elems.append(None if p is False else self.named("item", self.schema(p, eptr, depth + 1), eptr))
        # A prefix item with schema false ends the array before it.
        if None in elems:
            elems = elems[:elems.index(None)]
        n = len(elems)
        if lo > n and rest is None:
            raise SchemaError(f"minItems {lo} cannot be met: at most {n} items are allowed", ptr)
        ws, comma = self.json.ws, seq(Lit(","), self.json.ws)
        # Content after k prefix items have been written (k >= 1), built from the end.
        tail: Expr = EMPTY
        if rest is not None and (hi is None or hi > n):
            more_lo = max(0, lo - n)
            more_hi = None if hi is None else hi - n
            if n == 0:
                body = seq(rest, rep(seq(comma, rest), max(0, more_lo - 1),
                                     None if more_hi is None else more_hi - 1))
                return self._brackets(body, more_lo == 0)
            tail = rep(seq(comma, rest), more_lo, more_hi)
        for k in range(n - 1, 0, -1):
            step = seq(comma, elems[k], tail)
            tail = step if k < lo else opt(step)
        if n == 0:
            return seq(Lit("["), ws, Lit("]"))
        return self._brackets(seq(elems[0], tail), lo == 0)

    def _brackets(self, content: Expr, may_be_empty: bool) -> Expr:
        ws = self.json.ws
        full = seq(Lit("["), ws, content, ws, Lit("]"))
        if may_be_empty:
            return alt(seq(Lit("["), ws, Lit("]")), full)
        return full

    # ---------------------------------------------------------------- objects

    def object(self, s: Mapping[str, Any], ptr: str, depth: int) -> Expr:
        props = s.get("properties", {})
        if not isinstance(props, Mapping):
            raise SchemaError("'properties' must be an object", ptr)
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError("'required' must be a list of strings", ptr)
        if len(props) > MAX_PROPERTIES:
            raise SchemaError(f"more than {MAX_PROPERTIES} properties", ptr)
        extra_schema = s.get("additionalProperties", None)
        names = list(props)
        for r in required:
            if r not in props:
                if extra_schema is False:
                    raise SchemaError(f"required property {r!r} is forbidden by "
                                      "'additionalProperties': false", ptr)
                names.append(r)
        ws, comma = self.json.ws, seq(Lit(","), self.json.ws)
        members: list[tuple[Expr, bool]] = []
        for name in names:
            if name in props:
                pschema, pptr = props[name], f"{ptr}/properties/{sm.escape_pointer(name)}"
            else:
                pschema, pptr = (True if extra_schema is None else extra_schema), f"{ptr}/additionalProperties"
            if pschema is False:
                if name in required:
                    raise SchemaError(f"required property {name!r} has the schema false", pptr)
                continue
            key = Lit(json.dumps(name, ensure_ascii=False))
            value = self.named(name, self.schema(pschema, pptr, depth + 1), pptr)
            members.append((seq(key, ws, Lit(":"), ws, value), name in required))
        extra: Expr | None = None
        if extra_schema is not None and extra_schema is not False:
            value = self.schema(extra_schema, f"{ptr}/additionalProperties", depth + 1)
            key = self.json.string if not props and not required else self._other_key(names)
            extra = self.g.add("extra-member", seq(key, ws, Lit(":"), ws, value), f"{ptr}/additionalProperties")
        # after[i]: what may follow once something has been written and members[:i] are decided.
        after: Expr = rep(seq(comma, extra), 0, None) if extra is not None else EMPTY
        first: Expr | None = seq(extra, after) if extra is not None else None
        for member, req in reversed(members):
            step = seq(comma, member, after)
            new_first = seq(member, after)
            if not req and first is not None:
                new_first = alt(new_first, first)
            first = new_first
            after = step if req else seq(opt(seq(comma, member)), after)
            if len(members) > 4:
                after = self.g.add("obj-rest", after, ptr)
                first = self.g.add("obj-body", first, ptr)
        all_optional = not any(req for _, req in members)
        if first is None:
            return seq(Lit("{"), ws, Lit("}"))
        full = seq(Lit("{"), ws, first, ws, Lit("}"))
        return alt(seq(Lit("{"), ws, Lit("}")), full) if all_optional else full

    def _other_key(self, names: list[str]) -> Expr:
        """A quoted key spelled without escapes that is none of ``names``: one rule per
        node of the names' trie (built without recursion, names may be long)."""
        trie: dict = {}
        for n in names:
            node = trie
            for ch in n:
                node = node.setdefault(ch, {})
            node[""] = {}
        free = rep(self.json.chars(SAFE), 0, None)
        refs: dict[int, Ref] = {}
        nodes = [trie]
        for node in nodes:  # grows while iterating: a breadth-first walk
            refs[id(node)] = Ref(self.g.new_name("key"))
            nodes.extend(child for c, child in node.items() if c and SAFE.contains(ord(c)))
        for node in nodes:
            children = [c for c in node if c and SAFE.contains(ord(c))]
            options: list[Expr] = [] if "" in node else [EMPTY]
            options += [seq(Lit(c), refs[id(node[c])]) for c in children]
            other = _others(frozenset(children))
            if other.ranges:
                options.append(seq(other, free))
            self.g.define(refs[id(node)].name, alt(*options))
        return seq(Lit('"'), refs[id(trie)], Lit('"'))


@functools.lru_cache(maxsize=256)
def _others(used: frozenset[str]) -> CharSet:
    """Unescaped key characters other than ``used``."""
    return CharSet.of([(ord(c), ord(c)) for c in used]).complement().intersect(SAFE)


def _same_json(a: Any, b: Any) -> bool:
    return sm.json_type(a) == sm.json_type(b) and a == b or (
        isinstance(a, (int, float)) and isinstance(b, (int, float))
        and not isinstance(a, bool) and not isinstance(b, bool) and a == b)

