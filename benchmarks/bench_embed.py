"""Embeddings: throughput against llama-server --embedding, vectors against llama-embedding.

  texts      : 256 slices of tests/data/scoring_text.txt of 16 to 200 tokens (seeded)
  throughput : texts per second, mean pooling, unit norm, the same threads:
               - mullama Model.embed (in process),
               - mullama serve, POST /v1/embeddings with all texts in one request,
               - llama-server --embedding --pooling mean, the same request
                 (goal: mullama >= 1.0x llama-server, like for like over HTTP)
  vectors    : llama-embedding --pooling mean on the same texts; the cosine of
               each mullama vector with its llama-embedding twin (goal >= 0.9999);
               llama-server's vectors are compared too.

Both peers are built from the vendored llama.cpp (see _bench_env.py). The engines
run one after another, repetition by repetition; the median is reported.

Usage: python3 benchmarks/bench_embed.py [--texts 256] [--repeat 3] [--threads N]
       [--parallel 4]
Timings are reported, never asserted. Raw numbers go to bench-results/embed.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import _bench_env as env  # noqa: E402

import numpy as np  # noqa: E402

from mullama import Model, default_model_path, default_threads  # noqa: E402

TEXT = env.ROOT / "tests" / "data" / "scoring_text.txt"
SEP = "<#mullama-sep#>"


def make_texts(model: Model, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``n`` slices of the scoring text, each ``lo``..``hi`` tokens once tokenized (with BOS)."""
    words = TEXT.read_text(encoding="utf-8").split()
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    while len(texts) < n:
        target = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, len(words) - 1))
        take = max(1, int(target * 0.7))
        while True:
            piece = " ".join(words[start:start + take])
            n_tok = len(model.tokenize(piece))
            if n_tok >= target or start + take >= len(words):
                break
            take += 4
        if lo <= n_tok <= hi:
            texts.append(piece)
    return texts


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def llama_embedding(exe: Path, model: str, texts: list[str], threads: int) -> np.ndarray:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as fh:
        fh.write(SEP.join(texts))
        path = fh.name
    try:
        proc = subprocess.run([str(exe), "-m", model, "-f", path, "--embd-separator", SEP, "--pooling", "mean",
                               "--embd-normalize", "2", "--embd-output-format", "array", "-c", "512", "-b", "512",
                               "-t", str(threads), "-tb", str(threads)],
                              capture_output=True, text=True, check=True)
    finally:
        Path(path).unlink()
    match = re.search(r"\[\[.*\]\]", proc.stdout, re.S)
    if match is None:
        raise RuntimeError("llama-embedding printed no embeddings:\n" + proc.stderr[-2000:])
    return np.asarray(json.loads(match.group(0)), dtype=np.float32)


class HttpPeer:
    """A server process answering POST /v1/embeddings on 127.0.0.1."""

    def __init__(self, name: str, argv: list[str], port: int) -> None:
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"{name} did not start:\n{self.log.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.5)

    def embed(self, texts: list[str]) -> tuple[np.ndarray, float]:
        body = json.dumps({"input": texts, "model": "m", "encoding_format": "float"}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/embeddings", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=1800) as r:
            out = json.loads(r.read())
        wall = time.perf_counter() - t0
        rows = sorted(out["data"], key=lambda d: d["index"])
        return np.asarray([d["embedding"] for d in rows], dtype=np.float32), wall

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--parallel", type=int, default=4, help="llama-server slots and mullama serve streams")
    args = ap.parse_args()

    model_path = str(default_model_path())
    emb_exe = env.ensure_llama_embedding()
    server_exe = env.TOOLS_BUILD / "bin" / "llama-server"
    if not server_exe.is_file():
        env._run(["cmake", "--build", str(env.TOOLS_BUILD), "--target", "llama-server", "-j", "2"],
                 env.TOOLS_BUILD.parent / "bench-server-build.log")
    model = Model.load(model_path)
    texts = make_texts(model, args.texts, 16, 200)
    n_tokens = [len(model.tokenize(t, parse_special=True)) for t in texts]
    env.log(f"{len(texts)} texts, {min(n_tokens)}-{max(n_tokens)} tokens, {sum(n_tokens)} in all; "
            f"{args.threads} threads")

    reference = llama_embedding(emb_exe, model_path, texts, args.threads)
    model.embed(texts[:8])  # builds the embedding context

    port_s, port_m = free_port(), free_port()
    peers = [
        HttpPeer("llama-server", [str(server_exe), "-m", model_path, "--embedding", "--pooling", "mean",
                                  "--host", "127.0.0.1", "--port", str(port_s), "-np", str(args.parallel),
                                  "-c", str(512 * args.parallel), "-t", str(args.threads), "-tb", str(args.threads),
                                  "--no-webui"], port_s),
        HttpPeer("mullama serve", [sys.executable, "-m", "mullama", "serve", "--model", model_path,
                                   "--port", str(port_m), "--parallel", str(args.parallel), "--n-ctx", "512",
                                   "--threads", str(args.threads), "--max-body", str(16 << 20)], port_m),
    ]
    walls: dict[str, list[float]] = {"mullama": [], **{p.name: [] for p in peers}}
    vectors: dict[str, np.ndarray] = {}
    try:
        for p in peers:  # warm-up request each
            p.embed(texts[:8])
        for rep in range(args.repeat):
            t0 = time.perf_counter()
            vectors["mullama"] = model.embed(texts, pooling="mean")
            walls["mullama"].append(time.perf_counter() - t0)
            for p in peers:
                vectors[p.name], wall = p.embed(texts)
                walls[p.name].append(wall)
            env.log(f"rep {rep + 1}: " + ", ".join(f"{k} {len(texts) / v[-1]:.1f} texts/s" for k, v in walls.items()))
    finally:
        for p in peers:
            p.close()
    model.close()

    rate = {k: len(texts) / statistics.median(v) for k, v in walls.items()}
    cos = {k: cosines(v, reference) for k, v in vectors.items()}
    print(f"\nembeddings of {len(texts)} texts ({min(n_tokens)}-{max(n_tokens)} tokens), mean pooling, "
          f"{args.threads} threads, median of {args.repeat}")
    for k in walls:
        print(f"  {k:14s} {rate[k]:7.1f} texts/s  {rate[k] * sum(n_tokens) / len(texts):8.0f} tok/s   "
              f"cosine vs llama-embedding: min {cos[k].min():.6f}  median {np.median(cos[k]):.6f}")
    print(f"  mullama / llama-server:           {rate['mullama'] / rate['llama-server']:.2f}x (goal >= 1.0)")
    print(f"  mullama serve / llama-server:     {rate['mullama serve'] / rate['llama-server']:.2f}x")
    print(f"  mullama vectors with cosine >= 0.9999 to llama-embedding: "
          f"{int((cos['mullama'] >= 0.9999).sum())}/{len(texts)}")
    env.RESULTS.mkdir(exist_ok=True)
    (env.RESULTS / "embed.json").write_text(json.dumps({
        "cpu": env.cpu_model(), "threads": args.threads, "texts": len(texts), "tokens": n_tokens,
        "walls_s": walls, "texts_per_s": rate,
        "cosine_vs_llama_embedding": {k: {"min": float(v.min()), "median": float(np.median(v))} for k, v in cos.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
