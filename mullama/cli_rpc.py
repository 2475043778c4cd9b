"""The command line's RPC parts: ``mullama rpc-server`` and ``--rpc`` for run / serve."""

from __future__ import annotations

import argparse
import socket

__all__ = ["add_parsers", "add_rpc_arguments", "add_serve_arguments", "rpc_load_options", "supervise_serve"]

# a serving child that dies this many times in a row, each within this many seconds of its start,
# is not restarted again
QUICK_DEATHS = 3
QUICK_DEATH_S = 30.0


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


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """``mullama serve``'s RPC options (the listening-socket one is internal)."""
    group = p.add_argument_group(
        "layers on RPC servers (a build with MULLAMA_RPC=1)",
        "The HTTP server then runs in a child process that holds the model, watched by this one: "
        "llama.cpp aborts a process whose RPC server dies, so this process reports it, waits until "
        "every RPC server answers again and starts a new child on the same socket.")
    group.add_argument("--rpc", metavar="HOST:PORT,...", default=None,
                       help="put the model's layers on these RPC servers ('mullama rpc-server')")
    group.add_argument("--tensor-split", metavar="W,...", default=None,
                       help="share of the layers for each server's device, e.g. 1,1")
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)


def supervise_serve(args: argparse.Namespace, sock: socket.socket) -> int:
    """Run ``mullama serve`` on ``sock`` in a child process; start a new one when it dies
    because an RPC server went away (once every server answers again)."""
    import signal
    import subprocess
    import sys
    import time

    from mullama import errors
    from mullama.rpc import check_reachable, child_env, parse_endpoints

    servers = parse_endpoints(args.rpc)
    cmd = [sys.executable, "-m", "mullama", *args.argv, "--listen-fd", str(sock.fileno())]
    env = child_env()
    child: subprocess.Popen | None = None
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    quick_deaths = 0
    try:
        while True:
            started = time.monotonic()
            child = subprocess.Popen(cmd, pass_fds=[sock.fileno()], env=env)
            code = child.wait()
            if stopping or code >= 0:
                return code
            # a server that accepts connections but breaks every load would restart us forever
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < QUICK_DEATH_S else 0
            if quick_deaths >= QUICK_DEATHS:
                print(f"mullama: the serving process died {quick_deaths} times within {QUICK_DEATH_S:.0f} s of "
                      f"its start; giving up", file=sys.stderr, flush=True)
                return 1
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            print(f"mullama: the serving process died ({name}); an RPC server of {','.join(servers)} stopped "
                  f"answering. A new one starts when every RPC server answers.", file=sys.stderr, flush=True)
            while not stopping:
                try:
                    check_reachable(servers, timeout=1.0)
                    break
                except errors.ModelLoadError:
                    time.sleep(1.0)
            if stopping:
                return 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
