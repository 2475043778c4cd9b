"""llama-cpp-python side of bench_decode.py; runs with the benchmark venv's python.

The model is loaded once; the parent then sends one JSON request per line on
stdin ({"prompt": [ids], "max_tokens": n}) and reads one JSON result per line
on stdout, so that the engines can be interleaved repetition by repetition
without paying for a model load each time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--flash-attn", choices=("on", "off"), required=True)
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    # 0.3.36 takes flash_attn as a bool (ENABLED / DISABLED, no "auto")
    llm = Llama(model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=args.n_batch,
                flash_attn=args.flash_attn == "on", verbose=False)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "version": llama_cpp.__version__}) + "\n")
    out.flush()

    for line in sys.stdin:
        req = json.loads(line)
        prompt = req["prompt"]
        # reset() sets n_tokens to 0, so no prefix of the previous prompt is reused
        # (eval then drops the stale KV cells from position 0 on)
        llm.reset()
        times: list[float] = []
        pieces: list[str] = []
        t0 = time.perf_counter()
        for chunk in llm.create_completion(prompt, max_tokens=req["max_tokens"],
                                           temperature=0, stream=True):
            choice = chunk["choices"][0]
            if choice["text"]:
                times.append(time.perf_counter())
                pieces.append(choice["text"])
        t_end = time.perf_counter()
        # the generator evaluates every sampled token except the last one
        completion_tokens = llm.n_tokens - len(prompt) + 1 if times else 0
        out.write(json.dumps({
            "ttft": times[0] - t0 if times else None,
            "t_last": times[-1] - t0 if times else None,
            "total": t_end - t0,
            "completion_tokens": completion_tokens,
            "chunks": len(times),
            "text": "".join(pieces),
        }) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
