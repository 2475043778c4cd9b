"""Concurrent streams: mullama's in-process batching against llama.cpp's server and ceiling.

In one run, on the default model with the same threads, for 1, 2, 4 and 8
concurrent greedy streams of the same prompts and length:
- mullama: AsyncModel (continuous batching) driven from trio;
- llama-server -np 8, built from the vendored llama.cpp, driven over
  loopback by the same pattern (one streaming HTTP request per stream);
- llama-batched-bench: the kernels' own decode rate for B sequences.
Reported: aggregate decode tok/s, median time to first token, and the goals
(8 streams: >= 1.1x llama-server, >= 0.95x batched-bench B=8, >= 2.2x one stream).

Usage: python benchmarks/bench_batching.py [--tokens N] [--reps N] [--quick]
Nothing is asserted; figures go to stdout and bench-results/batching.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import _bench_env as env  # noqa: E402

from mullama import AsyncModel, Model, StreamConfig, default_model_path, default_threads  # noqa: E402

PROMPTS = [
    "The capital of France is", "Once upon a time", "The history of the Roman Empire",
    "Water boils at", "The three primary colours are", "My favourite animal is",
    "In 1969, the first man on the moon", "The best way to learn programming is",
]
LEVELS = (1, 2, 4, 8)


def ensure_server() -> Path:
    exe = env.TOOLS_BUILD / "bin" / "llama-server"
    env.ensure_llama_bench()  # configures the tools build folder
    if not exe.is_file():
        env.log("building llama-server (cached afterwards)")
    env._run(["cmake", "--build", str(env.TOOLS_BUILD), "--target", "llama-server", "llama-batched-bench",
              "-j", "2"], env.TOOLS_BUILD.parent / "bench-server-build.log")
    return exe


def summarize(ttfts: list[float], tokens: int, wall: float, stamps: list[list[float]]) -> dict:
    """Aggregate tok/s over the whole run, and over the steady part: from when every stream
    has its first token to when the first stream ends (all n streams decoding together)."""
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    inside = sum(1 for s in stamps for t in s if start < t <= end)
    steady = inside / (end - start) if end > start else float("nan")
    return {"tok_s": tokens / wall, "steady_tok_s": steady, "ttft_median_s": statistics.median(ttfts),
            "tokens": tokens, "wall_s": wall}


async def mullama_level(model: AsyncModel, n: int, tokens: int) -> dict:
    config = StreamConfig(max_tokens=tokens, temperature=0.0, timeout_ms=0)
    ttfts: list[float] = []
    stamps: list[list[float]] = [[] for _ in range(n)]
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        async with await model.generate_stream(PROMPTS[i % 8], config) as stream:
            async for _ in stream:
                stamps[i].append(time.perf_counter())
        ttfts.append(stamps[i][0] - t0)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return summarize(ttfts, sum(len(s) for s in stamps), time.perf_counter() - t0, stamps)


def server_level(port: int, n: int, tokens: int) -> dict:
    ttfts: list[float] = [0.0] * n
    counts: list[int] = [0] * n
    stamps: list[list[float]] = [[] for _ in range(n)]
    t0 = time.perf_counter()

    def one(i: int) -> None:
        stamps[i], _, final = env.stream_completion(port, {"prompt": PROMPTS[i % 8], "n_predict": tokens,
                                                           "temperature": 0.0, "cache_prompt": False, "top_k": 1})
        counts[i] = final.get("tokens_predicted", len(stamps[i]))
        ttfts[i] = stamps[i][0] - t0 if stamps[i] else 0.0

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(ttfts, sum(counts), time.perf_counter() - t0, stamps)


def start_server(exe: Path, model_path: str, threads: int, n_ctx: int) -> tuple[subprocess.Popen, int]:
    args = ["-m", model_path, "-np", "8", "-c", str(8 * n_ctx), "-t", str(threads), "-tb", str(threads),
            "-fa", "auto", "--no-webui"]
    return env.start_llama_server(exe, args)


def batched_bench(model_path: str, threads: int, tokens: int) -> dict[int, float]:
    exe = env.TOOLS_BUILD / "bin" / "llama-batched-bench"
    cmd = [str(exe), "-m", model_path, "-c", "8192", "-b", "2048", "-ub", "512", "-npp", "16", "-ntg", str(tokens),
           "-npl", ",".join(map(str, LEVELS)), "-t", str(threads), "-fa", "auto", "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rates = {}
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rates[int(row["pl"])] = float(row["speed_tg"])
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    tokens, reps = (16, 1) if args.quick else (args.tokens, args.reps)
    threads = default_threads()
    path = str(default_model_path())
    n_ctx = 512
    server_exe = ensure_server()
    amodel = AsyncModel(Model.load(path), n_ctx=n_ctx, n_parallel=8, n_threads=threads)
    anyio.run(mullama_level, amodel, 1, 4, backend="trio")  # warm-up
    server, port = start_server(server_exe, path, threads, n_ctx)
    results: dict[str, dict[int, list[dict]]] = {"mullama": {n: [] for n in LEVELS},
                                                 "llama-server": {n: [] for n in LEVELS}}
    try:
        server_level(port, 1, 4)  # warm-up
        ceilings: list[dict[int, float]] = []
        for _ in range(reps):
            for n in LEVELS:  # interleaved so all see the same machine state (the others sit idle)
                results["mullama"][n].append(anyio.run(mullama_level, amodel, n, tokens, backend="trio"))
                results["llama-server"][n].append(server_level(port, n, tokens))
            ceilings.append(batched_bench(path, threads, tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)
    amodel.close()
    ceiling = {n: statistics.median(c[n] for c in ceilings) for n in LEVELS}

    def med(name: str, n: int, key: str) -> float:
        return statistics.median(r[key] for r in results[name][n])

    print(f"threads={threads}  tokens/stream={tokens}  reps={reps}  (medians)")
    print("end to end, as the client sees it: all tokens / time from the requests to the last token")
    print(f"{'streams':>7} {'mullama tok/s':>14} {'server tok/s':>13} {'mullama TTFT':>13} {'server TTFT':>12}")
    summary: dict = {"threads": threads, "tokens": tokens, "levels": {}}
    for n in LEVELS:
        m, s = med("mullama", n, "tok_s"), med("llama-server", n, "tok_s")
        mt, st = med("mullama", n, "ttft_median_s"), med("llama-server", n, "ttft_median_s")
        print(f"{n:>7} {m:>14.1f} {s:>13.1f} {mt * 1e3:>10.0f} ms {st * 1e3:>9.0f} ms")
        summary["levels"][n] = {"mullama_tok_s": m, "server_tok_s": s, "mullama_ttft_s": mt, "server_ttft_s": st}
    print("decode: tokens / time while every stream generates (prompts done); batched-bench's S_TG is this")
    print(f"{'streams':>7} {'mullama tok/s':>14} {'server tok/s':>13} {'batched-bench':>14}")
    for n in LEVELS:
        ms, ss = med("mullama", n, "steady_tok_s"), med("llama-server", n, "steady_tok_s")
        print(f"{n:>7} {ms:>14.1f} {ss:>13.1f} {ceiling.get(n, float('nan')):>14.1f}")
        summary["levels"][n].update({"mullama_decode_tok_s": ms, "server_decode_tok_s": ss,
                                     "batched_bench_tok_s": ceiling.get(n)})
    m8, m1 = med("mullama", 8, "tok_s"), med("mullama", 1, "tok_s")
    d8, d1 = med("mullama", 8, "steady_tok_s"), med("mullama", 1, "steady_tok_s")
    ratios = {"vs_server_8": m8 / med("llama-server", 8, "tok_s"),
              "decode_vs_server_8": d8 / med("llama-server", 8, "steady_tok_s"),
              "decode_vs_batched_bench_8": d8 / ceiling[8],
              "end_to_end_vs_batched_bench_8": m8 / ceiling[8],
              "decode_vs_own_single": d8 / d1, "end_to_end_vs_own_single": m8 / m1,
              "batched_bench_8_vs_1": ceiling[8] / ceiling[1]}
    summary["ratios"] = ratios
    summary["raw"] = {**results, "llama-batched-bench": ceilings}
    print(f"8 streams: {ratios['vs_server_8']:.2f}x llama-server end to end (goal >= 1.1; decode "
          f"{ratios['decode_vs_server_8']:.2f}x), {ratios['decode_vs_batched_bench_8']:.2f}x batched-bench B=8 "
          f"decode (goal >= 0.95; end to end {ratios['end_to_end_vs_batched_bench_8']:.2f}x), "
          f"{ratios['decode_vs_own_single']:.2f}x mullama's own single stream decode (goal >= 2.2; end to end "
          f"{ratios['end_to_end_vs_own_single']:.2f}x; the kernels' own B=8/B=1: "
          f"{ratios['batched_bench_8_vs_1']:.2f}x)")
    env.RESULTS.mkdir(exist_ok=True)
    (env.RESULTS / "batching.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
