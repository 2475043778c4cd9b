"""Scoring throughput and perplexity against llama-perplexity.

  perplexity : the same text, n_ctx and threads through llama-perplexity and
               through Context.perplexity (one chunk per decode, the shapes
               llama-perplexity uses with -b n_ctx); tokens processed per second
               (goal >= 0.95x) and the perplexity (goal: equal to 4 significant
               digits)
  batched    : AsyncModel.perplexity with 4 slots (chunks side by side)
  llama-cpp-python : the same chunks through Llama(logits_all=True).eval and a
               numpy log-softmax of the scored rows, the way it scores text
               (goal: mullama >= 3x its tokens per second)

The text is tests/data/scoring_text.txt repeated (no download); its repetition
makes the perplexity low, which does not matter for either figure.

Usage: python3 benchmarks/bench_score.py [--n-ctx 512] [--repeat 12] [--threads N]
       [--llama-perplexity PATH] [--no-lcp]
Timings are reported, never asserted. Raw numbers go to bench-results/score.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import _bench_env as env  # noqa: E402

import anyio  # noqa: E402

from mullama import AsyncModel, Context, Model, default_model_path, default_threads  # noqa: E402

TEXT = env.ROOT / "tests" / "data" / "scoring_text.txt"


def _stamp(log: str, marker: str) -> float:
    """The time stamp (minutes.seconds.ms.us) of the log entry that says ``marker``: the
    last stamp before it, since an entry can follow a progress line without a line break."""
    stamps = list(re.finditer(r"(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) [DIWE] ", log[:log.index(marker)]))
    minutes, sec, ms, us = (int(g) for g in stamps[-1].groups())
    return minutes * 60 + sec + ms / 1e3 + us / 1e6


def run_llama_perplexity(exe: Path, model: str, text_file: str, n_ctx: int, threads: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), "-m", model, "-f", text_file, "-c", str(n_ctx), "-b", str(n_ctx),
                           "-t", str(threads), "-tb", str(threads)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))
    n_chunks = int(re.search(r"calculating perplexity over (\d+) chunks", log).group(1))
    # its log lines carry timestamps (minutes.seconds.ms.us): the evaluation runs from
    # "calculating perplexity" to "Final estimate"
    eval_s = _stamp(log, "Final estimate") - _stamp(log, "calculating perplexity over")
    n_tok = n_chunks * n_ctx
    return {"perplexity": ppl, "tokens": n_tok, "eval_s": eval_s, "tok_per_s": n_tok / eval_s, "wall_s": wall}


def run_mullama(model: Model, text: str, n_ctx: int, threads: int) -> dict:
    with Context(model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads) as ctx:
        ctx.score(model.tokenize(text)[:n_ctx])  # warm-up: llama.cpp sizes its buffers for this shape
        t0 = time.perf_counter()
        res = ctx.perplexity(text, n_ctx=n_ctx)
        dt = time.perf_counter() - t0
    n_tok = res.n_chunks * n_ctx
    return {"perplexity": res.perplexity, "tokens": n_tok, "eval_s": dt, "tok_per_s": n_tok / dt}


def run_lcp(model: Model, path: str, text: str, n_ctx: int, threads: int) -> dict:
    """llama-cpp-python (logits_all=True) on the chunks of Context.perplexity, in its own venv."""
    from mullama import scoring

    py = env.ensure_llama_cpp_python()
    chunks = [c.tolist() for c in scoring.perplexity_chunks(model, text, n_ctx)]
    worker = Path(__file__).resolve().parent / "_lcp_score_worker.py"
    proc = subprocess.run([str(py), str(worker), "--model", path, "--threads", str(threads), "--n-ctx", str(n_ctx)],
                          input=json.dumps({"chunks": chunks, "first": n_ctx // 2 + 1}) + "\n",
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    n_tok = len(chunks) * n_ctx
    return {"perplexity": math.exp(out["nll"] / out["count"]), "tokens": n_tok, "eval_s": out["eval_s"],
            "tok_per_s": n_tok / out["eval_s"], "version": out["version"]}


async def run_batched(path: str, text: str, n_ctx: int, threads: int) -> dict:
    m = await AsyncModel.load(path, n_ctx=n_ctx, n_parallel=4, n_threads=threads, n_batch=n_ctx)
    try:
        t0 = time.perf_counter()
        res = await m.perplexity(text, n_ctx=n_ctx)
        dt = time.perf_counter() - t0
    finally:
        await m.aclose()
    n_tok = res.n_chunks * n_ctx
    return {"perplexity": res.perplexity, "tokens": n_tok, "eval_s": dt, "tok_per_s": n_tok / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--reps", type=int, default=2, help="alternating runs of each; the fastest counts")
    ap.add_argument("--llama-perplexity", type=Path, default=None,
                    help="a built llama-perplexity (default: build it from vendor/llama.cpp)")
    ap.add_argument("--no-lcp", action="store_true", help="skip llama-cpp-python")
    args = ap.parse_args()
    path = str(default_model_path())
    text = (TEXT.read_text(encoding="utf-8") + "\n\n") * args.repeat
    exe = args.llama_perplexity or (env.ensure_llama_bench().parent / "llama-perplexity")
    results: dict = {"threads": args.threads, "n_ctx": args.n_ctx, "cpu": env.cpu_model(), "pin": env.read_pin()}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(text)
    peers, mine, lcps = [], [], []
    model = Model.load(path)
    try:
        for _ in range(args.reps):   # alternating, so that a busy moment hits all
            peers.append(run_llama_perplexity(exe, path, f.name, args.n_ctx, args.threads))
            mine.append(run_mullama(model, text, args.n_ctx, args.threads))
            if not args.no_lcp:
                lcps.append(run_lcp(model, path, text, args.n_ctx, args.threads))
    finally:
        model.close()
    results["llama_perplexity"] = peer = max(peers, key=lambda r: r["tok_per_s"])
    results["mullama"] = ours = max(mine, key=lambda r: r["tok_per_s"])
    results["runs"] = {"llama_perplexity": peers, "mullama": mine, "llama_cpp_python": lcps}
    results["mullama_4_slots"] = batched = anyio.run(run_batched, path, text, args.n_ctx, args.threads)
    Path(f.name).unlink()
    print(f"llama-perplexity   : PPL {peer['perplexity']:.4f}  {peer['tok_per_s']:8.1f} tok/s")
    print(f"Context.perplexity : PPL {ours['perplexity']:.4f}  {ours['tok_per_s']:8.1f} tok/s "
          f"({ours['tok_per_s'] / peer['tok_per_s']:.2f}x)")
    print(f"AsyncModel 4 slots : PPL {batched['perplexity']:.4f}  {batched['tok_per_s']:8.1f} tok/s "
          f"({batched['tok_per_s'] / peer['tok_per_s']:.2f}x)")
    if lcps:
        results["llama_cpp_python"] = lcp = max(lcps, key=lambda r: r["tok_per_s"])
        print(f"llama-cpp-python   : PPL {lcp['perplexity']:.4f}  {lcp['tok_per_s']:8.1f} tok/s "
              f"(logits_all=True); Context.perplexity is {ours['tok_per_s'] / lcp['tok_per_s']:.2f}x it "
              f"(goal >= 3x), 4 slots {batched['tok_per_s'] / lcp['tok_per_s']:.2f}x")
    env.RESULTS.mkdir(exist_ok=True)
    (env.RESULTS / "score.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
