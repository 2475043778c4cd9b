"""Every example runs to completion on the default model (with few tokens).

Servers run as subprocesses next to their clients; the SIGINT example gets a
real SIGINT while it streams.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mullama

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PAIRED = ("_server.py", "_client.py")
ALL = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_") and not p.name.endswith(PAIRED))


def example_env(model_path: str, max_tokens: str = "8") -> dict[str, str]:
    # the examples import the same mullama as the tests (installed or built in place)
    root = str(Path(mullama.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, MULLAMA_EXAMPLE_MAX_TOKENS=max_tokens, MULLAMA_MODEL=model_path, PYTHONPATH=path)


def check_clean(proc: subprocess.CompletedProcess | subprocess.Popen, stderr: str) -> None:
    assert proc.returncode == 0, stderr
    assert "GGML_ASSERT" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("name", ALL)
def test_example_runs(name, model_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=EXAMPLES, env=example_env(model_path),
                          capture_output=True, text=True, timeout=240)
    check_clean(proc, proc.stderr)
    assert proc.stdout.strip()


@pytest.mark.parametrize("server,client,pattern", [
    ("sse_server.py", "sse_client.py", r"SSE server on (http://\S+)"),
    ("websocket_server.py", "websocket_client.py", r"WebSocket server on (ws://\S+)"),
])
def test_server_and_client_examples(server, client, pattern, model_path):
    env = example_env(model_path)
    srv = subprocess.Popen([sys.executable, str(EXAMPLES / server), "--port", "0"], cwd=EXAMPLES, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline()
        match = re.search(pattern, line)
        assert match, line + (srv.stderr.read() if srv.poll() is not None else "")
        proc = subprocess.run([sys.executable, str(EXAMPLES / client), match.group(1), "The capital of France is"],
                              cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=120)
        check_clean(proc, proc.stderr)
        assert proc.stdout.startswith("The capital of France is") and len(proc.stdout) > 30
        srv.send_signal(signal.SIGINT)
        out, err = srv.communicate(timeout=30)
        check_clean(srv, err)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()


def test_sigint_example_cancels_mid_stream(model_path):
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "cancel_on_sigint.py")], cwd=EXAMPLES,
                            env=example_env(model_path, max_tokens="2000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.read(2) == "> "
        proc.stdout.read(40)  # some text has streamed
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        check_clean(proc, err)
        assert "[Generation cancelled]" in out
        generated = int(re.search(r"\[(\d+) tokens generated, finish reason: cancelled\]", out).group(1))
        assert generated < 1000
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
