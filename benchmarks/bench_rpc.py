"""One model over two loopback ``mullama rpc-server`` processes vs the same model local.

Needs a build with MULLAMA_RPC=1. Per repetition (the engines interleaved): load time,
and greedy decode of --tokens tokens after a short prompt, timed in this process from
the first piece to the last. Engines:

  local          Model.load(path), in this process
  rpc (child)    Model.load(path, rpc_servers=[a, b], tensor_split=[1, 1]): the engine runs
                 in a child process, each piece crosses a pipe
  rpc (in proc)  the same with in_process=True: what the pipe costs is the difference

On one machine the two servers share its cores and the "network" is loopback, so this
measures the protocol's and the pipe's overhead, not what separate hosts give.

    python3 benchmarks/bench_rpc.py [--reps 3] [--tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mullama  # noqa: E402
from mullama import rpc  # noqa: E402

PROMPT = "The capital of France is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mullama", "rpc-server", "--port", str(port),
                             "--threads", str(threads)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("rpc-server did not start")
            time.sleep(0.1)


def run_once(path: str, threads: int, tokens: int, **load: object) -> tuple[float, float, float]:
    """(load seconds, TTFT seconds, decode tok/s)."""
    t0 = time.perf_counter()
    model = mullama.Model.load(path, **load)
    t_load = time.perf_counter() - t0
    try:
        with mullama.Context(model, n_ctx=512, n_threads=threads) as ctx:
            greedy = mullama.SamplerParams(temperature=0.0)
            ctx.generate(PROMPT, max_tokens=4, params=greedy)  # warm-up
            t0 = time.perf_counter()
            first = last = None
            n = 0
            for _ in ctx.stream_tokens(PROMPT, max_tokens=tokens, params=greedy):
                last = time.perf_counter()
                if first is None:
                    first = last
                n += 1
            return t_load, first - t0, (n - 1) / (last - first)
    finally:
        model.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="threads of the local engine and of each server")
    args = ap.parse_args()
    if not rpc.rpc_available():
        raise SystemExit("this build has no RPC backend: rebuild with MULLAMA_RPC=1")
    path = str(mullama.default_model_path())
    servers = [start_server(args.threads) for _ in range(2)]
    endpoints = [e for _, e in servers]
    engines = {
        "local": {},
        "rpc (child)": {"rpc_servers": endpoints, "tensor_split": [1, 1]},
        "rpc (in proc)": {"rpc_servers": endpoints, "tensor_split": [1, 1], "in_process": True},
    }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in engines}
    try:
        for rep in range(args.reps):
            names = list(engines)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for name in names:
                results[name].append(run_once(path, args.threads, args.tokens, **engines[name]))
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait()
    print(f"{args.reps} reps, {args.tokens} tokens, {args.threads} thread(s) per engine/server; medians")
    print(f"{'engine':16} {'load s':>8} {'TTFT ms':>8} {'decode tok/s':>13}")
    med = {}
    for name, rows in results.items():
        med[name] = [statistics.median(col) for col in zip(*rows)]
        load_s, ttft, tps = med[name]
        print(f"{name:16} {load_s:8.2f} {ttft * 1000:8.1f} {tps:13.1f}")
    base = med["local"][2]
    for name in ("rpc (child)", "rpc (in proc)"):
        print(f"{name} decode / local decode: {med[name][2] / base:.2f}")
    print(f"child / in-process decode: {med['rpc (child)'][2] / med['rpc (in proc)'][2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
