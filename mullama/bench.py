"""``mullama bench``: mullama's own speed figures on one model, as a table.

Measured through the public API, each figure the median of ``reps`` runs:

- prompt processing (``ppN``): N prompt tokens evaluated, tokens per second;
- decode (``tgN``): greedy generation after a short prompt, (tokens - 1) per
  second from the first piece to the last;
- time to first token for the N-token prompt;
- the same decode through an async :class:`TokenStream` (trio);
- continuous batching: 1, 2, 4 and 8 concurrent streams on one
  :class:`AsyncModel`, aggregate tokens per second and median time to first token.

The peers (llama-bench, llama-cpp-python, llama-server) are compared by the
scripts under ``benchmarks/`` of the source tree.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["BenchRow", "run_bench", "format_table"]

DECODE_PROMPT = "Once upon a time"
FILLER = ("The river runs past the old mill, under the stone bridge and through the town, where the market "
          "opens at dawn and the bakers sell bread to the travellers who arrive on the morning train. ")


@dataclass(frozen=True)
class BenchRow:
    test: str
    value: float
    unit: str
    spread: tuple[float, float]

    def as_dict(self) -> dict:
        return {"test": self.test, "value": self.value, "unit": self.unit, "min": self.spread[0],
                "max": self.spread[1]}


def _row(test: str, values: Sequence[float], unit: str) -> BenchRow:
    return BenchRow(test, statistics.median(values), unit, (min(values), max(values)))


def _filler_ids(model, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids = model.tokenize(FILLER * (n // 20 + 2))
    return ids[:n]


def _sync_figures(model, threads: int | None, n_prompt: int, n_gen: int, reps: int) -> list[BenchRow]:
    from mullama import Context, SamplerParams

    greedy = SamplerParams(temperature=0)
    ids = _filler_ids(model, n_prompt)
    pp, ttft, tg = [], [], []
    with Context(model, n_ctx=max(2048, n_prompt + 64), n_threads=threads) as ctx:
        ctx.generate(DECODE_PROMPT, max_tokens=4, params=greedy)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            stream = ctx.generate_stream(ids, max_tokens=1, params=greedy)
            for _piece in stream:
                pass
            took = time.perf_counter() - t0
            ttft.append(took * 1000)
            pp.append(n_prompt / took)
            stamps = []
            for _piece in ctx.generate_stream(DECODE_PROMPT, max_tokens=n_gen, params=greedy):
                stamps.append(time.perf_counter())
            if len(stamps) > 1:
                tg.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return [_row(f"prompt processing pp{n_prompt}", pp, "tok/s"), _row(f"decode tg{n_gen}", tg, "tok/s"),
            _row(f"time to first token ({n_prompt}-token prompt)", ttft, "ms")]


def _async_figures(model, threads: int | None, n_gen: int, reps: int,
                   streams: Sequence[int]) -> list[BenchRow]:
    import trio

    from mullama import AsyncModel, StreamConfig

    config = StreamConfig(max_tokens=n_gen, temperature=0, logprobs=False, timeout_ms=0)
    rows: list[BenchRow] = []
    engine = AsyncModel(model, n_ctx=512, n_parallel=max(streams), n_threads=threads)

    async def one(prompt: str, out: list) -> None:
        t0 = time.perf_counter()
        stamps = []
        async with await engine.generate_stream(prompt, config) as stream:
            async for tok in stream:
                stamps.append(time.perf_counter())
        out.append((t0, stamps))

    async def level(n: int) -> tuple[float, float]:
        results: list = []
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, f"{DECODE_PROMPT} there lived a person numbered {i}", results)
        wall = time.perf_counter() - t0
        tokens = sum(len(s) for _, s in results)
        ttfts = [(s[0] - start) * 1000 for start, s in results if s]
        return tokens / wall, statistics.median(ttfts)

    async def main() -> None:
        await level(1)  # warm-up
        single = []
        for _ in range(reps):
            res: list = []
            await one(DECODE_PROMPT, res)
            stamps = res[0][1]
            single.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        rows.append(_row(f"async TokenStream decode tg{n_gen}", single, "tok/s"))
        for n in streams:
            agg, ttft = [], []
            for _ in range(reps):
                a, t = await level(n)
                agg.append(a)
                ttft.append(t)
            rows.append(_row(f"batched {n} stream{'s' if n > 1 else ''}: aggregate", agg, "tok/s"))
            rows.append(_row(f"batched {n} stream{'s' if n > 1 else ''}: median TTFT", ttft, "ms"))

    try:
        trio.run(main)
    finally:
        engine.close()  # also closes the model (the caller's close is then a no-op)
    return rows


def run_bench(model_path: str, *, threads: int | None = None, n_prompt: int = 512, n_gen: int = 128,
              reps: int = 3, streams: Sequence[int] = (1, 2, 4, 8),
              progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Measure and return the rows (see the module docstring). Takes about a minute on 2 cores."""
    from mullama import Model

    if reps < 1 or n_prompt < 1 or n_gen < 2:
        raise ValueError("reps and n_prompt must be >= 1 and n_gen >= 2")
    if not streams or any(n < 1 or n > 64 for n in streams):
        raise ValueError("stream counts must be within [1, 64]")
    say = progress or (lambda _msg: None)
    with Model.load(model_path) as model:
        say("sync context: prompt processing, decode, time to first token")
        rows = _sync_figures(model, threads, n_prompt, n_gen, reps)
        say(f"async streams and batching at {', '.join(map(str, streams))} streams")
        rows += _async_figures(model, threads, n_gen, reps, streams)
    return rows


def format_table(rows: Sequence[BenchRow], title: str) -> str:
    width = max(len(r.test) for r in rows)
    lines = [title, f"{'test':<{width}}  {'median':>9}  {'min':>9}  {'max':>9}  unit",
             "-" * (width + 42)]
    for r in rows:
        lines.append(f"{r.test:<{width}}  {r.value:>9.1f}  {r.spread[0]:>9.1f}  {r.spread[1]:>9.1f}  {r.unit}")
    return "\n".join(lines)
