"""Ray Serve replicas against ``mullama serve`` directly, under the same load.

In one run, on the default model, each server a child process on 127.0.0.1:
- ``mullama serve`` (Hypercorn, one engine) and ``mullama serve --replicas 1``
  (the same app in a Ray Serve replica behind Serve's proxy), with the same
  slots, context and threads; ``--streams`` concurrent SSE streams per round
  (default 8), rounds interleaved between the two servers. Per round: the
  median time to first token and the aggregate tok/s (all tokens of the
  round / its wall time). Goals: TTFT ratio (Ray / direct) <= 1.15 and
  aggregate tok/s ratio >= 0.9.
- ``mullama serve --replicas 2``: the same rounds, counting which replica
  answered each request (the ``X-Mullama-Replica`` header).

Usage: python benchmarks/bench_ray.py [--rounds N] [--streams N] [--tokens N] [--threads N] [--quick]
Nothing is asserted; the figures go to stdout and bench-results/ray.json.
Needs the 'ray' extra. Ray's own processes take CPU: run on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout built in place
from mullama import default_model_path  # noqa: E402

RESULTS = ROOT / "bench-results"
PROMPTS = [f"Write a short story about a {animal} who learns to {skill}."
           for animal, skill in [("fox", "sing"), ("cat", "swim"), ("owl", "cook"), ("bear", "paint"),
                                 ("crow", "dance"), ("wolf", "read"), ("hare", "sail"), ("mole", "fly"),
                                 ("seal", "knit"), ("lynx", "draw"), ("deer", "juggle"), ("frog", "skate")]]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Server:
    """A ``mullama serve`` child process (with or without replicas), stopped by SIGINT."""

    def __init__(self, name: str, extra: list[str], args: argparse.Namespace) -> None:
        self.name = name
        self.tmp = tempfile.mkdtemp(prefix="mlbench", dir="/tmp")
        env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_TMPDIR=self.tmp)
        cmd = [sys.executable, "-m", "mullama", "serve", "--port", "0", "--parallel", str(args.streams),
               "--n-ctx", "512", "--threads", str(args.threads), "--model", str(default_model_path()),
               "--model-id", "bench", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.port = 0
        deadline = time.monotonic() + 300
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            match = re.search(r"serving bench on http://127\.0\.0\.1:(\d+) ", line)
            if match:
                self.port = int(match.group(1))
                break
            if time.monotonic() > deadline:
                break
        if not self.port:
            self.stop()
            raise RuntimeError(f"{name} did not start")
        # keep reading stderr so that a chatty child never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        log(f"{name} on port {self.port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def one_stream(port: int, prompt: str, tokens: int, start: threading.Barrier, out: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0})
    start.wait()
    sent = time.perf_counter()
    conn.request("POST", "/stream", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    count = 0
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        if first is None and not event["done"]:
            first = time.perf_counter()
        if event["done"]:
            count = event["usage"]["completion_tokens"]
            break
    end = time.perf_counter()
    conn.close()
    out.append({"ttft": (first or end) - sent, "tokens": count, "sent": sent, "end": end,
                "replica": resp.getheader("x-mullama-replica")})


def round_of_streams(port: int, streams: int, tokens: int, offset: int) -> dict:
    out: list[dict] = []
    start = threading.Barrier(streams)
    threads = [threading.Thread(target=one_stream,
                                args=(port, PROMPTS[(offset + i) % len(PROMPTS)], tokens, start, out))
               for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in out) - min(r["sent"] for r in out)
    return {"ttft_median": statistics.median(r["ttft"] for r in out),
            "tok_s": sum(r["tokens"] for r in out) / wall,
            "replicas": dict(collections.Counter(r["replica"] for r in out if r["replica"])),
            "streams": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    parser.add_argument("--quick", action="store_true", help="2 rounds of 16 tokens")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = 2, 16
    load = os.getloadavg()[0]
    log(f"load average {load:.2f} on {os.cpu_count()} CPUs")

    results: dict = {"args": vars(args), "load_before": load, "direct": [], "ray1": [], "ray2": []}
    direct = Server("mullama serve", [], args)
    ray1 = None
    try:
        ray1 = Server("mullama serve --replicas 1", ["--replicas", "1", "--ray-cpus", str(os.cpu_count() or 2)],
                      args)
        for name, server in (("direct", direct), ("ray1", ray1)):  # warm up: first requests pay for lazy setup
            round_of_streams(server.port, args.streams, 8, 0)
        for r in range(args.rounds):  # interleaved, the order alternating: the machine drifts
            order = [("direct", direct), ("ray1", ray1)] if r % 2 == 0 else [("ray1", ray1), ("direct", direct)]
            for name, server in order:
                res = round_of_streams(server.port, args.streams, args.tokens, r)
                results[name].append(res)
                log(f"round {r} {name}: TTFT median {res['ttft_median'] * 1000:.0f} ms, {res['tok_s']:.1f} tok/s")
    finally:
        direct.stop()
        if ray1 is not None:
            ray1.stop()

    ray2 = Server("mullama serve --replicas 2", ["--replicas", "2", "--ray-cpus", str(os.cpu_count() or 2),
                                                 "--threads", str(max(1, args.threads // 2))], args)
    try:
        round_of_streams(ray2.port, args.streams, 8, 0)
        for r in range(args.rounds):
            res = round_of_streams(ray2.port, args.streams, args.tokens, r)
            results["ray2"].append(res)
            log(f"round {r} ray2: replicas {sorted(res['replicas'].values())}, {res['tok_s']:.1f} tok/s")
    finally:
        ray2.stop()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    ttft_ratio = med("ray1", "ttft_median") / med("direct", "ttft_median")
    tps_ratio = med("ray1", "tok_s") / med("direct", "tok_s")
    paired_ttft = statistics.median(a["ttft_median"] / b["ttft_median"]
                                    for a, b in zip(results["ray1"], results["direct"]))
    paired_tps = statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(results["ray1"], results["direct"]))
    spread: collections.Counter = collections.Counter()
    for res in results["ray2"]:
        spread.update(res["replicas"])
    results["summary"] = {"ttft_ratio": ttft_ratio, "tok_s_ratio": tps_ratio, "paired_ttft_ratio": paired_ttft,
                          "paired_tok_s_ratio": paired_tps, "two_replicas_requests": dict(spread),
                          "load_after": os.getloadavg()[0]}
    print(f"{args.streams} concurrent streams x {args.tokens} tokens, {args.rounds} rounds, "
          f"{args.threads} threads, load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'':24}{'TTFT median':>14}{'aggregate tok/s':>18}")
    labels = (("direct", "mullama serve"), ("ray1", "Ray Serve, 1 replica"), ("ray2", "Ray Serve, 2 replicas"))
    for name, label in labels:
        print(f"{label:24}{med(name, 'ttft_median') * 1000:>11.0f} ms{med(name, 'tok_s'):>18.1f}")
    print(f"TTFT ratio Ray/direct: {ttft_ratio:.3f} (paired {paired_ttft:.3f}; goal <= 1.15)")
    print(f"tok/s ratio Ray/direct: {tps_ratio:.3f} (paired {paired_tps:.3f}; goal >= 0.9)")
    print(f"2 replicas, requests per replica: {sorted(spread.values())}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
