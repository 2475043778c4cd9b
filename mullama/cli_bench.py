"""``mullama bench``: the speed table on the command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure prompt, decode and batched streaming speed on a model")
    p.add_argument("--model", "-m", help="store name or GGUF path (default: the embedded Gemma 3 270M)")
    p.add_argument("--threads", "-t", type=int, default=None, help="decode threads (default: the physical cores)")
    p.add_argument("--prompt-tokens", "-p", type=int, default=512)
    p.add_argument("--gen-tokens", "-n", type=int, default=128)
    p.add_argument("--reps", "-r", type=int, default=3)
    p.add_argument("--streams", default="1,2,4,8", help="concurrent stream counts (default 1,2,4,8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    import json

    from mullama import default_model_path
    from mullama.bench import format_table, run_bench
    from mullama.context import default_threads
    from mullama.store import resolve

    try:
        streams = [int(s) for s in args.streams.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--streams must be a comma-separated list of integers, got {args.streams!r}") from None
    path = resolve(args.model) if args.model else default_model_path()
    threads = args.threads or default_threads()
    rows = run_bench(str(path), threads=threads, n_prompt=args.prompt_tokens, n_gen=args.gen_tokens,
                     reps=args.reps, streams=streams,
                     progress=None if args.json else (lambda msg: print(f"... {msg}", file=sys.stderr)))
    if args.json:
        print(json.dumps({"model": str(path), "threads": threads, "rows": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(format_table(rows, f"mullama bench: {path} ({threads} threads, {args.reps} reps)"))
    return 0
