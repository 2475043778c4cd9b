"""Speculative decoding from the prompt (n-gram lookup): mullama with and without it, and
llama-server with its own n-gram speculation, on the same prompts in one run.

Workloads (the default model, the same threads; greedy unless said):
- grounded: the prompt holds a ~400-token passage and asks for it back with a small edit;
  and a code-edit prompt (a ~300-token module, one name to change);
- free text: a plain prompt the (base) default model continues in prose, sampled
  (temperature 0.8, top_p 0.95, a fixed seed per repetition): greedy decoding of a
  270M model falls into loops within a hundred tokens, which n-gram drafts then copy,
  so a greedy prompt would not test text that does not repeat;
- 8 concurrent grounded streams (mullama's batch engine), aggregate rate.

Decode rate per run: (tokens - 1) / (time of the last piece - time of the first piece),
wall clock, so the prompt's evaluation is not counted. Engines are interleaved per
repetition; the median over repetitions is reported with the ratios and their goals
(grounded >= 1.6x without speculation and >= 1.0x llama-server's n-gram speculation,
free text >= 0.97x, 8 grounded streams >= 1.2x).

Usage: python benchmarks/bench_spec.py [--tokens N] [--reps N] [--quick] [--no-server]
(llama-server runs the grounded prompts only: free text is compared with mullama alone.)
Nothing is asserted; figures go to stdout and bench-results/spec.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import _bench_env as env  # noqa: E402

from mullama import AsyncModel, Context, Model, SamplerParams, StreamConfig, default_model_path  # noqa: E402
from mullama import default_threads  # noqa: E402

PASSAGE = """The river town of Aldermere grew up around a stone bridge built in the twelfth century. \
Merchants crossed it with wool and salt, and the toll they paid funded the first school, a chapel, \
and later a market hall with a clock that still strikes every quarter hour. In the sixteenth century \
a flood carried away two of the bridge's five arches; the townspeople rebuilt them in brick, which is \
why the bridge still looks mismatched today. The wool trade declined in the eighteenth century, but \
the arrival of the canal in 1794 brought coal barges and a brewery that employed a third of the town. \
The brewery closed in 1962 and its buildings became workshops, a small museum and, more recently, a \
library with a reading room overlooking the water. Every summer the town holds a fair on the meadow \
below the bridge, with boat races, a brass band and a competition for the best loaf of bread. Visitors \
who climb the church tower can see the old toll house, the canal basin and, on a clear day, the hills \
forty miles to the west. The local historical society keeps a record of every flood since 1540, \
painted as lines on the wall of the toll house, and the highest of them, from the winter of 1947, \
reaches above the height of a door. The society also runs walking tours on Sunday afternoons, which \
start at the market hall and end at the brewery museum, where tea and cake are served."""

CODE = '''import json
from pathlib import Path


def load_records(path):
    """Read one JSON record per line, skipping blank lines."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            records.append(json.loads(line))
    return records


def total_amount(records):
    """The sum of the amount field of every record."""
    total = 0
    for record in records:
        total += record.get("amount", 0)
    return total


def by_customer(records):
    """Group the records by their customer field."""
    groups = {}
    for record in records:
        groups.setdefault(record["customer"], []).append(record)
    return groups


def write_summary(records, path):
    """Write the total and the number of records per customer as JSON."""
    summary = {"total": total_amount(records), "customers": {}}
    for customer, items in by_customer(records).items():
        summary["customers"][customer] = len(items)
    Path(path).write_text(json.dumps(summary, indent=2), encoding="utf-8")
'''


def chat(user: str) -> str:
    return f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"


GROUNDED = {
    "passage-edit": chat("Repeat this text, but write 'Aldermere' as 'Alderbury':\n" + PASSAGE),
    "code-edit": chat("Rename the function total_amount to sum_amounts in this module and give the "
                      "whole module back:\n" + CODE),
}
FREE = {"free-text": "The history of the printing press begins in"}
FREE_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 40}


def decode_rate(stamps: list[float], n: int) -> float:
    return (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else 0.0


def run_mullama(ctx: Context, prompt: str, tokens: int, spec: bool, seed: int | None = None) -> dict:
    sampling = dict(FREE_SAMPLING, seed=seed) if seed is not None else {"temperature": 0.0}
    params = SamplerParams(**sampling, speculative="ngram" if spec else None)
    stamps: list[float] = []
    n = 0
    for tok in ctx.stream_tokens(prompt, tokens, params, logprobs=False):
        stamps.append(time.perf_counter())
        n += 1
    stats = ctx.last_stats
    ctx.clear_cache()
    return {"tokens": n, "tok_s": decode_rate(stamps, n), "drafted": stats.draft_tokens,
            "accepted": stats.accepted_tokens}


async def concurrent(model: AsyncModel, prompts: list[str], tokens: int, spec: bool) -> dict:
    cfg = StreamConfig(max_tokens=tokens, temperature=0.0, timeout_ms=0, buffer_size=64,
                       speculative="ngram" if spec else None)
    firsts: list[float] = []
    lasts: list[float] = []
    counts: list[int] = []

    async def one(p: str) -> None:
        n, first, last = 0, 0.0, 0.0
        async with await model.generate_stream(p, cfg) as stream:
            async for _ in stream:
                last = time.perf_counter()
                first = first or last
                n += 1
        firsts.append(first)
        lasts.append(last)
        counts.append(n)

    async with anyio.create_task_group() as tg:
        for p in prompts:
            tg.start_soon(one, p)
    model.clear_cache()
    # aggregate decode rate: every stream's tokens after its first, over the span in which all decoded
    return {"tokens": sum(counts), "tok_s": (sum(counts) - len(counts)) / (max(lasts) - max(firsts))
            if max(lasts) > max(firsts) else 0.0}


SERVER_SPEC = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
               "--spec-ngram-simple-size-m", "16", "--spec-draft-n-max", "16"]


def start_server(model_path: str, threads: int, spec: bool) -> tuple[subprocess.Popen, int]:
    args = ["-m", model_path, "-np", "1", "-c", "2048", "-t", str(threads), "-tb", str(threads),
            "-fa", "auto", "--no-webui"] + (SERVER_SPEC if spec else [])
    return env.start_llama_server(env.TOOLS_BUILD / "bin" / "llama-server", args)


def run_server(port: int, prompt: str, tokens: int) -> dict:
    stamps, _, final = env.stream_completion(port, {"prompt": prompt, "n_predict": tokens, "temperature": 0.0,
                                                    "top_k": 1, "cache_prompt": False})
    n = int(final.get("tokens_predicted", len(stamps)))
    timings = final.get("timings", {})
    # an event can carry several tokens: the rate is over the tokens after the first event's
    rate = (n - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    return {"tokens": n, "tok_s": rate, "server_tok_s": timings.get("predicted_per_second"),
            "drafted": timings.get("draft_n"), "accepted": timings.get("draft_n_accepted")}


def med(rows: list[dict], key: str = "tok_s") -> float:
    return statistics.median(r[key] for r in rows) if rows else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-server", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.reps = 96, 1
    model_path = str(default_model_path())
    model = Model.load(model_path)
    prompts = {**GROUNDED, **FREE}
    res: dict[str, dict[str, list[dict]]] = {name: {} for name in prompts}
    ctx = Context(model, n_ctx=2048, n_threads=args.threads)
    servers = {}
    if not args.no_server:
        for spec in (False, True):
            servers[spec] = start_server(model_path, args.threads, spec)
    try:
        for rep in range(args.reps):
            for name, prompt in prompts.items():
                free = name in FREE
                # free text is sampled: the same seed for both runs of a repetition
                seed = 1000 + rep if free else None
                order = ["mullama", "mullama+spec"] + (["server", "server+spec"] if servers and not free else [])
                order = order[rep % len(order):] + order[:rep % len(order)]
                for engine in order:
                    if engine.startswith("mullama"):
                        row = run_mullama(ctx, prompt, args.tokens, engine.endswith("spec"), seed)
                    else:
                        row = run_server(servers[engine.endswith("spec")][1], prompt, args.tokens)
                    res[name].setdefault(engine, []).append(row)
                    env.log(f"rep {rep} {name:13s} {engine:13s} {row}")
    finally:
        for proc, _ in servers.values():
            proc.kill()
            proc.wait()
        ctx.close()
    # 8 concurrent grounded streams
    amodel = AsyncModel(model, n_ctx=1024, n_parallel=8, n_threads=args.threads)
    streams = [GROUNDED["passage-edit"], GROUNDED["code-edit"]] * 4
    conc: dict[str, list[dict]] = {"mullama": [], "mullama+spec": []}
    try:
        for rep in range(args.reps):
            for spec in ((False, True) if rep % 2 == 0 else (True, False)):
                row = anyio.run(concurrent, amodel, streams, min(args.tokens, 160), spec)
                conc["mullama+spec" if spec else "mullama"].append(row)
                env.log(f"rep {rep} 8 streams spec={spec} {row}")
    finally:
        amodel.close()

    print(f"\ngreedy decode tok/s (median of {args.reps}, {args.tokens} tokens max, {args.threads} threads, "
          f"{env.cpu_model()})")
    ratios: dict[str, float] = {}
    for name, rows in res.items():
        line = "  ".join(f"{e} {med(r):6.1f}" for e, r in rows.items())
        spec = rows["mullama+spec"]
        acc = sum(r["accepted"] for r in spec) / max(1, sum(r["drafted"] for r in spec))
        print(f"{name:13s} {line}  (mullama drafted {spec[-1]['drafted']}, accepted {acc:.0%})")
        ratios[f"{name} spec/no-spec"] = med(spec) / med(rows["mullama"])
        if "server+spec" in rows:
            ratios[f"{name} spec/server+spec"] = med(spec) / med(rows["server+spec"])
    ratios["8 grounded streams spec/no-spec"] = med(conc["mullama+spec"]) / med(conc["mullama"])
    print(f"8 grounded streams aggregate: no spec {med(conc['mullama']):.1f}, spec {med(conc['mullama+spec']):.1f}")
    goals = {"spec/no-spec": 1.6, "spec/server+spec": 1.0}
    for key, value in ratios.items():
        goal = 0.97 if key.startswith("free") else \
            1.2 if key.startswith("8 ") else next((g for k, g in goals.items() if key.endswith(k)), None)
        print(f"{key:40s} {value:5.2f}x" + (f"  (goal >= {goal})" if goal else ""))
    env.RESULTS.mkdir(exist_ok=True)
    (env.RESULTS / "spec.json").write_text(json.dumps({"args": vars(args), "single": res, "concurrent": conc,
                                                       "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
