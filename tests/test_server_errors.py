"""Bad requests get a 4xx JSON error and cost nothing; API keys; client disconnects."""

from __future__ import annotations

import json
import socket
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from live_server import LiveServer, open_sse_socket, read_events
from mullama.server import ServerSettings

PROMPT = "The capital of France is"
GOOD = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}

BAD_BODIES = [
    # (path, raw body, status, text expected in the message)
    ("/stream", b"{not json", 400, "not valid JSON"),
    ("/stream", b"[1, 2]", 400, "JSON object"),
    ("/stream", b"", 400, "no body"),
    ("/stream", b'{"prompt": "x", "temperature": NaN}', 400, "NaN"),
    ("/stream", b'{"prompt": "x", "top_p": Infinity}', 400, "Infinity"),
    ("/stream", b'{"prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("/stream", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("/stream", json.dumps({"prompt": 5}).encode(), 400, "'prompt' must be a string"),
    ("/stream", json.dumps({"max_tokens": 5}).encode(), 400, "'prompt' is required"),
    ("/stream", json.dumps({"prompt": ""}).encode(), 400, "must not be empty"),
    ("/stream", json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, "'max_tokens' must be an integer"),
    ("/stream", json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400, "'max_tokens'"),
    ("/stream", json.dumps({"prompt": "x", "max_tokens": -3}).encode(), 400, "'max_tokens'"),
    ("/stream", json.dumps({"prompt": "x", "max_tokens": 10**12}).encode(), 400, "'max_tokens'"),
    ("/stream", json.dumps({"prompt": "x", "max_tokens": 1025}).encode(), 400, "at most 1024"),
    ("/stream", json.dumps({"prompt": "x", "max_tokens": True}).encode(), 400, "'max_tokens' must be an integer"),
    ("/stream", json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "'temperature'"),
    ("/stream", json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "'temperature' must be a number"),
    ("/stream", json.dumps({"prompt": "x", "temperature": 1e308 * 10}).encode(), 400, "Infinity"),
    ("/stream", json.dumps({"prompt": "x", "top_p": 1.5}).encode(), 400, "'top_p'"),
    ("/stream", json.dumps({"prompt": "x", "top_k": -1}).encode(), 400, "'top_k'"),
    ("/stream", json.dumps({"prompt": "x", "seed": -1}).encode(), 400, "'seed'"),
    ("/stream", json.dumps({"prompt": "x", "seed": 2**70}).encode(), 400, "'seed'"),
    ("/stream", json.dumps({"prompt": "x", "stop": 3}).encode(), 400, "'stop'"),
    ("/stream", json.dumps({"prompt": "x", "stop": [""]}).encode(), 400, "'stop'"),
    ("/stream", json.dumps({"prompt": "x", "stop": ["a"] * 100_000}).encode(), 400, "at most 64"),
    ("/stream", json.dumps({"prompt": "x", "stop": ["a" * 2000]}).encode(), 400, "longer than"),
    ("/stream", json.dumps({"prompt": "word " * 2000}).encode(), 400, "context"),
    ("/stream", json.dumps({"prompt": "\n \t" * 200_000}).encode(), 400, "characters"),
    ("/v1/completions", json.dumps({"prompt": [1, 2, 10**9]}).encode(), 400, "outside the vocabulary"),
    ("/v1/completions", json.dumps({"prompt": {"a": 1}}).encode(), 400, "'prompt' must be"),
    ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 50}).encode(), 400, "'logprobs'"),
    ("/v1/completions", json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400, "'stream'"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "'messages'"),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400, "'messages'"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(), 400, "content"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                         "top_logprobs": 3}).encode(), 400, "needs 'logprobs'"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                         "top_logprobs": 99, "logprobs": True}).encode(), 400, "'top_logprobs'"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                         "stream_options": 1}).encode(), 400, "'stream_options'"),
]


@pytest.mark.parametrize("path,raw,status,text", BAD_BODIES, ids=[f"{i}" for i in range(len(BAD_BODIES))])
def test_bad_request_gets_a_json_error(server, path, raw, status, text):
    got, headers, data = server.request("POST", path, raw=raw, headers={"Content-Type": "application/json"})
    assert got == status, data[:300]
    assert headers["content-type"].startswith("application/json")
    error = json.loads(data)["error"]
    assert text in error["message"] and error["type"] == "invalid_request_error"


def _post_big(port: int, head: bytes, parts) -> tuple[int, dict]:
    """Send a large request on a raw socket; the server may answer before it is all sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(head)
            for part in parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    body = data.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])


def test_body_over_the_limit_is_413_declared_or_chunked(server):
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    head = (f"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}\r\n\r\n").encode()
    status, body = _post_big(server.port, head, [big])
    assert status == 413 and "limit" in body["error"]["message"]
    # no Content-Length: the limit is enforced while reading
    chunk = b"a" * 65536
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 40 + [b"0\r\n\r\n"]
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, body = _post_big(server.port, head, parts)
    assert status == 413 and "limit" in body["error"]["message"]


def test_unknown_path_and_method(server):
    status, body = server.json("GET", "/nowhere")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = server.json("GET", "/stream")
    assert status == 405 and "error" in body


def test_the_next_valid_request_gives_the_reference_output(server):
    """After the whole catalogue, the server answers as before and nothing is left running."""
    events = list(server.sse("/stream", GOOD))
    fresh = list(server.sse("/stream", GOOD))
    assert events == fresh and events[-1]["done"] and events[-1]["usage"]["completion_tokens"] == 8
    m = server.wait_idle()
    assert m["mullama_active_streams"] == 0


@pytest.fixture(scope="module")
def keyed(served_model):
    s = LiveServer(served_model, ServerSettings(port=0, api_key="s3cret"))
    yield s
    s.close()


def test_api_key_guards_everything_but_health(keyed):
    import openai

    assert keyed.request("GET", "/health")[0] == 200
    for method, path in [("GET", "/"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/stream"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, hdrs, data = keyed.request(method, path, GOOD, headers=headers)
            assert status == 401, (path, headers)
            assert json.loads(data)["error"]["code"] == "invalid_api_key"
    ok = {"Authorization": "Bearer s3cret"}
    assert keyed.request("GET", "/metrics", headers=ok)[0] == 200
    assert list(keyed.sse("/stream", GOOD, headers=ok))[-1]["done"]
    with openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="s3cret", max_retries=0) as client:
        assert client.completions.create(model="m", prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
    with openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    ws_url = f"ws://127.0.0.1:{keyed.port}/ws"
    with pytest.raises(InvalidStatus):
        connect(ws_url, open_timeout=10).close()
    with connect(ws_url, additional_headers=ok, open_timeout=10) as ws:
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 2}))
        assert json.loads(ws.recv(timeout=60))["type"] == "token"


def test_sse_client_disconnect_stops_generation(server, served_model):
    before = server.metrics()
    sock = open_sse_socket(server.port, {"prompt": PROMPT, "max_tokens": 1000, "temperature": 0})
    events = read_events(sock, 5)
    assert len(events) >= 5 and not events[-1]["done"]
    assert server.metrics()["mullama_active_streams"] == 1
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    closed_at = time.monotonic()
    after = server.wait_idle()
    took = time.monotonic() - closed_at
    key = 'mullama_streams_total{endpoint="stream",finish_reason="cancelled"}'
    assert after[key] == before.get(key, 0) + 1
    generated = after["mullama_generated_tokens_total"] - before["mullama_generated_tokens_total"]
    assert generated < 200, generated  # far from the 1000 asked for
    assert took < 2.0
    calls = served_model.n_decode_calls
    time.sleep(0.2)
    assert served_model.n_decode_calls == calls  # the engine is idle: nothing decodes for nobody
    assert all(p == -1 for p in served_model.kv_positions())


def test_non_streaming_client_disconnect_stops_generation(server):
    before = server.metrics()
    body = json.dumps({"messages": [{"role": "user", "content": "Write a long story."}],
                       "max_tokens": 1000, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 30
    while server.metrics()["mullama_generated_tokens_total"] - before["mullama_generated_tokens_total"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()
    after = server.wait_idle()
    key = 'mullama_streams_total{endpoint="chat",finish_reason="cancelled"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["mullama_generated_tokens_total"] - before["mullama_generated_tokens_total"] < 300
