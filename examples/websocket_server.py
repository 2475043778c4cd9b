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
from _common import cap, model_path, until_interrupted
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from mullama import AsyncModel, MullamaError, StreamConfig

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


async def main(port: int) -> None:
    model = app.state.model = await AsyncModel.load(model_path(), n_ctx=4096, n_parallel=4)
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    async with model, trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=until_interrupted))
        print(f"WebSocket server on {binds[0].replace('http', 'ws')}/ws", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8765)
    trio.run(main, parser.parse_args().port)
    print("stopped")
