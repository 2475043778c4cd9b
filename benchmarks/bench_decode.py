"""Decode speed and time-to-first-token: mullama vs llama-cpp-python vs llama-bench.

One run, one model (mullama's default Gemma 3 270M Q4_K_M), one thread count,
one flash-attention setting for all three engines. Per repetition every engine
runs once, in a rotating order, so that machine noise is spread over all of
them; the table shows median [min-max] and the raw numbers go to
bench-results/decode.json.

  decode : greedy generation of --max-tokens tokens after a short prompt;
           tok/s = (tokens - 1) / (time of last piece - time of first piece)
  ttft512: wall time from the call to the first piece for a 512-token prompt,
           compared with 512 / pp512 of llama-bench (pure prompt evaluation)

Usage: python3 benchmarks/bench_decode.py [--reps 5] [--quick] [--flash-attn on|off]
Timings are reported, never asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# run as a script from a checkout: find the in-place built package and the helpers
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import _bench_env as env  # noqa: E402

DECODE_PROMPT = "The capital of France is"
# Plain prose, repeated and cut to exactly --prompt-tokens ids.
FILLER = ("The river runs past the old mill, under the stone bridge and through the town, "
          "where the market opens at dawn and the bakers sell bread to the travellers who "
          "arrive with the morning train from the coast. ")


# ---------------------------------------------------------------- engines

class MullamaEngine:
    name = "mullama"

    def __init__(self, model_path: str, threads: int, flash_attn: str) -> None:
        from mullama import Context, Model, SamplerParams
        self.model = Model.load(model_path)
        self.ctx = Context(self.model, n_ctx=2048, n_threads=threads, n_batch=512,
                           flash_attn=flash_attn == "on")
        self.params = SamplerParams(temperature=0)

    def run(self, ids: list[int], max_tokens: int) -> dict:
        self.ctx.clear_cache()  # evaluate the whole prompt every time, as the peers do
        calls0 = self.ctx.n_decode_calls
        times: list[float] = []
        pieces: list[str] = []
        t0 = time.perf_counter()
        it = self.ctx.generate_stream(ids, max_tokens=max_tokens, params=self.params)
        for piece in it:
            times.append(time.perf_counter())
            pieces.append(piece)
        t_end = time.perf_counter()
        st = it.stats
        return {
            "ttft": times[0] - t0 if times else None,
            "t_last": times[-1] - t0 if times else None,
            "total": t_end - t0,
            "completion_tokens": st.completion_tokens,
            "chunks": len(times),
            "text": "".join(pieces),
            # mullama's own clock, from the first next() rather than from the call
            "stats_ttft": st.time_to_first_token,
            "stats_total": st.total_time,
            "stats_tok_s": st.tokens_per_second,
            "finish_reason": st.finish_reason,
            "decode_calls": self.ctx.n_decode_calls - calls0,
        }

    def close(self) -> None:
        self.ctx.close()
        self.model.close()


class LlamaCppPythonEngine:
    """llama-cpp-python in its own venv, driven through _lcp_worker.py over pipes."""
    name = "llama-cpp-python"

    def __init__(self, python: Path, model_path: str, threads: int, flash_attn: str) -> None:
        worker = Path(__file__).resolve().parent / "_lcp_worker.py"
        # llama.cpp logs to stderr even with verbose=False; keep it out of the report
        self.log_path = env.RESULTS / "lcp-worker.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(python), str(worker), "--model", model_path, "--threads", str(threads),
             "--flash-attn", flash_attn],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        hello = self._read()
        self.version = hello["version"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"the llama-cpp-python worker exited early:\n{tail}")
        return json.loads(line)

    def run(self, ids: list[int], max_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": ids, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def run_llama_bench(exe: Path, model_path: str, threads: int, flash_attn: str,
                    n_prompt: int, n_gen: int) -> dict:
    """One llama-bench repetition (it does its own warm-up): pp and tg tok/s."""
    cmd = [str(exe), "-m", model_path, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-b", "512", "-ub", "512", "-fa", flash_attn, "-r", "1", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed:\n{proc.stderr[-2000:]}")
    out: dict = {}
    for test in json.loads(proc.stdout):
        key = "pp" if test["n_gen"] == 0 else "tg"
        out[key] = test["avg_ts"]
    # (its "build_commit" is the git HEAD of this checkout, not llama.cpp's: not recorded)
    return out


# ---------------------------------------------------------------- numbers

def decode_rate(r: dict) -> float | None:
    """Tokens after the first one over the time after the first one (wall clock)."""
    n = r["completion_tokens"]
    if r["ttft"] is None or n < 2 or r["t_last"] <= r["ttft"]:
        return None
    return (n - 1) / (r["t_last"] - r["ttft"])


def summary(values: list[float | None]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt(s: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if s is None:
        return "-"
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['median'] * scale)} [{f.format(s['min'] * scale)}-"
            f"{f.format(s['max'] * scale)}]")


def compare(num: list, den: list, higher_is_better: bool, target: str) -> dict | None:
    """A ratio three ways, since the machine's speed drifts between runs:
    of the medians; of the best runs (least disturbed); and the median of the
    per-repetition ratios (the engines of one repetition ran seconds apart)."""
    pairs = [(a, b) for a, b in zip(num, den) if a is not None and b]
    if not pairs:
        return None
    nums, dens = [a for a, _ in pairs], [b for _, b in pairs]
    best = max if higher_is_better else min
    return {"median": statistics.median(nums) / statistics.median(dens),
            "best": best(nums) / best(dens),
            "paired": statistics.median(a / b for a, b in pairs), "target": target}


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    from mullama import default_threads
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions per engine (default 5)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 32 tokens")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--flash-attn", choices=("on", "off"), default="on",
                    help="the same for all engines; llama-cpp-python 0.3.36 has no 'auto' "
                         "(on a CPU, llama.cpp's 'auto' resolves to 'on')")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--json", type=Path, default=env.RESULTS / "decode.json")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.max_tokens = 1, 32
    return args


def main() -> None:
    args = parse_args()
    from mullama import default_model_path
    model_path = str(default_model_path())
    pin = env.read_pin()

    # builds first (cached), so that no compiler competes with the timed runs
    bench_exe = env.ensure_llama_bench()
    lcp_py = env.ensure_llama_cpp_python()

    mull = MullamaEngine(model_path, args.threads, args.flash_attn)
    decode_ids = mull.model.tokenize(DECODE_PROMPT)
    text = FILLER
    while len(mull.model.tokenize(text)) < args.prompt_tokens:
        text += FILLER
    long_ids = mull.model.tokenize(text)[:args.prompt_tokens]  # starts with BOS, like a real prompt
    lcp = LlamaCppPythonEngine(lcp_py, model_path, args.threads, args.flash_attn)

    # warm-up: page in the weights and let the allocators settle, not recorded
    for eng in (mull, lcp):
        eng.run(decode_ids, 8)
        eng.run(long_ids, 2)

    raw: dict[str, list[dict]] = {"mullama": [], "llama-cpp-python": [], "llama-bench": []}
    order = ["mullama", "llama-cpp-python", "llama-bench"]
    for rep in range(args.reps):
        k = rep % len(order)
        for name in order[k:] + order[:k]:  # rotate who goes first
            env.log(f"rep {rep + 1}/{args.reps}: {name}")
            if name == "llama-bench":
                raw[name].append(run_llama_bench(bench_exe, model_path, args.threads,
                                                 args.flash_attn, args.prompt_tokens,
                                                 args.max_tokens))
                continue
            eng = mull if name == "mullama" else lcp
            dec = eng.run(decode_ids, args.max_tokens)
            pro = eng.run(long_ids, 4)
            if dec["completion_tokens"] != args.max_tokens:
                env.log(f"WARNING {name} produced {dec['completion_tokens']} tokens, "
                        f"not {args.max_tokens}: its decode rate is over fewer tokens")
            raw[name].append({"decode": dec, "prompt": pro, "decode_tok_s": decode_rate(dec)})
    mull.close()
    lcp.close()

    M, L, B = raw["mullama"], raw["llama-cpp-python"], raw["llama-bench"]
    series = {  # one value per repetition, in repetition order (so they pair up)
        "mullama": {
            "decode_tok_s": [r["decode_tok_s"] for r in M],
            "decode_tok_s_stats": [r["decode"]["stats_tok_s"] for r in M],
            "ttft_short_s": [r["decode"]["ttft"] for r in M],
            "ttft_prompt_s": [r["prompt"]["ttft"] for r in M],
            "ttft_prompt_s_stats": [r["prompt"]["stats_ttft"] for r in M],
        },
        "llama-cpp-python": {
            "decode_tok_s": [r["decode_tok_s"] for r in L],
            "ttft_short_s": [r["decode"]["ttft"] for r in L],
            "ttft_prompt_s": [r["prompt"]["ttft"] for r in L],
        },
        "llama-bench": {
            "tg_tok_s": [r.get("tg") for r in B],
            "pp_tok_s": [r.get("pp") for r in B],
            "pp_time_s": [args.prompt_tokens / r["pp"] if r.get("pp") else None for r in B],
        },
    }
    res = {eng: {k: summary(v) for k, v in d.items()} for eng, d in series.items()}
    m, l, b = series["mullama"], series["llama-cpp-python"], series["llama-bench"]
    n = args.prompt_tokens
    ratios = {
        "mullama decode / llama-bench tg": compare(m["decode_tok_s"], b["tg_tok_s"], True, ">= 0.98"),
        "mullama decode / llama-cpp-python decode": compare(
            m["decode_tok_s"], l["decode_tok_s"], True, ">= 1.0"),
        "llama-cpp-python decode / llama-bench tg": compare(
            l["decode_tok_s"], b["tg_tok_s"], True, "-"),
        f"mullama TTFT{n} / ({n}/pp{n})": compare(m["ttft_prompt_s"], b["pp_time_s"], False, "<= 1.05"),
        f"llama-cpp-python TTFT{n} / ({n}/pp{n})": compare(
            l["ttft_prompt_s"], b["pp_time_s"], False, "-"),
    }
    same_text = raw["mullama"][0]["decode"]["text"] == raw["llama-cpp-python"][0]["decode"]["text"]

    meta = {
        "llama_cpp_commit": pin.get("llama_cpp_commit"),
        "llama_cpp_python_version": lcp.version,
        "cpu": env.cpu_model(), "threads": args.threads, "flash_attn": args.flash_attn,
        "model": model_path, "reps": args.reps, "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens, "decode_prompt_tokens": len(decode_ids),
        "n_ctx": 2048, "n_batch": 512, "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "meta": meta, "summary": res, "same_greedy_text": same_text,
        "ratios": ratios,
        "raw": raw,
    }, indent=2))
    print_report(meta, res, ratios, same_text, raw, args)


def print_report(meta: dict, res: dict, ratios: dict, same_text: bool, raw: dict,
                 args: argparse.Namespace) -> None:
    n = args.prompt_tokens
    print(f"\nllama.cpp {meta['llama_cpp_commit']} | llama-cpp-python {meta['llama_cpp_python_version']}"
          f" | CPU {meta['cpu']} | threads {meta['threads']} | flash-attn {meta['flash_attn']}")
    print(f"model {Path(meta['model']).name} | reps {meta['reps']} | decode {args.max_tokens} tokens "
          f"after a {meta['decode_prompt_tokens']}-token prompt | median [min-max]\n")
    m, l, b = res["mullama"], res["llama-cpp-python"], res["llama-bench"]
    rows = [
        ("engine", "decode tok/s", "TTFT short (ms)", f"TTFT {n} (ms)", f"prompt tok/s ({n})"),
        ("mullama", fmt(m["decode_tok_s"]), fmt(m["ttft_short_s"], 1000),
         fmt(m["ttft_prompt_s"], 1000), f"{n / m['ttft_prompt_s']['median']:.0f}"),
        ("llama-cpp-python", fmt(l["decode_tok_s"]), fmt(l["ttft_short_s"], 1000),
         fmt(l["ttft_prompt_s"], 1000), f"{n / l['ttft_prompt_s']['median']:.0f}"),
        ("llama-bench", f"{fmt(b['tg_tok_s'])} (tg{args.max_tokens})", "-",
         f"{fmt(b['pp_time_s'], 1000)} ({n}/pp{n})", f"{fmt(b['pp_tok_s'], digits=0)} (pp{n})"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print(f"{'ratio':<42} {'median':>7} {'best':>7} {'paired':>7}   target")
    for name, r in ratios.items():
        if r is None:
            print(f"{name:<42} {'-':>7}")
            continue
        print(f"{name:<42} {r['median']:7.3f} {r['best']:7.3f} {r['paired']:7.3f}   {r['target']}")
    print(f"\nmullama decode by its own stats: {fmt(m['decode_tok_s_stats'])} tok/s; "
          f"TTFT {n} by its stats (from first next()): {fmt(m['ttft_prompt_s_stats'], 1000)} ms")
    dc = [r["decode"]["decode_calls"] for r in raw["mullama"]]
    print(f"mullama llama_decode calls per {args.max_tokens}-token generation: {dc[0]}; "
          f"greedy text identical to llama-cpp-python: {'yes' if same_text else 'no'}")
    print(f"raw numbers: {args.json}")


if __name__ == "__main__":
    main()
