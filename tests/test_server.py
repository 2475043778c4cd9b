"""The HTTP server end to end: SSE, OpenAI API (through the official client), metrics."""

from __future__ import annotations

import openai
import pytest

import mullama

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def reference(model, greedy):
    """Greedy text of the sync engine, which the batched server must reproduce."""
    def ref(prompt: str, n: int) -> str:
        with mullama.Context(model, n_ctx=512) as ctx:
            return ctx.generate(prompt, max_tokens=n, params=greedy)
    return ref


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_health_and_models(server, client):
    status, body = server.json("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["slots"] == 4
    models = client.models.list()
    assert [m.id for m in models.data] == [server.settings.model_id]


def test_sse_stream_in_the_tutorial_format(server, reference):
    status, headers, data = server.request("POST", "/stream", {"prompt": PROMPT, "max_tokens": 12,
                                                               "temperature": 0})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    import json
    parsed = [json.loads(e[6:]) for e in events]
    *tokens, last = parsed
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert not any(t["done"] for t in tokens) and all(t["token"] for t in tokens)
    assert last["done"] is True and last["token"] == "" and last["index"] == len(tokens)
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 12
    assert "".join(t["token"] for t in tokens) == reference(PROMPT, 12)


def test_sse_events_arrive_while_generating(server, served_model):
    """Each token is flushed on its own: the first event arrives while the rest are still decoding.

    Counted in decode steps, not seconds, so that a fast machine passes as well as a slow one."""
    steps = []
    for event in server.sse("/stream", {"prompt": PROMPT, "max_tokens": 48, "temperature": 0}):
        steps.append(served_model.n_decode_calls)
    assert len(steps) >= 20
    assert steps[-1] - steps[0] >= 10, steps  # tokens were still decoding after the first event came


def test_openai_completions(client, reference):
    r = client.completions.create(model="any", prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == reference(PROMPT, 10)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 10 and r.usage.total_tokens == 16
    parts = [c.choices[0].text for c in client.completions.create(
        model="any", prompt=PROMPT, max_tokens=10, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == r.choices[0].text


def test_openai_completions_logprobs_echo_and_stop(client, reference):
    r = client.completions.create(model="any", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 3 and max(top.values()) == pytest.approx(value, abs=1e-5)
        assert top[tok] == pytest.approx(value, abs=1e-5)  # greedy picks the most likely
    assert lp.text_offset[0] == 0
    echo = client.completions.create(model="any", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPT + reference(PROMPT, 4)
    full = reference(PROMPT, 12)
    cut = full.split()[2]
    stopped = client.completions.create(model="any", prompt=PROMPT, max_tokens=12, temperature=0, stop=[cut])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full[:full.index(cut)]


def test_openai_chat_non_stream_and_stream_agree(client, model, greedy):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(model="any", messages=messages, max_tokens=12, temperature=0)
    prompt = model.apply_chat_template(messages)
    with mullama.Context(model, n_ctx=512) as ctx:
        expected = ctx.generate(prompt, max_tokens=12, params=greedy)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == expected
    assert r.usage.prompt_tokens == len(model.tokenize(prompt, parse_special=True))
    chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_openai_chat_logprobs_and_seed(client):
    messages = [{"role": "user", "content": "Tell me a word."}]
    r = client.chat.completions.create(model="any", messages=messages, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 4
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    kw = dict(model="any", messages=messages, max_tokens=16, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == first


def test_openai_errors_have_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "x"}], max_tokens=10**6)
    assert info.value.status_code == 400 and "1024" in info.value.message
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="any", prompt="word " * 2000, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="any", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="any", prompt=PROMPT, n=5)  # more choices than slots
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.moderations.create(input="x")   # an endpoint the server does not have


def test_concurrent_streams_are_batched(server, served_model):
    """Eight SSE clients at once share the decode steps and each gets its exact count."""
    import concurrent.futures

    prompts = [f"Write about the number {i}:" for i in range(8)]
    before = served_model.n_decode_calls

    def one(prompt: str) -> list[dict]:
        return list(server.sse("/stream", {"prompt": prompt, "max_tokens": 24, "temperature": 0}))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, prompts))
    for events in results:
        assert events[-1]["done"] and events[-1]["usage"]["completion_tokens"] == 24
    steps = served_model.n_decode_calls - before
    assert steps < 8 * 25 * 0.75, steps  # far fewer decode calls than one per token per stream
    server.wait_idle()


def test_metrics_count_requests_tokens_and_latency(server):
    before = server.metrics()
    list(server.sse("/stream", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}))
    after = server.wait_idle()
    assert after['mullama_requests_total{path="/stream",status="200"}'] == \
        before.get('mullama_requests_total{path="/stream",status="200"}', 0) + 1
    assert after["mullama_generated_tokens_total"] - before["mullama_generated_tokens_total"] == 5
    assert after["mullama_prompt_tokens_total"] - before["mullama_prompt_tokens_total"] == 6
    assert after["mullama_time_to_first_token_seconds_count"] == before["mullama_time_to_first_token_seconds_count"] + 1
    assert after["mullama_inter_token_seconds_count"] - before["mullama_inter_token_seconds_count"] == 4
    assert after['mullama_time_to_first_token_seconds_bucket{le="+Inf"}'] == after["mullama_time_to_first_token_seconds_count"]
    assert after["mullama_queue_depth"] == 0 and after["mullama_slots"] == 4
