"""Decode speed under a JSON Schema constraint: mullama against itself unconstrained and against llama-server.

One run, the default model (Gemma 3 270M Q4_K_M), one thread count, greedy.
Four configurations, each generating exactly --tokens tokens after the same
prompt (the same token ids for both engines):

  mullama free    Context.generate_stream(ids, params=SamplerParams(temperature=0))
  mullama schema  the same with SamplerParams(grammar=json_schema_to_gbnf(SCHEMA))
  server free     llama-server (-np 1) /completion, streamed, temperature 0
  server schema   the same with "json_schema": SCHEMA

The schema asks for at least MIN_ITEMS objects, more than --tokens tokens can
hold, so no configuration ends early. Decode tok/s = (tokens - 1) / (time of
the last piece - time of the first piece), wall clock; the configurations run
interleaved, the order rotating per repetition. Targets: mullama schema /
mullama free >= 0.85, mullama schema / server schema >= 1.0.

Usage: python benchmarks/bench_grammar.py [--reps 5] [--tokens 128] [--quick]
Timings are reported, never asserted; raw numbers go to bench-results/grammar.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import _bench_env as env  # noqa: E402

PROMPT = "A list of cities of the world with their country and population, as JSON:\n"
MIN_ITEMS = 24
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "cities": {
            "type": "array",
            "minItems": MIN_ITEMS,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "country": {"type": "string"},
                    "population": {"type": "integer"},
                    "capital": {"type": "boolean"},
                },
                "required": ["name", "country", "population", "capital"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["cities"],
    "additionalProperties": False,
}
CONFIGS = ("mullama free", "mullama schema", "server free", "server schema")


class Mullama:
    def __init__(self, model_path: str, threads: int) -> None:
        from mullama import Context, Model, SamplerParams

        self.model = Model.load(model_path)
        self.ctx = Context(self.model, n_ctx=2048, n_threads=threads, n_batch=512)
        self.free = SamplerParams(temperature=0)
        self.constrained = SamplerParams(temperature=0, json_schema=SCHEMA)

    def run(self, ids: list[int], tokens: int, constrained: bool) -> dict:
        self.ctx.clear_cache()
        params = self.constrained if constrained else self.free
        before = _grammar_counters(self.ctx)
        clock0 = dict(self.ctx._engine.timing)
        stamps: list[float] = []
        pieces: list[str] = []
        t0 = time.perf_counter()
        it = self.ctx.generate_stream(ids, max_tokens=tokens, params=params)
        for piece in it:
            stamps.append(time.perf_counter())
            pieces.append(piece)
        after = _grammar_counters(self.ctx)
        clock1 = self.ctx._engine.timing
        stats = it.stats
        out = {"stamps": [t - t0 for t in stamps], "tokens": stats.completion_tokens,
               "finish_reason": stats.finish_reason, "text": "".join(pieces),
               # the engine's own clocks: inside llama_decode, and after it (sampling with the
               # grammar, text pipeline); the second is where a constraint costs
               "decode_s": clock1["decode_s"] - clock0["decode_s"],
               "sample_s": clock1["sample_s"] - clock0["sample_s"]}
        if before is not None and after is not None:
            out["grammar_counters"] = {k: after[k] - before.get(k, 0) for k in after}
        return out

    def close(self) -> None:
        self.ctx.close()
        self.model.close()


def _grammar_counters(ctx: Any) -> dict[str, int]:
    """Tokens chosen under a grammar, first choices it rejected, and passes over the whole vocabulary."""
    return dict(ctx.grammar_stats)


class Server:
    def __init__(self, exe: Path, model_path: str, threads: int) -> None:
        self.proc, self.port = env.start_llama_server(
            exe, ["-m", model_path, "-np", "1", "-c", "2048", "-b", "512", "-t", str(threads),
                  "-tb", str(threads), "--no-webui"])

    def run(self, ids: list[int], tokens: int, constrained: bool) -> dict:
        body: dict[str, Any] = {"prompt": ids, "n_predict": tokens, "temperature": 0.0, "top_k": 1,
                                "cache_prompt": False}
        if constrained:
            body["json_schema"] = SCHEMA
        t0 = time.perf_counter()
        stamps, pieces, final = env.stream_completion(self.port, body)
        timings = final.get("timings", {})
        return {"stamps": [t - t0 for t in stamps], "tokens": final.get("tokens_predicted", len(stamps)),
                "finish_reason": final.get("stop_type"), "text": "".join(pieces),
                "server_tok_s": timings.get("predicted_per_second")}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def ensure_server() -> Path:
    exe = env.TOOLS_BUILD / "bin" / "llama-server"
    if exe.is_file():
        return exe
    env.ensure_llama_bench()  # configures the tools build folder
    env.log("building llama-server (cached afterwards)")
    env._run(["cmake", "--build", str(env.TOOLS_BUILD), "--target", "llama-server", "-j", "2"],
             env.TOOLS_BUILD.parent / "bench-server-build.log")
    return exe


def decode_rate(r: dict) -> float | None:
    s = r["stamps"]
    if len(s) < 2 or s[-1] <= s[0]:
        return None
    # pieces and tokens differ only where a piece holds back an incomplete UTF-8 character
    return (r["tokens"] - 1) / (s[-1] - s[0])


def compare(num: list, den: list) -> dict | None:
    """A ratio three ways: of the medians, of the best runs, and the median of per-repetition ratios."""
    pairs = [(a, b) for a, b in zip(num, den) if a is not None and b]
    if not pairs:
        return None
    nums, dens = [a for a, _ in pairs], [b for _, b in pairs]
    return {"median": statistics.median(nums) / statistics.median(dens), "best": max(nums) / max(dens),
            "paired": statistics.median(a / b for a, b in pairs)}


def main() -> None:
    from mullama import default_model_path, default_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 32 tokens")
    ap.add_argument("--json", type=Path, default=env.RESULTS / "grammar.json")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.tokens = 1, 32
    model_path = str(default_model_path())

    exe = ensure_server()
    mull = Mullama(model_path, args.threads)
    ids = mull.model.tokenize(PROMPT)
    server = Server(exe, model_path, args.threads)
    raw: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    try:
        for engine in (mull, server):  # warm-up, not recorded
            engine.run(ids, 8, False)
            engine.run(ids, 8, True)
        for rep in range(args.reps):
            k = rep % len(CONFIGS)
            for name in CONFIGS[k:] + CONFIGS[:k]:
                env.log(f"rep {rep + 1}/{args.reps}: {name}")
                engine = mull if name.startswith("mullama") else server
                r = engine.run(ids, args.tokens, name.endswith("schema"))
                if r["tokens"] != args.tokens:
                    env.log(f"WARNING {name} generated {r['tokens']} tokens, not {args.tokens}")
                r["tok_s"] = decode_rate(r)
                raw[name].append(r)
    finally:
        server.close()
        mull.close()

    rates = {c: [r["tok_s"] for r in raw[c]] for c in CONFIGS}
    ratios = {
        "mullama schema / mullama free": (compare(rates["mullama schema"], rates["mullama free"]), ">= 0.85"),
        "mullama schema / server schema": (compare(rates["mullama schema"], rates["server schema"]), ">= 1.0"),
        "mullama free / server free": (compare(rates["mullama free"], rates["server free"]), "-"),
        "server schema / server free": (compare(rates["server schema"], rates["server free"]), "-"),
    }
    counters = [r.get("grammar_counters") for r in raw["mullama schema"]]
    meta = {"cpu": env.cpu_model(), "threads": args.threads, "tokens": args.tokens, "reps": args.reps,
            "prompt_tokens": len(ids), "model": model_path, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "schema": SCHEMA, "ratios": ratios, "raw": raw}, indent=2))

    print(f"\nCPU {meta['cpu']} | threads {args.threads} | {args.tokens} tokens after a "
          f"{len(ids)}-token prompt | greedy | reps {args.reps} | median [min-max]\n")
    for c in CONFIGS:
        vals = [v for v in rates[c] if v is not None]
        if vals:
            print(f"{c:<16} {statistics.median(vals):7.1f} [{min(vals):.1f}-{max(vals):.1f}] tok/s")
    print(f"\n{'ratio':<34} {'median':>7} {'best':>7} {'paired':>7}   target")
    for name, (r, target) in ratios.items():
        if r is None:
            print(f"{name:<34} {'-':>7}")
        else:
            print(f"{name:<34} {r['median']:7.3f} {r['best']:7.3f} {r['paired']:7.3f}   {target}")
    for c in ("mullama free", "mullama schema"):
        dec = statistics.median(r["decode_s"] / r["tokens"] for r in raw[c])
        smp = statistics.median(r["sample_s"] / r["tokens"] for r in raw[c])
        print(f"{c}: {dec * 1e3:.2f} ms/token in llama_decode, {smp * 1e3:.3f} ms/token after it (sampling)")
    if all(counters):
        total = {k: sum(c[k] for c in counters) for k in counters[0]}
        n = total["tokens"] or float("nan")
        print(f"\nmullama schema runs: {total['tokens']} tokens under the grammar; the first choice was "
              f"rejected for {total.get('rejected', 0)} ({total.get('rejected', 0) / n:.1%}), "
              f"{total['full_passes']} needed the full grammar pass ({total['full_passes'] / n:.1%})")
    else:
        print("\nmullama exposes no grammar counters: the share of full grammar passes is not known")
    print(f"sample (mullama schema): {raw['mullama schema'][0]['text'][:160]!r}")
    print(f"raw numbers: {args.json}")


if __name__ == "__main__":
    main()
