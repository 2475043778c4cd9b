"""Sequences that outlive a stream: prefix cache, chat turns and n > 1.

  shared prefix : TTFT of a request whose first 1,500 tokens an earlier, finished
                  request already evaluated, against the same request cold
                  (goal <= 0.1x)
  chat          : a 10-turn chat (the transcript is fixed beforehand, so every
                  engine sees the same prompts); TTFT of turn 10 against turn 2
                  (goal <= 1.5x), and against llama-server -np 8 with
                  cache_prompt on, turn by turn (goal: mullama <= 1.0x)
  n = 4         : one request for four choices from a 1,000-token prompt against
                  four separate concurrent requests (prefix cache off): prompt
                  tokens evaluated (counted) and wall time (goal <= 0.4x)

Usage: python3 benchmarks/bench_prefix.py [--reps 3] [--quick] [--no-server]
Timings are reported, never asserted. Raw numbers go to bench-results/prefix.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import _bench_env as env  # noqa: E402

import anyio  # noqa: E402

from mullama import AsyncModel, Model, SamplerParams, StreamConfig, default_model_path  # noqa: E402

FILLER = ("The river runs past the old mill, under the stone bridge and through the town, "
          "where the market opens at dawn and the bakers sell bread to the travellers who "
          "arrive with the morning train from the coast. ")
QUESTIONS = ["What is the name of the river?", "When does the market open?", "Who buys the bread?",
             "Where does the train come from?", "What stands by the river?", "Describe the bridge.",
             "What do the bakers sell?", "When does the train arrive?", "Is the town large?",
             "Summarise the story in one sentence."]


def text_of_tokens(model: Model, n: int) -> list[int]:
    ids = model.tokenize(FILLER * (n // 30 + 2))
    return ids[:n]


async def ttft(m: AsyncModel, prompt, max_tokens: int = 4) -> float:
    t0 = time.perf_counter()
    async with await m.generate_stream(prompt, StreamConfig(max_tokens=max_tokens, temperature=0,
                                                             timeout_ms=0)) as s:
        await s.next()
        first = time.perf_counter() - t0
        async for _ in s:
            pass
    return first


async def shared_prefix(m: AsyncModel, reps: int, n_prefix: int) -> dict:
    base = text_of_tokens(m.model, n_prefix)
    tail_a = m.model.tokenize(" Question: how old is the mill?", add_special=False)
    tail_b = m.model.tokenize(" Question: how long is the bridge?", add_special=False)
    cold, warm = [], []
    for _ in range(reps):
        m.clear_cache()
        cold.append(await ttft(m, base + tail_a))
        warm.append(await ttft(m, base + tail_b))
    return {"cold_s": cold, "warm_s": warm, "ratio": statistics.median(warm) / statistics.median(cold)}


def chat_prompts(model: Model, turns: int) -> list[str]:
    """The prompt of every turn of a fixed transcript (replies written beforehand)."""
    messages: list[dict[str, str]] = [{"role": "system", "content": FILLER * 3}]
    prompts = []
    for i in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " " + FILLER})
        prompts.append(model.apply_chat_template(messages, add_generation_prompt=True))
        messages.append({"role": "assistant", "content": f"Answer {i}: " + FILLER[: 60 + 7 * i]})
    return prompts


async def chat_mullama(m: AsyncModel, prompts: list[str]) -> list[float]:
    m.clear_cache()
    return [await ttft(m, p) for p in prompts]


def server_ttft(port: int, prompt: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "n_predict": 4, "temperature": 0.0, "top_k": 1, "stream": True,
                       "cache_prompt": True})
    t0 = time.perf_counter()
    conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
    first = None
    for raw in conn.getresponse():
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        event = json.loads(line[5:])
        if first is None:
            first = time.perf_counter() - t0
        if event.get("stop"):
            break
    conn.close()
    return first if first is not None else float("nan")


async def n_choices(path: str, threads: int, n_prompt: int, tokens: int) -> dict:
    config = StreamConfig(max_tokens=tokens, temperature=0.8, timeout_ms=0, sampler=SamplerParams(seed=5))
    out = {}
    for label, cache in (("n4", True), ("separate", False)):
        async with AsyncModel(Model.load(path), n_ctx=2048, n_parallel=4, n_threads=threads,
                              prefix_cache=cache) as m:
            ids = text_of_tokens(m.model, n_prompt)
            await ttft(m, ids[:16])                  # warm-up
            decoded0 = m.n_decoded_tokens
            t0 = time.perf_counter()
            if label == "n4":
                streams = await m.generate_stream(ids, config, n=4)
            else:
                streams = [await m.generate_stream(ids, config.replace(
                    sampler=SamplerParams(seed=5 + i))) for i in range(4)]
            generated = 0
            async with anyio.create_task_group() as tg:
                async def drain(s) -> None:
                    nonlocal generated
                    async with s:
                        async for _ in s:
                            generated += 1
                for s in streams:
                    tg.start_soon(drain, s)
            wall = time.perf_counter() - t0
            out[label] = {"wall_s": wall, "prompt_tokens_evaluated": m.n_decoded_tokens - decoded0 - generated + 4,
                          "generated": generated}
    out["ratio"] = out["n4"]["wall_s"] / out["separate"]["wall_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="one repetition, shorter prompts")
    ap.add_argument("--no-server", action="store_true", help="skip llama-server (no build needed)")
    args = ap.parse_args()
    import os
    threads = args.threads or len(os.sched_getaffinity(0))
    reps = 1 if args.quick else args.reps
    n_prefix = 500 if args.quick else 1500
    turns = 4 if args.quick else 10
    path = default_model_path()
    results: dict = {"threads": threads, "cpu": env.cpu_model(), "pin": env.read_pin()}

    async def ours() -> None:
        async with AsyncModel(Model.load(path), n_ctx=8192, n_parallel=2, n_threads=threads) as m:
            results["shared_prefix"] = await shared_prefix(m, reps, n_prefix)
            prompts = chat_prompts(m.model, turns)
            results["chat_prompt_tokens"] = [len(m.model.tokenize(p)) for p in prompts]
            results["chat_mullama"] = [await chat_mullama(m, prompts) for _ in range(reps)]
        results["n_choices"] = await n_choices(path, threads, 500 if args.quick else 1000, 16)
        results["chat_prompts"] = prompts

    anyio.run(ours, backend="trio")
    prompts = results.pop("chat_prompts")
    if not args.no_server:
        import bench_batching as bb
        exe = bb.ensure_server()
        server, port = bb.start_server(exe, path, threads, 8192)
        try:
            server_ttft(port, "Hello")
            results["chat_server"] = [[server_ttft(port, p) for p in prompts] for _ in range(reps)]
        finally:
            server.terminate()
            server.wait(timeout=30)

    def per_turn(runs: list[list[float]]) -> list[float]:
        return [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]

    sp = results["shared_prefix"]
    print(f"shared {n_prefix}-token prefix: cold TTFT {statistics.median(sp['cold_s']) * 1000:.0f} ms, "
          f"warm {statistics.median(sp['warm_s']) * 1000:.0f} ms -> {sp['ratio']:.3f}x (goal <= 0.1)")
    ours_turns = per_turn(results["chat_mullama"])
    results["chat_turn_ratio"] = ours_turns[-1] / ours_turns[1]
    print(f"chat: prompt tokens per turn {results['chat_prompt_tokens']}")
    print("  mullama TTFT ms: " + " ".join(f"{t * 1000:.0f}" for t in ours_turns)
          + f"  (turn {turns} / turn 2 = {results['chat_turn_ratio']:.2f}x, goal <= 1.5)")
    if "chat_server" in results:
        theirs = per_turn(results["chat_server"])
        ratio = statistics.median(a / b for a, b in zip(ours_turns[1:], theirs[1:]))
        results["chat_vs_server"] = ratio
        print("  server  TTFT ms: " + " ".join(f"{t * 1000:.0f}" for t in theirs)
              + f"  (mullama / server, median of turns 2..{turns}: {ratio:.2f}x, goal <= 1.0)")
    nc = results["n_choices"]
    print(f"n=4: {nc['n4']['wall_s']:.2f} s, prompt tokens evaluated {nc['n4']['prompt_tokens_evaluated']}; "
          f"four requests: {nc['separate']['wall_s']:.2f} s, {nc['separate']['prompt_tokens_evaluated']} "
          f"-> {nc['ratio']:.2f}x (goal <= 0.4)")
    env.RESULTS.mkdir(exist_ok=True)
    (env.RESULTS / "prefix.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
