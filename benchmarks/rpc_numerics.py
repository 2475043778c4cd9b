"""How far the split model's numbers are from the local model's: the bound behind
tests/test_rpc.py's ARGMAX_TOL.

Two loopback `mullama rpc-server` processes hold the default model (tensor_split 1,1).
For each prompt the split model generates greedy tokens; the local model then scores
prompt + tokens, which gives, per generated token, how far below the local argmax it is
(its "margin", in nats), and how far the two backends' log-probabilities of the same
token are apart.

    python3 benchmarks/rpc_numerics.py [--tokens 32] [--flash-attn auto|on|off]
"""

from __future__ import annotations

import argparse

import numpy as np

from bench_rpc import start_server

import mullama

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "import numpy as np\n", "Water boils at", "My favourite food is",
           "In 1492, Columbus", "The quick brown fox", "To make a cup of tea,"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--flash-attn", default="auto", choices=["auto", "on", "off"])
    args = ap.parse_args()
    fa = {"on": True, "off": False}.get(args.flash_attn, "auto")
    path = str(mullama.default_model_path())
    servers = [start_server(1) for _ in range(2)]
    greedy = mullama.SamplerParams(temperature=0.0)
    margins, diffs = [], []
    try:
        with mullama.Model.load(path) as local, \
                mullama.Model.load(path, rpc_servers=[e for _, e in servers], tensor_split=[1, 1]) as split, \
                mullama.Context(local, n_ctx=512, n_threads=1, flash_attn=fa) as lc, \
                mullama.Context(split, n_ctx=512, n_threads=1, flash_attn=fa) as sc:
            for prompt in PROMPTS:
                ids = local.tokenize(prompt, add_special=True, parse_special=True)
                toks = [t.token_id for t in sc.stream_tokens(prompt, max_tokens=args.tokens, params=greedy)]
                here = lc.score(ids + toks, top_logprobs=1)
                there = sc.score(ids + toks, top_logprobs=1)
                k = len(ids)
                m = here.top_logprobs[k:, 0] - here.logprobs[k:]
                margins.extend(m)
                diffs.extend(np.abs(here.logprobs[k:] - there.logprobs[k:]))
                same = [t.token_id for t in lc.stream_tokens(prompt, max_tokens=args.tokens, params=greedy)]
                agree = next((i for i, (a, b) in enumerate(zip(toks, same)) if a != b), len(toks))
                print(f"{prompt[:32]!r:36} same greedy prefix {agree:2d}/{len(toks)}  max margin {m.max():.4f}")
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait()
    print(f"{len(margins)} tokens: max margin below the local argmax {max(margins):.4f} nats; "
          f"|logprob local - split| max {max(diffs):.4f}, p99 {np.percentile(diffs, 99):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
