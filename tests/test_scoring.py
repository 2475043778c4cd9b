"""Scoring given text: Context.score / loglikelihood / perplexity and the AsyncModel batch forms.

Tolerances: llama.cpp's CPU kernels round differently for different batch
shapes (one token per decode against a whole prompt per decode), which moved
the log-probabilities of the default model by up to 0.25 nats here. Where two
paths have the same shapes, they agree to float32 rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import anyio
import numpy as np
import pytest

import mullama
from mullama.scoring import MAX_SCORE_BATCH, MAX_SCORE_TOP

TEXT = (Path(__file__).parent / "data" / "scoring_text.txt").read_text(encoding="utf-8")
SHORT = "The keeper wrote in his logbook every night: the wind, the state of the sea."
# llama-perplexity at the pinned llama.cpp on this text: -c 128 -b 128 -t 2 printed
# "Final estimate: PPL = 34.5908 +/- 5.65197"
LLAMA_PERPLEXITY_128 = 34.5908
SHAPE_TOL = 0.6       # nats: measured 0.25 between batch shapes, doubled and rounded up
SAME_SHAPE_TOL = 1e-4


@pytest.fixture(scope="module")
def ctx1(model):
    """A context that decodes one token per step: the shapes of a generation."""
    c = mullama.Context(model, n_ctx=512, n_batch=1)
    yield c
    c.close()


def test_score_arrays(ctx, model):
    res = ctx.score(SHORT, top_logprobs=3)
    ids = model.tokenize(SHORT, add_special=True, parse_special=True)
    assert res.tokens.tolist() == ids and len(res) == len(ids) and res.first == 1
    assert math.isnan(res.logprobs[0]) and res.argmax[0] == -1 and (res.top_ids[0] == -1).all()
    lp = res.logprobs[1:]
    assert np.isfinite(lp).all() and (lp <= 0).all()
    assert res.top_ids.shape == (len(ids), 3) and res.top_logprobs.dtype == np.float32
    top = res.top_logprobs[1:]
    assert (np.diff(top, axis=1) <= 0).all(), "alternatives come best first"
    assert (res.top_ids[1:, 0] == res.argmax[1:]).all()
    assert (lp <= top[:, 0] + 1e-6).all()
    greedy = res.greedy[1:]
    assert greedy.any() and not greedy.all()
    # a greedy token's log-probability is its row's best alternative, to float32 rounding
    np.testing.assert_allclose(lp[greedy], top[greedy, 0], atol=1e-6)
    assert res.total_logprob == pytest.approx(float(lp.sum()))
    assert res.perplexity == pytest.approx(math.exp(-lp.mean()))
    assert np.exp(top).sum(axis=1).max() <= 1.0 + 1e-5


def test_score_ids_as_given(ctx, model):
    ids = model.tokenize(SHORT, add_special=False)
    res = ctx.score(ids)
    assert res.tokens.tolist() == ids and math.isnan(res.logprobs[0])
    assert res.top_ids.shape == (len(ids), 0)
    one = ctx.score(ids[:1])
    assert one.n_scored == 0 and math.isnan(one.perplexity)


def test_teacher_forced_same_shapes(ctx1, model, greedy):
    """Scoring a greedy generation's tokens gives back the log-probabilities reported while
    generating them, and every one of them is the argmax."""
    prompt = np.asarray(model.tokenize(SHORT, add_special=True), dtype=np.int32)
    toks = list(ctx1.stream_tokens(prompt, max_tokens=12, params=greedy, logprobs=True))
    gen = np.asarray([t.token_id for t in toks if not model.is_eog(t.token_id)], dtype=np.int32)
    res = ctx1.score(np.concatenate([prompt, gen]))
    tail = res.logprobs[prompt.size:]
    np.testing.assert_allclose(tail, [t.logprob for t in toks[:gen.size]], atol=SAME_SHAPE_TOL)
    assert res.greedy[prompt.size:].all()


def test_teacher_forced_batched(ctx, ctx1, model):
    """The whole-prompt evaluation agrees with the one-token-per-step one within the
    rounding of different batch shapes."""
    a = ctx.score(SHORT).logprobs[1:]
    b = ctx1.score(SHORT).logprobs[1:]
    assert np.abs(a - b).max() < SHAPE_TOL
    assert np.abs(a - b).mean() < SHAPE_TOL / 4


def test_loglikelihood(ctx, ctx1, model, greedy):
    context, continuation = "The sea climbed over the harbour", " wall and the lamp shook"
    total, is_greedy = ctx.loglikelihood(context, continuation)
    whole = ctx.score(context + continuation)
    n_ctx_tokens = len(model.tokenize(context, add_special=True, parse_special=True))
    assert total == pytest.approx(float(whole.logprobs[n_ctx_tokens:].sum()), abs=1e-9)
    assert total < 0 and is_greedy == bool(whole.greedy[n_ctx_tokens:].all())
    # whitespace ending the context belongs to the continuation, as harnesses tokenize it
    assert ctx.loglikelihood(context + " ", continuation[1:]) == pytest.approx((total, is_greedy))
    # a greedy continuation is greedy; the same tokens with one changed are not
    prompt = model.tokenize(context, add_special=True)
    gen = [t.token_id for t in ctx1.stream_tokens(prompt, max_tokens=4, params=greedy)]
    lp, is_greedy = ctx1.loglikelihood(prompt, gen)
    assert is_greedy and lp > -20
    changed = gen[:-1] + [(gen[-1] + 1) % model.n_vocab]
    lp2, is_greedy2 = ctx1.loglikelihood(prompt, changed)
    assert not is_greedy2 and lp2 < lp


def test_perplexity_method(model):
    """llama-perplexity's method: whole chunks with BOS first, the second half scored."""
    n = 128
    with mullama.Context(model, n_ctx=256) as c:
        res = c.perplexity(TEXT, n_ctx=n)
        ids = np.asarray(model.tokenize(TEXT, add_special=True), dtype=np.int32)
        assert res.n_chunks == ids.size // n and res.n_ctx == n
        assert res.n_tokens == res.n_chunks * (n - n // 2 - 1)
        nll = []
        for k in range(res.n_chunks):
            chunk = ids[k * n:(k + 1) * n].copy()
            chunk[0] = model.bos_token_id
            nll.extend(-c.score(chunk).logprobs[n // 2 + 1:])
    assert res.perplexity == pytest.approx(math.exp(np.mean(nll)), rel=1e-3)
    assert res.nll == pytest.approx(math.log(res.perplexity))
    assert 1 < res.perplexity < 200 and res.stderr > 0
    assert res.chunk_perplexities[-1] == pytest.approx(res.perplexity)
    # the figure llama-perplexity gives for the same text and n_ctx (measured 34.5901 here)
    assert res.perplexity == pytest.approx(LLAMA_PERPLEXITY_128, rel=2e-3)
    assert res.stderr == pytest.approx(5.65197, rel=0.01)


@pytest.mark.parametrize("bad, exc", [
    ("", ValueError),
    ([], ValueError),
    ([1, 2, 10**9], mullama.TokenIdError),
    ([1, -1], ValueError),
    ("word " * 2000, mullama.ContextOverflowError),
])
def test_score_bad_input(ctx, bad, exc):
    with pytest.raises(exc):
        ctx.score(bad)


def test_bad_arguments(ctx):
    for top in (-1, MAX_SCORE_TOP + 1):
        with pytest.raises(ValueError, match="top_logprobs"):
            ctx.score(SHORT, top_logprobs=top)
    with pytest.raises(TypeError):
        ctx.score(SHORT, top_logprobs=1.5)
    with pytest.raises(ValueError, match="continuation"):
        ctx.loglikelihood("context", "")
    with pytest.raises(ValueError, match="context"):
        ctx.loglikelihood([], [5])
    with pytest.raises(TypeError):
        ctx.loglikelihood("text", [5])
    with pytest.raises(ValueError, match="needs at least"):
        ctx.perplexity(SHORT, n_ctx=64)
    with pytest.raises(ValueError, match="larger than this context"):
        ctx.perplexity(TEXT, n_ctx=4096)
    # the context still works afterwards
    assert ctx.score(SHORT).n_scored > 0


# ---------------------------------------------------------------- AsyncModel



@pytest.mark.anyio
async def test_async_score_batch(async_model, model):
    texts = [SHORT, "A trawler caught in fog found its way home.", model.tokenize("Years passed.")]
    results = await async_model.score(texts, top_logprobs=2)
    assert len(results) == 3
    with mullama.Context(model, n_ctx=512) as c:
        for text, res in zip(texts, results):
            ref = c.score(text, top_logprobs=2)
            assert res.tokens.tolist() == ref.tokens.tolist()
            assert np.nanmax(np.abs(res.logprobs - ref.logprobs)) < SHAPE_TOL
    single = await async_model.score(SHORT)
    assert isinstance(single, mullama.ScoreResult) and single.n_scored == len(single) - 1


@pytest.mark.anyio
async def test_async_loglikelihood(async_model, model):
    context = "The keeper grew old, and a young woman from the town came to"
    pairs = [(context, " learn the work."), (context, " sell fish."), (context, " paint the railing.")]
    got = await async_model.loglikelihood(pairs)
    with mullama.Context(model, n_ctx=512) as c:
        ref = [c.loglikelihood(a, b) for a, b in pairs]
    for (lp, g), (rlp, rg) in zip(got, ref):
        assert lp == pytest.approx(rlp, abs=SHAPE_TOL)
    assert all(isinstance(g, bool) for _, g in got)


@pytest.mark.anyio
async def test_async_perplexity(async_model, model):
    res = await async_model.perplexity(TEXT, n_ctx=128)
    assert res.n_chunks == 5 and res.n_tokens == 5 * 63
    # chunks share decodes here: batch shapes differ from llama-perplexity's
    assert res.perplexity == pytest.approx(LLAMA_PERPLEXITY_128, rel=0.02)


@pytest.mark.anyio
async def test_async_score_cancel(async_model):
    """Cancelling a long batch stops its requests; the model is idle afterwards and usable."""
    texts = [TEXT[: 300 + 40 * i] for i in range(24)]
    with anyio.CancelScope() as scope:
        async def cancel_soon() -> None:
            while async_model.n_decode_calls == start:
                await anyio.sleep(0.001)
            scope.cancel()

        start = async_model.n_decode_calls
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_soon)
            await async_model.score(texts)
    assert scope.cancelled_caught
    with anyio.fail_after(30):
        while async_model.active_streams or any(p >= 0 for p in async_model.kv_positions()):
            await anyio.sleep(0.01)
    assert (await async_model.score(SHORT)).n_scored > 0


@pytest.mark.anyio
async def test_async_bad_input(async_model):
    with pytest.raises(ValueError, match="at most"):
        await async_model.score(["x"] * (MAX_SCORE_BATCH + 1))
    with pytest.raises(ValueError, match="empty"):
        await async_model.score([])
    with pytest.raises(ValueError):
        await async_model.score([SHORT, ""])
    with pytest.raises(mullama.TokenIdError):
        await async_model.score([[1, 2], [3, 10**7]])
    with pytest.raises(ValueError, match="top_logprobs"):
        await async_model.score(SHORT, top_logprobs=MAX_SCORE_TOP + 1)
    with pytest.raises(TypeError):
        await async_model.loglikelihood([("a", "b", "c")])
    with pytest.raises(ValueError, match="at most"):
        await async_model.loglikelihood([("a", " b")] * 10_000)
