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
from _common import cap, serve_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mullama import MullamaError, StreamConfig

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3000)
    trio.run(partial(serve_app, app, "SSE server", parser.parse_args().port))
    print("stopped")
