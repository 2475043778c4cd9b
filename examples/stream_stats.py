"""Measure tokens per second while streaming."""

import time

from _common import cap, model_path

from mullama import Context, Model


def stream_with_stats(ctx, prompt, max_tokens=200, params=None):
    start = time.perf_counter()
    stream = ctx.generate_stream(prompt, max_tokens=max_tokens, params=params)
    output = ""
    print("> ", end="", flush=True)
    for piece in stream:
        print(piece, end="", flush=True)
        output += piece
    print()
    elapsed = time.perf_counter() - start
    stats = stream.stats
    print("--- Stats ---")
    print(f"Tokens: {stats.completion_tokens}")
    print(f"Time: {elapsed:.2f}s (first token after {stats.time_to_first_token * 1000:.0f} ms)")
    print(f"Speed: {stats.tokens_per_second:.1f} tok/s")
    print(f"Characters: {len(output)}")
    return {"output": output, "tokens": stats.completion_tokens, "elapsed": elapsed,
            "tok_per_sec": stats.tokens_per_second}


with Model.load(model_path()) as model, Context(model, n_ctx=2048) as ctx:
    stream_with_stats(ctx, "Explain quantum computing:", max_tokens=cap(150))
