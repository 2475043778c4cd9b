"""JSON Schema -> GBNF: conversion errors, acceptance through llama.cpp's own grammar,
and a few real constrained generations."""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mullama
from mullama.grammar import JSON_OBJECT_SCHEMA, SchemaError, json_schema_to_gbnf

# ----------------------------------------------------------------------------- helpers

FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


def validate(schema: Any, value: Any) -> None:
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator, format_checker=FORMAT_CHECKER)


def is_valid(schema: Any, value: Any) -> bool:
    try:
        validate(schema, value)
    except jsonschema.ValidationError:
        return False
    return True


@pytest.fixture(scope="module")
def accepts(model):
    """accepts(schema, text): whether the schema's grammar takes the whole text."""
    cache: dict[str, Any] = {}

    def check(schema: Any, text: str) -> bool:
        gbnf = json_schema_to_gbnf(schema)
        g = cache.get(gbnf)
        if g is None:
            g = cache[gbnf] = model.compile_grammar(gbnf)
        return g.accepts(model.tokenize(text, add_special=False))

    return check


def compact(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------- conversion errors

ERRORS = [
    (5, "must be an object or a boolean"),
    ("{}", "must be an object or a boolean"),
    ({"type": "object", "properties": {"age": {"type": "integer", "multipleOf": 2}}},
     "'multipleOf' (at /properties/age)"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties' (at the schema root)"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "object", "minProperties": 1}, "'minProperties'"),
    ({"type": "array", "contains": {"type": "string"}}, "'contains'"),
    ({"not": {"type": "string"}}, "'not'"),
    ({"if": {}, "then": {}}, "'if'"),
    ({"type": "strin"}, "'type' must be one of"),
    ({"$ref": "#/$defs/missing"}, "points to a missing definition"),
    ({"$ref": "https://example.com/schema.json"}, "remote $ref"),
    ({"$ref": "other.json#/a"}, "remote $ref"),
    ({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
        "next": {"$ref": "#/$defs/node"}}, "required": ["next"]}}},
     "exclude everything) (at /$defs/node)"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
     "cannot produce any finite"),
    ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}, "$ref": "#/$defs/a"},
     "left-recursive"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems 3 is greater than maxItems 2"),
    ({"type": "string", "minLength": 5, "maxLength": 4}, "minLength 5 is greater than maxLength 4"),
    ({"enum": []}, "'enum' is empty"),
    ({"type": "integer", "enum": ["a"]}, "no 'enum'/'const' value has an allowed 'type'"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "leave no value"),
    ({"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 5}, "leave no value"),
    ({"type": "number", "minimum": 2.5, "maximum": 2}, "the number bounds leave no value"),
    ({"type": "number", "exclusiveMinimum": 2, "exclusiveMaximum": 2}, "the number bounds leave no value"),
    ({"type": "number", "maximum": 1e300}, "beyond 2**53"),
    ({"type": "string", "format": "email"}, "unsupported format 'email'"),
    ({"type": "string", "format": "date", "maxLength": 3}, "'format' combined with 'maxLength'"),
    ({"type": "string", "pattern": "a", "maxLength": 3}, "'pattern' combined with"),
    ({"type": "string", "pattern": "(?=a)b"}, "lookaround"),
    ({"type": "string", "pattern": "(?<!a)b"}, "lookaround"),
    ({"type": "string", "pattern": r"(a)\1"}, "backreference"),
    ({"type": "string", "pattern": r"\bword"}, "word boundary"),
    ({"type": "string", "pattern": r"\p{L}"}, "Unicode property"),
    ({"type": "string", "pattern": "a^b"}, "'^' anchor"),
    ({"type": "string", "pattern": "a$b"}, "'$' anchor before the end"),
    ({"type": "string", "pattern": "(a$)"}, "'$' anchor inside a group"),
    ({"type": "string", "pattern": "a**"}, "quantifier after a quantifier"),
    ({"type": "string", "pattern": "a{3,2}"}, "maximum below minimum"),
    ({"type": "string", "pattern": "*a"}, "nothing to repeat"),
    ({"type": "string", "pattern": "(a"}, "missing ')'"),
    ({"type": "string", "pattern": "[a"}, "unterminated character class"),
    ({"type": "string", "pattern": "^(a*)*$"}, "can match the empty string"),
    ({"type": "string", "pattern": "(?i)a"}, "group flags"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"],
      "additionalProperties": False}, "required property 'b' is forbidden"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "schema false"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "'oneOf' branches 0 and 1"),
    ({"anyOf": [{"type": "integer"}], "oneOf": [{"type": "integer"}]}, "'anyOf' and 'oneOf' in the same"),
    ({"oneOf": [{"type": "object", "properties": {"a": {}}}, {"type": "object"}]}, "'oneOf' branches"),
    ({"allOf": [{"type": "string", "pattern": "a"}, {"pattern": "b"}]}, "'pattern' appears in several"),
    ({"allOf": [{"type": "object", "properties": {"a": {}}, "additionalProperties": False},
                {"properties": {"b": {}}}]}, "does not declare property 'b'"),
    ({"type": "array", "prefixItems": [{}], "maxItems": 1, "minItems": 2}, "minItems 2 is greater"),
    ({"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, "minItems 2 cannot be met"),
    ({"type": "string", "minLength": -1}, "'minLength' must be a non-negative integer"),
    ({"enum": [float("nan")]}, "not valid JSON data"),
    ({"type": "object", "properties": {"a": {"type": {"x"}}}}, "not valid JSON data"),
    ({"type": "string", "maxLength": 10 ** 7}, "repetition count above"),
    ({"type": "string", "pattern": "(" * 500 + "a" + ")" * 500}, "groups nested deeper than 32"),
]


@pytest.mark.parametrize(("schema", "message"), ERRORS, ids=lambda v: str(v)[:40] if isinstance(v, str) else None)
def test_conversion_errors_name_the_problem(schema: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        json_schema_to_gbnf(schema)
    assert isinstance(info.value, SchemaError)
    assert message in str(info.value), str(info.value)


def test_oversized_schema_is_refused() -> None:
    schema = {"type": "object", "description": "x" * (1 << 20)}
    with pytest.raises(SchemaError, match=r"over the limit of 262144 bytes"):
        json_schema_to_gbnf(schema)


def test_shared_subschemas_are_measured_as_text() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(60):  # each level holds the one below twice: 2**60 copies as JSON text
        schema = {"type": "object", "properties": {"a": schema, "b": schema}}
    with pytest.raises(SchemaError, match="over the limit of 262144 bytes"):
        json_schema_to_gbnf(schema)


def test_nested_containers_grow_linearly(model) -> None:
    def nested(depth: int) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "integer"}
        for i in range(depth):
            s = ({"type": "object", "properties": {"a": s, "b": {"type": "string"}}, "required": ["a"]}
                 if i % 2 else {"type": "array", "items": s, "maxItems": 3})
        return s

    g20, g40 = json_schema_to_gbnf(nested(20)), json_schema_to_gbnf(nested(40))
    assert len(g40) < 2.5 * len(g20)
    value: Any = 1
    for i in range(40):
        value = {"a": value} if i % 2 else [value]
    assert model.compile_grammar(g40).accepts(model.tokenize(json.dumps(value), add_special=False))


def test_branch_copies_are_capped() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(30):  # each anyOf branch carries a copy of the sibling 'properties'
        schema = {"type": "object", "properties": {"x": schema}, "anyOf": [{"required": ["x"]}, {}, {}]}
    with pytest.raises(SchemaError, match="expands to more than"):
        json_schema_to_gbnf(schema)


def test_deep_nesting_is_refused() -> None:
    schema: dict[str, Any] = {"type": "array"}
    for _ in range(200):
        schema = {"type": "array", "items": schema}
    with pytest.raises(SchemaError, match="nests deeper than"):
        json_schema_to_gbnf(schema)


def test_grammar_size_cap() -> None:
    props = {f"p{i}": {"type": "string", "minLength": 300, "maxLength": 390} for i in range(600)}
    with pytest.raises(SchemaError, match="too large"):
        json_schema_to_gbnf({"type": "object", "properties": props})


def test_annotations_are_ignored_and_output_is_stable() -> None:
    plain = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    noted = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:x", "title": "T",
             "description": "d", "$comment": "c", "examples": [{"a": "x"}], "default": {"a": "y"},
             "deprecated": False, "readOnly": False, "writeOnly": False, "strict": True,
             "type": "object",
             "properties": {"a": {"type": "string", "title": "A", "description": "the a"}},
             "required": ["a"]}
    assert json_schema_to_gbnf(noted) == json_schema_to_gbnf(plain)
    text = json_schema_to_gbnf(plain)
    assert text.startswith("root ::= ")
    assert re.fullmatch(r"(?:[a-zA-Z0-9-]+ ::= [^\n]+\n)+", text)


def test_properties_keep_declaration_order() -> None:
    text = json_schema_to_gbnf({"type": "object", "properties": {"zeta": {}, "alpha": {}},
                                "required": ["alpha", "zeta"]})
    assert text.index('\\"zeta\\"') < text.index('\\"alpha\\"')


def test_many_optional_properties_stay_linear() -> None:
    small = json_schema_to_gbnf({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(10)}})
    large = json_schema_to_gbnf({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(100)}})
    assert len(large) < 15 * len(small)


def test_params_convert_at_construction() -> None:
    p = mullama.SamplerParams(json_schema={"type": "boolean"})
    assert p.grammar_text is not None and "root ::=" in p.grammar_text
    with pytest.raises(ValueError, match="'propertyNames'"):
        mullama.SamplerParams(json_schema={"type": "object", "propertyNames": {"maxLength": 3}})


# ------------------------------------------------------------ acceptance by llama.cpp

DATE_SCHEMA = {"type": "string", "format": "date"}
TREE = {
    "$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["value"]}},
    "$ref": "#/$defs/node",
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": ["string", "null"]},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "role"],
}

# (family, schema, texts that validate and are produced, texts that must be rejected)
CASES: list[tuple[str, Any, list[str], list[str]]] = [
    ("type-string", {"type": "string"}, ['""', '"hi"', '"tab\\there"', '"q\\"uote"', '"\\u00e9t\\u00e9"',
                                          '"é ✓ 😀"', '"\\/"'],
     ["hi", "'hi'", '"a\nb"', '"bad \\x escape"', '"\\ud83d"', "1"]),
    ("type-integer", {"type": "integer"}, ["0", "-7", "1234567890123456"], ["01", "-0", "1.5", "1e3", '"1"', "+1"]),
    ("type-number", {"type": "number"}, ["0", "-0.5", "3.25", "1e10", "2.5E-3", "-0"],
     ["01", ".5", "1.", "1e", "NaN", "Infinity", "1e999"]),
    ("type-boolean-null", {"type": ["boolean", "null"]}, ["true", "false", "null"], ["True", "0", '"true"']),
    ("any-value", True, ['{"a":[1,{"b":null}]}', "[]", '"x"', "1.5"], ["{", "nul", "[1,]"]),
    ("json-object", JSON_OBJECT_SCHEMA, ["{}", '{"a":1,"b":[true]}', '{"k": {"n": null}}'],
     ["[]", '"x"', '{"a"}', '{"a":1,}']),
    ("object-required-optional", PERSON,
     ['{"name":"Ann","role":"admin"}', '{"name":"Ann","age":30,"email":null,"role":"user"}',
      '{"name":"Bo","email":"b@x.io","role":"user"}'],
     ['{"role":"admin"}', '{"name":"Ann"}', '{"name":"","role":"user"}', '{"name":"Ann","role":"root"}',
      '{"name":"Ann","role":"user","extra":1}', '{"name":"Ann","age":131,"role":"user"}']),
    ("additional-false", {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
     ["{}", '{"a":1}'], ['{"b":1}', '{"a":1,"b":2}']),
    ("additional-schema", {"type": "object", "properties": {"a": {"type": "integer"}},
                           "additionalProperties": {"type": "string"}},
     ['{"a":1,"b":"x"}', '{"ab":"x","c":"y"}', '{"":"e"}', "{}"],
     ['{"a":"x"}', '{"b":1}', '{"a":1,"a":"x"}']),
    ("additional-long-names", {"type": "object", "properties": {"k" * 1200: {"type": "null"}, "kx": {"type": "string"}},
                               "additionalProperties": {"type": "boolean"}},
     ['{"' + "k" * 1200 + '":null}', '{"' + "k" * 1199 + '":true}', '{"k":false}', '{"kxy":true}'],
     ['{"' + "k" * 1200 + '":true}', '{"kx":true,"kx":true}', '{"kx":1}']),
    ("required-undeclared", {"type": "object", "required": ["id"]}, ['{"id":[1]}'], ["{}"]),
    ("array-items-min-max", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
     ["[1]", "[1,2,3]", "[ 1, 2 ]"], ["[]", "[1,2,3,4]", '["a"]']),
    ("array-prefix-items", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                            "items": {"type": "boolean"}, "minItems": 1},
     ['["a"]', '["a",1]', '["a",1,true,false]'], ["[]", "[1]", '["a",1,2]', '["a","b"]']),
    ("array-prefix-closed", {"type": "array", "prefixItems": [{"const": 1}], "items": False},
     ["[]", "[1]"], ["[1,1]", "[2]"]),
    ("enum-const", {"enum": ["red", 1, None, {"k": [True]}]}, ['"red"', "1", "null", '{"k":[true]}'],
     ['"blue"', "2", '"1"']),
    ("const", {"const": "fixed"}, ['"fixed"'], ['"other"']),
    ("anyOf-nullable", {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "null"}]},
     ['"ab"', "null"], ['"abc"', "1"]),
    ("oneOf-tagged", {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}}, "required": ["kind"]},
        {"type": "object", "properties": {"kind": {"const": "b"}, "y": {"type": "string"}}, "required": ["kind"]}]},
     ['{"kind":"a","x":1}', '{"kind":"b","y":"s"}'], ['{"kind":"a","y":"s"}', '{"kind":"c"}']),
    ("allOf-simple", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                                {"properties": {"b": {"type": "string"}}}]},
     ['{"a":1}', '{"a":1,"b":"x"}'], ['{"b":"x"}']),
    ("ref-tree", TREE, ['{"value":1}', '{"value":1,"children":[{"value":2,"children":[{"value":3}]}]}'],
     ['{"children":[]}', '{"value":1,"children":[{"children":[]}]}']),
    ("ref-with-siblings", {"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s", "maxLength": 2},
     ['"ab"'], ['"abc"']),
    ("string-length", {"type": "string", "minLength": 2, "maxLength": 3},
     ['"ab"', '"abc"', '"\\n\\t"', '"😀😀"'], ['"a"', '"abcd"', '"\\ud83d\\ude00"']),
    ("string-long-length", {"type": "string", "minLength": 450, "maxLength": 1001},
     ['"' + "a" * 450 + '"', '"' + "ab" * 500 + 'c"', '"' + "é" * 800 + '"'],
     ['"' + "a" * 449 + '"', '"' + "a" * 1002 + '"']),
    ("pattern-anchored", {"type": "string", "pattern": r"^[A-Z]{2}-\d{3,4}$"},
     ['"AB-123"', '"ZZ-0000"'], ['"ab-123"', '"AB-12"', '"AB-12345"', '"xAB-123"']),
    ("pattern-unanchored", {"type": "string", "pattern": "ab+c"}, ['"abc"', '"xxabbbcyy"'], ['"ac"', '"abx"']),
    ("pattern-classes", {"type": "string", "pattern": r"^(?:\w+\s)?[^\s\d.]\S*\.?$"},
     ['"foo x"', '"a"', '"é."', '"x\\"."'], ['"1"', '"foo  x"', '" x"']),
    ("pattern-escapes", {"type": "string", "pattern": r'^a\.b\\c"d\/e\u00e9|^(?P<n>x|y){2}$'},
     ['"a.b\\\\c\\"d/eé"', '"xy"'], ['"a.b\\\\c\\"d/ee"', '"xyz"']),
    ("format-date", DATE_SCHEMA, ['"2024-02-29"', '"1999-12-31"', '"0001-01-01"'],
     ['"2023-02-29"', '"2024-04-31"', '"2024-13-01"', '"0000-01-01"', '"2024-1-01"']),
    ("format-time", {"type": "string", "format": "time"}, ['"23:59:59Z"', '"08:00:00.123+05:30"'],
     ['"24:00:00Z"', '"12:00:00"', '"12:60:00Z"']),
    ("format-date-time", {"type": "string", "format": "date-time"}, ['"2024-01-31T12:30:00Z"'],
     ['"2024-01-31 12:30:00Z"', '"2024-01-32T12:30:00Z"']),
    ("format-uuid", {"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'],
     ['"123e4567e89b12d3a456426614174000"', '"123e4567-e89b-12d3-a456-42661417400g"']),
    ("integer-range", {"type": "integer", "minimum": -15, "maximum": 1234},
     ["-15", "-9", "0", "7", "99", "1000", "1234"], ["-16", "1235", "2000", "-0"]),
    ("integer-exclusive", {"type": "integer", "exclusiveMinimum": 9, "exclusiveMaximum": 100.5},
     ["10", "100"], ["9", "101"]),
    ("number-range", {"type": "number", "minimum": -1.5, "exclusiveMaximum": 2.25},
     ["-1.5", "-1.25", "-1", "0", "0.001", "2", "2.2", "2.2499"], ["-1.51", "-2", "2.25", "2.250", "3", "1e0"]),
    ("number-exclusive-zero", {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
     ["0.5", "1", "1.0", "0.00001"], ["0", "0.0", "-0.5", "1.01", "-0"]),
    ("number-lower-only", {"type": "number", "minimum": 0}, ["0", "0.5", "123.25"], ["-0.5", "-1"]),
    ("integer-lower-only", {"type": "integer", "minimum": 18}, ["18", "99", "123456"], ["17", "5", "-20"]),
    ("integer-upper-only", {"type": "integer", "maximum": -3}, ["-3", "-100"], ["-2", "0", "5"]),
    ("whitespace-bounded", {"type": "array", "items": {"type": "integer"}},
     ["[1, 2]", "[\n  1,\n  2\n]", "[\t1]", "[\n" + " " * 20 + "1]"],
     ["[1,  2]", "[\n" + " " * 21 + "1]", "[\n\n1]", " [1]", "[1] "]),
]


@pytest.mark.parametrize(("family", "schema", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_grammar_accepts_valid_and_rejects_invalid(accepts, family: str, schema: Any,
                                                   good: list[str], bad: list[str]) -> None:
    for text in good:
        value = json.loads(text)
        assert is_valid(schema, value), f"test data: {text} should validate"
        if family == "format-time":
            datetime.time.fromisoformat(value.replace("Z", "+00:00"))
        if family == "format-date-time":
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        assert accepts(schema, text), f"{family}: grammar refused valid {text!r}"
    for text in bad:
        assert not accepts(schema, text), f"{family}: grammar accepted {text!r}"


# -------------------------------------------------- property-based: soundness and reach

ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": -50, "maximum": 5000},
        "label": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
        "ok": {"type": ["boolean", "null"]},
    },
    "required": ["id", "tags"],
}
ITEM_STRATEGY = st.fixed_dictionaries(
    {"id": st.integers(-50, 5000), "tags": st.lists(st.sampled_from(["x", "y", "z"]), max_size=3)},
    optional={"label": st.text(max_size=6).filter(lambda s: "\x00" not in s),
              "ok": st.one_of(st.booleans(), st.none())},
).map(lambda d: {k: d[k] for k in ITEM["properties"] if k in d})
# Near misses: values of roughly the right shape, many of them invalid.
NEAR_STRATEGY = st.fixed_dictionaries(
    {},
    optional={"id": st.integers(-100, 6000) | st.just("1"), "label": st.text(max_size=8),
              "tags": st.lists(st.sampled_from(["x", "y", "w"]), max_size=4), "ok": st.just(1) | st.none(),
              "zz": st.integers()},
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=ITEM_STRATEGY, indent=st.sampled_from([None, 2]))
def test_valid_instances_are_accepted(accepts, value: dict, indent: int | None) -> None:
    validate(ITEM, value)
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    assert accepts(ITEM, text)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=NEAR_STRATEGY)
def test_accepted_texts_always_validate(accepts, value: dict) -> None:
    text = compact(value)
    if accepts(ITEM, text):
        validate(ITEM, json.loads(text))
    else:
        ordered = list(value) == [k for k in ITEM["properties"] if k in value]
        assert not (ordered and is_valid(ITEM, value)), f"valid, ordered and refused: {text}"


# ---------------------------------------------------------------- real generations

def _generate(ctx, prompt: str, schema: Any, max_tokens: int) -> tuple[str, str | None]:
    params = mullama.SamplerParams(temperature=0.0, json_schema=schema)
    stream = ctx.generate_stream(prompt, max_tokens=max_tokens, params=params)
    text = "".join(stream)
    return text, stream.finish_reason


ORDER = {
    "type": "object",
    "properties": {
        "customer": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 30},
            "tier": {"enum": ["gold", "silver", "bronze"]}},
            "required": ["name", "tier"]},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
        "note": {"type": "string", "maxLength": 40},
    },
    "required": ["customer", "items"],
}


@pytest.mark.parametrize(("schema", "prompt"), [
    (ORDER, "Write a JSON order for Alice, a gold customer, buying apples and pears:\n"),
    ({"type": "object", "properties": {
        "code": {"type": "string", "pattern": r"^[A-Z]{3}-\d{2}$"},
        "day": {"type": "string", "format": "date"}},
      "required": ["code", "day"]}, "A ticket as JSON:\n"),
    ({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 12}, "minItems": 2, "maxItems": 4},
     "The months of summer as numbers, in JSON:\n"),
    (TREE, "A small tree of numbers in JSON:\n"),
], ids=["nested-enum-list-optional", "pattern-format", "bounded-integers", "recursive-tree"])
def test_generation_follows_schema(ctx, schema: Any, prompt: str) -> None:
    text, reason = _generate(ctx, prompt, schema, max_tokens=200)
    print(repr(text), reason)
    if reason == "length":  # a greedy loop inside an unbounded part: the grammar held so far
        pytest.fail(f"generation did not finish in 200 tokens: {text!r}")
    assert reason == "stop"
    validate(schema, json.loads(text))


# ------------------------------------------------------------ fuzz: errors, not crashes

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(-3, 3, allow_nan=False),
                     st.sampled_from(["", "a", "string", "object", "integer", "#", "#/$defs/a", "^a+$",
                                      "date", "(", "[^a]{2,3}"]))
_KEYWORDS = ["type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
             "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "minLength",
             "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
             "exclusiveMaximum", "title", "additionalItems"]
_SCHEMAS = st.recursive(
    st.one_of(st.booleans(), st.just({}), st.fixed_dictionaries({"type": st.sampled_from(
        ["string", "integer", "number", "boolean", "null", "object", "array"])})),
    lambda inner: st.dictionaries(
        st.sampled_from(_KEYWORDS),
        st.one_of(_SCALARS, inner, st.lists(st.one_of(inner, _SCALARS), max_size=3),
                  st.dictionaries(st.sampled_from(["a", "b", "x y"]), inner, max_size=3)),
        max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_SCHEMAS)
def test_any_schema_gives_a_parsable_grammar_or_a_schema_error(model, schema: Any) -> None:
    try:
        gbnf = json_schema_to_gbnf(schema)
    except SchemaError:
        return
    model.compile_grammar(gbnf)  # llama.cpp must parse everything the converter emits


# ------------------------------------------- fuzz: random sentences of the grammar validate

def _min_costs(g: Any) -> dict[str, int]:
    """Shortest derivation length of each rule (to end random sampling)."""
    from mullama.grammar.gbnf import Alt, CharSet, Lit, Ref, Rep, Seq

    inf = 10 ** 9
    costs = dict.fromkeys(g.rules, inf)

    def cost(e: Any) -> int:
        if isinstance(e, Lit):
            return len(e.text)
        if isinstance(e, CharSet):
            return 1
        if isinstance(e, Ref):
            return costs[e.name]
        if isinstance(e, Seq):
            return min(inf, sum(cost(i) for i in e.items))
        if isinstance(e, Alt):
            return min(cost(o) for o in e.options)
        assert isinstance(e, Rep)
        return min(inf, e.min * cost(e.item))

    changed = True
    while changed:
        changed = False
        for name, e in g.rules.items():
            c = cost(e)
            if c < costs[name]:
                costs[name], changed = c, True
    costs["__cost__"] = cost  # type: ignore[assignment]
    return costs


def sample_sentence(g: Any, rnd: Any) -> str:
    from mullama.grammar.gbnf import Alt, CharSet, Lit, Ref, Rep, Seq

    costs = _min_costs(g)
    cost = costs["__cost__"]
    out: list[str] = []

    def walk(e: Any, depth: int) -> None:
        short = depth > 12
        if isinstance(e, Lit):
            out.append(e.text)
        elif isinstance(e, CharSet):
            lo, hi = rnd.choice(e.ranges)
            out.append(chr(rnd.randint(lo, min(hi, lo + rnd.choice([3, 100, 5000])))))
        elif isinstance(e, Ref):
            walk(g.rules[e.name], depth + 1)
        elif isinstance(e, Seq):
            for i in e.items:
                walk(i, depth)
        elif isinstance(e, Alt):
            options = e.options
            if short:
                best = min(cost(o) for o in options)
                options = tuple(o for o in options if cost(o) == best)
            walk(rnd.choice(options), depth + 1)
        else:
            top = e.min if short else (e.max if e.max is not None and e.max - e.min <= 4 else e.min + 4)
            for _ in range(rnd.randint(e.min, top)):
                walk(e.item, depth + 1)

    walk(g.rules["root"], 0)
    return "".join(out)


_NAMES = st.sampled_from(["a", "b", "id", "x y", "é", 'q"', "a/b"])
_PATTERNS = st.sampled_from(["^a+$", "[^a]{2,3}", r"^\d{1,3}(\.\d+)?$", "x|^y$", r"^[\w.-]+@[a-z]+\.(com|org)$",
                             r"^\S\s\D\W$", "^(ab|cd)*e?$", "^.{0,3}$", "b"])
_LEAVES = st.one_of(
    st.sampled_from([{"type": t} for t in ("string", "integer", "number", "boolean", "null")]
                    + [{}, {"type": ["string", "null"]}, {"type": "object"}, {"type": "array"}]),
    st.builds(lambda v: {"enum": v}, st.lists(_SCALARS, min_size=1, max_size=4)),
    st.builds(lambda v: {"const": v}, _SCALARS),
    st.builds(lambda p: {"type": "string", "pattern": p}, _PATTERNS),
    st.builds(lambda f: {"type": "string", "format": f}, st.sampled_from(["date", "time", "date-time", "uuid"])),
    st.builds(lambda a, b: {"type": "string", "minLength": a, "maxLength": a + b},
              st.integers(0, 5), st.integers(0, 600)),
    st.builds(lambda a, b, ea, eb: {"type": "integer", ("exclusiveMinimum" if ea else "minimum"): a,
                                    ("exclusiveMaximum" if eb else "maximum"): a + b},
              st.integers(-10 ** 6, 10 ** 6), st.integers(0, 10 ** 7), st.booleans(), st.booleans()),
    st.builds(lambda a: {"type": "integer", "minimum": a}, st.integers(-10 ** 20, 10 ** 20)),
    st.builds(lambda a, b, ea, eb: {"type": "number", **({} if a is None else {("exclusiveMinimum" if ea else "minimum"): a}),
                                    **({} if b is None else {("exclusiveMaximum" if eb else "maximum"): b})},
              st.none() | st.floats(-1e6, 1e6) | st.integers(-1000, 1000) | st.sampled_from([0, 0.1, -0.5, 2.25]),
              st.none() | st.floats(-1e6, 1e6) | st.integers(-1000, 1000) | st.sampled_from([0, 0.1, 1, 2.25]),
              st.booleans(), st.booleans()),
)


def _objects(inner: Any) -> Any:
    return st.builds(
        lambda props, req, extra: {"type": "object", "properties": props,
                                   "required": [k for k in props if k in req], **extra},
        st.dictionaries(_NAMES, inner, max_size=4), st.sets(_NAMES),
        st.sampled_from([{}, {"additionalProperties": False}, {"additionalProperties": True}])
        | st.builds(lambda x: {"additionalProperties": x}, inner))


def _arrays(inner: Any) -> Any:
    return st.builds(
        lambda items, prefix, lo, extra: {"type": "array", **items, **prefix,
                                          **({"minItems": lo, "maxItems": lo + extra} if lo is not None else {})},
        st.sampled_from([{}, {"items": False}]) | st.builds(lambda x: {"items": x}, inner),
        st.just({}) | st.builds(lambda xs: {"prefixItems": xs}, st.lists(inner, max_size=3)),
        st.none() | st.integers(0, 3), st.integers(0, 3))


_TYPED_SCHEMAS = st.recursive(_LEAVES, lambda inner: st.one_of(
    _objects(inner), _arrays(inner),
    st.builds(lambda xs: {"anyOf": xs}, st.lists(inner, min_size=1, max_size=3)),
    st.builds(lambda x: {"oneOf": [{"type": "null"}, x]}, inner),
    st.builds(lambda a, b: {"allOf": [a, b]}, _objects(inner), _objects(inner)),
    st.builds(lambda x: {"$defs": {"d": x}, "$ref": "#/$defs/d"}, inner),
), max_leaves=10)


@settings(max_examples=150, deadline=None)
@given(schema=_SCHEMAS | _TYPED_SCHEMAS, seed=st.integers(0, 2 ** 32))
def test_random_sentences_of_the_grammar_validate(schema: Any, seed: int) -> None:
    import random

    from mullama.grammar.json_schema import build_grammar

    try:
        g = build_grammar(schema)
    except SchemaError:
        return
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError:
        return
    rnd = random.Random(seed)
    for _ in range(5):
        text = sample_sentence(g, rnd)
        validate(schema, json.loads(text))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_random_sentences_of_table_schemas_validate(case: Any) -> None:
    import random

    from mullama.grammar.json_schema import build_grammar

    schema = case[1]
    g = build_grammar(schema)
    rnd = random.Random(1)
    for _ in range(40):
        text = sample_sentence(g, rnd)
        value = json.loads(text)
        validate(schema, value)
        if schema.get("format") in ("time", "date-time") if isinstance(schema, dict) else False:
            (datetime.time if schema["format"] == "time" else datetime.datetime).fromisoformat(
                value.replace("Z", "+00:00"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_TYPED_SCHEMAS, seed=st.integers(0, 2 ** 32))
def test_llama_grammar_accepts_random_sentences(model, schema: Any, seed: int) -> None:
    """The rendered GBNF means what the expressions mean: llama.cpp takes their sentences."""
    import random

    from mullama.grammar.json_schema import build_grammar

    try:
        g = build_grammar(schema)
    except SchemaError:
        return
    compiled = model.compile_grammar(g.render())
    rnd = random.Random(seed)
    for _ in range(3):
        text = sample_sentence(g, rnd)
        assert compiled.accepts(model.tokenize(text, add_special=False)), text


def test_pydantic_schemas_convert_and_their_sentences_validate() -> None:
    """Schemas as pydantic writes them ($defs, anyOf-null, discriminated oneOf, formats,
    bounds, recursion): every sampled sentence validates and parses back into the model."""
    import enum
    import random
    import uuid
    from typing import Literal, Optional, Union

    pydantic = pytest.importorskip("pydantic")
    from mullama.grammar.json_schema import build_grammar

    class Color(str, enum.Enum):
        red = "red"
        blue = "blue"

    class Cat(pydantic.BaseModel):
        kind: Literal["cat"]
        lives: int = pydantic.Field(ge=0, le=9)

    class Dog(pydantic.BaseModel):
        kind: Literal["dog"]
        good: bool = True

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=50, description="full name")
        age: Optional[int] = pydantic.Field(default=None, ge=0, le=150)
        color: Color
        tags: list[str] = []
        zip: str = pydantic.Field(pattern=r"^\d{5}$")
        born: datetime.date
        seen: Optional[datetime.datetime] = None
        id: uuid.UUID
        pet: Union[Cat, Dog] = pydantic.Field(discriminator="kind")
        score: float = pydantic.Field(ge=0, lt=1)
        friend: Optional["Person"] = None

    schema = Person.model_json_schema()
    grammar = build_grammar(schema)
    rnd = random.Random(5)
    for _ in range(100):
        text = sample_sentence(grammar, rnd)
        validate(schema, json.loads(text))
        Person.model_validate_json(text)
