"""Generation through the public sync API on the real default model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import mullama
from mullama import Context, SamplerParams

PROMPT = "The capital of France is"


def test_every_path_gives_the_same_text(ctx, model, greedy):
    text = ctx.generate(PROMPT, max_tokens=24, params=greedy)
    pieces = list(ctx.generate_stream(PROMPT, max_tokens=24, params=greedy))
    tokens = list(ctx.stream_tokens(PROMPT, max_tokens=24, params=greedy))
    assert text and "".join(pieces) == text
    assert "".join(t.text for t in tokens) == text
    assert model.detokenize([t.token_id for t in tokens]) == text
    assert len(tokens) == 24
    assert [t.is_final for t in tokens] == [False] * 23 + [True]
    assert [t.index for t in tokens] == list(range(24))


def test_same_output_on_a_fresh_context(model, ctx, greedy):
    ctx.generate("Once upon a time, in a land far away,", max_tokens=16, params=greedy)
    reused = ctx.generate(PROMPT, max_tokens=24, params=greedy)
    with Context(model, n_ctx=1024) as fresh:
        assert fresh.generate(PROMPT, max_tokens=24, params=greedy) == reused
    ctx.clear_cache()
    assert ctx.n_cached == 0
    assert ctx.generate(PROMPT, max_tokens=24, params=greedy) == reused


def test_prefix_reuse_skips_cached_tokens(model, greedy):
    with Context(model, n_ctx=512, reuse_prefix=True) as c:
        first = c.generate(PROMPT, max_tokens=8, params=greedy)
        calls = c.n_decode_calls
        c.generate(PROMPT + first, max_tokens=1, params=greedy)
        stats = c.last_stats
        # the prompt and the 7 decoded tokens of the first answer are cached
        assert stats.cached_tokens >= stats.prompt_tokens - 3
        assert c.n_decode_calls == calls + 1  # one short prompt chunk, no step decode
        c.clear_cache()
        c.generate(PROMPT, max_tokens=1, params=greedy)
        assert c.last_stats.cached_tokens == 0


def test_seed_makes_sampling_repeatable(ctx):
    params = SamplerParams(temperature=1.0, seed=1234)
    a = ctx.generate(PROMPT, max_tokens=24, params=params)
    b = ctx.generate(PROMPT, max_tokens=24, params=params)
    c = ctx.generate(PROMPT, max_tokens=24, params=params.replace(seed=99))
    assert a == b
    assert a != c


def test_context_seed_is_the_default_seed(model):
    params = SamplerParams(temperature=1.0)
    with Context(model, n_ctx=256, seed=7) as c1, Context(model, n_ctx=256, seed=7) as c2:
        assert c1.generate(PROMPT, 20, params) == c2.generate(PROMPT, 20, params)


def test_max_tokens_is_respected(ctx, greedy):
    for n in (1, 5):
        it = ctx.stream_tokens(PROMPT, max_tokens=n, params=greedy)
        assert len(list(it)) == n
        assert it.finish_reason == "length"
    it = ctx.generate_stream(PROMPT, max_tokens=0, params=greedy)
    assert list(it) == [] and it.finish_reason == "length"


def test_breaking_out_stops_decoding(ctx, greedy):
    before = ctx.n_decode_calls
    for i, _ in enumerate(ctx.stream_tokens(PROMPT, max_tokens=200, params=greedy)):
        if i == 4:
            break
    # one prompt chunk, then one decode per token after the first
    assert ctx.n_decode_calls - before == 1 + 4
    stream = ctx.generate_stream(PROMPT, max_tokens=200, params=greedy)
    next(stream)
    stream.close()
    calls = ctx.n_decode_calls
    assert list(stream) == [] and stream.finish_reason == "cancelled"
    assert ctx.n_decode_calls == calls


def test_logprobs_are_real(ctx, model, greedy):
    ids = model.tokenize(PROMPT)
    logits = ctx.logits(ids).astype(np.float64)
    expected = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    first = next(iter(ctx.stream_tokens(ids, max_tokens=3, params=greedy, top_logprobs=5)))
    assert first.token_id == int(np.argmax(logits))
    assert first.logprob == pytest.approx(expected[first.token_id], abs=1e-3)
    top_ids = [t for t, _ in first.top_logprobs]
    assert top_ids == list(np.argsort(-logits)[:5])
    assert [lp for _, lp in first.top_logprobs] == pytest.approx(list(np.sort(expected)[::-1][:5]), abs=1e-3)


def test_generation_ends_at_the_context_limit(model, greedy):
    with Context(model, n_ctx=32) as small:
        ids = model.tokenize(PROMPT)
        it = small.stream_tokens(ids, max_tokens=1000, params=greedy)
        tokens = list(it)
        assert it.finish_reason == "length"
        assert len(ids) + len(tokens) == 32
        # a prompt of n_ctx - 1 tokens still gets one token
        long_ids = (ids * 10)[:31]
        assert len(list(small.stream_tokens(long_ids, max_tokens=5, params=greedy))) == 1
        with pytest.raises(mullama.ContextOverflowError, match="32"):
            small.generate((ids * 10)[:32], max_tokens=1)


def test_a_new_generation_supersedes_the_old_one(ctx, greedy):
    first = ctx.generate_stream(PROMPT, max_tokens=50, params=greedy)
    next(first)
    assert ctx.generate(PROMPT, max_tokens=5, params=greedy)
    with pytest.raises(mullama.StreamingError, match="superseded"):
        next(first)


def test_threads_are_serialised(model, greedy):
    with Context(model, n_ctx=512) as shared:
        expected = shared.generate(PROMPT, max_tokens=12, params=greedy)
        results, errors = [], []

        def worker():
            try:
                results.append(shared.generate(PROMPT, max_tokens=12, params=greedy))
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert results == [expected] * 4


def test_other_threads_run_while_decoding(ctx, greedy):
    ticks = 0
    stop = threading.Event()

    def counter():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    t = threading.Thread(target=counter)
    t.start()
    try:
        ctx.generate(PROMPT, max_tokens=16, params=greedy)
    finally:
        stop.set()
        t.join()
    # with the GIL held through decoding the counter would barely move
    assert ticks > 10_000


def test_close_is_idempotent_and_use_after_close_raises(model, greedy):
    c = Context(model, n_ctx=128)
    c.close()
    c.close()
    with pytest.raises(mullama.ClosedError):
        c.generate(PROMPT, max_tokens=2, params=greedy)


def test_kv_cells_are_freed_when_a_generation_ends(ctx, greedy):
    ctx.generate(PROMPT, max_tokens=4, params=greedy)
    assert ctx.kv_positions()[0] == -1
    stream = ctx.generate_stream(PROMPT, max_tokens=40, params=greedy)
    next(stream)
    assert ctx.kv_positions()[0] >= 0
    stream.close()
    assert ctx.kv_positions()[0] == -1
