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


def test_serve_answers_and_stops_on_sigint(model_path):
    proc = subprocess.Popen([sys.executable, "-m", "mullama", "serve", "--port", "0", "--parallel", "2",
                             "--n-ctx", "256", "--model", model_path, "--model-id", "tiny"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(), cwd=TESTS)
    try:
        line = proc.stderr.readline()
        match = re.search(r"serving tiny on (http://127\.0\.0\.1:\d+) \(2 slots\)", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        url = match.group(1)
        with urllib.request.urlopen(url + "/health", timeout=30) as resp:
            assert json.load(resp)["status"] == "ok"
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
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


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
