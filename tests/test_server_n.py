"""OpenAI ``n`` (several choices of one prompt) and the prefix cache, against a live server."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest

import mullama
from live_server import LiveServer, read_events
from mullama.server import ServerSettings

PROMPT = "The capital of France is"
PROMPT_TOKENS = 6
MESSAGES = [{"role": "user", "content": "Name a fruit."}]
SAMPLED = dict(model="any", max_tokens=12, temperature=1.0, seed=7, n=2)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def fresh(server, served_model) -> None:
    """Evaluate the next prompt from scratch and alone: a prompt found in the prefix cache
    is continued from a one-token step, and a stream still running from an earlier test
    changes the batch; either changes rounding and so what a seeded sampler draws, so
    comparisons start from the same state."""
    server.wait_idle(timeout=120)
    served_model.clear_cache()


def _idle(server, served_model) -> dict[str, float]:
    m = server.wait_idle()
    assert served_model.kv_positions() == [-1] * served_model.n_parallel
    return m


def _by_index(choices) -> list:
    assert [c.index for c in choices] == list(range(len(choices)))
    return list(choices)


def _streamed(chunks, n: int, text) -> tuple[list[str], list[str]]:
    """Texts and finish reasons per choice; each choice has one final chunk, its last."""
    texts, finals = [""] * n, [None] * n
    for chunk in chunks:
        assert len(chunk.choices) <= 1
        for choice in chunk.choices:
            assert 0 <= choice.index < n and finals[choice.index] is None  # nothing after its final chunk
            texts[choice.index] += text(choice) or ""
            finals[choice.index] = choice.finish_reason
    assert all(f in ("length", "stop") for f in finals), finals
    return texts, finals


def test_completions_n_non_streaming(server, served_model, client):
    before = server.metrics()
    fresh(server, served_model)
    r = client.completions.create(prompt=PROMPT, logprobs=1, **SAMPLED)
    choices = _by_index(r.choices)
    assert len(choices) == 2 and choices[0].text != choices[1].text  # seeds 7 and 8
    for choice in choices:
        assert choice.finish_reason in ("length", "stop")
        assert "".join(choice.logprobs.tokens) == choice.text
    counts = [len(c.logprobs.tokens) for c in choices]
    assert r.usage.prompt_tokens == PROMPT_TOKENS  # the shared prompt counts once
    assert r.usage.completion_tokens == sum(counts)
    assert r.usage.total_tokens == PROMPT_TOKENS + sum(counts)
    after = _idle(server, served_model)
    assert after["mullama_prompt_tokens_total"] - before["mullama_prompt_tokens_total"] == PROMPT_TOKENS
    assert after["mullama_generated_tokens_total"] - before["mullama_generated_tokens_total"] == sum(counts)
    key = 'mullama_streams_total{endpoint="completions",finish_reason="length"}'
    assert after.get(key, 0) - before.get(key, 0) == sum(1 for c in choices if c.finish_reason == "length")
    # the same seed gives the same choices, streamed or not
    fresh(server, served_model)
    again = client.completions.create(prompt=PROMPT, **SAMPLED)
    assert [c.text for c in again.choices] == [c.text for c in choices]


def test_completions_n_streaming(server, served_model, client):
    fresh(server, served_model)
    whole = client.completions.create(prompt=PROMPT, echo=True, **SAMPLED)
    fresh(server, served_model)
    chunks = list(client.completions.create(prompt=PROMPT, echo=True, stream=True,
                                            stream_options={"include_usage": True}, **SAMPLED))
    *body, last = chunks
    texts, finals = _streamed(body, 2, lambda c: c.text)
    assert texts == [c.text for c in whole.choices] and texts[0] != texts[1]
    assert all(t.startswith(PROMPT) for t in texts)  # echo opens every choice
    assert finals == [c.finish_reason for c in whole.choices]
    assert last.choices == [] and last.usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == \
        whole.usage.model_dump(include={"prompt_tokens", "completion_tokens"})
    assert sum(1 for c in chunks if c.usage) == 1
    _idle(server, served_model)


def test_chat_n_non_streaming(server, served_model, client):
    r = client.chat.completions.create(messages=MESSAGES, logprobs=True, **SAMPLED)
    choices = _by_index(r.choices)
    assert len(choices) == 2 and choices[0].message.content != choices[1].message.content
    counts = []
    for choice in choices:
        assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
        counts.append(len(choice.logprobs.content))
    prompt = served_model.model.apply_chat_template(MESSAGES)
    assert r.usage.prompt_tokens == len(served_model.model.tokenize(prompt, parse_special=True))
    assert r.usage.completion_tokens == sum(counts)
    _idle(server, served_model)


def test_chat_n_streaming(server, served_model, client):
    fresh(server, served_model)
    whole = client.chat.completions.create(messages=MESSAGES, **SAMPLED)
    fresh(server, served_model)
    chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **SAMPLED))
    *body, last = chunks
    openings = [c.choices[0].index for c in body if c.choices[0].delta.role == "assistant"]
    assert openings == [0, 1]
    texts, finals = _streamed(body, 2, lambda c: c.delta.content)
    assert texts == [c.message.content for c in whole.choices] and texts[0] != texts[1]
    assert finals == [c.finish_reason for c in whole.choices]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    _idle(server, served_model)


@pytest.mark.parametrize("n", [0, 5, 1000])
def test_n_outside_the_slots_is_a_400_naming_n(server, client, n):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="any", prompt=PROMPT, max_tokens=2, n=n)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=2, n=n, stream=True)
    assert info.value.body["param"] == "n" and info.value.body["type"] == "invalid_request_error"
    if n > 4:
        assert "at most 4" in info.value.body["message"]


def test_n_on_a_model_without_batching_is_a_400(model_path):
    model = mullama.AsyncModel(mullama.Model.load(model_path), n_ctx=128, n_parallel=2, batching=False)
    server = LiveServer(model, ServerSettings(port=0))
    try:
        status, body = server.json("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "n": 2})
        assert status == 400 and body["error"]["param"] == "n"
        status, body = server.json("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "n": 1})
        assert status == 200 and body["usage"]["completion_tokens"] == 2
    finally:
        server.close()
        model.close()


def _post(port: int, path: str, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_client_disconnect_cancels_every_choice(server, served_model, stream):
    before = server.metrics()
    sock = _post(server.port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1000, "temperature": 1.0,
                                                   "seed": 3, "n": 3, "stream": stream})
    if stream:
        events = read_events(sock, 8)
        assert {e["choices"][0]["index"] for e in events} == {0, 1, 2}
    deadline = time.monotonic() + 60
    while server.metrics()["mullama_generated_tokens_total"] - before["mullama_generated_tokens_total"] < 9:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert server.metrics()["mullama_active_streams"] == 3
    sock.close()
    after = _idle(server, served_model)
    key = 'mullama_streams_total{endpoint="completions",finish_reason="cancelled"}'
    assert after[key] == before.get(key, 0) + 3
    assert after["mullama_generated_tokens_total"] - before["mullama_generated_tokens_total"] < 3 * 300


def test_metrics_health_and_models_show_the_prefix_cache(server, served_model, client):
    status, health = server.json("GET", "/health")
    assert status == 200 and health["prefix_cache"] is True
    assert client.models.list().data[0].meta["prefix_cache"] is True
    _, _, raw = server.request("GET", "/metrics")
    text = raw.decode()
    for name in ("mullama_prefix_cache_hits", "mullama_prefix_cache_reused_tokens", "mullama_prefix_cache_tokens"):
        assert f"# TYPE {name} gauge" in text
    assert "# HELP mullama_slots_in_use Slots whose KV cells a running stream holds" in text

    shared = "A lighthouse keeper wrote in her log every night: the sea, the wind, the ships. " * 6
    before = server.metrics()
    for question in ("What did she see first?", "What did she hear last?"):
        client.completions.create(model="any", prompt=shared + question, max_tokens=2, temperature=0)
    after = _idle(server, served_model)
    assert after["mullama_prefix_cache_hits"] >= before["mullama_prefix_cache_hits"] + 1
    n_shared = len(served_model.model.tokenize(shared))
    reused = after["mullama_prefix_cache_reused_tokens"] - before["mullama_prefix_cache_reused_tokens"]
    assert reused >= n_shared - 2, (reused, n_shared)
    assert after["mullama_prefix_cache_tokens"] >= n_shared
    assert after["mullama_prefix_cache_tokens"] == sum(served_model.prefix_cache_stats()["cached_tokens"])
