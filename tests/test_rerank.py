"""Model.rerank / embed(pooling="rank") / AsyncModel.rerank / POST /v1/rerank.

The model is a tiny BERT cross-encoder written by ``gguf_factory`` (2 layers,
a dense + tanh classifier and a projection head). Its scores are checked
against an independent float64 numpy forward pass over the same weights; the
largest difference measured is 0.014 on scores spread over about 15 units
(ggml's GELU table and float32 sums), so 0.05 is the tolerance, while a wrong
pair layout, pooling or head moves scores by several units.
"""

from __future__ import annotations

import numpy as np
import pytest

import mullama
from gguf_factory import RERANK_WORDS, reranker_tensors, tiny_reranker_bytes
from mullama.rerank import pair_tokens

TOL = 0.05
QUERY = "where is the cat"
DOCS = ["the cat sat on the mat", "the sun is hot", "a dog ran in the park",
        "the lighthouse keeper wrote in his log", "cat", "the sea is cold and the ship is in the wind"]


# ---------------------------------------------------------------- an independent forward pass

def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def bert_head(t: dict[str, np.ndarray], ids: np.ndarray, n_head: int = 4, n_layer: int = 2) -> np.ndarray:
    """The classifier outputs of a BERT sequence classifier on ``ids``: embeddings (token,
    type 0, position), post-norm encoder layers, the first token through cls (tanh) and
    cls.output."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    n = len(ids)
    x = t["token_embd.weight"][ids] + t["token_types.weight"][0] + t["position_embd.weight"][:n]
    x = _layer_norm(x, t["token_embd_norm.weight"], t["token_embd_norm.bias"])
    d = x.shape[1] // n_head
    for i in range(n_layer):
        def lin(h: np.ndarray, name: str, p: str = f"blk.{i}.") -> np.ndarray:
            return h @ t[p + name + ".weight"].T + t[p + name + ".bias"]

        q, k, v = (lin(x, m).reshape(n, n_head, d).transpose(1, 0, 2) for m in ("attn_q", "attn_k", "attn_v"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, -1)
        x = _layer_norm(lin(a, "attn_output") + x, t[f"blk.{i}.attn_output_norm.weight"],
                        t[f"blk.{i}.attn_output_norm.bias"])
        x = _layer_norm(lin(_gelu(lin(x, "ffn_up")), "ffn_down") + x, t[f"blk.{i}.layer_output_norm.weight"],
                        t[f"blk.{i}.layer_output_norm.bias"])
    h = np.tanh(t["cls.weight"] @ x[0] + t["cls.bias"])
    return t["cls.output.weight"] @ h + t["cls.output.bias"]


# ---------------------------------------------------------------- fixtures

def _load(tmp_path_factory: pytest.TempPathFactory, name: str, data: bytes) -> mullama.Model:
    path = tmp_path_factory.mktemp("rerank") / name
    path.write_bytes(data)
    return mullama.Model.load(str(path))


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    m = _load(tmp_path_factory, "reranker.gguf", tiny_reranker_bytes())
    yield m
    m.close()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """The same BERT without a classifier head."""
    m = _load(tmp_path_factory, "bert.gguf", tiny_reranker_bytes(head=False))
    yield m
    m.close()


# ---------------------------------------------------------------- library

def test_pair_layout(reranker):
    """[CLS] query [SEP] document: what a WordPiece vocabulary adds (BOS and SEP, no EOS)."""
    q, d = reranker.tokenize("the cat", add_special=False), reranker.tokenize("a dog", add_special=False)
    assert pair_tokens(reranker, "the cat", "a dog").tolist() == [2, *q, 3, *d]


def test_scores_match_numpy(reranker):
    rng = np.random.default_rng(1)
    docs = DOCS + [" ".join(rng.choice(RERANK_WORDS, int(rng.integers(1, 40)))) for _ in range(20)]
    got = reranker.rerank(QUERY, docs)
    assert got.shape == (len(docs),) and got.dtype == np.float32
    t = reranker_tensors()
    want = np.array([bert_head(t, pair_tokens(reranker, QUERY, d))[0] for d in docs])
    assert want.std() > 1.0  # the scores differ enough for the tolerance to mean something
    np.testing.assert_allclose(got, want, atol=TOL)
    assert np.argsort(-got)[:3].tolist() == np.argsort(-want)[:3].tolist()


def test_rank_pooling_is_the_head(reranker):
    ids = [pair_tokens(reranker, QUERY, d) for d in DOCS]
    raw = reranker.embed(ids, pooling="rank")
    assert raw.shape == (len(DOCS), 1)
    np.testing.assert_allclose(raw[:, 0], reranker.rerank(QUERY, DOCS), atol=1e-6)
    # one pair at a time: the same scores as all pairs sharing a decode, up to the rounding
    # of another batch shape (measured 0.017)
    alone = np.array([reranker.rerank(QUERY, d)[0] for d in DOCS])
    np.testing.assert_allclose(alone, raw[:, 0], atol=TOL)
    with pytest.raises(ValueError, match="not normalized"):
        reranker.embed(ids, pooling="rank", normalize=True)


def test_several_labels(tmp_path_factory):
    """A head with 3 outputs: rank pooling gives all of them; rerank the first."""
    m = _load(tmp_path_factory, "labels.gguf", tiny_reranker_bytes(n_labels=3))
    try:
        ids = [pair_tokens(m, QUERY, d) for d in DOCS[:3]]
        got = m.embed(ids, pooling="rank")
        t = reranker_tensors(n_labels=3)
        want = np.stack([bert_head(t, i) for i in ids])
        assert got.shape == (3, 3)
        np.testing.assert_allclose(got, want, atol=TOL)
        np.testing.assert_allclose(m.rerank(QUERY, DOCS[:3]), got[:, 0], atol=1e-6)
    finally:
        m.close()


def test_no_classifier_head(encoder, model):
    for m in (encoder, model):
        with pytest.raises(mullama.UnsupportedModelError, match="no classifier head"):
            m.rerank(QUERY, DOCS)
        with pytest.raises(mullama.UnsupportedModelError):
            m.embed(["the cat"], pooling="rank", normalize=False)
    assert encoder.embed("the cat", pooling="cls").shape == (1, encoder.n_embd)


@pytest.mark.parametrize("query, docs, exc", [
    ("", DOCS, ValueError),
    (QUERY, [], ValueError),
    (QUERY, ["the cat", ""], ValueError),
    (QUERY, ["the cat", 5], TypeError),
    (5, DOCS, TypeError),
    (QUERY, 5, TypeError),
    (QUERY, ["the cat"] * 5000, ValueError),
    (QUERY, ["the cat " * 80], mullama.ContextOverflowError),
])
def test_bad_input(reranker, query, docs, exc):
    with pytest.raises(exc):
        reranker.rerank(query, docs)


@pytest.mark.anyio
async def test_async_rerank(reranker):
    am = mullama.AsyncModel(mullama.Model.load(reranker.path), n_ctx=128, n_parallel=1)
    try:
        got = await am.rerank(QUERY, DOCS)
        np.testing.assert_allclose(got, reranker.rerank(QUERY, DOCS), atol=1e-6)
    finally:
        am.close()


# ---------------------------------------------------------------- server

@pytest.fixture(scope="module")
def rerank_server(reranker):
    from live_server import LiveServer
    from mullama.server import ServerSettings

    am = mullama.AsyncModel(mullama.Model.load(reranker.path), n_ctx=128, n_parallel=1)  # owns its model
    s = LiveServer(am, ServerSettings(port=0, max_body_bytes=1 << 20))
    yield s
    s.close()
    am.close()


def test_server_rerank(rerank_server, reranker):
    scores = reranker.rerank(QUERY, DOCS)
    status, body = rerank_server.json("POST", "/v1/rerank", {"model": "r", "query": QUERY, "documents": DOCS})
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == "r"
    results = body["results"]
    assert [r["index"] for r in results] == np.argsort(-scores, kind="stable").tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in results], np.sort(scores)[::-1], atol=1e-6)
    assert all("document" not in r for r in results)
    n_tokens = sum(len(pair_tokens(reranker, QUERY, d)) for d in DOCS)
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}

    status, top = rerank_server.json("POST", "/rerank", {"query": QUERY, "documents": [{"text": d} for d in DOCS],
                                                         "top_n": 2, "return_documents": True})
    assert status == 200, top
    assert [r["index"] for r in top["results"]] == [r["index"] for r in results[:2]]
    assert [r["document"]["text"] for r in top["results"]] == [DOCS[r["index"]] for r in results[:2]]


@pytest.mark.parametrize("bad", [
    {"documents": DOCS},
    {"query": "", "documents": DOCS},
    {"query": 3, "documents": DOCS},
    {"query": QUERY},
    {"query": QUERY, "documents": []},
    {"query": QUERY, "documents": "the cat"},
    {"query": QUERY, "documents": ["the cat", ""]},
    {"query": QUERY, "documents": [{"txt": "the cat"}]},
    {"query": QUERY, "documents": DOCS, "top_n": 0},
    {"query": QUERY, "documents": DOCS, "top_n": True},
    {"query": QUERY, "documents": DOCS, "return_documents": "yes"},
    {"query": QUERY, "documents": ["the cat"] * 5000},
    {"query": QUERY, "documents": ["the cat " * 80]},
])
def test_server_bad_input(rerank_server, bad):
    status, body = rerank_server.json("POST", "/v1/rerank", bad)
    assert status == 400, (bad, body)
    assert body["error"]["type"] == "invalid_request_error"


def test_server_without_head(server):
    status, body = server.json("POST", "/v1/rerank", {"query": QUERY, "documents": DOCS})
    assert status == 400 and "no classifier head" in body["error"]["message"]
