"""The ``mullama`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from mullama import cli_bench, cli_rpc, cli_serve, cli_store

__all__ = ["main"]


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="stream a completion for PROMPT to the terminal")
    p.add_argument("prompt", nargs="?", help="the prompt (read from stdin when omitted)")
    p.add_argument("--model", "-m", help="GGUF file (default: the embedded Gemma 3 270M)")
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--grammar-file", metavar="FILE", help="constrain the output to this GBNF grammar")
    p.add_argument("--json-schema", metavar="SCHEMA",
                   help="constrain the output to instances of this JSON Schema (JSON text, or @FILE)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-stats", action="store_true", help="do not print the statistics line")
    cli_rpc.add_rpc_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mullama import Context, Model, SamplerParams, default_model_path, store

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    params = SamplerParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           grammar=_read_text(args.grammar_file) if args.grammar_file else None,
                           json_schema=_read_schema(args.json_schema) if args.json_schema else None)
    path = store.resolve(args.model) if args.model else default_model_path()
    with Model.load(path, **cli_rpc.rpc_load_options(args)) as model, \
            Context(model, n_ctx=args.n_ctx, n_threads=args.threads) as ctx:
        if args.chat:
            prompt = model.apply_chat_template([{"role": "user", "content": prompt}])
        stream = ctx.generate_stream(prompt, max_tokens=args.max_tokens, params=params, stop=args.stop)
        out = sys.stdout
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stream.close()
            out.write("\n[interrupted]")
        out.write("\n")
        out.flush()
        if not args.no_stats:
            s = stream.stats
            ttft = f"{s.time_to_first_token * 1000:.0f} ms" if s.time_to_first_token is not None else "-"
            print(
                f"[prompt {s.prompt_tokens} tokens | generated {s.completion_tokens} tokens | "
                f"first token {ttft} | {s.tokens_per_second:.1f} tok/s | {s.finish_reason}]",
                file=sys.stderr,
            )
    return 0


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _read_schema(arg: str) -> object:
    import json

    text = _read_text(arg[1:]) if arg.startswith("@") else arg
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--json-schema is not valid JSON: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mullama", description="Stream tokens from a local GGUF model.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    _add_run(sub)
    cli_store.add_parsers(sub)
    cli_serve.add_parsers(sub)
    cli_bench.add_parsers(sub)
    cli_rpc.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mullama import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from mullama.errors import MullamaError

    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (MullamaError, ValueError, TypeError, OSError) as exc:
        print(f"mullama: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
