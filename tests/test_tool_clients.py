"""Tool calling over the OpenAI API, through real clients: openai, instructor, pydantic-ai, langchain.

A loopback server serves the default model. Forced choices make the 270M model
call correctly; every call's arguments are also validated with ``jsonschema``
against the schema that was sent.
"""

from __future__ import annotations

import json
from typing import Literal

import anyio
import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

import mullama

pytestmark = pytest.mark.timeout(240)

WEATHER_PARAMS = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                  "properties": {"city": {"type": "string"},
                                 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": WEATHER_PARAMS}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                          "parameters": {"type": "object", "required": ["zone"],
                                                         "properties": {"zone": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


class Weather(BaseModel):
    """Weather query for a city."""

    city: str = Field(description="the city")
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(scope="module")
def tool_server(model_path):
    from live_server import LiveServer
    from mullama.server import ServerSettings

    m = mullama.AsyncModel(mullama.Model.load(model_path), n_ctx=2048, n_parallel=2)
    s = LiveServer(m, ServerSettings(port=0, max_tokens_cap=512))
    yield s
    s.close()
    m.close()


@pytest.fixture(scope="module")
def client(tool_server):
    with openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def fresh(server) -> None:
    """Evaluate the next prompt from scratch: a prompt continued from the prefix cache is
    computed in other steps, whose rounding can change a greedy choice."""
    server.wait_idle()
    server.model.clear_cache()


def body(**kw):
    return {"model": "mullama", "messages": ASK, "tools": [WEATHER, CLOCK], "temperature": 0,
            "max_tokens": 64, **kw}


# ---------------------------------------------------------------- the wire format

@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_call_in_the_answer(tool_server, choice):
    status, answer = tool_server.json("POST", "/v1/chat/completions",
                                      body(tool_choice=choice, parallel_tool_calls=False))
    assert status == 200, answer
    [c] = answer["choices"]
    assert c["finish_reason"] == "tool_calls"
    msg = c["message"]
    assert msg["role"] == "assistant" and msg["content"] is None
    [call] = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    schemas = {"get_weather": WEATHER_PARAMS, "get_time": CLOCK["function"]["parameters"]}
    if isinstance(choice, dict):
        assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_streamed_call_matches_the_whole_answer(tool_server):
    req = body(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    fresh(tool_server)
    _, whole = tool_server.json("POST", "/v1/chat/completions", req)
    fresh(tool_server)
    events = [e for e in tool_server.sse("/v1/chat/completions", {**req, "stream": True}) if "raw" not in e]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    head, *fragments = calls
    assert head["index"] == 0 and head["id"] and head["function"] == {"name": "get_weather", "arguments": ""}
    assert fragments and all(set(f) == {"index", "function"} and f["index"] == 0 for f in fragments)
    assert not any(d.get("content") for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    arguments = "".join(f["function"]["arguments"] for f in fragments)
    assert arguments == whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMS)


def test_streamed_auto_answer_matches_the_whole_one(tool_server):
    """With "auto" the model may answer in text: streamed, the text arrives as content deltas
    (a possible call opener held back until it is decided) and adds up to the whole answer."""
    req = body(tool_choice="auto", max_tokens=24)
    fresh(tool_server)
    _, whole = tool_server.json("POST", "/v1/chat/completions", req)
    message = whole["choices"][0]["message"]
    fresh(tool_server)
    events = [e for e in tool_server.sse("/v1/chat/completions", {**req, "stream": True}) if "raw" not in e]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    if message.get("tool_calls"):
        assert any(d.get("tool_calls") for d in deltas)
    else:
        assert content == message["content"] and not any(d.get("tool_calls") for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_tool_choice_none_answers_in_text(tool_server):
    status, answer = tool_server.json("POST", "/v1/chat/completions", body(tool_choice="none", max_tokens=8))
    assert status == 200, answer
    c = answer["choices"][0]
    assert "tool_calls" not in c["message"] and c["finish_reason"] in ("stop", "length")


BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools", "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "used twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools", "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "no-such-format-keyword-x",
                                               "unevaluatedItems": False, "$dynamicRef": "#a"}}}}}]},
     "tools", "tools[0] (f)"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "parallel_tool_calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]}, "messages", "tool_calls"),
]


@pytest.mark.parametrize("change,param,needle", BAD)
def test_bad_tool_requests_get_a_400_naming_the_problem(tool_server, change, param, needle):
    status, answer = tool_server.json("POST", "/v1/chat/completions", body(**change))
    assert status == 400, answer
    assert answer["error"]["param"] == param and needle in answer["error"]["message"], answer


# ---------------------------------------------------------------- clients

def test_openai_parse_with_a_strict_pydantic_tool(client):
    tool = openai.pydantic_function_tool(Weather)
    assert tool["function"]["strict"] is True
    completion = client.chat.completions.parse(
        model="mullama", messages=ASK, tools=[tool], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=64)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert isinstance(call.function.parsed_arguments, Weather)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_instructor_tools_mode_returns_a_validated_model(client):
    import instructor

    patched = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    sent = []
    patched.on("completion:kwargs", lambda *a, **kw: sent.append(kw))
    weather = patched.chat.completions.create(model="mullama", response_model=Weather, messages=ASK,
                                              temperature=0, max_tokens=64, max_retries=0)
    assert isinstance(weather, Weather)
    assert sent[0]["tool_choice"] == {"type": "function", "function": {"name": "Weather"}}
    jsonschema.validate(weather.model_dump(), sent[0]["tools"][0]["function"]["parameters"])


class _Steer(httpx.AsyncBaseTransport):
    """Records each request pydantic-ai sends and names the tool it must call: the function tool
    until a tool result is in the history, then the output tool."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[dict] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        payload = json.loads(await request.aread())
        self.sent.append(json.loads(json.dumps(payload)))
        answered = any(m["role"] == "tool" for m in payload["messages"])
        payload["tool_choice"] = {"type": "function", "function": {"name": "final_result" if answered else "get_weather"}}
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        steered = httpx.Request(request.method, request.url, headers=headers, json=payload)
        return await self.inner.handle_async_request(steered)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Report(BaseModel):
    city: str
    summary: str = Field(max_length=80)


def test_pydantic_ai_agent_calls_a_tool_then_gives_structured_output(tool_server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    steer = _Steer()
    calls = []
    api = openai.AsyncOpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0,
                             http_client=httpx.AsyncClient(transport=steer, timeout=120))
    provider = OpenAIProvider(openai_client=api)
    agent = Agent(OpenAIChatModel("mullama", provider=provider), output_type=Report,
                  model_settings={"temperature": 0, "max_tokens": 96})

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        calls.append(city)
        return f"Sunny and 21 C in {city}."

    async def run():
        async with api:  # closes its connections before the loop ends
            return await agent.run("What is the weather in Paris?")

    result = anyio.run(run)
    assert isinstance(result.output, Report)
    assert len(calls) == 1 and len(steer.sent) == 2
    assert [m["role"] for m in steer.sent[1]["messages"]][-2:] == ["assistant", "tool"]
    assert steer.sent[0]["tool_choice"] == "required"  # what pydantic-ai asks for with a tool output
    output_tool = next(t for t in steer.sent[1]["tools"] if t["function"]["name"] == "final_result")
    jsonschema.validate(result.output.model_dump(), output_tool["function"]["parameters"])


def _chat_model(tool_server, **kw):
    from langchain_openai import ChatOpenAI

    kw.setdefault("max_tokens", 64)
    return ChatOpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", model="mullama", temperature=0,
                      max_retries=0, timeout=120, **kw)


def test_langchain_structured_output_by_function_calling(tool_server):
    llm = _chat_model(tool_server)
    weather = llm.with_structured_output(Weather, method="function_calling").invoke(ASK[0]["content"])
    assert isinstance(weather, Weather)
    jsonschema.validate(weather.model_dump(), Weather.model_json_schema())


def test_langchain_bind_tools_round_trip_with_a_tool_message(tool_server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return f"Sunny and 21 C in {city}."

    llm = _chat_model(tool_server)
    history = [HumanMessage(ASK[0]["content"])]
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(history)
    [call] = ai.tool_calls
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(call["args"], get_weather.tool_call_schema.model_json_schema())
    history += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    short = _chat_model(tool_server, max_tokens=16)
    final = short.bind_tools([get_weather], tool_choice="none").invoke(history)
    assert not final.tool_calls and isinstance(final.content, str) and final.content
    # the call and its result were rendered into the prompt (the tools were not: tool_choice "none")
    question = _chat_model(tool_server, max_tokens=1).invoke(history[:1])
    assert final.usage_metadata["input_tokens"] > question.usage_metadata["input_tokens"] + 10
