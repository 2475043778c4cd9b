"""Structured output through real client libraries (openai, instructor, langchain-openai) on the default model.

Each client talks to a loopback server over HTTP exactly as it would to
OpenAI. Every request body is captured on its way out, and the answer is
validated with ``jsonschema`` against the schema the client really sent, on
top of the client's own Pydantic validation.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, Optional

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

import mullama

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 320


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


class Person(BaseModel):
    """Nested models, an enum, a bounded list and an optional field."""

    name: str = Field(max_length=24)
    age: int
    favourite_colour: Colour
    hobbies: list[str] = Field(max_length=3)
    address: Address
    nickname: Optional[str] = Field(default=None, max_length=16)


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)


PERSON_PROMPT = [
    {"role": "system", "content": "You extract facts as JSON."},
    {"role": "user", "content": "Alice Smith is 31 years old and lives in Paris, France. Her favourite colour is "
                                "blue. She likes chess and running. Friends call her Ali."},
]
# one worked example: enough for a small model to fill in the keys the prompt's schema names
CITY_PROMPT = [
    {"role": "user", "content": "Rome is the capital of Italy. Give the city and its country."},
    {"role": "assistant", "content": '{"name": "Rome", "country": "Italy"}'},
    {"role": "user", "content": "Madrid is the capital of Spain. Give the city and its country."},
]


class Recorder:
    """httpx event hooks keeping the JSON body of every chat request sent and of every
    whole (not streamed) answer received."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []

    def request(self, request: httpx.Request) -> None:
        if request.url.path.endswith("/chat/completions"):
            self.bodies.append(json.loads(request.content))

    def response(self, response: httpx.Response) -> None:
        if response.headers.get("content-type", "").startswith("application/json"):
            response.read()
            self.answers.append(response.json())

    def content(self) -> Any:
        """The last whole answer's message, parsed as JSON."""
        return json.loads(self.answers[-1]["choices"][0]["message"]["content"])

    def schema_sent(self) -> dict[str, Any]:
        fmt = self.bodies[-1]["response_format"]
        assert fmt["type"] == "json_schema", fmt
        return fmt["json_schema"]["schema"]


@pytest.fixture(scope="module")
def live(model_path):
    """A server of its own: a 2,048-token context per slot leaves room for schema-bearing prompts."""
    from live_server import LiveServer
    from mullama.server import ServerSettings

    model = mullama.AsyncModel(mullama.Model.load(model_path), n_ctx=2048, n_parallel=2)
    server = LiveServer(model, ServerSettings(port=0, max_tokens_cap=1024))
    yield server
    server.close()
    model.close()


@pytest.fixture()
def recorder():
    return Recorder()


@pytest.fixture()
def http_client(recorder):
    with httpx.Client(event_hooks={"request": [recorder.request], "response": [recorder.response]},
                      timeout=240) as c:
        yield c


@pytest.fixture()
def client(live, http_client):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0,
                       http_client=http_client) as c:
        yield c


@pytest.fixture(scope="module")
def parsed_person(live):
    """One greedy ``.parse`` answer (and the body sent for it), shared by the tests that read it."""
    rec = Recorder()
    with httpx.Client(event_hooks={"request": [rec.request]}, timeout=240) as http, \
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, http_client=http) as c:
        completion = c.chat.completions.parse(model="mullama", messages=PERSON_PROMPT, response_format=Person,
                                              temperature=0, max_tokens=MAX_TOKENS)
    return completion, rec


def test_openai_parse_nested_model(parsed_person):
    completion, recorder = parsed_person
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.address, Address)
    assert isinstance(person.favourite_colour, Colour) and len(person.hobbies) <= 3
    sent = recorder.schema_sent()
    assert recorder.bodies[-1]["response_format"]["json_schema"]["name"] == "Person"
    assert recorder.bodies[-1]["response_format"]["json_schema"]["strict"] is True
    assert "$defs" in sent  # the nested models and the enum travel as references
    jsonschema.validate(json.loads(choice.message.content), sent)


def test_openai_streaming_helper(client, recorder, parsed_person):
    deltas: list[str] = []
    with client.chat.completions.stream(model="mullama", messages=PERSON_PROMPT, response_format=Person,
                                        temperature=0, max_tokens=MAX_TOKENS) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
                if event.parsed is not None:  # the helper's partial parse of the JSON so far
                    assert isinstance(event.parsed, dict)
        final = stream.get_final_completion()
    assert len(deltas) > 5
    choice = final.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)
    assert "".join(deltas) == choice.message.content
    jsonschema.validate(json.loads(choice.message.content), recorder.schema_sent())
    # streamed or not, the greedy answer is the same
    assert choice.message.content == parsed_person[0].choices[0].message.content


def test_openai_parse_reports_truncation(client):
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="mullama", messages=PERSON_PROMPT, response_format=Person,
                                      temperature=0, max_tokens=6)


def test_instructor_json_schema_mode(client, recorder):
    import instructor

    ic = instructor.from_openai(client, mode=instructor.Mode.JSON_SCHEMA)
    person = ic.chat.completions.create(model="mullama", messages=PERSON_PROMPT, response_model=Person,
                                        temperature=0, max_tokens=MAX_TOKENS, max_retries=0)
    assert isinstance(person, Person)
    body = recorder.bodies[-1]
    jsonschema.validate(recorder.content(), recorder.schema_sent())
    assert body["response_format"]["json_schema"]["name"] == "Person"


def test_instructor_json_mode(client, recorder):
    """JSON mode sends only {"type": "json_object"} and puts the schema in the prompt: the server
    guarantees a JSON object, instructor's validation (with its retries) does the rest."""
    import instructor

    ic = instructor.from_openai(client, mode=instructor.Mode.JSON)
    city = ic.chat.completions.create(model="mullama", messages=CITY_PROMPT, response_model=City,
                                      temperature=0, max_tokens=MAX_TOKENS, max_retries=2)
    assert isinstance(city, City) and city.name and city.country
    assert all(b["response_format"] == {"type": "json_object"} for b in recorder.bodies)
    for body in recorder.bodies:  # the schema went inside the system message
        assert '"properties"' in body["messages"][0]["content"]
    jsonschema.validate(recorder.content(), City.model_json_schema())


def test_langchain_with_structured_output(live, http_client, recorder):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="mullama", base_url=f"{live.url}/v1", api_key="unused", temperature=0,
                     max_tokens=MAX_TOKENS, max_retries=0, http_client=http_client)
    structured = llm.with_structured_output(Person, method="json_schema")
    person = structured.invoke([(m["role"], m["content"]) for m in PERSON_PROMPT])
    assert isinstance(person, Person)
    jsonschema.validate(recorder.content(), recorder.schema_sent())
