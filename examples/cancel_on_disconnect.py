"""A client that disconnects mid-stream cancels its generation on the server.

One trio program plays both sides: an SSE server (Starlette on Hypercorn) and a
client that reads a few events and hangs up. The server's ``async with`` on the
token stream exits when the response is cancelled, which stops the decoder
within one step and frees the sequence.
"""

from __future__ import annotations

import json

import trio
from _common import model_path
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from mullama import AsyncModel, StreamConfig

report: dict = {}


async def stream(request: Request) -> StreamingResponse:
    body = await request.json()
    tokens = await request.app.state.model.generate_stream(body["prompt"], StreamConfig(max_tokens=2000))

    async def events():
        try:
            async with tokens:
                async for tok in tokens:
                    yield f"data: {json.dumps({'token': tok.text})}\n\n"
        finally:  # runs when the client goes away, too
            report["server_tokens"] = tokens.tokens_generated
            report["finish_reason"] = tokens.finish_reason

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(routes=[Route("/stream", stream, methods=["POST"])])


async def impatient_client(host: str, port: int, keep: int) -> int:
    """Post a request, read ``keep`` events, then close the connection."""
    payload = json.dumps({"prompt": "Count slowly from one to one thousand:"}).encode()
    sock = await trio.open_tcp_stream(host, port)
    await sock.send_all(b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    seen = b""
    while seen.count(b"data: ") < keep:
        seen += await sock.receive_some(65536)
    await sock.aclose()
    return seen.count(b"data: ")


async def main() -> None:
    model = app.state.model = await AsyncModel.load(model_path(), n_ctx=4096, n_parallel=2)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    async with model, trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, config)
        host, port = binds[0].removeprefix("http://").rsplit(":", 1)
        received = await impatient_client(host, int(port), keep=5)
        print(f"client read {received} events of 2000 and disconnected")
        with trio.fail_after(10):
            while model.active_streams or "finish_reason" not in report:
                await trio.sleep(0.01)
        print(f"server generated {report['server_tokens']} tokens, finish reason: {report['finish_reason']}")
        print(f"streams still running: {model.active_streams}; KV cells in use: "
              f"{sum(1 for p in model.kv_positions() if p >= 0)} sequences")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
