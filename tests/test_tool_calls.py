"""Tool calling without generation: formats, parsing, rendering through real templates, streaming shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mullama.grammar import ToolError, detect_tool_format, parse_tool_calls, validate_tools
from mullama.grammar.tool_formats import undecided_tail, FORMATS
from mullama.grammar.tools import check_choice, prefix_rules
from mullama.types import TokenData

TEMPLATES = Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp" / "models" / "templates"
FAMILIES = {
    "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct.jinja": "llama3",
    "Qwen-Qwen2.5-7B-Instruct.jinja": "hermes",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": "hermes",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": "mistral",
    "google-gemma-2-2b-it.jinja": "generic",
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def template(name: str) -> str:
    path = TEMPLATES / name
    if not path.exists():
        pytest.skip(f"{path} is missing; run vendor/fetch_llama_cpp.py")
    return path.read_text()


@pytest.mark.parametrize("name,family", FAMILIES.items())
def test_the_family_is_detected_from_the_template_source(name, family):
    assert detect_tool_format(template(name)) == family


def test_builtin_and_missing_templates_are_generic():
    assert detect_tool_format(None) == "generic"
    assert detect_tool_format("chatml") == "generic"


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f != "generic"])
def test_tools_and_a_past_call_render_through_the_native_template(model, name):
    prompt = model.apply_chat_template(HISTORY, template=template(name), tools=[WEATHER])
    assert "Current weather of a city" in prompt          # the tool is described
    assert '"city": "Paris"' in prompt                    # the past call, its arguments as an object
    assert '"{\\"city' not in prompt                       # ... not as a JSON string inside JSON
    assert "sunny, 21 C" in prompt                        # the tool's result


def test_the_generic_format_describes_tools_in_the_system_turn(model):
    prompt = model.apply_chat_template(HISTORY, tools=[WEATHER], tool_choice="required")
    assert model.tool_format() == "generic"
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in prompt
    assert "Current weather of a city" in prompt and "Call one of the tools now." in prompt
    assert "Result of get_weather: sunny, 21 C" in prompt
    plain = model.apply_chat_template(HISTORY, tools=[WEATHER], tool_choice="none")
    assert "Current weather of a city" not in plain and "sunny, 21 C" in plain


def test_mistral_ids_are_mapped_to_nine_characters(model):
    prompt = model.apply_chat_template(HISTORY, template=template("mistralai-Mistral-Nemo-Instruct-2407.jinja"),
                                       tools=[WEATHER])
    ids = {part.split('"')[0] for part in prompt.split('"id": "')[1:]}
    calls = {part.split('"')[0] for part in prompt.split('"call_id": "')[1:]}
    assert ids == calls and all(len(i) == 9 and i.isalnum() for i in ids)


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("fmt,text", [
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}'),
    ("generic", '{ "tool_calls":[{"name":"get_weather","arguments":{"city":"Rome"}}]}'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Rome"}}'),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}'),
    ("llama3", '{"parameters": {"city": "Rome"}, "name": "get_weather"}'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]'),
])
def test_a_call_is_parsed_in_each_format(fmt, text):
    result = parse_tool_calls(text, fmt)
    assert result.content is None
    [call] = result.tool_calls
    assert call.name == "get_weather" and call.parsed_arguments() == {"city": "Rome"}
    assert call.id


def test_content_before_the_calls_and_several_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": "}{"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    result = parse_tool_calls(text, "hermes", ids=["id1", "id2"])
    assert result.content == "Let me check.\n"
    assert [(c.id, c.name, c.parsed_arguments()) for c in result.tool_calls] == [("id1", "a", {"x": "}{"}),
                                                                                ("id2", "b", {})]


def test_text_without_a_call_is_content():
    for fmt in FORMATS:
        result = parse_tool_calls("The weather is fine.", fmt)
        assert result.content == "The weather is fine." and result.tool_calls == []


def test_a_call_cut_short_keeps_its_partial_arguments():
    [call] = parse_tool_calls('[TOOL_CALLS][{"name": "f", "arguments": {"city": "Ro', "mistral").tool_calls
    assert call.name == "f" and call.arguments == '{"city": "Ro'
    with pytest.raises(json.JSONDecodeError):
        call.parsed_arguments()


def test_the_start_of_an_opener_is_held_back():
    assert undecided_tail("Sure <tool_", FORMATS["hermes"]) == len("<tool_")
    assert undecided_tail("Sure <b>", FORMATS["hermes"]) == 0
    assert undecided_tail('ok {"tool', FORMATS["generic"]) == len('{"tool')
    assert undecided_tail("ok {x", FORMATS["generic"]) == 0
    assert undecided_tail("  {", FORMATS["llama3"]) == 3
    assert undecided_tail("Hello", FORMATS["llama3"]) == 0


# ---------------------------------------------------------------- checking tools

@pytest.mark.parametrize("tools,needle", [
    ("nope", "must be a list"),
    ([{"type": "function", "function": {"description": "x"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "retrieval"}], "tools[0]"),
    ([WEATHER, WEATHER], "used twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "of type \"object\""),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"),
])
def test_bad_tools_are_refused_by_name(tools, needle):
    with pytest.raises(ToolError) as info:
        validate_tools(tools)
    assert needle in str(info.value) and isinstance(info.value, ValueError)


def test_tool_choice_is_checked():
    tools = validate_tools([WEATHER])
    assert check_choice(tools, "auto") == "auto"
    assert check_choice(tools, {"type": "function", "function": {"name": "get_weather"}}) == "get_weather"
    with pytest.raises(ToolError, match="'nope'"):
        check_choice(tools, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ToolError, match="tool_choice"):
        check_choice(tools, "sometimes")


def test_a_tool_without_parameters_takes_an_empty_object():
    [tool] = validate_tools([{"type": "function", "function": {"name": "ping"}}])
    assert tool["function"]["parameters"] == {"type": "object", "properties": {}}


def test_rule_prefixes_leave_literals_and_classes_alone():
    gbnf = 'root ::= "root" item{1,3} [a-z root]\nitem ::= "x\\" item" root # item\n'
    assert prefix_rules(gbnf, "t0-") == ('t0-root ::= "root" t0-item{1,3} [a-z root]\n'
                                         't0-item ::= "x\\" item" t0-root # item\n')


# ---------------------------------------------------------------- the streamed answer shape

def _shape(choice: str):
    from mullama.server.openai_api import _ChatShape
    from mullama.server.tool_calls import ToolRequest

    request = ToolRequest(validate_tools([WEATHER]), choice, True, "hermes")
    return request.shape(_ChatShape(None, 1, False))


def _stream(shape, pieces):
    chunks = []
    for piece in pieces:
        chunks.extend(shape.delta(0, TokenData(piece, 1, False)) or [])
    chunks.extend(shape.closing(0, "stop"))
    return chunks


def test_streamed_calls_send_id_and_name_first_then_argument_fragments():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    chunks = _stream(_shape("required"), [text[i:i + 3] for i in range(0, len(text), 3)])
    deltas = [c["delta"] for c in chunks]
    assert not any("content" in d for d in deltas)
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:] if d]
    assert len(fragments) > 1 and json.loads("".join(fragments)) == {"city": "Rome"}
    assert all("id" not in d["tool_calls"][0] for d in deltas[1:] if d)
    assert chunks[-1]["finish_reason"] == "tool_calls"


def test_streamed_auto_answer_sends_text_and_holds_back_an_opener_prefix():
    chunks = _stream(_shape("auto"), ["Hello", " <tool", "_", "x> done"])
    content = [c["delta"]["content"] for c in chunks if "content" in c["delta"]]
    assert content[:2] == ["Hello", " "] and "".join(content) == "Hello <tool_x> done"
    assert chunks[-1]["finish_reason"] == "stop"


def test_whole_answer_has_tool_calls_and_finish_reason():
    shape = _shape("auto")
    for piece in ["Checking.", '<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}\n</tool_call>']:
        shape.take(0, TokenData(piece, 1, False))
    choice = shape.choice(0, "stop")
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


def test_tools_refuse_a_second_output_constraint():
    from mullama import StreamConfig
    from mullama.server.errors import ApiError
    from mullama.server.tool_calls import ToolRequest
    from mullama.grammar import tool_call_grammar

    tools = validate_tools([WEATHER])
    request = ToolRequest(tools, "required", False, "generic", tool_call_grammar(tools, "generic", "required"))
    constrained = request.constrain(StreamConfig(max_tokens=8))
    assert constrained.sampler.grammar_text == request.grammar.grammar
    with pytest.raises(ApiError, match="another output constraint") as info:
        request.constrain(StreamConfig(max_tokens=8, json_schema={"type": "object"}))
    assert info.value.status == 400
