"""The /ws WebSocket protocol: several prompts per connection, cancel, disconnect, limits."""

from __future__ import annotations

import json
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import mullama

PROMPT = "The capital of France is"


def ws_url(server) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


def collect(ws) -> tuple[str, dict]:
    """Token contents until the 'done' (or 'error') message."""
    parts = []
    while True:
        msg = json.loads(ws.recv(timeout=120))
        if msg["type"] == "token":
            parts.append(msg["content"])
        else:
            return "".join(parts), msg


def test_several_prompts_on_one_connection(server, model, greedy):
    prompts = [PROMPT, "Water boils at", "One, two, three,"]
    with connect(ws_url(server), open_timeout=10) as ws:
        for prompt in prompts:
            ws.send(json.dumps({"prompt": prompt, "max_tokens": 10, "temperature": 0}))
            text, done = collect(ws)
            with mullama.Context(model, n_ctx=512) as ctx:
                assert text == ctx.generate(prompt, max_tokens=10, params=greedy)
            assert done == {"type": "done", "finish_reason": "length", "tokens": 10, "pieces": done["pieces"]}
        # prompts sent back to back are answered in order
        for prompt in prompts:
            ws.send(json.dumps({"prompt": prompt, "max_tokens": 4, "temperature": 0}))
        assert [collect(ws)[1]["type"] for _ in prompts] == ["done"] * 3


def test_bad_messages_get_errors_and_the_connection_stays(server):
    with connect(ws_url(server), open_timeout=10) as ws:
        for bad in ["{oops", "[1]", json.dumps({"prompt": 3}), json.dumps({"prompt": "x", "max_tokens": -1}),
                    json.dumps({"prompt": "x", "temperature": float("nan")}), json.dumps({"max_tokens": 3})]:
            ws.send(bad)
            msg = json.loads(ws.recv(timeout=30))
            assert msg["type"] == "error" and msg["error"]["message"], bad
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 3}))
        assert collect(ws)[1]["tokens"] == 3


def test_cancel_message_stops_the_current_generation(server):
    with connect(ws_url(server), open_timeout=10) as ws:
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 1000, "temperature": 0}))
        assert json.loads(ws.recv(timeout=60))["type"] == "token"
        ws.send(json.dumps({"type": "cancel"}))
        text, done = collect(ws)
        assert done["type"] == "done" and done["finish_reason"] == "cancelled" and done["tokens"] < 200
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 2}))
        assert collect(ws)[1]["finish_reason"] == "length"
    server.wait_idle()


def test_client_closing_mid_stream_stops_generation(server, served_model):
    before = server.metrics()
    with connect(ws_url(server), open_timeout=10) as ws:
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 1000, "temperature": 0}))
        for _ in range(5):
            assert json.loads(ws.recv(timeout=60))["type"] == "token"
    after = server.wait_idle()
    key = 'mullama_streams_total{endpoint="ws",finish_reason="cancelled"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["mullama_generated_tokens_total"] - before["mullama_generated_tokens_total"] < 200
    calls = served_model.n_decode_calls
    time.sleep(0.2)
    assert served_model.n_decode_calls == calls


def test_oversized_message_closes_with_1009(server):
    limit = server.settings.max_ws_message_bytes
    with connect(ws_url(server), open_timeout=10, max_size=None) as ws:
        ws.send(json.dumps({"prompt": "a" * (limit + 10)}))
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(timeout=30)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    # the server is fine afterwards
    with connect(ws_url(server), open_timeout=10) as ws:
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 2}))
        assert collect(ws)[1]["tokens"] == 2
