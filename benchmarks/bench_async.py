"""Async streams against the sync iterator, cancel latency, and event-loop stalls.

In one run, on the default model with the same threads:
- decode tok/s of the sync iterator, of a trio TokenStream and of an asyncio
  TokenStream (goal: async >= 0.97 x sync);
- how long after cancel() the producer thread is gone, during decode
  (goal: within one decode step) and in the middle of a 2,000-token prompt
  (goal: <= 60 ms);
- how late a 1 ms event-loop timer fires while a stream generates (goal: p99 < 2 ms).

Usage: python benchmarks/bench_async.py [--reps N] [--tokens N] [--quick]
Nothing is asserted; the figures go to stdout and bench-results/async.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout built in place
from mullama import AsyncModel, Context, Model, SamplerParams, StreamConfig, default_model_path, default_threads

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


def sync_decode(ctx: Context, n: int) -> float:
    stream = ctx.generate_stream(PROMPT, max_tokens=n, params=SamplerParams(temperature=0))
    for _ in stream:
        pass
    assert stream.stats.completion_tokens == n, stream.stats
    return stream.stats.tokens_per_second


async def async_decode(model: AsyncModel, n: int) -> float:
    """Decode tok/s after the first token, consuming as fast as tokens come."""
    stream = await model.generate_stream(PROMPT, StreamConfig(max_tokens=n, temperature=0.0))
    count, first = 0, None
    async for _ in stream:
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert count == n
    return (n - 1) / (end - first)


async def loop_gaps(model: AsyncModel, n: int) -> list[float]:
    """How late a 1 ms timer fires while a stream generates: the event loop's stalls.

    The ticker sleeps between ticks: a busy-looping ticker would take a CPU away
    from the decode threads on a small machine and measure itself.
    """
    gaps: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await anyio.sleep(0.001)
            gaps.append(time.perf_counter() - t0 - 0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        async for _ in await model.generate_stream(PROMPT, StreamConfig(max_tokens=n, temperature=0.0)):
            pass
        done.set()
    return gaps


async def cancel_latency(model: AsyncModel, during_prompt: bool) -> float:
    """Seconds from cancel() until the producer thread has ended."""
    if during_prompt:
        ids = model.model.tokenize("lorem ipsum dolor sit amet " * 400, add_special=True)[:2000]
        stream = await model.generate_stream(ids, StreamConfig(max_tokens=4))
        await anyio.sleep(random.uniform(0.05, 1.5))  # somewhere inside prompt processing
        assert stream.tokens_generated == 0 and stream.buffered == 0
    else:
        stream = await model.generate_stream(PROMPT, StreamConfig(max_tokens=10_000, temperature=0.0))
        for _ in range(10):
            await stream.next()
        await anyio.sleep(random.uniform(0, 0.013))
    producer = stream._producer
    t0 = time.perf_counter()
    stream.cancel()
    while not producer.finished:  # the request has left the batch and freed its KV cells
        await anyio.sleep(0.0002)
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--per-context", action="store_true", help="measure AsyncModel(batching=False)")
    args = ap.parse_args()
    reps, n = (1, 32) if args.quick else (args.reps, args.tokens)
    threads = default_threads()
    path = default_model_path()
    model = Model.load(path)
    ctx = Context(model, n_ctx=4096, n_threads=threads)
    amodel = AsyncModel(Model.load(path), n_ctx=4096, n_threads=threads, batching=not args.per_context)
    sync_decode(ctx, 8)  # warm-up
    results: dict[str, list[float]] = {"sync": [], "trio": [], "asyncio": [], "cancel_decode_ms": [],
                                       "cancel_prompt_ms": []}
    gaps: list[float] = []
    for _ in range(reps):  # interleaved, so machine noise spreads over all three
        # each measured run follows a short warm-up on the same path: the sync path
        # and the async producer use different OpenMP thread teams, and a team that
        # just finished still spins for a while on the other's cores
        sync_decode(ctx, 8)
        results["sync"].append(sync_decode(ctx, n))
        for backend in ("trio", "asyncio"):
            anyio.run(async_decode, amodel, 8, backend=backend)
            results[backend].append(anyio.run(async_decode, amodel, n, backend=backend))
            gaps += anyio.run(loop_gaps, amodel, n, backend=backend)
        for backend in ("trio", "asyncio"):
            results["cancel_decode_ms"].append(anyio.run(cancel_latency, amodel, False, backend=backend) * 1e3)
            results["cancel_prompt_ms"].append(anyio.run(cancel_latency, amodel, True, backend=backend) * 1e3)
    med = {k: statistics.median(v) for k, v in results.items()}
    step_ms = 1000 / med["sync"]
    summary = {
        "threads": threads, "tokens": n, "reps": reps,
        "sync_tok_s": med["sync"], "trio_tok_s": med["trio"], "asyncio_tok_s": med["asyncio"],
        "trio_over_sync": med["trio"] / med["sync"], "asyncio_over_sync": med["asyncio"] / med["sync"],
        "decode_step_ms": step_ms,
        "cancel_decode_ms_median": med["cancel_decode_ms"], "cancel_decode_ms_max": max(results["cancel_decode_ms"]),
        "cancel_prompt_ms_median": med["cancel_prompt_ms"], "cancel_prompt_ms_max": max(results["cancel_prompt_ms"]),
        "loop_gap_ms_p50": pct(gaps, 0.50) * 1e3, "loop_gap_ms_p99": pct(gaps, 0.99) * 1e3,
        "loop_gap_ms_max": max(gaps) * 1e3, "raw": results,
    }
    print(f"{'measure':<34}{'value':>12}   goal")
    print(f"{'sync iterator decode tok/s':<34}{med['sync']:>12.1f}")
    print(f"{'trio TokenStream decode tok/s':<34}{med['trio']:>12.1f}   {summary['trio_over_sync']:.3f}x sync (>= 0.97)")
    print(f"{'asyncio TokenStream decode tok/s':<34}{med['asyncio']:>12.1f}   {summary['asyncio_over_sync']:.3f}x sync (>= 0.97)")
    print(f"{'cancel during decode, ms (median)':<34}{med['cancel_decode_ms']:>12.2f}   max {summary['cancel_decode_ms_max']:.2f}; one step = {step_ms:.1f} ms")
    print(f"{'cancel during 2000-tok prompt, ms':<34}{med['cancel_prompt_ms']:>12.2f}   max {summary['cancel_prompt_ms_max']:.2f} (<= 60)")
    print(f"{'event-loop stall p99, ms':<34}{summary['loop_gap_ms_p99']:>12.3f}   (< 2); p50 {summary['loop_gap_ms_p50']:.3f}, max {summary['loop_gap_ms_max']:.2f}")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "async.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
