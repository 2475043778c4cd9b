"""One model over two ``mullama rpc-server`` processes on loopback (ggml's RPC backend).

Needs a build with ``MULLAMA_RPC=1`` (CI builds so); other builds skip these tests,
except the checks of bad input, which need no backend.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import mullama
import proc_net
from mullama import rpc
from mullama.errors import GenerationError, ModelLoadError

TESTS = Path(__file__).resolve().parent
PACKAGE_ROOT = str(Path(mullama.__file__).resolve().parent.parent)
HAS_RPC = rpc.rpc_available()
needs_rpc = pytest.mark.skipif(not HAS_RPC, reason="this build of mullama has no ggml RPC backend "
                                                   "(build it with MULLAMA_RPC=1 to run the RPC tests)")
START_TIMEOUT = 60.0
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "The three primary colors are"]
N_TOKENS = 24
# Bound on how far (in nats) a token the split model picks may sit below the local argmax.
# Measured by benchmarks/rpc_numerics.py on the default model, 10 prompts x 32 greedy tokens,
# flash attention auto and off:
# the split and the local run give the same tokens a log-probability up to 0.36 apart
# (p99 0.26; the local CPU backend repacks some weights, the servers do not), and a picked
# token was at most 0.32 below the local argmax. A layer lost, doubled or run out of
# order puts the picks several nats away.
ARGMAX_TOL = 0.75


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(marker: str) -> dict[str, str]:
    env = dict(os.environ, MULLAMA_TEST_RPC=marker, GGML_NO_BACKTRACE="1")
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


class RpcServers:
    """``mullama rpc-server`` processes on free loopback ports, marked so that every
    process they (and the engines talking to them) start can be found."""

    def __init__(self, n: int) -> None:
        self.marker = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []
        self.endpoints: list[str] = []
        try:
            for _ in range(n):
                self.start(free_port())
        except BaseException:
            self.stop()
            raise

    def start(self, port: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mullama", "rpc-server", "--port", str(port), "--threads", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=child_env(f"MULLAMA_TEST_RPC={self.marker}"), cwd=TESTS)
        self.procs.append(proc)
        endpoint = f"127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"rpc-server on {endpoint} exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"rpc-server on {endpoint} did not listen") from None
                time.sleep(0.1)
        if endpoint not in self.endpoints:
            self.endpoints.append(endpoint)
        return proc

    def pids(self) -> list[int]:
        return proc_net.marked_pids(f"MULLAMA_TEST_RPC={self.marker}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


@pytest.fixture(scope="module")
def servers():
    s = RpcServers(2)
    yield s
    s.stop()
    assert s.pids() == [], "an rpc-server outlived its test"


@pytest.fixture(scope="module")
def split_model(servers, model_path):
    m = mullama.Model.load(model_path, rpc_servers=servers.endpoints, tensor_split=[1, 1])
    yield m
    m.close()


# ---------------------------------------------------------------- bad input (no backend needed)


@pytest.mark.parametrize("servers_arg, message", [
    ([], "at least one"),
    ("", "at least one"),
    (["127.0.0.1"], "not HOST:PORT"),
    (["127.0.0.1:0"], "outside 1-65535"),
    (["127.0.0.1:70000"], "outside 1-65535"),
    (["[::1]:50052"], "IPv4 only"),
    (["127.0.0.1:50052", "127.0.0.1:50052"], "listed twice"),
    (["127.0.0.1:50052,"], "not HOST:PORT"),
])
def test_bad_endpoints_are_value_errors(model_path, servers_arg, message):
    with pytest.raises(ValueError, match=message):
        mullama.Model.load(model_path, rpc_servers=servers_arg)


def test_endpoint_must_be_a_string(model_path):
    with pytest.raises(TypeError):
        mullama.Model.load(model_path, rpc_servers=[("127.0.0.1", 50052)])


@pytest.mark.parametrize("split, message", [
    ([0, 0], "all zero"),
    ([1, -1], ">= 0"),
    ([1, float("nan")], "finite"),
    ([1, float("inf")], "finite"),
    ([1], "2 RPC servers"),
])
def test_bad_tensor_split_is_a_value_error(model_path, split, message):
    with pytest.raises(ValueError, match=message):
        mullama.Model.load(model_path, rpc_servers=["127.0.0.1:1", "127.0.0.1:2"], tensor_split=split)


def test_tensor_split_needs_rpc_servers(model_path):
    with pytest.raises(ValueError, match="needs rpc_servers"):
        mullama.Model.load(model_path, tensor_split=[1.0])


# ---------------------------------------------------------------- with the backend


@needs_rpc
def test_unreachable_server_is_a_model_load_error(model_path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=f"127.0.0.1:{port} is not reachable"):
        mullama.Model.load(model_path, rpc_servers=[f"127.0.0.1:{port}"])
    assert time.monotonic() - started < 30


def test_without_the_backend_the_error_says_how_to_rebuild(model_path, monkeypatch):
    monkeypatch.setattr(rpc, "rpc_available", lambda: False)
    with pytest.raises(ModelLoadError, match="MULLAMA_RPC=1"):
        mullama.Model.load(model_path, rpc_servers=["127.0.0.1:50052"])
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from mullama import rpc; rpc.rpc_available = lambda: False; "
                               "from mullama.cli import main; sys.exit(main(['rpc-server', '--port', '1']))"],
        capture_output=True, text=True, env=child_env("x"), cwd=TESTS, timeout=120)
    assert result.returncode == 1 and "MULLAMA_RPC=1" in result.stderr, result.stderr


@needs_rpc
def test_rpc_server_warns_and_binds_loopback(servers):
    for proc in servers.procs:
        assert proc.poll() is None
        os.set_blocking(proc.stderr.fileno(), False)
        said = (proc.stderr.read() or b"").decode()
        assert "no authentication" in said and "Never expose an RPC server to an untrusted network" in said
    socks = proc_net.inet_sockets(servers.pids())
    listening = [s for s in socks if s.state == "LISTEN"]
    assert sorted(s.local[1] for s in listening) == sorted(int(e.rsplit(":", 1)[1]) for e in servers.endpoints)
    assert all(s.local[0] == "127.0.0.1" for s in listening)
    with pytest.raises(ValueError, match="IPv4"):
        rpc.serve(host="localhost", port=1)


@needs_rpc
def test_split_model_greedy_tokens_are_local_argmax(split_model, model, servers):
    """Each greedy token of the split model is the local model's argmax at that prefix,
    up to the measured numerical difference between the two backends."""
    assert split_model.n_layer == model.n_layer and split_model.size == model.size
    local = mullama.Context(model, n_ctx=512, n_threads=1)
    ctx = mullama.Context(split_model, n_ctx=512, n_threads=1)
    try:
        assert type(ctx).__name__ == "RpcContext"
        greedy = mullama.SamplerParams(temperature=0.0)
        for prompt in PROMPTS:
            ids = model.tokenize(prompt, add_special=True, parse_special=True)
            stream = ctx.stream_tokens(prompt, max_tokens=N_TOKENS, params=greedy)
            toks = [t.token_id for t in stream]
            assert len(toks) == N_TOKENS and stream.finish_reason == "length"
            assert stream.stats.completion_tokens == N_TOKENS
            scored = local.score(ids + toks, top_logprobs=1)
            margins = scored.top_logprobs[len(ids):, 0] - scored.logprobs[len(ids):]
            assert margins.max() <= ARGMAX_TOL, (prompt, split_model.detokenize(toks), margins)
        # the text pieces of generate_stream join to generate's text
        text = ctx.generate(PROMPTS[0], max_tokens=8, params=greedy)
        assert "".join(ctx.generate_stream(PROMPTS[0], max_tokens=8, params=greedy)) == text
        # the layers are on the servers: the engine process talks to both, on loopback only
        engine_socks = proc_net.inet_sockets([split_model.engine_pid])
        remote_ports = {s.remote[1] for s in engine_socks if s.state == "ESTABLISHED"}
        assert {int(e.rsplit(":", 1)[1]) for e in servers.endpoints} <= remote_ports
        socks = engine_socks + proc_net.inet_sockets(servers.pids())
        assert socks and all(s.on_loopback for s in socks), [s for s in socks if not s.on_loopback]
    finally:
        ctx.close()
        local.close()


@needs_rpc
def test_split_model_errors_come_back_as_the_same_exceptions(split_model):
    with mullama.Context(split_model, n_ctx=64, n_threads=1) as ctx:
        with pytest.raises(mullama.ContextOverflowError) as info:
            ctx.generate("word " * 200, max_tokens=4)
        assert info.value.n_ctx == 64
        with pytest.raises(TypeError):
            ctx.generate("hi", max_tokens=4, params="greedy")
        logits = ctx.logits("Hello")
        assert logits.shape == (split_model.n_vocab,) and np.isfinite(logits).all()
        assert ctx.n_ctx == 64 and isinstance(ctx.grammar_stats, dict)
        older = ctx.generate_stream("Hello", max_tokens=8)
        next(older)
        assert len(list(ctx.generate_stream("Hi", max_tokens=2))) >= 1
        with pytest.raises(mullama.StreamingError, match="superseded"):
            next(older)
    with pytest.raises(TypeError, match="in_process=True"):
        mullama.AsyncModel(split_model)


@needs_rpc
def test_busy_server_is_a_model_load_error(split_model, servers, model_path):
    """A server serves one client at a time: while the split model holds both, another
    load gets ModelLoadError from the handshake check (ggml's client would wait forever)."""
    with pytest.raises(ModelLoadError, match="busy"):
        mullama.Model.load(model_path, rpc_servers=servers.endpoints[:1])


@needs_rpc
def test_a_socket_that_is_no_rpc_server_is_a_model_load_error():
    with socket.socket() as silent, socket.socket() as closing:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        closing.bind(("127.0.0.1", 0))
        closing.listen()
        with pytest.raises(ModelLoadError, match="did not answer"):
            rpc.check_reachable([f"127.0.0.1:{silent.getsockname()[1]}"], timeout=0.5)
        def hang_up() -> None:
            conn, _ = closing.accept()
            conn.close()

        t = threading.Thread(target=hang_up)
        t.start()
        with pytest.raises(ModelLoadError, match="broke off"):
            rpc.check_reachable([f"127.0.0.1:{closing.getsockname()[1]}"], timeout=5)
        t.join()


@needs_rpc
def test_tensor_split_needs_one_weight_per_device(model_path):
    own = RpcServers(2)
    try:
        with pytest.raises(ModelLoadError, match="3 weights but the RPC servers offer 2 devices"):
            mullama.Model.load(model_path, rpc_servers=own.endpoints, tensor_split=[1, 1, 1])
    finally:
        own.stop()


@needs_rpc
def test_server_killed_mid_stream_is_a_generation_error(model_path, model):
    """llama.cpp aborts the engine process; the parent gets GenerationError and lives on."""
    own = RpcServers(2)
    try:
        m = mullama.Model.load(model_path, rpc_servers=own.endpoints, tensor_split=[1, 1])
        ctx = mullama.Context(m, n_ctx=256, n_threads=1)
        stream = ctx.generate_stream("Once upon a time", max_tokens=200,
                                     params=mullama.SamplerParams(temperature=0.0))
        pieces = [next(stream) for _ in range(3)]
        own.procs[1].send_signal(signal.SIGKILL)
        own.procs[1].wait()
        with pytest.raises(GenerationError, match="SIGABRT") as info:
            for piece in stream:
                pieces.append(piece)
        assert "RPC" in str(info.value)
        with pytest.raises(GenerationError):  # the engine is gone for good
            ctx.generate("again", max_tokens=2)
        engine = m.engine_pid
        m.close()
        assert not Path(f"/proc/{engine}").exists()
    finally:
        own.stop()
    assert own.pids() == []
    # this process carries on: a local load generates as before
    with mullama.Model.load(model_path) as fresh, mullama.Context(fresh, n_ctx=256, n_threads=1) as c1, \
            mullama.Context(model, n_ctx=256, n_threads=1) as c2:
        greedy = mullama.SamplerParams(temperature=0.0)
        assert c1.generate("Once upon a time", 8, greedy) == c2.generate("Once upon a time", 8, greedy)


LOCAL_AFTER_RPC = textwrap.dedent("""
    import os, signal, sys
    import mullama
    path, a, b, pid_a, pid_b = sys.argv[1:6]
    greedy = mullama.SamplerParams(temperature=0.0)
    with mullama.Model.load(path, rpc_servers=[a, b], tensor_split=[1, 1], in_process=True) as m:
        with mullama.Context(m, n_ctx=128, n_threads=1) as ctx:
            assert len(ctx.generate("Hello", 4, greedy)) > 0
    # both servers gone: a load that went to them would abort this process
    for pid in (int(pid_a), int(pid_b)):
        os.kill(pid, signal.SIGKILL)
    with mullama.Model.load(path) as m, mullama.Context(m, n_ctx=128, n_threads=1) as ctx:
        print("LOCAL:" + ctx.generate("The capital of France is", 8, greedy))
""")


@needs_rpc
def test_local_load_after_an_rpc_load_stays_local(model_path, model):
    """Registering RPC servers is process-wide in ggml; the device list mullama passes
    keeps them to the model that asked for them."""
    own = RpcServers(2)
    try:
        result = subprocess.run(
            [sys.executable, "-c", LOCAL_AFTER_RPC, model_path, *own.endpoints,
             str(own.procs[0].pid), str(own.procs[1].pid)],
            capture_output=True, text=True, env=child_env("x"), cwd=TESTS, timeout=240)
    finally:
        own.stop()
    assert own.pids() == []
    assert result.returncode == 0, result.stderr[-3000:]
    with mullama.Context(model, n_ctx=128, n_threads=1) as ctx:
        expected = ctx.generate("The capital of France is", 8, mullama.SamplerParams(temperature=0.0))
    assert f"LOCAL:{expected}\n" in result.stdout


def _complete(port: int, prompt: str, max_tokens: int) -> tuple[int, dict]:
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
            headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@needs_rpc
def test_serve_rpc_survives_a_dead_server(model_path, model):
    """``mullama serve --rpc``: the HTTP server runs in a child the command watches; when an
    RPC server dies the child aborts, and a new one serves on the same socket once the
    RPC server is back."""
    import queue
    import re

    own = RpcServers(2)
    serve = subprocess.Popen(
        [sys.executable, "-m", "mullama", "serve", "--port", "0", "--rpc", ",".join(own.endpoints),
         "--tensor-split", "1,1", "--parallel", "1", "--n-ctx", "256", "--threads", "1", "--model", model_path,
         "--model-id", "tiny"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=child_env(f"MULLAMA_TEST_RPC={own.marker}"), cwd=TESTS)
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def read() -> None:
        for line in serve.stderr:
            log.append(line)
            lines.put(line)
        lines.put(None)

    def wait_for(pattern: str) -> re.Match:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, "".join(log)[-3000:]
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no {pattern!r} in:\n" + "".join(log)[-3000:])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        port = int(wait_for(r"serving tiny on http://127\.0\.0\.1:(\d+) ").group(1))
        with mullama.Context(model, n_ctx=256, n_threads=1) as ctx:
            reference = ctx.generate("Hello", 6, mullama.SamplerParams(temperature=0.0))
        status, body = _complete(port, "Hello", 6)
        assert status == 200 and body["usage"]["completion_tokens"] == 6
        # the split model's greedy text may drift from the local one, but not its first token
        assert body["choices"][0]["text"][:2] == reference[:2]
        dead_port = int(own.endpoints[1].rsplit(":", 1)[1])
        own.procs[1].send_signal(signal.SIGKILL)
        own.procs[1].wait()
        with pytest.raises(OSError):  # the serving child aborts on this request's first step
            _complete(port, "Hello", 6)
        wait_for(r"the serving process died \(SIGABRT\)")
        assert serve.poll() is None
        own.start(dead_port)
        wait_for(r"serving tiny on http://127\.0\.0\.1:%d " % port)
        status, again = _complete(port, "Hello", 6)
        assert status == 200 and again["choices"][0]["text"] == body["choices"][0]["text"]
        socks = proc_net.inet_sockets(own.pids())
        assert socks and all(s.on_loopback for s in socks), [s for s in socks if not s.on_loopback]
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, "".join(log)[-3000:]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        reader.join(30)
        serve.stderr.close()
        own.stop()
    deadline = time.monotonic() + 30
    while own.pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert own.pids() == [], [proc_net.command_line(p) for p in own.pids()]
