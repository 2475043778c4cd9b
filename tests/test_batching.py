"""Continuous batching: many concurrent streams share one decode."""

from __future__ import annotations

import threading

import anyio
import pytest

import mullama
from mullama import AsyncModel, StreamConfig

from greedy_check import assert_own_greedy_continuation

pytestmark = pytest.mark.anyio

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "Water boils at",
    "The three primary colours are",
    "My favourite animal is",
    "In 1969, the first man on the moon",
    "A haiku about autumn:",
]
GREEDY = StreamConfig(max_tokens=16, temperature=0.0, timeout_ms=300_000)


@pytest.fixture(scope="module")
def engine_model(model_path):
    m = AsyncModel(mullama.Model.load(model_path), n_ctx=512, n_parallel=8)
    yield m
    m.close()


async def collect(m: AsyncModel, prompt: str, config: StreamConfig = GREEDY) -> list:
    async with await m.generate_stream(prompt, config) as stream:
        return [t async for t in stream]


async def test_eight_concurrent_streams_are_exact(engine_model):
    model = engine_model.model
    results: dict[int, list] = {}

    async def run(i: int, p: str) -> None:
        results[i] = await collect(engine_model, p)

    batch = PROMPTS[:6] + PROMPTS[:2]  # eight streams, two prompts twice, all in the same batch
    async with anyio.create_task_group() as tg:
        for i, p in enumerate(batch):
            tg.start_soon(run, i, p)
    for i, p in enumerate(batch):
        toks = results[i]
        assert len(toks) == 16 or toks[-1].is_final and len(toks) < 16
        assert toks[-1].is_final and [t.index for t in toks] == list(range(len(toks)))
        text = "".join(t.text for t in toks)
        assert text == model.detokenize([t.token_id for t in toks])
        # no token of another stream, none lost or duplicated
        assert_own_greedy_continuation(model, p, [t.token_id for t in toks if not model.is_eog(t.token_id)])
    # Duplicates start alike; bit-identical continuations are not promised: llama.cpp's
    # CPU kernels round differently depending on a row's place in the batch.
    assert results[6][0].token_id == results[0][0].token_id
    assert results[7][0].token_id == results[1][0].token_id
    assert max(engine_model.kv_positions()) == -1


async def test_log_probabilities_of_a_full_batch(engine_model):
    """Each step's rows are reduced on all threads at once; every stream still gets the
    log-probability and alternatives of its own row, as the one-stream path computes them."""
    model = engine_model.model
    greedy_top = GREEDY.replace(max_tokens=6, top_logprobs=5)
    sampled_top = StreamConfig(max_tokens=6, temperature=0.9, top_k=0, top_p=1.0, top_logprobs=4,
                               timeout_ms=300_000, sampler=mullama.SamplerParams(temperature=0.9, seed=7))
    configs = [greedy_top] * 3 + [GREEDY.replace(max_tokens=6, logprobs=False)] * 2 + [GREEDY.replace(max_tokens=6)] \
        + [sampled_top] * 2
    results: dict[int, list] = {}

    async def run(i: int) -> None:
        results[i] = await collect(engine_model, PROMPTS[i], configs[i])

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(run, i)
    for i, config in enumerate(configs):
        toks = results[i]
        assert len(toks) == 6
        if not config.logprobs:
            assert all(t.logprob is None for t in toks)
            continue
        assert all(t.logprob <= 0.0 for t in toks)
        if config.top_logprobs == 0:
            assert all(not t.top_logprobs for t in toks)
            continue
        for t in toks:
            ids = [tid for tid, _ in t.top_logprobs]
            lps = [lp for _, lp in t.top_logprobs]
            assert len(ids) == config.top_logprobs and len(set(ids)) == len(ids)
            assert lps == sorted(lps, reverse=True) and sum(2.718281828 ** lp for lp in lps) <= 1.0 + 1e-5
            if t.token_id in ids:
                assert lps[ids.index(t.token_id)] == pytest.approx(t.logprob, abs=1e-6)
            else:
                assert t.logprob <= lps[-1] + 1e-6
        if config.temperature == 0.0:
            assert [t.top_logprobs[0][0] for t in toks] == [t.token_id for t in toks]
    # against the one-stream path (a batch row rounds a little differently: loose tolerance)
    for i in (0, 5):
        ids = model.tokenize(PROMPTS[i])
        expected = list(mullama.Context(model, n_ctx=256).stream_tokens(
            ids, 1, mullama.SamplerParams(temperature=0), top_logprobs=5))[0]
        got = results[i][0]
        assert got.token_id == expected.token_id
        assert got.logprob == pytest.approx(expected.logprob, abs=0.05)
        if i == 0:
            assert [tid for tid, _ in got.top_logprobs[:2]] == [tid for tid, _ in expected.top_logprobs[:2]]
    assert max(engine_model.kv_positions()) == -1


async def test_aborting_some_streams_leaves_the_others_intact(engine_model):
    results: dict[int, list] = {}
    config = GREEDY.replace(max_tokens=24)

    async def run(i: int) -> None:
        async with await engine_model.generate_stream(PROMPTS[i % 8], config) as stream:
            got = []
            async for tok in stream:
                got.append(tok)
                if i in (1, 4, 7) and len(got) == 5:
                    break  # leaving `async with` aborts this stream
            results[i] = got

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(run, i)
    for i in range(10):
        if i in (1, 4, 7):
            assert len(results[i]) == 5
        else:
            assert len(results[i]) == 24 and results[i][-1].is_final
    assert len(await collect(engine_model, PROMPTS[0])) == 16
    with anyio.fail_after(5):
        while engine_model.active_streams:
            await anyio.sleep(0.01)
    assert max(engine_model.kv_positions()) == -1


async def test_a_parked_consumer_does_not_stop_the_others(engine_model):
    parked = await engine_model.generate_stream(PROMPTS[0], StreamConfig(max_tokens=500, temperature=0.0,
                                                                          buffer_size=2, timeout_ms=0))
    try:
        others = []
        async with anyio.create_task_group() as tg:
            async def run(p: str) -> None:
                others.append(await collect(engine_model, p, GREEDY.replace(max_tokens=32)))
            for p in PROMPTS[1:4]:
                tg.start_soon(run, p)
        assert [len(o) for o in others] == [32, 32, 32]
        # the parked stream produced exactly what fits its buffer, then decoding of it paused
        assert parked.buffered == 2 and parked.producer_pauses >= 1
        first = await parked.next()
        assert first is not None and first.index == 0
    finally:
        await parked.aclose()


async def test_holes_between_running_streams(engine_model):
    """A parked stream, and later a free slot, between two running ones: the hole is filled
    with a throw-away token each step, which must leave every stream's own cache intact."""
    model = engine_model.model
    config = GREEDY.replace(max_tokens=40)
    left = await engine_model.generate_stream(PROMPTS[0], config)                   # slot 0
    middle = await engine_model.generate_stream(PROMPTS[1], config.replace(buffer_size=2))  # slot 1, parked
    right = await engine_model.generate_stream(PROMPTS[2], config)                  # slot 2
    short = await engine_model.generate_stream(PROMPTS[3], config.replace(max_tokens=3))    # slot 3, ends early
    last = await engine_model.generate_stream(PROMPTS[4], config)                   # slot 4
    async with left, middle, right, short, last:
        got: dict[int, list] = {}

        async def drain(i: int, stream) -> None:
            got[i] = [t async for t in stream]

        async with anyio.create_task_group() as tg:
            for i, stream in ((0, left), (2, right), (3, short), (4, last)):
                tg.start_soon(drain, i, stream)
        assert middle.producer_pauses >= 1          # it sat parked while the others ran
        got[1] = [t async for t in middle]
    for i in range(5):
        ids = [t.token_id for t in got[i] if not model.is_eog(t.token_id)]
        assert len(got[i]) == (3 if i == 3 else 40) or got[i][-1].is_final
        assert_own_greedy_continuation(model, PROMPTS[i], ids)
    with anyio.fail_after(5):
        while engine_model.active_streams:
            await anyio.sleep(0.01)
    assert max(engine_model.kv_positions()) == -1


async def test_queue_is_fifo_and_bounded(model_path):
    async with await AsyncModel.load(model_path, n_ctx=256, n_parallel=1, max_queue=2) as m:
        config = StreamConfig(max_tokens=6, temperature=0.0)
        streams = [await m.generate_stream(PROMPTS[0], config)]
        with anyio.fail_after(10):
            while m.active_streams == 0:  # the engine thread takes it from the queue
                await anyio.sleep(0.001)
        streams += [await m.generate_stream(PROMPTS[i], config) for i in (1, 2)]  # these two wait
        with pytest.raises(mullama.QueueFullError):
            await m.generate_stream(PROMPTS[3], config)
        order: list[int] = []

        async def drain(i: int) -> None:
            async for tok in streams[i]:
                if tok.index == 0:
                    order.append(i)

        async with anyio.create_task_group() as tg:
            for i in (2, 1, 0):
                tg.start_soon(drain, i)
        assert order == [0, 1, 2]
        with anyio.fail_after(10):  # the engine frees the slot right after the final token
            while m.active_streams or m.waiting_streams:
                await anyio.sleep(0.001)


async def test_cancelled_while_queued_never_runs(model_path):
    async with await AsyncModel.load(model_path, n_ctx=256, n_parallel=1) as m:
        running = await m.generate_stream(PROMPTS[0], StreamConfig(max_tokens=30, temperature=0.0))
        queued = await m.generate_stream(PROMPTS[1], StreamConfig(max_tokens=30, temperature=0.0))
        queued.cancel()
        assert len([t async for t in running]) == 30
        assert await queued.next() is None and queued.finish_reason == "cancelled"
        assert queued.tokens_generated == 0


def test_blocking_streams_from_threads(engine_model):
    expected = {p: "".join(t.text for t in engine_model.stream_blocking(p, GREEDY)) for p in PROMPTS[:4]}
    got: dict[str, str] = {}

    def worker(p: str) -> None:
        with engine_model.stream_blocking(p, GREEDY) as stream:
            got[p] = "".join(t.text for t in stream)

    threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(got) == set(expected)
    for p in PROMPTS[:4]:
        assert got[p][:8] == expected[p][:8]
