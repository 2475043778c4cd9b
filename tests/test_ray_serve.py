"""Replicas on Ray Serve: ``mullama serve --replicas N`` as a user runs it, on loopback only.

Every test here starts its Ray through the command line with 2 CPUs and no
dashboard, finds every process that Ray started by a mark in their
environment, checks that all their sockets stay on 127.0.0.0/8, and makes
sure none is left when the server stops. The 2-replica tests are ``slow``.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="needs the 'ray' extra: pip install '.[ray]'")

import proc_net  # noqa: E402
from live_server import read_events  # noqa: E402

import mullama  # noqa: E402
from mullama.cli_serve_ray import autoscaling_from_args  # noqa: E402
from mullama.server import ServerSettings  # noqa: E402
from mullama.server.ray_serve import (  # noqa: E402
    REPLICA_HEADER, MullamaReplica, ReplicaConfig, build_app, max_ongoing_requests)

ROOT = Path(mullama.__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
START_TIMEOUT = 300.0
PROMPT = "Count from one to one hundred, separated by commas:"


def _stop_with_parent() -> None:
    """In the child: SIGTERM (a clean stop of Ray) when the test process dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RayServer:
    """``mullama serve --replicas N`` in a child process, with its own Ray temp dir as the mark."""

    def __init__(self, model_path: str, replicas: int) -> None:
        self.tmp = tempfile.mkdtemp(prefix="mlray", dir="/tmp")  # short: Ray puts unix sockets in it
        self.marker = f"RAY_TMPDIR={self.tmp}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_TMPDIR=self.tmp)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mullama", "serve", "--replicas", str(replicas), "--ray-cpus", "2",
             "--port", "0", "--parallel", "2", "--n-ctx", "512", "--threads", "1", "--model", model_path,
             "--model-id", "tiny"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=TESTS,
            start_new_session=True, preexec_fn=_stop_with_parent)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.port = 0
        self.stopped = False
        deadline = time.monotonic() + START_TIMEOUT
        while not self.port:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                log = "".join(self.log)[-4000:]
                self.stop(check=False)
                raise AssertionError(f"mullama serve --replicas did not start:\n{log}")
            match = re.search(r"serving tiny on http://127\.0\.0\.1:(\d+) ", line)
            if match:
                self.port = int(match.group(1))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def pids(self) -> list[int]:
        return proc_net.marked_pids(self.marker)

    def request(self, method: str, path: str, body: object = None,
                timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"} if body is not None else {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        status, _, data = self.request("GET", "/metrics")
        assert status == 200, data
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in data.decode().splitlines() if line and not line.startswith("#")}

    def stop(self, check: bool = True) -> None:
        """SIGINT, as a user's Ctrl-C; then every process Ray started must be gone."""
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                code = self.proc.wait(90)
            except subprocess.TimeoutExpired:
                code = None
            deadline = time.monotonic() + 30
            while (left := self.pids()) and time.monotonic() < deadline:
                time.sleep(0.25)
            leftovers = [(pid, proc_net.command_line(pid)) for pid in left]
            if check:
                assert code == 0, "".join(self.log)[-4000:]
                assert any("mullama: stopped" in line for line in self.log)
                assert not leftovers, f"processes left running: {leftovers}"
        finally:
            proc_net.kill_all(self.pids())
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.reader.join(10)
            assert self.proc.stderr is not None
            self.proc.stderr.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def _assert_loopback_only(server: RayServer) -> None:
    pids = server.pids()
    assert len(pids) >= 4, [proc_net.command_line(p) for p in pids]  # gcs, raylet, workers, ...
    sockets = proc_net.inet_sockets(pids)
    off = [(s, proc_net.command_line(s.pid)[:60]) for s in sockets if not s.on_loopback]
    assert not off, f"sockets off loopback: {off}"
    listening = {s.local[1] for s in sockets if s.state == "LISTEN"}
    assert server.port in listening  # the proxy is among the processes checked


def _wait_idle(server: RayServer, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["mullama_active_streams"] == 0 and m["mullama_slots_in_use"] == 0 and m["mullama_engine_streams"] == 0:
            return m
        assert time.monotonic() < deadline, f"the replica did not become idle: {m}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def one_replica(model_path):
    server = RayServer(model_path, replicas=1)
    yield server
    server.stop()


# ------------------------------------------------------------------ no cluster needed


def test_replica_config_is_checked():
    with pytest.raises(ValueError, match="n_parallel"):
        ReplicaConfig("m.gguf", n_parallel=0)
    with pytest.raises(ValueError, match="model_path"):
        ReplicaConfig("")
    with pytest.raises(ValueError, match="n_threads"):
        ReplicaConfig("m.gguf", n_threads=0)
    with pytest.raises(ValueError, match="settings"):
        ReplicaConfig("m.gguf", settings={"api_key": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_replicas"):
        build_app(ReplicaConfig("m.gguf"), num_replicas=0)


def test_deployment_options_follow_the_replica():
    config = ReplicaConfig("/models/m.gguf", n_parallel=3, max_queue=5, settings=ServerSettings(api_key="k"))
    assert max_ongoing_requests(config) == 3 + 5 + 2
    fixed = build_app(config, num_replicas=2, health_check_period_s=7)._bound_deployment
    assert fixed.num_replicas == 2 and fixed.max_ongoing_requests == 10
    assert fixed.ray_actor_options["num_cpus"] == 1
    assert fixed._deployment_config.health_check_period_s == 7
    auto = build_app(config, autoscaling_config={"min_replicas": 1, "max_replicas": 4},
                     ray_actor_options={"num_cpus": 0.5})._bound_deployment
    scaling = auto._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 3)
    assert auto.ray_actor_options["num_cpus"] == 0.5


def test_replica_outside_ray_serves_the_app_and_closes(model_path):
    from starlette.testclient import TestClient

    replica = MullamaReplica(ReplicaConfig(model_path, n_ctx=128, n_parallel=1, n_threads=1,
                                           settings=ServerSettings(api_key="k")))
    try:
        replica.check_health()
        with TestClient(replica.__serve_build_asgi_app__()) as client:
            resp = client.get("/health")
            assert resp.status_code == 200 and resp.json()["slots"] == 1
            assert resp.headers[REPLICA_HEADER] == "local"
            assert client.get("/v1/models").status_code == 401  # the same app: the API key holds
    finally:
        replica.__del__()
    assert replica.model.closed
    with pytest.raises(RuntimeError, match="closed"):
        replica.check_health()


def test_autoscaling_flags():
    def ns(**kw):
        base = dict(replicas=None, min_replicas=None, max_replicas=None, target_ongoing_requests=None)
        return argparse.Namespace(**{**base, **kw})

    assert autoscaling_from_args(ns(replicas=2)) is None
    assert autoscaling_from_args(ns(replicas=2, max_replicas=4, target_ongoing_requests=1.5)) == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 1.5}
    with pytest.raises(ValueError, match="--max-replicas"):
        autoscaling_from_args(ns(min_replicas=1))
    with pytest.raises(ValueError, match="within"):
        autoscaling_from_args(ns(replicas=5, max_replicas=4))


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--ray-address", "auto"], "need --replicas N"),
    (["--min-replicas", "1"], "autoscaling needs --max-replicas"),
    (["--replicas", "1", "--ray-address", "auto", "--ray-cpus", "2"], "--ray-cpus applies to a Ray started here"),
])
def test_bad_flags_fail_before_ray_starts(model_path, flags, message):
    proc = subprocess.run([sys.executable, "-m", "mullama", "serve", *flags, "--model", model_path],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          cwd=TESTS, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# ------------------------------------------------------------------ one replica (runs by default)


@pytest.mark.timeout(420)
def test_ray_processes_stay_on_loopback(one_replica):
    _assert_loopback_only(one_replica)


@pytest.mark.timeout(120)
def test_same_api_through_the_replica(one_replica):
    status, headers, body = one_replica.request("GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["slots"] == 2
    assert headers[REPLICA_HEADER]
    status, _, body = one_replica.request("GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
    status, _, body = one_replica.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
    status, _, body = one_replica.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": -1})
    assert status == 400 and json.loads(body)["error"]["param"] == "max_tokens"
    status, headers, body = one_replica.request(
        "POST", "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "stream": True, "temperature": 0})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert one_replica.metrics()['mullama_requests_total{path="/v1/chat/completions",status="200"}'] >= 1


@pytest.mark.timeout(120)
def test_websocket_through_the_replica(one_replica, model):
    from websockets.sync.client import connect

    prompt = "The capital of France is"
    with connect(f"ws://127.0.0.1:{one_replica.port}/ws", open_timeout=30) as ws:
        ws.send(json.dumps({"prompt": prompt, "max_tokens": 6, "temperature": 0}))
        parts = []
        while (msg := json.loads(ws.recv(timeout=60)))["type"] == "token":
            parts.append(msg["content"])
    assert msg["type"] == "done" and msg["tokens"] == 6
    with mullama.Context(model, n_ctx=512) as ctx:  # the replica runs the same engine on the same model
        assert "".join(parts) == ctx.generate(prompt, max_tokens=6, params=mullama.SamplerParams(temperature=0))


@pytest.mark.timeout(120)
def test_tokens_stream_and_a_disconnect_cancels_in_the_replica(one_replica):
    before = _wait_idle(one_replica)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 400, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", one_replica.port), timeout=120)
    sock.sendall(b"POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    events = read_events(sock, 5)
    assert len(events) >= 5 and not any(e["done"] for e in events)
    during = one_replica.metrics()  # tokens reached us while the replica still generates
    assert during["mullama_active_streams"] == 1
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    after = _wait_idle(one_replica)
    key = 'mullama_streams_total{endpoint="stream",finish_reason="cancelled"}'
    assert after[key] == before.get(key, 0) + 1
    generated = after["mullama_generated_tokens_total"] - before["mullama_generated_tokens_total"]
    assert 5 <= generated < 200, generated  # far from the 400 asked for
    calls = after["mullama_decode_calls"]
    time.sleep(0.3)
    assert one_replica.metrics()["mullama_decode_calls"] == calls  # nothing decodes for nobody


@pytest.mark.timeout(180)
def test_sigint_stops_every_ray_process(one_replica):
    assert one_replica.pids()
    one_replica.stop()  # asserts the exit status, the message and that no process is left
    assert not one_replica.pids()


# ------------------------------------------------------------------ two replicas (slow)


@pytest.fixture(scope="module")
def two_replicas(model_path):
    server = RayServer(model_path, replicas=2)
    yield server
    server.stop()


def _stream_replica(server: RayServer, max_tokens: int) -> tuple[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", "/stream", body=json.dumps({"prompt": PROMPT, "max_tokens": max_tokens,
                                                         "temperature": 0}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        events = [json.loads(line[6:]) for line in resp.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1]["done"] and "error" not in events[-1]
        return resp.getheader(REPLICA_HEADER), events[-1]["usage"]["completion_tokens"]
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_replicas_share_the_streams(two_replicas):
    _assert_loopback_only(two_replicas)
    results: list[tuple[str, int]] = []
    threads = [threading.Thread(target=lambda: results.append(_stream_replica(two_replicas, 24)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 8 and all(n == 24 for _, n in results)
    assert len({replica for replica, _ in results}) == 2, results


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_replica_is_restarted(two_replicas):
    replicas = [p for p in two_replicas.pids() if proc_net.command_line(p).startswith("ray::ServeReplica")]
    assert len(replicas) == 2, [proc_net.command_line(p) for p in two_replicas.pids()]
    os.kill(replicas[0], signal.SIGKILL)
    deadline = time.monotonic() + 240
    while True:  # Ray replaces the replica; meanwhile the other one answers
        now = [p for p in two_replicas.pids() if proc_net.command_line(p).startswith("ray::ServeReplica")]
        if len(now) == 2 and replicas[0] not in now:
            status, _, body = two_replicas.request("GET", "/health")
            if status == 200:
                break
        assert time.monotonic() < deadline, "the replica was not restarted"
        time.sleep(1)
    seen = {_stream_replica(two_replicas, 4)[0] for _ in range(8)}
    assert seen  # requests succeed after the restart
    _assert_loopback_only(two_replicas)
    two_replicas.stop()
