"""Schema helpers: keyword tables, ``$ref`` resolution, merging of ``allOf`` parts,
type inference, numeric bounds, and the ``oneOf`` disjointness check."""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from .gbnf import SchemaError

__all__ = [
    "ANNOTATIONS", "KNOWN", "TYPES", "EmptyIntersection", "resolve_ref", "merge_all_of",
    "merge_ref", "merge_siblings", "check_one_of_disjoint", "types_of", "json_type",
    "integer_bounds", "number_bounds", "count", "escape_pointer",
]

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

#: Keywords that do not constrain instances (or only widen them, like OpenAPI's
#: ``nullable``), so ignoring them keeps every generated instance valid.
ANNOTATIONS = frozenset({
    "title", "description", "$schema", "$id", "$comment", "examples", "example", "default",
    "deprecated", "readOnly", "writeOnly", "strict", "discriminator", "nullable",
    "contentEncoding", "contentMediaType", "$defs", "definitions",
})
_FAMILIES = {
    "object": ("properties", "required", "additionalProperties"),
    "array": ("items", "prefixItems", "additionalItems", "minItems", "maxItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "integer": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
}
KNOWN = ANNOTATIONS | {"type", "enum", "const", "$ref", "allOf", "anyOf", "oneOf"} | {
    k for ks in _FAMILIES.values() for k in ks}

_MIN_KEYS = ("minimum", "minLength", "minItems")
_MAX_KEYS = ("maximum", "maxLength", "maxItems")


class EmptyIntersection(SchemaError):
    """Merged parts leave no possible type."""


def escape_pointer(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def resolve_ref(ref: Any, root: Any, ptr: str) -> tuple[str, Any]:
    """(pointer, schema) for a local ``$ref``; remote and dangling ones are refused."""
    if not isinstance(ref, str):
        raise SchemaError("'$ref' must be a string", ptr)
    if not ref.startswith("#"):
        raise SchemaError(f"remote $ref {ref!r} is not supported (only '#/...' references "
                          "into the same schema)", ptr)
    frag = urllib.parse.unquote(ref[1:])
    if frag and not frag.startswith("/"):
        raise SchemaError(f"$ref {ref!r}: anchors are not supported, use a JSON pointer", ptr)
    node = root
    for raw in frag.split("/")[1:] if frag else []:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise SchemaError(f"$ref {ref!r} points to a missing definition", ptr)
    return frag, node


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def types_of(s: Mapping[str, Any], ptr: str) -> list[str]:
    """The types to generate: ``type`` as given, else those implied by the keywords."""
    t = s.get("type")
    if t is None:
        implied = [fam for fam, keys in _FAMILIES.items() if any(k in s for k in keys)]
        return implied or list(TYPES)
    names = [t] if isinstance(t, str) else t
    if not isinstance(names, list) or not names or not all(n in TYPES for n in names):
        raise SchemaError(f"'type' must be one of {', '.join(TYPES)} or a non-empty list of them", ptr)
    return list(dict.fromkeys(names))


def count(s: Mapping[str, Any], key: str, ptr: str, default: int | None) -> int | None:
    if key not in s:
        return default
    v = s[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
        raise SchemaError(f"{key!r} must be a non-negative integer", ptr)
    return int(v)


def integer_bounds(s: Mapping[str, Any], ptr: str) -> tuple[int | None, int | None]:
    """Inclusive integer bounds from minimum/maximum and their exclusive forms
    (number form, and draft 4's boolean form)."""
    def num(key: str) -> float | int | None:
        v = s.get(key)
        if v is None or (isinstance(v, bool) and key.startswith("exclusive")):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SchemaError(f"{key!r} must be a number", ptr)
        return v

    lo: int | None = None
    hi: int | None = None
    if (v := num("minimum")) is not None:
        lo = math.floor(v) + 1 if s.get("exclusiveMinimum") is True else math.ceil(v)
    if (v := num("exclusiveMinimum")) is not None:
        b = math.floor(v) + 1
        lo = b if lo is None else max(lo, b)
    if (v := num("maximum")) is not None:
        hi = math.ceil(v) - 1 if s.get("exclusiveMaximum") is True else math.floor(v)
    if (v := num("exclusiveMaximum")) is not None:
        b = math.ceil(v) - 1
        hi = b if hi is None else min(hi, b)
    return lo, hi


#: Bounds on ``number`` must be exactly representable as floats (validators compare floats).
MAX_EXACT_NUMBER = 2 ** 53


def number_bounds(s: Mapping[str, Any], ptr: str) -> tuple[tuple[Decimal, bool] | None,
                                                           tuple[Decimal, bool] | None]:
    """Inclusive decimal bounds for a ``number``, each (value, strict=False).

    Validators compare a parsed float with the bound, so a strict bound b becomes the
    inclusive bound nextafter(b): every decimal at or beyond it parses to a float
    strictly beyond b, and every decimal at or beyond an inclusive bound parses to a
    float at or beyond it (rounding is monotonic)."""
    lows: list[float] = []
    highs: list[float] = []
    for key, out, up in (("minimum", lows, True), ("exclusiveMinimum", lows, True),
                         ("maximum", highs, False), ("exclusiveMaximum", highs, False)):
        v = s.get(key)
        if v is None or isinstance(v, bool):
            continue
        if not isinstance(v, (int, float)):
            raise SchemaError(f"{key!r} must be a number", ptr)
        if abs(v) > MAX_EXACT_NUMBER:
            raise SchemaError(f"{key!r} on a 'number' beyond 2**53 is not supported", ptr)
        strict = key.startswith("exclusive") or s.get(
            "exclusiveMinimum" if up else "exclusiveMaximum") is True
        f = float(v)
        out.append(math.nextafter(f, math.inf if up else -math.inf) if strict else f)
    lo = (Decimal(max(lows)), False) if lows else None
    hi = (Decimal(min(highs)), False) if highs else None
    return lo, hi


# ------------------------------------------------------------------ merging

def _type_set(v: Any, ptr: str) -> set[str]:
    names = set([v] if isinstance(v, str) else v if isinstance(v, list) else [None])
    if not names <= set(TYPES):
        raise SchemaError("'type' must be a type name or a list of them", ptr)
    if "number" in names:
        names.add("integer")
    return names


def merge(a: Mapping[str, Any], b: Mapping[str, Any], ptr: str) -> dict[str, Any]:
    """Both schemas at once, as one schema (what ``allOf`` means), where that is simple."""
    check_shapes(a, ptr)
    check_shapes(b, ptr)
    out = dict(a)
    for k, v in b.items():
        if k in ANNOTATIONS:
            out.setdefault(k, v)
        elif k not in out or out[k] == v:
            out[k] = v
        elif k == "type":
            common = _type_set(out[k], ptr) & _type_set(v, ptr)
            if not common:
                raise EmptyIntersection("the combined 'type's leave no type", ptr)
            out[k] = [t for t in TYPES if t in common and not (t == "integer" and "number" in common)]
        elif k == "required":
            out[k] = list(dict.fromkeys(list(out[k]) + list(v)))
        elif k == "properties":
            props = dict(out[k])
            for name, sub in v.items():
                props[name] = sub if name not in props or props[name] == sub else {
                    "allOf": [props[name], sub]}
            out[k] = props
        elif k in _MIN_KEYS:
            out[k] = max(out[k], v)
        elif k in _MAX_KEYS:
            out[k] = min(out[k], v)
        elif k == "allOf":
            out[k] = list(out[k]) + list(v)
        else:
            raise SchemaError(f"keyword {k!r} appears in several combined schemas with different "
                              "values; this 'allOf' is not simple enough to support", ptr)
    return out


def _check_closed(parts: list[Mapping[str, Any]], merged: Mapping[str, Any], ptr: str) -> None:
    """A part with its own ``additionalProperties`` must not see properties of another part."""
    names = set(merged.get("properties", {})) | set(merged.get("required", []))
    for p in parts:
        if "additionalProperties" in p and p["additionalProperties"] is not True:
            own = set(p.get("properties", {}))
            if not names <= own:
                extra = sorted(names - own)[0]
                raise SchemaError(f"'allOf' part with 'additionalProperties' does not declare "
                                  f"property {extra!r} of another part; not supported", ptr)


def merge_all_of(s: Mapping[str, Any], root: Any, ptr: str) -> dict[str, Any]:
    parts_in = s["allOf"]
    if not isinstance(parts_in, list) or not parts_in:
        raise SchemaError("'allOf' must be a non-empty list of schemas", ptr)
    parts: list[Mapping[str, Any]] = [{k: v for k, v in s.items() if k != "allOf"}]
    for i, p in enumerate(parts_in):
        seen: set[str] = set()
        while isinstance(p, Mapping) and "$ref" in p:
            target_ptr, target = resolve_ref(p["$ref"], root, f"{ptr}/allOf/{i}")
            if target_ptr in seen:
                raise SchemaError("'allOf' over a $ref cycle is not supported", f"{ptr}/allOf/{i}")
            seen.add(target_ptr)
            if not isinstance(target, Mapping):
                p = target
                break
            p = merge({k: v for k, v in p.items() if k != "$ref"}, target, f"{ptr}/allOf/{i}")
        if p is True:
            continue
        if not isinstance(p, Mapping):
            raise SchemaError("an 'allOf' part that accepts nothing or is not a schema", f"{ptr}/allOf/{i}")
        parts.append(p)
    merged: dict[str, Any] = {}
    for p in parts:
        merged = merge(merged, p, ptr)
    _check_closed(parts, merged, ptr)
    return merged


def merge_ref(s: Mapping[str, Any], target: Any, ptr: str) -> dict[str, Any]:
    """A ``$ref`` with constraining siblings: both apply."""
    rest = {k: v for k, v in s.items() if k != "$ref"}
    if target is True:
        return dict(rest)
    if not isinstance(target, Mapping):
        raise SchemaError("'$ref' target accepts nothing or is not a schema", ptr)
    merged = merge(rest, target, ptr)
    _check_closed([rest, target], merged, ptr)
    return merged


def merge_siblings(rest: Mapping[str, Any], branch: Any, ptr: str) -> Any:
    """An ``anyOf``/``oneOf`` branch together with the constraints beside the keyword."""
    if not any(k not in ANNOTATIONS for k in rest):
        return branch
    if branch is True:
        return dict(rest)
    if branch is False:
        return False
    if not isinstance(branch, Mapping):
        raise SchemaError("an 'anyOf'/'oneOf' branch must be a schema", ptr)
    merged = merge(rest, branch, ptr)
    _check_closed([rest, branch], merged, ptr)
    return merged


# ------------------------------------------------------------- oneOf checks

_ALL_KINDS = frozenset({"object", "array", "string", "int", "frac", "boolean", "null"})


def _value_kinds(v: Any) -> set[str]:
    t = json_type(v)
    return {"int" if t == "integer" else "frac" if t == "number" else t}


def _kinds(s: Any, root: Any, seen: frozenset[str]) -> set[str]:
    """A superset of the kinds of value the schema accepts."""
    if s is True or not isinstance(s, Mapping):
        return set(_ALL_KINDS) if s is not False else set()
    k = set(_ALL_KINDS)
    if "type" in s:
        ts = [s["type"]] if isinstance(s["type"], str) else list(s["type"])
        allowed: set[str] = set()
        for t in ts:
            allowed |= {"int", "frac"} if t == "number" else {"int"} if t == "integer" else {t}
        k &= allowed
    if "const" in s:
        k &= _value_kinds(s["const"])
    if isinstance(s.get("enum"), list):
        k &= set().union(*(_value_kinds(v) for v in s["enum"]))
    if isinstance(s.get("$ref"), str) and s["$ref"].startswith("#") and s["$ref"] not in seen:
        try:
            _, target = resolve_ref(s["$ref"], root, "")
            k &= _kinds(target, root, seen | {s["$ref"]})
        except SchemaError:
            pass
    for key in ("anyOf", "oneOf"):
        if isinstance(s.get(key), list):
            k &= set().union(*(_kinds(b, root, seen) for b in s[key]))
    if isinstance(s.get("allOf"), list):
        for b in s["allOf"]:
            k &= _kinds(b, root, seen)
    return k


def _deref(s: Any, root: Any) -> Any:
    for _ in range(32):
        if isinstance(s, Mapping) and isinstance(s.get("$ref"), str):
            try:
                s = resolve_ref(s["$ref"], root, "")[1]
            except SchemaError:
                return s
        else:
            break
    return s


def _tag_values(s: Any, root: Any, name: str) -> set[str] | None:
    s = _deref(s, root)
    if not isinstance(s, Mapping) or name not in s.get("required", []):
        return None
    p = _deref(s.get("properties", {}).get(name), root)
    if not isinstance(p, Mapping):
        return None
    if "const" in p:
        return {json.dumps(p["const"], sort_keys=True)}
    if isinstance(p.get("enum"), list):
        return {json.dumps(v, sort_keys=True) for v in p["enum"]}
    return None


def _distinguished(a: Any, b: Any, root: Any) -> bool:
    da, db = _deref(a, root), _deref(b, root)
    if not (isinstance(da, Mapping) and isinstance(db, Mapping)):
        return False
    for name in da.get("properties", {}):
        ta, tb = _tag_values(da, root, name), _tag_values(db, root, name)
        if ta is not None and tb is not None and not ta & tb:
            return True
    return False


def check_one_of_disjoint(branches: list[Any], root: Any, ptr: str) -> None:
    """``oneOf`` rejects a value that matches two branches; accept only branches that
    cannot overlap (different types, or a required tag property with different values)."""
    kinds = [_kinds(b, root, frozenset()) for b in branches]
    for i in range(len(branches)):
        for j in range(i + 1, len(branches)):
            if kinds[i] & kinds[j] and not (
                    kinds[i] | kinds[j] <= {"object"} and _distinguished(branches[i], branches[j], root)):
                raise SchemaError(f"'oneOf' branches {i} and {j} may match the same value, which "
                                  "'oneOf' forbids; use 'anyOf', or make the branches distinct "
                                  "(different types, or a required property with different "
                                  "'const' values)", ptr)


_SCHEMA = "a schema (object or boolean)"
_SHAPES: dict[str, tuple[tuple[type, ...], str]] = {
    "properties": ((Mapping,), "an object of schemas"),
    "$defs": ((Mapping,), "an object of schemas"),
    "definitions": ((Mapping,), "an object of schemas"),
    "required": ((list,), "a list of strings"),
    "additionalProperties": ((bool, Mapping), _SCHEMA),
    "additionalItems": ((bool, Mapping), _SCHEMA),
    "items": ((bool, Mapping, list), "a schema or a list of schemas"),
    "prefixItems": ((list,), "a list of schemas"),
    "enum": ((list,), "a list"),
    "anyOf": ((list,), "a non-empty list of schemas"),
    "oneOf": ((list,), "a non-empty list of schemas"),
    "allOf": ((list,), "a non-empty list of schemas"),
    "$ref": ((str,), "a string"),
    "pattern": ((str,), "a string"),
    "format": ((str,), "a string"),
    "type": ((str, list), "a type name or a list of them"),
}


def check_shapes(s: Mapping[str, Any], ptr: str) -> None:
    """Refuse keyword values of the wrong JSON type before anything reads them."""
    for key, (kinds, what) in _SHAPES.items():
        if key not in s:
            continue
        v = s[key]
        if not isinstance(v, kinds) or (key in ("anyOf", "oneOf", "allOf") and not v):
            raise SchemaError(f"{key!r} must be {what}", ptr)
        if key in ("properties", "$defs", "definitions") and not all(
                isinstance(x, (bool, Mapping)) for x in v.values()):
            raise SchemaError(f"{key!r} must be {what}", ptr)
        if key == "required" and not all(isinstance(x, str) for x in v):
            raise SchemaError(f"{key!r} must be {what}", ptr)
        if key in ("prefixItems", "anyOf", "oneOf", "allOf") or (key == "items" and isinstance(v, list)):
            if not all(isinstance(x, (bool, Mapping)) for x in v):
                raise SchemaError(f"{key!r} must be {what}", ptr)
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        v = s.get(key)
        if v is not None and not isinstance(v, (int, float)) or (
                isinstance(v, bool) and not key.startswith("exclusive")):
            raise SchemaError(f"{key!r} must be a number", ptr)
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        count(s, key, ptr, None)
