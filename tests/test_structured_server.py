"""Structured output over HTTP: grammar, json_schema and response_format on every endpoint."""

from __future__ import annotations

import json
import uuid

import jsonschema
import pytest
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(180)

YES_NO = 'root ::= "yes" | "no"'
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "y": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["x", "y"], "additionalProperties": False}
CHAT = [{"role": "user", "content": "Give me a point with small integer coordinates x and y."}]


def _chat(server, **fields):
    status, body = server.json("POST", "/v1/chat/completions", {"messages": CHAT, "temperature": 0,
                                                                "max_tokens": 60, **fields})
    assert status == 200, body
    return body["choices"][0]


def test_completion_follows_a_grammar(server):
    status, body = server.json("POST", "/v1/completions", {"prompt": "Is the sky green? Answer:", "max_tokens": 8,
                                                           "temperature": 0, "grammar": YES_NO})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"] in ("yes", "no") and choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] >= 1


def test_scored_and_batched_completions_keep_the_constraint(server):
    # echo and prompt batches take the scoring path: what they generate is constrained all the same
    prompts = ["Is the sky green? Answer:", "Is water wet? Answer:"]
    status, body = server.json("POST", "/v1/completions", {"prompt": prompts, "max_tokens": 8, "temperature": 0,
                                                           "echo": True, "logprobs": 1, "grammar": YES_NO})
    assert status == 200, body
    assert len(body["choices"]) == 2
    for choice in body["choices"]:
        prompt = prompts[choice["index"]]
        assert choice["text"].startswith(prompt)
        assert choice["text"][len(prompt):] in ("yes", "no"), choice["text"]


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT, "strict": True}}},
    {"response_format": {"type": "json_object", "schema": POINT}},
    {"response_format": {"type": "json_schema", "schema": POINT}},
    {"json_schema": POINT},
], ids=["openai", "json_object+schema", "llama.cpp-response_format", "top-level"])
def test_chat_answer_is_valid_under_the_schema(server, fields):
    choice = _chat(server, **fields)
    value = json.loads(choice["message"]["content"])
    jsonschema.validate(value, POINT)
    assert choice["finish_reason"] == "stop"


def test_json_object_is_any_object(server):
    choice = _chat(server, response_format={"type": "json_object"}, max_tokens=200)
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_truncated_answer_reports_length(server):
    choice = _chat(server, json_schema=POINT, max_tokens=3)
    assert choice["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])
    assert choice["message"]["content"].lstrip().startswith("{")


def test_streamed_chat_is_valid_under_the_schema(server):
    events = list(server.sse("/v1/chat/completions", {
        "messages": CHAT, "temperature": 0, "max_tokens": 60, "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT}}}))
    assert events[-1] == {"raw": "[DONE]"}
    chunks = [e for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) > 2  # really streamed
    jsonschema.validate(json.loads(text), POINT)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # the same as the whole answer
    assert text == _chat(server, json_schema=POINT)["message"]["content"]


def test_every_choice_keeps_its_own_grammar_state(server):
    status, body = server.json("POST", "/v1/chat/completions", {
        "messages": CHAT, "temperature": 1.0, "seed": 7, "n": 3, "max_tokens": 60, "json_schema": POINT})
    assert status == 200, body
    texts = []
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), POINT)
        texts.append(choice["message"]["content"])
    assert len(texts) == 3


def test_tutorial_sse_and_websocket_take_a_constraint(server):
    status, _, data = server.request("POST", "/stream", {"prompt": "A point as JSON:", "max_tokens": 60,
                                                         "temperature": 0, "json_schema": POINT})
    assert status == 200
    events = [json.loads(e[6:]) for e in data.decode().split("\n\n") if e]
    *tokens, last = events
    assert last["done"] and last["finish_reason"] == "stop"
    jsonschema.validate(json.loads("".join(t["token"] for t in tokens)), POINT)

    with connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"prompt": "Is the sky green? Answer:", "max_tokens": 8, "temperature": 0,
                            "grammar": YES_NO}))
        pieces = []
        while (msg := json.loads(ws.recv(timeout=120)))["type"] == "token":
            pieces.append(msg["content"])
        assert msg["type"] == "done" and msg["finish_reason"] == "stop"
        assert "".join(pieces) in ("yes", "no")
        ws.send(json.dumps({"prompt": "x", "grammar": "root ::= ("}))
        msg = json.loads(ws.recv(timeout=60))
        assert msg["type"] == "error" and "not a valid GBNF grammar" in msg["error"]["message"]


def test_a_repeated_constraint_is_converted_and_parsed_once(server):
    # a schema no other test sends, so the first request is a miss whatever ran before
    schema = {"type": "object", "properties": {f"k{uuid.uuid4().hex[:8]}": {"type": "boolean"}},
              "required": [], "additionalProperties": False}
    before = server.metrics()
    for _ in range(3):
        status, body = server.json("POST", "/v1/completions", {"prompt": "JSON:", "max_tokens": 2,
                                                               "json_schema": schema, "temperature": 0})
        assert status == 200, body
    after = server.metrics()
    assert after["mullama_grammar_cache_misses"] - before["mullama_grammar_cache_misses"] == 2  # schema + parse
    assert after["mullama_grammar_cache_hits"] - before["mullama_grammar_cache_hits"] == 4


BAD = [
    ("/v1/completions", {"grammar": "root ::= ("}, "grammar", "not a valid GBNF grammar"),
    ("/v1/completions", {"grammar": 'start ::= "a"'}, "grammar", "does not contain a 'root' symbol"),
    ("/v1/completions", {"grammar": 'root ::= "a" undefined-rule'}, "grammar",
     "not a valid GBNF grammar: Undefined rule identifier 'undefined-rule'"),
    ("/v1/completions", {"grammar": 7}, "grammar", "'grammar' must be a string"),
    ("/v1/completions", {"grammar": YES_NO, "response_format": {"type": "json_object"}}, "grammar",
     "cannot be combined"),
    ("/v1/chat/completions", {"json_schema": POINT, "grammar": YES_NO}, "json_schema", "cannot be combined"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": POINT}}},
     "response_format", "'response_format.json_schema.name' is required"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_shema": {"name": "p", "schema": POINT}}},
     "response_format", "unknown field 'json_shema'"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format", "must be one of"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object", "schema": "{}"}}, "response_format",
     "must be a JSON Schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "object", "properties": {"a": {"type": "strnig"}}}}}},
     "response_format", "'type' must be one of"),
    ("/v1/completions", {"json_schema": {"type": "object", "not": {"required": ["a"]}}}, "json_schema",
     "unsupported keyword 'not'"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {}}}}]}, "tools", "cannot be combined"),
    ("/stream", {"grammar": "root ::= ["}, "grammar", "not a valid GBNF grammar"),
    ("/stream", {"json_schema": {"type": "object", "properties": {"a": {"type": "strnig"}}}}, "json_schema",
     "(at /properties/a)"),
]


@pytest.mark.parametrize("path,fields,param,text", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_constraint_is_a_400_that_costs_no_decode(server, path, fields, param, text):
    body = {"prompt": "x", "max_tokens": 4} if path != "/v1/chat/completions" else {"messages": CHAT}
    before = server.metrics()["mullama_decode_calls"]
    status, answer = server.json("POST", path, {**body, **fields})
    assert status == 400, answer
    error = answer["error"]
    assert text in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    assert server.metrics()["mullama_decode_calls"] == before
