"""An SSE server of your own: POST /stream sends each token as a Server-Sent Event.

Starlette on Hypercorn's trio worker, over an AsyncModel that batches concurrent
requests. The events follow the tutorial's format; a client that disconnects
cancels its generation (leaving ``async with`` stops the decoder within a step).

    python sse_server.py --port 3000
    python sse_client.py http://127.0.0.1:3000 "Hello!"
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
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mullama import AsyncModel, MullamaError, StreamConfig

def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def stream(request: Request) -> Response:
    try:
        body = await request.json()
        prompt = body["prompt"]
        config = StreamConfig(max_tokens=cap(int(body.get("max_tokens", 200))), temperature=0.7)
        tokens = await request.app.state.model.generate_stream(prompt, config)
    except (MullamaError, ValueError, TypeError, KeyError) as exc:
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=400)

    async def events():
        index = 0
        async with tokens:  # exits early when the client leaves: generation is cancelled
            async for tok in tokens:
                if tok.text:
                    yield sse({"token": tok.text, "index": index, "done": False})
                    index += 1
        yield sse({"token": "", "index": index, "done": True})

    headers = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


app = Starlette(routes=[Route("/stream", stream, methods=["POST"])])


async def main(port: int) -> None:
    model = app.state.model = await AsyncModel.load(model_path(), n_ctx=4096, n_parallel=4)
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    async with model, trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=until_interrupted))
        print(f"SSE server on {binds[0]}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3000)
    trio.run(main, parser.parse_args().port)
    print("stopped")
