"""Scoring over HTTP: /v1/completions with echo and prompt batches, and the tokenizer endpoints.

The server's engine evaluates a prompt alone in a decode of the same shape as
a Context does, but its context holds several sequences; scores agree within
SHAPE_TOL (see tests/test_scoring.py).
"""

from __future__ import annotations

import math

import numpy as np
import openai
import pytest

import mullama

SHAPE_TOL = 0.6
PROMPT = "The keeper wrote in his logbook every night: the wind and the sea."

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def ref(model):
    c = mullama.Context(model, n_ctx=512)
    yield c
    c.close()


def test_echo_scores_only(client, model, ref):
    out = client.completions.create(model="mullama", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    (choice,) = out.choices
    assert choice.text == PROMPT and choice.index == 0 and choice.finish_reason == "length"
    lp = choice.logprobs
    want = ref.score(PROMPT, top_logprobs=2)
    assert len(lp.tokens) == len(want) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = np.asarray(lp.token_logprobs[1:], dtype=np.float64)
    assert np.abs(got - want.logprobs[1:]).max() < SHAPE_TOL
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    # a token that is its row's argmax has exactly its row's best log-probability
    pairs = list(zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
    assert all(tok <= max(top.values()) + 1e-6 for tok, top in pairs)
    # a token that is its row's argmax has exactly its row's best log-probability (what
    # lm-evaluation-harness's is_greedy compares)
    counting = client.completions.create(model="mullama", prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12",
                                         echo=True, logprobs=1, max_tokens=0).choices[0].logprobs
    pairs = list(zip(counting.token_logprobs[1:], counting.top_logprobs[1:]))
    assert sum(tok == max(top.values()) for tok, top in pairs) >= len(pairs) // 2
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(PROMPT)
    assert out.usage.prompt_tokens == len(want) and out.usage.completion_tokens == 0


def test_token_id_batch_like_an_evaluation_harness(client, model, ref):
    """lm-evaluation-harness's request: token-id prompts, echo, logprobs=1, max_tokens=1; it sums
    token_logprobs[ctxlen:-1] and calls a token greedy when it equals the top alternative."""
    ctx_ids = model.tokenize("The keeper grew old, and a young woman came to", add_special=False)
    conts = [model.tokenize(" learn the work", add_special=False), model.tokenize(" sell fish", add_special=False)]
    prompts = [ctx_ids + c for c in conts]
    out = client.completions.create(model="mullama", prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                    temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for choice, cont, prompt in zip(sorted(out.choices, key=lambda c: c.index), conts, prompts):
        lps = choice.logprobs.token_logprobs
        assert len(lps) == len(prompt) + 1 and lps[0] is None
        total = sum(lps[len(ctx_ids):-1])
        greedy = all(t == max(top.values()) for t, top in
                     zip(lps[len(ctx_ids):-1], choice.logprobs.top_logprobs[len(ctx_ids):-1]))
        want, want_greedy = ref.loglikelihood(ctx_ids, cont)
        assert total == pytest.approx(want, abs=SHAPE_TOL)
        assert isinstance(greedy, bool)
        assert choice.text.startswith(model.detokenize(prompt))


def test_string_batch_with_n(client):
    out = client.completions.create(model="mullama", prompt=["Once upon a time", "The lighthouse"], n=2,
                                    max_tokens=3, temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_index = {c.index: c for c in out.choices}
    # greedy: both choices of one prompt are the same text
    assert by_index[0].text == by_index[1].text and by_index[2].text == by_index[3].text
    assert out.usage.completion_tokens == 12


def test_echo_with_generation(client, model):
    out = client.completions.create(model="mullama", prompt=PROMPT, echo=True, logprobs=0, max_tokens=4,
                                    temperature=0)
    (choice,) = out.choices
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    n_prompt = len(model.tokenize(PROMPT))
    assert len(choice.logprobs.tokens) == n_prompt + out.usage.completion_tokens
    assert all(v is not None and v <= 0 for v in choice.logprobs.token_logprobs[1:])
    assert choice.logprobs.text_offset[n_prompt] == len(PROMPT)


def test_streamed_echo(client, model):
    """A streamed echo: the first chunk is the prompt with its legacy logprobs, the next ones
    the generated tokens, each with its own entry; together they equal the non-streamed answer."""
    kw = dict(model="mullama", prompt=PROMPT, echo=True, logprobs=2, max_tokens=5, temperature=0)
    chunks = list(client.completions.create(stream=True, **kw))
    whole = client.completions.create(**kw).choices[0]
    first = chunks[0].choices[0]
    n_prompt = len(model.tokenize(PROMPT))
    assert first.text == PROMPT and len(first.logprobs.tokens) == n_prompt
    assert first.logprobs.token_logprobs[0] is None and first.logprobs.top_logprobs[0] is None
    assert first.logprobs.token_logprobs[1:] == whole.logprobs.token_logprobs[1:n_prompt]
    generated = [c.choices[0] for c in chunks[1:] if c.choices and c.choices[0].logprobs]
    assert all(len(g.logprobs.tokens) == 1 for g in generated)
    tokens = first.logprobs.tokens + [t for g in generated for t in g.logprobs.tokens]
    offsets = first.logprobs.text_offset + [o for g in generated for o in g.logprobs.text_offset]
    values = first.logprobs.token_logprobs + [v for g in generated for v in g.logprobs.token_logprobs]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    np.testing.assert_allclose(values[n_prompt:], whole.logprobs.token_logprobs[n_prompt:], atol=1e-4)
    assert offsets[n_prompt] == len(PROMPT)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # without logprobs the first chunk is the bare prompt
    plain = list(client.completions.create(stream=True, **{**kw, "logprobs": None}))
    assert plain[0].choices[0].text == PROMPT and plain[0].choices[0].logprobs is None


def test_tokenizer_endpoints(server, model):
    status, body = server.json("POST", "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert status == 200 and body["tokens"] == model.tokenize(PROMPT, add_special=False)
    status, with_bos = server.json("POST", "/tokenize", {"content": PROMPT})
    assert status == 200 and with_bos["tokens"] == [model.bos_token_id] + body["tokens"]
    status, text = server.json("POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and text["prompt"] == PROMPT
    status, info = server.json("GET", "/tokenizer_info")
    assert status == 200 and info["eos_token"] and info["bos_token"]
    # a remote tokenizer finds the special tokens' ids by tokenizing their text
    status, eos = server.json("POST", "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos["tokens"] == [model.eos_token_id]
    assert info["model_max_length"] == 512 and "chat_template" in info


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": ["x"] * 10_000, "max_tokens": 1}, "at most"),
    ({"prompt": [[1, 2], [3, 10**9]], "echo": True, "max_tokens": 0}, "outside the vocabulary"),
    ({"prompt": ["fine", ""], "max_tokens": 1}, "must not be empty"),
    ({"prompt": [[]], "max_tokens": 1}, "empty"),
    ({"prompt": "x", "echo": True, "logprobs": 6, "max_tokens": 0}, "logprobs"),
    ({"prompt": ["a", "b"], "stream": True}, "one prompt"),
    ({"prompt": "word " * 600, "echo": True, "logprobs": 1, "max_tokens": 0}, "context"),
    ({"prompt": [1.5, 2]}, "prompt"),
])
def test_bad_scoring_requests(server, body, fragment):
    status, err = server.json("POST", "/v1/completions", body)
    assert status == 400, err
    assert fragment in err["error"]["message"]


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {}),
    ("/tokenize", {"prompt": 5}),
    ("/detokenize", {"tokens": "abc"}),
    ("/detokenize", {"tokens": [-1]}),
])
def test_bad_tokenizer_requests(server, path, body):
    status, err = server.json("POST", path, body)
    assert status == 400 and err["error"]["message"]


def test_server_idle_after_scoring(server):
    server.wait_idle()
    m = server.metrics()
    assert not math.isnan(m["mullama_decode_calls"])
