"""The command line's RPC parts: ``mullama rpc-server`` and ``--rpc`` for run / serve."""

from __future__ import annotations

import argparse

__all__ = ["add_parsers", "add_rpc_arguments", "rpc_load_options"]


def add_rpc_arguments(p: argparse.ArgumentParser) -> None:
    """``--rpc`` and ``--tensor-split``, shared by run and serve."""
    p.add_argument("--rpc", metavar="HOST:PORT,...", default=None,
                   help="put the model's layers on these RPC servers ('mullama rpc-server'; "
                        "needs a build with MULLAMA_RPC=1)")
    p.add_argument("--tensor-split", metavar="W,...", default=None,
                   help="with --rpc: share of the layers for each server's device, e.g. 1,1")


def rpc_load_options(args: argparse.Namespace) -> dict:
    """Model.load keywords for --rpc / --tensor-split."""
    if args.rpc is None:
        if args.tensor_split is not None:
            raise ValueError("--tensor-split needs --rpc")
        return {}
    split = None
    if args.tensor_split is not None:
        try:
            split = [float(w) for w in args.tensor_split.split(",")]
        except ValueError:
            raise ValueError(f"--tensor-split must be numbers separated by commas, got {args.tensor_split!r}") \
                from None
    return {"rpc_servers": args.rpc, "tensor_split": split}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from mullama.rpc import DEFAULT_PORT

    p = sub.add_parser(
        "rpc-server", help="serve this machine's CPU to other hosts' models over ggml's RPC protocol",
        description="Serve this machine's CPU as a device for models loaded elsewhere with --rpc / "
                    "rpc_servers=. The protocol has no authentication and has had remote-code-execution "
                    "vulnerabilities: never let an untrusted network reach it.")
    p.add_argument("--host", default="127.0.0.1", help="IPv4 address to listen on (default 127.0.0.1)")
    p.add_argument("--port", "-p", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--threads", "-t", type=int, default=None, help="compute threads (default: the CPUs)")
    p.set_defaults(func=_rpc_server)


def _rpc_server(args: argparse.Namespace) -> int:
    from mullama.rpc import serve

    return serve(args.host, args.port, args.threads)
