"""llama-cpp-python side of bench_score.py; runs with the benchmark venv's python.

The parent sends one JSON line: {"chunks": [[ids], ...], "first": k}. Each chunk is
evaluated from an empty cache with ``logits_all=True`` (the way llama-cpp-python
gives the logits of every position), and the log-probability of each token from
index ``first`` on is taken from the row before it (log-softmax in numpy), as
llama-perplexity scores the second half of a chunk. One JSON line comes back: the
evaluation time (model load and a warm-up chunk excluded) and the summed NLL.
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
    ap.add_argument("--n-ctx", type=int, required=True)
    args = ap.parse_args()

    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_ctx=args.n_ctx, n_batch=args.n_ctx, n_ubatch=args.n_ctx,
                n_threads=args.threads, n_threads_batch=args.threads, logits_all=True, verbose=False)
    req = json.loads(sys.stdin.readline())
    chunks, first = req["chunks"], req["first"]

    def score(chunk: list[int]) -> tuple[float, int]:
        llm.reset()
        llm.eval(chunk)
        rows = np.asarray(llm.scores[first - 1:len(chunk) - 1], dtype=np.float64)
        top = rows.max(axis=1)
        lse = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
        lp = rows[np.arange(rows.shape[0]), chunk[first:]] - lse
        return -float(lp.sum()), int(lp.size)

    score(chunks[0])  # warm-up: buffers sized for this shape
    t0 = time.perf_counter()
    nll = 0.0
    count = 0
    for chunk in chunks:
        a, b = score(chunk)
        nll += a
        count += b
    dt = time.perf_counter() - t0
    sys.stdout.write(json.dumps({"eval_s": dt, "nll": nll, "count": count, "version": llama_cpp.__version__}) + "\n")


if __name__ == "__main__":
    main()
