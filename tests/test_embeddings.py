"""Model.embed / AsyncModel.embed / POST /v1/embeddings.

Two traps of llama.cpp's embeddings at the pinned commit are tested: mean
pooling of a text longer than the micro-batch pools each micro-batch on its
own (measured cosine 0.94 against the right vector), and texts of different
lengths in one decode of a context with a KV stream per sequence pool wrongly
(0.990). Vectors of one text embedded alone and among others of other lengths
agree to the rounding of different batch shapes (measured cosine >= 0.9988).
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import openai
import pytest

import mullama

TEXT = (Path(__file__).parent / "data" / "scoring_text.txt").read_text(encoding="utf-8")
TEXTS = ["The lighthouse on the northern cape.", "A cat refused to climb the stairs.",
         "The keeper wrote in his logbook every night: the wind, the state of the sea, the ships he saw "
         "and the birds that struck the glass."]


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_shapes_and_norms(model):
    for pooling in ("mean", "last", "cls"):
        vecs = model.embed(TEXTS, pooling=pooling)
        assert vecs.shape == (3, model.n_embd) and vecs.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    raw = model.embed(TEXTS[0], normalize=False)
    assert raw.shape == (1, model.n_embd) and abs(np.linalg.norm(raw) - 1) > 1e-3
    tokens = model.embed(TEXTS[:2], pooling=None, normalize=False)
    assert [t.shape for t in tokens] == [(len(model.tokenize(t)), model.n_embd) for t in TEXTS[:2]]
    ids = model.tokenize(TEXTS[1])
    assert cos(model.embed([ids])[0], model.embed(TEXTS[1])[0]) > 0.99999
    # different texts are different, similar ones closer than unrelated ones
    a, b, c = model.embed(["The cat sat on the mat.", "A cat was sitting on the mat.", "Stock markets fell sharply."])
    assert cos(a, b) > cos(a, c)


def test_long_text_is_pooled_whole(model):
    """Trap 1: a text longer than llama.cpp's default micro-batch (512) is mean-pooled over
    all its tokens, not per micro-batch."""
    long_text = TEXT + " " + TEXT[:2000]
    n = len(model.tokenize(long_text))
    assert n > 600
    pooled = model.embed(long_text, pooling="mean", normalize=False)[0]
    per_token = model.embed([long_text], pooling=None, normalize=False)[0]
    assert per_token.shape[0] == n
    assert cos(pooled, per_token.mean(axis=0)) > 0.9999


def test_mixed_lengths_in_one_decode(model):
    """Trap 2: texts of different lengths embedded together are each pooled over their own
    tokens (the per-token vectors of the same batch), and agree with each text embedded
    alone up to the rounding of a different batch shape (measured cosine >= 0.9988 for a
    three-token text beside a 200-token one; the trap gave 0.990)."""
    texts = [TEXTS[2], "Short.", TEXT[:900], TEXTS[0]]
    per_token = model.embed(texts, pooling=None, normalize=False)
    together = model.embed(texts, pooling="mean", normalize=False)
    assert cos(together, np.stack([t.mean(axis=0) for t in per_token])).min() > 0.99999
    last = model.embed(texts, pooling="last", normalize=False)
    assert cos(last, np.stack([t[-1] for t in per_token])).min() > 0.99999
    first = model.embed(texts, pooling="cls", normalize=False)
    assert cos(first, np.stack([t[0] for t in per_token])).min() > 0.99999
    alone = np.stack([model.embed(t, pooling="mean", normalize=False)[0] for t in texts])
    assert cos(together, alone).min() > 0.995


@pytest.mark.parametrize("bad, exc", [
    ([], ValueError),
    ([""], ValueError),
    (["fine", []], ValueError),
    ([[1, 10**9]], mullama.TokenIdError),
    (["x"] * 5000, ValueError),
    (5, TypeError),
])
def test_bad_input(model, bad, exc):
    with pytest.raises(exc):
        model.embed(bad)


def test_bad_pooling(model):
    with pytest.raises(ValueError, match="pooling"):
        model.embed("text", pooling="max")


@pytest.mark.anyio
async def test_async_embed(async_model, model):
    got = await async_model.embed(TEXTS)
    assert cos(got, model.embed(TEXTS)).min() > 0.9999


@pytest.mark.timeout(300)
def test_openai_embeddings(server, model):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        out = client.embeddings.create(model="mullama", input=TEXTS, encoding_format="float")
        assert [d.index for d in out.data] == [0, 1, 2]
        vecs = np.asarray([d.embedding for d in out.data], dtype=np.float32)
        assert vecs.shape == (3, model.n_embd)
        assert cos(vecs, model.embed(TEXTS)).min() > 0.9999
        assert out.usage.prompt_tokens == sum(len(model.tokenize(t)) for t in TEXTS)
        one = client.embeddings.create(model="mullama", input=model.tokenize(TEXTS[0]))
        assert cos(np.asarray(one.data[0].embedding), vecs[0]) > 0.9999
    status, body = server.json("POST", "/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"})
    assert status == 200
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert cos(decoded, vecs[0]) > 0.9999
    for bad in ({"input": []}, {"input": [""]}, {"input": "x", "dimensions": 3}, {"input": "x", "encoding_format": "hex"},
                {"input": [[1, 10**9]]}, {"input": ["x"] * 5000}):
        status, err = server.json("POST", "/v1/embeddings", bad)
        assert status == 400, (bad, err)
