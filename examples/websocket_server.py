"""A WebSocket server of your own: send ``{"prompt": ..., "max_tokens": ...}``,
receive ``{"type": "token", "content": ...}`` per piece and ``{"type": "done"}``.

Several prompts per connection. Sending each token awaits the socket, so a slow
client holds back its stream (backpressure: the decoder pauses once
``buffer_size`` tokens wait), and a client that leaves cancels its generation.

    python websocket_server.py --port 8765
    python websocket_client.py ws://127.0.0.1:8765/ws "Hello!"
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import trio
from _common import cap, serve_app
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from mullama import MullamaError, StreamConfig

async def handle_client(ws: WebSocket) -> None:
    await ws.accept()
    print("client connected", flush=True)
    try:
        while True:
            try:
                data = json.loads(await ws.receive_text())
                config = StreamConfig(max_tokens=cap(int(data.get("max_tokens", 200))), temperature=0.7,
                                      buffer_size=16)
                tokens = await ws.app.state.model.generate_stream(data["prompt"], config)
            except (MullamaError, ValueError, TypeError, KeyError) as exc:
                await ws.send_json({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
                continue
            async with tokens:
                async for tok in tokens:
                    if tok.text:
                        await ws.send_json({"type": "token", "content": tok.text})
            await ws.send_json({"type": "done", "tokens": tokens.tokens_generated})
    except WebSocketDisconnect:
        print("client disconnected", flush=True)


app = Starlette(routes=[WebSocketRoute("/ws", handle_client)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8765)
    trio.run(partial(serve_app, app, "WebSocket server", parser.parse_args().port, scheme="ws", path="/ws"))
    print("stopped")
