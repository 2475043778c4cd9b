"""``mullama serve`` and ``mullama bench`` as a user runs them: real subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import mullama

ROOT = Path(mullama.__file__).resolve().parent.parent


TESTS = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _serve(*args: str) -> tuple[subprocess.Popen, str, str]:
    """``mullama serve`` on a free port: the process, its URL and its banner line."""
    proc = subprocess.Popen([sys.executable, "-m", "mullama", "serve", "--port", "0", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(), cwd=TESTS)
    line = proc.stderr.readline()
    match = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+) ", line)
    if not match:
        rest = proc.stderr.read() if proc.poll() is not None else ""
        _stop(proc)
        raise AssertionError(line + rest)
    return proc, match.group(1), line


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stderr.close()


def test_serve_answers_and_stops_on_sigint(model_path):
    proc, url, line = _serve("--parallel", "2", "--n-ctx", "256", "--model", model_path, "--model-id", "tiny")
    try:
        assert re.search(r"serving tiny on http://127\.0\.0\.1:\d+ \(2 slots\)", line), line
        with urllib.request.urlopen(url + "/health", timeout=30) as resp:
            health = json.load(resp)
        assert health["status"] == "ok" and health["prefix_cache"] is True
        req = urllib.request.Request(url + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "Hello", "max_tokens": 3}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.load(resp)
        assert body["model"] == "tiny" and body["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "mullama: stopped" in proc.stderr.read()
    finally:
        _stop(proc)


def test_serve_without_prefix_cache(model_path):
    proc, url, line = _serve("--parallel", "1", "--n-ctx", "128", "--model", model_path, "--no-prefix-cache")
    try:
        assert "(1 slots, no prefix cache)" in line, line
        with urllib.request.urlopen(url + "/health", timeout=30) as resp:
            assert json.load(resp)["prefix_cache"] is False
        for _ in range(2):  # the same prompt twice: nothing is reused
            req = urllib.request.Request(url + "/v1/completions", method="POST",
                                         data=json.dumps({"prompt": "Hello there, how", "max_tokens": 2}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                assert json.load(resp)["usage"]["completion_tokens"] == 2
        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
        assert "\nmullama_prefix_cache_hits 0\n" in metrics and "\nmullama_prefix_cache_tokens 0\n" in metrics
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        _stop(proc)


def test_serve_refuses_a_missing_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mullama", "serve", "--port", "0", "--model",
                           str(tmp_path / "nope.gguf")], capture_output=True, text=True, env=_env(), timeout=60, cwd=TESTS)
    assert proc.returncode == 1 and "mullama: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_prints_the_table(model_path):
    proc = subprocess.run([sys.executable, "-m", "mullama", "bench", "--model", model_path, "-r", "1", "-p", "64",
                           "-n", "8", "--streams", "1,2", "--json"], capture_output=True, text=True, env=_env(),
                          timeout=300, cwd=TESTS)
    assert proc.returncode == 0, proc.stderr
    rows = {r["test"]: r for r in json.loads(proc.stdout)["rows"]}
    for name in ("prompt processing pp64", "decode tg8", "async TokenStream decode tg8",
                 "batched 2 streams: aggregate", "batched 2 streams: median TTFT"):
        assert rows[name]["value"] > 0, name
    bad = subprocess.run([sys.executable, "-m", "mullama", "bench", "--streams", "a,b"], capture_output=True,
                         text=True, env=_env(), timeout=60, cwd=TESTS)
    assert bad.returncode == 1 and "--streams" in bad.stderr
