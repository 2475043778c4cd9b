"""Structured output for the server: ``response_format``, ``grammar`` and ``json_schema``.

A request body constrains its generation in at most one of these ways:

- ``"response_format": {"type": "text"}`` — no constraint (the default);
- ``{"type": "json_object"}`` — any JSON object;
- ``{"type": "json_object", "schema": {...}}`` — JSON valid under the schema
  (the form of llama.cpp's server and of several client libraries);
- ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
  "strict": ...}}`` — OpenAI's structured outputs (what ``openai``'s
  ``.parse(response_format=Model)`` sends); ``{"type": "json_schema",
  "schema": {...}}`` is llama.cpp's shorter spelling;
- ``"json_schema": {...}`` at the top level — llama.cpp's field;
- ``"grammar": "<GBNF>"`` at the top level — a grammar whose start rule is ``root``.

The constraint is always enforced, ``strict`` or not. Whatever the request
sends is turned into GBNF and parsed by llama.cpp's own grammar parser before
generation starts, so a schema keyword the converter does not support, a
malformed field or a GBNF syntax error is a 400 naming the field, never an
unconstrained answer. Conversions and parses are cached by their text, so a
client repeating one schema pays for it once.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Mapping, Protocol, TypeVar

from mullama.grammar import JSON_OBJECT_SCHEMA
from mullama.params import schema_grammar
from mullama.server.errors import ApiError

__all__ = ["Constraint", "GrammarCache", "parse_constraint", "request_grammar", "ANY_OBJECT_SCHEMA"]

# what "json_object" without a schema means: any JSON object, as OpenAI's JSON mode
ANY_OBJECT_SCHEMA: Mapping[str, Any] = JSON_OBJECT_SCHEMA
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
FORMAT_TYPES = ("text", "json_object", "json_schema")
CACHE_SIZE = 32  # as many parsed grammars as a Model keeps

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class _Compiler(Protocol):
    """The part of :class:`mullama.Model` this module needs."""

    def compile_grammar(self, gbnf: str) -> Any: ...


@dataclass(frozen=True)
class Constraint:
    """What a request asked for: ``schema`` (JSON Schema) or ``gbnf`` (grammar text), and
    ``field``, the request field it came from (named in error messages)."""

    field: str
    schema: Mapping[str, Any] | bool | None = None
    gbnf: str | None = None


class _Lru(Generic[_K, _V]):
    """A small thread-safe least-recently-used map."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[_K, _V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: _K) -> _V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: _K, value: _V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class _Outcome:
    """A cached result: the GBNF (or compiled grammar), or the message of the error it gave."""

    value: Any = None
    error: str | None = None


class GrammarCache:
    """Schema-to-GBNF conversions and grammar parses, each done once per distinct text.

    Failures are cached too, so a client repeating a bad request is answered
    without converting or parsing again. ``hits`` and ``misses`` count lookups
    of both kinds.
    """

    def __init__(self, capacity: int = CACHE_SIZE,
                 converter: Callable[[Mapping[str, Any] | bool], str] = schema_grammar) -> None:
        self._schemas: _Lru[str, _Outcome] = _Lru(capacity)
        self._grammars: _Lru[str, _Outcome] = _Lru(capacity)
        self._convert = converter
        self.hits = 0
        self.misses = 0

    def _lookup(self, lru: _Lru[str, _Outcome], key: str, make: Callable[[], Any]) -> _Outcome:
        found = lru.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        try:
            outcome = _Outcome(value=make())
        except RecursionError:
            outcome = _Outcome(error="it is nested too deeply")
        except (ValueError, TypeError, KeyError) as exc:
            message = str(exc) or type(exc).__name__
            outcome = _Outcome(error=message.removeprefix("invalid grammar: "))
        lru.put(key, outcome)
        return outcome

    def schema_to_gbnf(self, schema: Mapping[str, Any] | bool) -> _Outcome:
        """The GBNF of a JSON Schema, or the converter's error message."""
        try:
            # key order kept: the properties of an object come out in it
            key = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return _Outcome(error="it is not plain JSON")
        return self._lookup(self._schemas, key, lambda: self._convert(schema))

    def compile(self, model: _Compiler, gbnf: str) -> _Outcome:
        """``model.compile_grammar(gbnf)``, or llama.cpp's parser message."""
        return self._lookup(self._grammars, gbnf, lambda: model.compile_grammar(gbnf))

    def gbnf_for(self, model: _Compiler, constraint: Constraint) -> str:
        """The checked GBNF of a constraint, or the 400 :class:`ApiError` naming what was wrong."""
        param = constraint.field.split(".", 1)[0]
        if constraint.gbnf is not None:
            gbnf = constraint.gbnf
        else:
            assert constraint.schema is not None
            converted = self.schema_to_gbnf(constraint.schema)
            if converted.error is not None:
                raise ApiError(400, f"'{constraint.field}' cannot be used: {converted.error}", param=param,
                               code="unsupported_schema")
            gbnf = converted.value
        compiled = self.compile(model, gbnf)
        if compiled.error is not None:
            if constraint.gbnf is not None:
                raise ApiError(400, f"'{constraint.field}' is not a valid GBNF grammar: {compiled.error}",
                               param=param, code="invalid_grammar")
            raise ApiError(400, f"'{constraint.field}' gave a grammar llama.cpp rejects: {compiled.error}",
                           param=param, code="unsupported_schema")
        return gbnf


def _schema_value(value: Any, where: str) -> Mapping[str, Any] | bool:
    if isinstance(value, bool) or isinstance(value, dict):
        return value
    raise ApiError(400, f"'{where}' must be a JSON Schema (an object), got {type(value).__name__}",
                   param=where.split(".", 1)[0])


def _only_keys(value: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    extra = sorted(k for k in value if k not in allowed)
    if extra:
        raise ApiError(400, f"'{where}' has unknown field '{extra[0]}' (known: {', '.join(allowed)})",
                       param=where.split(".", 1)[0])


def _openai_json_schema(value: Any) -> Mapping[str, Any] | bool:
    """The schema inside OpenAI's ``response_format.json_schema`` object, checked."""
    where = "response_format.json_schema"
    if not isinstance(value, dict):
        raise ApiError(400, f"'{where}' must be an object with 'name' and 'schema'", param="response_format")
    _only_keys(value, ("name", "description", "schema", "strict"), where)
    name = value.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ApiError(400, f"'{where}.name' is required: 1 to 64 letters, digits, '_' or '-'",
                       param="response_format")
    if value.get("description") is not None and not isinstance(value["description"], str):
        raise ApiError(400, f"'{where}.description' must be a string", param="response_format")
    if value.get("strict") is not None and not isinstance(value["strict"], bool):
        raise ApiError(400, f"'{where}.strict' must be true or false", param="response_format")
    if value.get("schema") is None:
        raise ApiError(400, f"'{where}.schema' is required", param="response_format")
    return _schema_value(value["schema"], f"{where}.schema")


def _response_format(value: Any) -> Constraint | None:
    if not isinstance(value, dict):
        raise ApiError(400, "'response_format' must be an object such as {\"type\": \"json_object\"}",
                       param="response_format")
    kind = value.get("type")
    if kind not in FORMAT_TYPES:
        raise ApiError(400, f"'response_format.type' must be one of {', '.join(FORMAT_TYPES)}, got {kind!r}",
                       param="response_format")
    if kind == "text":
        _only_keys(value, ("type",), "response_format")
        return None
    if kind == "json_object":
        _only_keys(value, ("type", "schema"), "response_format")
        if value.get("schema") is None:
            return Constraint("response_format", schema=ANY_OBJECT_SCHEMA)
        return Constraint("response_format.schema",
                          schema=_schema_value(value["schema"], "response_format.schema"))
    _only_keys(value, ("type", "json_schema", "schema"), "response_format")
    if value.get("json_schema") is not None and value.get("schema") is not None:
        raise ApiError(400, "'response_format' has both 'json_schema' and 'schema'; send one",
                       param="response_format")
    if value.get("schema") is not None:
        return Constraint("response_format.schema", schema=_schema_value(value["schema"], "response_format.schema"))
    return Constraint("response_format.json_schema.schema", schema=_openai_json_schema(value.get("json_schema")))


def parse_constraint(body: Mapping[str, Any]) -> Constraint | None:
    """The constraint a request body asks for (None: free text), or a 400 :class:`ApiError`.

    Reads ``response_format``, ``grammar`` and ``json_schema``; ``null`` (and
    an empty ``grammar``, llama.cpp's "none") count as absent. Two constraints
    in one request are refused rather than guessed between.
    """
    found: list[Constraint] = []
    if body.get("response_format") is not None:
        rf = _response_format(body["response_format"])
        if rf is not None:
            found.append(rf)
    grammar = body.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str):
            raise ApiError(400, f"'grammar' must be a string of GBNF, got {type(grammar).__name__}",
                           param="grammar")
        if grammar:
            found.append(Constraint("grammar", gbnf=grammar))
    if body.get("json_schema") is not None:
        found.append(Constraint("json_schema", schema=_schema_value(body["json_schema"], "json_schema")))
    if len(found) > 1:
        names = [c.field.split(".", 1)[0] for c in found]
        raise ApiError(400, f"'{names[0]}' and '{names[1]}' cannot be combined: send one constraint",
                       param=names[1])
    return found[0] if found else None


def request_grammar(body: Mapping[str, Any], model: _Compiler, cache: GrammarCache) -> str | None:
    """The checked GBNF a request body asks for (None: free text), or a 400 :class:`ApiError`."""
    constraint = parse_constraint(body)
    return None if constraint is None else cache.gbnf_for(model, constraint)
