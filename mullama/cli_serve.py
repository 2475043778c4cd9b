"""``mullama serve``: the HTTP server on the command line."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from mullama.cli_rpc import add_serve_arguments, rpc_load_options, supervise_serve

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (SSE, WebSocket, OpenAI-compatible API)")
    p.add_argument("--model", "-m", help="store name or GGUF path (default: the embedded Gemma 3 270M)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (0 picks a free one; default 8080)")
    p.add_argument("--parallel", "-np", type=int, default=4, help="streams decoded together (default 4)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context length of each stream (default 2048)")
    p.add_argument("--threads", type=int, default=None, help="decode threads (default: the physical cores)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (default 64)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not keep a finished stream's KV cells for the next prompt sharing its prefix")
    p.add_argument("--api-key", default=os.environ.get("MULLAMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MULLAMA_API_KEY, or none)")
    p.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--model-id", default=None, help="the model name /v1/models reports")
    p.add_argument("--speculative", choices=["ngram"], default=None,
                   help="verify drafts taken from each prompt and output (n-gram lookup) in the same pass")
    p.add_argument("--access-log", action="store_true", help="log each request to stderr")
    ray = p.add_argument_group(
        "replicas on Ray Serve (pip install 'mullama[ray]')",
        "Run N copies of the server behind Ray Serve's proxy, which listens on --host/--port. Without "
        "--ray-address a one-machine Ray is started on 127.0.0.1 and stopped on exit. Ray has no "
        "authentication: a cluster belongs on a private network.")
    ray.add_argument("--replicas", type=int, default=None, metavar="N",
                     help="serve through Ray Serve with N replicas (with autoscaling: the initial number)")
    ray.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="join this Ray cluster (e.g. 'auto' or HOST:6379) instead of starting one")
    ray.add_argument("--ray-cpus", type=int, default=None,
                     help="CPUs of the Ray started here (default: this process's CPUs)")
    ray.add_argument("--replica-cpus", type=float, default=None,
                     help="CPUs Ray reserves for each replica (default 1, or a share of --ray-cpus)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscale down to this many replicas")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling target of requests per replica (default: its slots)")
    add_serve_arguments(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging

    import trio

    from mullama import AsyncModel, Model, default_model_path
    from mullama.server.runner import bind_socket, serve
    from mullama.server.settings import ServerSettings
    from mullama.store import resolve

    logging.basicConfig(level=logging.INFO if args.access_log else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    path = resolve(args.model) if args.model else default_model_path()
    model_id = args.model_id or args.model or "gemma3:270m"
    settings = ServerSettings(host=args.host, port=args.port, api_key=args.api_key, model_id=model_id,
                              max_tokens_cap=args.max_tokens_cap,
                              default_max_tokens=min(256, args.max_tokens_cap), max_body_bytes=args.max_body,
                              speculative=args.speculative)
    ray_flags = (args.replicas, args.ray_address, args.ray_cpus, args.replica_cpus, args.min_replicas,
                 args.max_replicas, args.target_ongoing_requests)
    if any(flag is not None for flag in ray_flags):
        if args.rpc is not None:
            raise ValueError("--rpc and Ray Serve replicas do not go together: each replica would need its "
                             "own RPC servers (an RPC server serves one client at a time)")
        from mullama.cli_serve_ray import serve_replicas

        return serve_replicas(args, path, model_id, settings)
    load_options = rpc_load_options(args)
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    else:
        sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    if load_options and args.listen_fd is None:
        try:
            return supervise_serve(args, sock)
        finally:
            sock.close()
    # with --rpc this is the supervised child: the engine runs here, in the server's process
    model = AsyncModel(Model.load(path, **load_options, in_process=bool(load_options)), n_ctx=args.n_ctx,
                       n_parallel=args.parallel, n_threads=args.threads, max_queue=args.max_queue,
                       prefix_cache=args.prefix_cache)

    async def until_signal() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(
                model, settings, sock, shutdown_trigger=until_signal, task_status=task_status,
                access_log=args.access_log))
            shown = f"[{host}]" if ":" in host else host
            cache = "" if args.prefix_cache else ", no prefix cache"
            print(f"mullama: serving {model_id} on http://{shown}:{port} ({args.parallel} slots{cache})",
                  file=sys.stderr, flush=True)

    try:
        trio.run(main)
    finally:
        model.close()
        sock.close()
    print("mullama: stopped", file=sys.stderr, flush=True)
    return 0

