"""Reading a request's structured-output fields (response_format, grammar, json_schema), no model needed."""

from __future__ import annotations

import pytest

from mullama.server.errors import ApiError
from mullama.server.structured import ANY_OBJECT_SCHEMA, Constraint, GrammarCache, parse_constraint

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("body,expected", [
    ({}, None),
    ({"response_format": None, "grammar": None, "json_schema": None}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"grammar": ""}, None),  # llama.cpp's "no grammar"
    ({"response_format": {"type": "json_object"}}, Constraint("response_format", schema=ANY_OBJECT_SCHEMA)),
    ({"response_format": {"type": "json_object", "schema": None}},
     Constraint("response_format", schema=ANY_OBJECT_SCHEMA)),
    ({"response_format": {"type": "json_object", "schema": SCHEMA}},
     Constraint("response_format.schema", schema=SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "A_b-1", "schema": SCHEMA, "strict": True,
                                                                 "description": "one a"}}},
     Constraint("response_format.json_schema.schema", schema=SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": None}}},
     Constraint("response_format.json_schema.schema", schema=SCHEMA)),
    ({"response_format": {"type": "json_schema", "schema": SCHEMA}}, Constraint("response_format.schema", schema=SCHEMA)),
    ({"json_schema": SCHEMA}, Constraint("json_schema", schema=SCHEMA)),
    ({"json_schema": {}}, Constraint("json_schema", schema={})),
    ({"json_schema": True}, Constraint("json_schema", schema=True)),
    ({"grammar": 'root ::= "yes" | "no"'}, Constraint("grammar", gbnf='root ::= "yes" | "no"')),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "text"}}, Constraint("grammar", gbnf='root ::= "a"')),
])
def test_accepted_forms(body, expected):
    assert parse_constraint(body) == expected


@pytest.mark.parametrize("body,param,text", [
    ({"response_format": "json"}, "response_format", "'response_format' must be an object"),
    ({"response_format": {}}, "response_format", "'response_format.type' must be one of"),
    ({"response_format": {"type": "xml"}}, "response_format", "got 'xml'"),
    ({"response_format": {"type": "text", "schema": SCHEMA}}, "response_format", "unknown field 'schema'"),
    ({"response_format": {"type": "json_object", "json_schema": SCHEMA}}, "response_format",
     "unknown field 'json_schema'"),
    ({"response_format": {"type": "json_object", "schema": "{}"}}, "response_format",
     "'response_format.schema' must be a JSON Schema"),
    ({"response_format": {"type": "json_object", "schema": [SCHEMA]}}, "response_format", "got list"),
    # a misspelt key must not pass as an unconstrained request
    ({"response_format": {"type": "json_schema", "json_shema": {"name": "x", "schema": SCHEMA}}},
     "response_format", "unknown field 'json_shema'"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "must be an object with 'name'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "response_format",
     "'response_format.json_schema.name' is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "has space", "schema": SCHEMA}}},
     "response_format", ".name' is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n" * 65, "schema": SCHEMA}}},
     "response_format", ".name' is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "'response_format.json_schema.schema' is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": "yes"}}},
     "response_format", ".strict' must be true or false"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "description": 1}}},
     "response_format", ".description' must be a string"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "extra": 1}}},
     "response_format", "unknown field 'extra'"),
    ({"response_format": {"type": "json_schema", "schema": SCHEMA,
                          "json_schema": {"name": "x", "schema": SCHEMA}}}, "response_format", "send one"),
    ({"grammar": 5}, "grammar", "'grammar' must be a string"),
    ({"json_schema": "{}"}, "json_schema", "'json_schema' must be a JSON Schema"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar", "cannot be combined"),
    ({"grammar": 'root ::= "a"', "json_schema": SCHEMA}, "json_schema", "cannot be combined"),
    ({"json_schema": SCHEMA, "response_format": {"type": "json_schema", "schema": SCHEMA}}, "json_schema",
     "cannot be combined"),
])
def test_malformed_forms_are_400_naming_the_field(body, param, text):
    with pytest.raises(ApiError) as info:
        parse_constraint(body)
    err = info.value
    assert err.status == 400 and err.param == param and text in err.message, err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


class FakeModel:
    """Parses GBNF the way the tests need: anything with 'root ::=' is valid."""

    def __init__(self) -> None:
        self.parsed: list[str] = []

    def compile_grammar(self, gbnf: str) -> object:
        self.parsed.append(gbnf)
        if "root ::=" not in gbnf:
            raise ValueError("expecting root rule")
        return object()


def fake_converter(schema):
    if isinstance(schema, dict) and "not" in schema:
        raise ValueError("unsupported JSON Schema keyword 'not'")
    if isinstance(schema, dict) and schema.get("deep"):
        raise RecursionError
    return f"root ::= {len(str(schema))}"


def test_each_distinct_text_is_converted_and_parsed_once():
    cache, model = GrammarCache(converter=fake_converter), FakeModel()
    for _ in range(3):
        assert cache.gbnf_for(model, Constraint("json_schema", schema=SCHEMA)).startswith("root ::=")
        assert cache.gbnf_for(model, Constraint("grammar", gbnf='root ::= "x"')) == 'root ::= "x"'
    assert model.parsed == [f"root ::= {len(str(SCHEMA))}", 'root ::= "x"']
    assert cache.misses == 3  # one schema conversion, two parses


def test_errors_are_400s_and_cached_too():
    cache, model = GrammarCache(converter=fake_converter), FakeModel()
    for _ in range(2):
        with pytest.raises(ApiError) as info:
            cache.gbnf_for(model, Constraint("grammar", gbnf="rot ::= x"))
        assert info.value.status == 400 and info.value.param == "grammar"
        assert info.value.code == "invalid_grammar"
        assert "'grammar' is not a valid GBNF grammar: expecting root rule" in info.value.message
        with pytest.raises(ApiError) as info:
            cache.gbnf_for(model, Constraint("response_format.json_schema.schema", schema={"not": {}}))
        assert info.value.param == "response_format" and info.value.code == "unsupported_schema"
        assert "keyword 'not'" in info.value.message and "response_format.json_schema.schema" in info.value.message
        with pytest.raises(ApiError, match="nested too deeply"):
            cache.gbnf_for(model, Constraint("json_schema", schema={"deep": True}))
    assert model.parsed == ["rot ::= x"]
    assert cache.misses == 3 and cache.hits == 3


def test_the_cache_is_bounded_and_keeps_recent_entries():
    cache, model = GrammarCache(capacity=4, converter=fake_converter), FakeModel()
    for i in range(10):
        cache.gbnf_for(model, Constraint("grammar", gbnf=f'root ::= "{i}"'))
        cache.gbnf_for(model, Constraint("grammar", gbnf='root ::= "kept"'))  # used every round
    assert len(cache._grammars) == 4
    assert model.parsed.count('root ::= "kept"') == 1 and len(model.parsed) == 11
