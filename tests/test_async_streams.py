"""Async token streams on trio and asyncio: API, backpressure, cancellation, timeout."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

import mullama
from mullama import AsyncModel, StreamConfig

pytestmark = pytest.mark.anyio

PROMPT = "The capital of France is"
GREEDY = StreamConfig(max_tokens=16, temperature=0.0, timeout_ms=300_000)


# How long a producer thread may take to let go after its stream ended: it finishes the decode
# step it is in first, and on a busy machine one step can take seconds. A bound, not a speed check.
PRODUCER_EXIT_S = 60.0


def producer_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "mullama-producer")


async def wait_no_producers(timeout: float = PRODUCER_EXIT_S) -> None:
    with anyio.fail_after(timeout):
        while producer_threads():
            await anyio.sleep(0.005)


def wait_no_producers_sync(timeout: float = PRODUCER_EXIT_S) -> None:
    deadline = time.monotonic() + timeout
    while producer_threads() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert producer_threads() == 0


async def test_stream_matches_sync_generation(async_model, model):
    expected = [t for t in mullama.Context(model, n_ctx=256).stream_tokens(PROMPT, 16, mullama.SamplerParams(temperature=0))]
    stream = await async_model.generate_stream(PROMPT, GREEDY)
    got = [tok async for tok in stream]
    assert [t.token_id for t in got] == [t.token_id for t in expected]
    assert "".join(t.text for t in got) == "".join(t.text for t in expected)
    assert [t.logprob for t in got] == pytest.approx([t.logprob for t in expected], abs=1e-4)
    assert got[-1].is_final and not any(t.is_final for t in got[:-1])
    assert stream.is_finished and stream.tokens_generated == 16 and stream.finish_reason == "length"
    assert await stream.next() is None
    with pytest.raises(anyio.EndOfStream):
        await stream.receive()
    await wait_no_producers()


async def test_top_logprobs_match_the_sync_path(async_model, model):
    expected = list(mullama.Context(model, n_ctx=256).stream_tokens(
        PROMPT, 6, mullama.SamplerParams(temperature=0), top_logprobs=5))
    async with await async_model.generate_stream(PROMPT, GREEDY.replace(max_tokens=6, top_logprobs=5)) as stream:
        got = [tok async for tok in stream]
    assert len(got) == len(expected) == 6
    for g, e in zip(got, expected):
        assert [i for i, _ in g.top_logprobs] == [i for i, _ in e.top_logprobs]
        assert [lp for _, lp in g.top_logprobs] == pytest.approx([lp for _, lp in e.top_logprobs], abs=1e-4)
        assert g.top_logprobs[0] == (g.token_id, pytest.approx(g.logprob, abs=1e-6))  # greedy: the best one
    with pytest.raises(ValueError, match="top_logprobs"):
        StreamConfig(top_logprobs=21)
    with pytest.raises(ValueError, match="logprobs"):
        StreamConfig(top_logprobs=2, logprobs=False)


async def test_next_try_next_and_async_with(async_model):
    async with await async_model.generate_stream(PROMPT, GREEDY) as stream:
        assert stream.config is GREEDY
        first = await stream.next()
        assert first is not None and first.index == 0
        while stream.buffered == 0:
            await anyio.sleep(0.005)
        ready = stream.try_next()
        assert ready is not None and ready.index == 1
        rest = [t async for t in stream]
        assert len(rest) == 14
    assert stream.try_next() is None
    assert await async_model.generate(PROMPT, GREEDY) == "".join(
        [first.text, ready.text] + [t.text for t in rest])


async def test_stop_sequences_end_the_stream(async_model):
    full = await async_model.generate(PROMPT, GREEDY.replace(max_tokens=30))
    stop = full[10:14]
    stream = await async_model.generate_stream(PROMPT, GREEDY.replace(max_tokens=30, stop_sequences=(stop,)))
    got = [t async for t in stream]
    assert "".join(t.text for t in got) == full[: full.index(stop)]
    assert got[-1].is_final and stream.finish_reason == "stop"


async def test_backpressure_pauses_decoding(async_model):
    config = StreamConfig(max_tokens=200, temperature=0.0, buffer_size=4)
    async with await async_model.generate_stream(PROMPT, config) as stream:
        await stream.next()
        # a slow consumer: the producer fills the buffer, then must be waiting, not decoding
        with anyio.fail_after(60):
            while stream.buffered < 4 or stream.producer_pauses < 1:
                await anyio.sleep(0.05)
        assert stream.buffered == 4
        calls = async_model.n_decode_calls
        await anyio.sleep(0.3)
        assert async_model.n_decode_calls == calls  # no decode while the buffer is full
        for _ in range(6):
            await stream.next()
        assert stream.buffered <= 4
    await wait_no_producers()


async def test_cancel_stops_within_a_step(async_model):
    stream = await async_model.generate_stream(PROMPT, StreamConfig(max_tokens=500, temperature=0.0))
    await stream.next()
    stream.cancel()
    calls = async_model.n_decode_calls
    await stream.aclose()
    await wait_no_producers()
    assert async_model.n_decode_calls - calls <= 1
    assert stream.is_finished and stream.finish_reason == "cancelled"
    assert await stream.next() is None
    # the model is usable right away, and its cache holds no stale sequence
    assert await async_model.generate(PROMPT, GREEDY)


async def test_cancel_scope_cancels_the_stream(async_model):
    # opened before the scope: on a busy machine opening alone may outlast the 0.3 s
    stream = await async_model.generate_stream(PROMPT, StreamConfig(max_tokens=5000, temperature=0.0,
                                                                     stream_delay_ms=1))
    with anyio.move_on_after(0.3):  # ~1000 tokens (to the context's end) >= 1 ms apart: it ends first
        async for _ in stream:
            pass
    assert stream.is_finished and stream.finish_reason == "cancelled"
    await wait_no_producers()
    assert len(await async_model.generate(PROMPT, GREEDY)) > 0


@pytest.mark.parametrize("batching", [True, False])
async def test_cancel_during_prompt_processing(model_path, batching):
    async with await AsyncModel.load(model_path, n_ctx=4096, n_batch=2048, batching=batching) as m:
        long_prompt = "word " * 2000
        # how long the whole prompt takes here, to compare the cancel against
        t0 = time.perf_counter()
        await m.generate(long_prompt, StreamConfig(max_tokens=1))
        full_prompt = time.perf_counter() - t0
        stream = await m.generate_stream(long_prompt, StreamConfig(max_tokens=4))
        await anyio.sleep(full_prompt / 10)  # the producer is inside llama_decode of the prompt
        t0 = time.perf_counter()
        await stream.aclose()
        elapsed = time.perf_counter() - t0
        assert producer_threads() == 0
        assert max(m.kv_positions()) == -1
        assert stream.finish_reason == "cancelled" and stream.tokens_generated == 0
        # the abort callback stops the prompt batch instead of finishing it
        assert elapsed < full_prompt / 2, (elapsed, full_prompt)
        assert await m.generate(PROMPT, GREEDY)


async def test_timeout_raises_streaming_error(async_model):
    config = StreamConfig(max_tokens=5000, temperature=0.0, timeout_ms=200, stream_delay_ms=5)
    stream = await async_model.generate_stream(PROMPT, config)
    with pytest.raises(mullama.StreamingError, match="timed out"):
        async for _ in stream:
            pass
    assert stream.is_finished
    await wait_no_producers()


@pytest.mark.parametrize("batching", [True, False])
async def test_concurrent_streams_queue_and_are_correct(model_path, batching):
    async with await AsyncModel.load(model_path, n_ctx=512, n_parallel=2, batching=batching) as m:
        prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at"]
        expected = {p: await m.generate(p, GREEDY) for p in prompts}
        results: dict[str, str] = {}

        async def one(p: str) -> None:
            results[p] = await m.generate(p, GREEDY)

        async with anyio.create_task_group() as tg:
            for p in prompts * 2:
                tg.start_soon(one, p)
        if batching:
            # batched arithmetic may flip a late near-tie (see test_batching.py); the start agrees
            assert {p: t[:12] for p, t in results.items()} == {p: t[:12] for p, t in expected.items()}
        else:
            assert results == expected
    await wait_no_producers()


async def test_event_loop_is_not_blocked(async_model):
    ticks = 0
    ticks_at_token: list[int] = []
    stop = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            await anyio.sleep(0)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        async with await async_model.generate_stream(PROMPT, GREEDY.replace(max_tokens=24)) as stream:
            async for _ in stream:
                ticks_at_token.append(ticks)
        stop.set()
    # the loop kept running while every single token was being decoded
    steps = [b - a for a, b in zip(ticks_at_token, ticks_at_token[1:])]
    assert len(steps) == 23 and min(steps) > 0, steps


async def test_bad_config_and_prompt(async_model):
    with pytest.raises(ValueError, match="buffer_size"):
        StreamConfig(buffer_size=0)
    with pytest.raises(ValueError, match="temperature"):
        StreamConfig(temperature=-1)
    with pytest.raises(ValueError, match="timeout_ms"):
        StreamConfig(timeout_ms=-5)
    with pytest.raises(ValueError, match="stop_sequences"):
        StreamConfig(stop_sequences=("",))
    with pytest.raises(mullama.ContextOverflowError):
        await async_model.generate_stream("word " * 5000, GREEDY)
    assert await async_model.generate(PROMPT, GREEDY)


def test_trio_nursery_cancel_stops_the_producer(async_model):
    import trio

    async def main() -> str:
        async with trio.open_nursery() as nursery:
            holder = {}
            streaming = trio.Event()

            async def consume() -> None:
                stream = await async_model.generate_stream(PROMPT, StreamConfig(max_tokens=5000, temperature=0))
                holder["stream"] = stream
                async for _ in stream:
                    streaming.set()

            nursery.start_soon(consume)
            await streaming.wait()  # a token is out: the stream is running
            nursery.cancel_scope.cancel()
        return holder["stream"].finish_reason

    assert trio.run(main) == "cancelled"
    wait_no_producers_sync()


def test_asyncio_task_cancel_and_timeout(async_model):
    import asyncio

    async def consume(box: dict, streaming: asyncio.Event) -> None:
        stream = await async_model.generate_stream(PROMPT, StreamConfig(max_tokens=5000, temperature=0))
        box["stream"] = stream
        async for _ in stream:
            streaming.set()

    async def main() -> tuple[str, str]:
        box: dict = {}
        streaming = asyncio.Event()
        task = asyncio.ensure_future(consume(box, streaming))
        await streaming.wait()  # a token is out: the stream is running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # opened before the timeout: on a busy machine opening alone may outlast the 0.3 s
        stream = await async_model.generate_stream(PROMPT, StreamConfig(max_tokens=5000, temperature=0))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                async for _ in stream:
                    pass
        return box["stream"].finish_reason, stream.finish_reason

    assert asyncio.run(main()) == ("cancelled", "cancelled")
    wait_no_producers_sync()


def test_abandoned_stream_is_cleaned_up(async_model):
    import asyncio
    import gc

    async def main() -> str:
        stream = await async_model.generate_stream(PROMPT, StreamConfig(max_tokens=5000, temperature=0))
        async for _ in stream:
            break  # no aclose(): the stream is simply dropped
        del stream
        gc.collect()
        # the context came back, so another stream can start
        return await async_model.generate(PROMPT, GREEDY)

    assert asyncio.run(main())
    wait_no_producers_sync()


async def test_kv_cells_are_freed_after_every_stream(async_model):
    await async_model.generate(PROMPT, GREEDY)
    assert max(async_model.kv_positions()) == -1
    stream = await async_model.generate_stream(PROMPT, StreamConfig(max_tokens=500, temperature=0.0))
    await stream.next()
    await stream.aclose()
    assert max(async_model.kv_positions()) == -1


async def test_a_long_prompt_is_tokenized_off_the_event_loop(async_model, model):
    text = ("a" + " " * 30) * 300  # 9,300 characters in ~600 tokens: tokenized in a worker thread
    loop_thread = threading.get_ident()
    seen = []
    original = mullama.Model.tokenize

    def spy(self, *args, **kwargs):
        seen.append(threading.get_ident())
        return original(self, *args, **kwargs)

    mullama.Model.tokenize = spy
    try:
        async with await async_model.generate_stream(text, GREEDY.replace(max_tokens=2)) as stream:
            got = [t async for t in stream]
    finally:
        mullama.Model.tokenize = original
    assert len(got) == 2 and stream.prompt_tokens == len(model.tokenize(text, parse_special=True))
    assert seen and loop_thread not in seen
