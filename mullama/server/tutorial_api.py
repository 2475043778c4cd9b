"""``POST /stream`` (Server-Sent Events) and the ``/ws`` WebSocket: the tutorial's protocols.

SSE: ``data: {"token": ..., "index": i, "done": false}`` per piece of text,
then ``data: {"token": "", "index": n, "done": true, ...}``. A client that
disconnects cancels its generation (the engine stops within one step).

WebSocket: the client sends ``{"prompt": ..., "max_tokens": ...}`` (more
sampling fields optional) and receives ``{"type": "token", "content": ...}``
per piece, then ``{"type": "done", ...}``; any number of prompts per
connection, taken in order. ``{"type": "cancel"}`` stops the current one; a
client that closes mid-stream stops it too.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from mullama.errors import MullamaError
from mullama.server.body import Fields, parse_json, read_json
from mullama.server.errors import ApiError, error_response
from mullama.server.service import Generation, Service
from mullama.server.structured import request_grammar

__all__ = ["stream_endpoint", "websocket_endpoint", "SSE_HEADERS"]

SSE_HEADERS = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}
TUTORIAL_TEMPERATURE = 0.7
MAX_PENDING_PROMPTS = 16


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _prompt_and_config(body: dict[str, Any], service: Service) -> tuple[str, Any]:
    fields = Fields(body, service.settings)
    prompt = fields.text("prompt", required=True)
    assert prompt is not None
    if not prompt:
        raise ApiError(400, "'prompt' must not be empty", param="prompt")
    grammar = request_grammar(body, service.model.model, service.grammars)
    config = fields.stream_config(temperature=TUTORIAL_TEMPERATURE, max_tokens=fields.max_tokens("max_tokens"),
                                  grammar=grammar)
    return prompt, config


async def _sse_events(gen: Generation) -> AsyncIterator[str]:
    index = 0
    async with gen:
        try:
            async for tok in gen:
                if tok.text:
                    yield _event({"token": tok.text, "index": index, "done": False})
                    index += 1
        except MullamaError as exc:
            yield _event({"token": "", "index": index, "done": True, "error": {"message": str(exc),
                                                                              "type": type(exc).__name__}})
            return
        yield _event({"token": "", "index": index, "done": True, "finish_reason": gen.finish_reason,
                      "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens}})


async def stream_endpoint(request: Request) -> Response:
    service: Service = request.app.state.service
    try:
        body = await read_json(request, service.settings.max_body_bytes)
        prompt, config = _prompt_and_config(body, service)
        gen = await service.start(prompt, config, "stream")
    except ApiError as err:
        return error_response(err)
    return StreamingResponse(_sse_events(gen), media_type="text/event-stream", headers=SSE_HEADERS)


class _Session:
    """One WebSocket connection: a reader task feeding prompts, a writer streaming answers."""

    def __init__(self, ws: WebSocket, service: Service) -> None:
        self.ws = ws
        self.service = service
        self.pending: deque[dict[str, Any]] = deque()
        self.arrived = anyio.Event()
        self.current: anyio.CancelScope | None = None

    async def send(self, payload: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(payload, ensure_ascii=False))

    async def read_loop(self, done: anyio.CancelScope) -> None:
        limit = self.service.settings.max_ws_message_bytes
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                if raw is None:
                    raw = message.get("bytes") or b""
                size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
                if size > limit:
                    await self.send({"type": "error", "error": {
                        "message": f"the message is {size} bytes; the limit is {limit}", "code": 1009}})
                    await self.ws.close(code=1009)
                    break
                try:
                    body = parse_json(raw)
                except ApiError as err:
                    await self.send({"type": "error", **err.body()})
                    continue
                if body.get("type") == "cancel":
                    if self.current is not None:
                        self.current.cancel()
                    continue
                if len(self.pending) >= MAX_PENDING_PROMPTS:
                    await self.send({"type": "error", **ApiError(
                        429, f"more than {MAX_PENDING_PROMPTS} prompts wait on this connection").body()})
                    continue
                self.pending.append(body)
                self.arrived.set()
        except WebSocketDisconnect:
            pass
        done.cancel()  # stops the writer, and with it any generation it runs

    async def write_loop(self) -> None:
        while True:
            while not self.pending:
                self.arrived = anyio.Event()
                await self.arrived.wait()
            await self.answer(self.pending.popleft())

    async def answer(self, body: dict[str, Any]) -> None:
        try:
            prompt, config = _prompt_and_config(body, self.service)
            gen = await self.service.start(prompt, config, "ws")
        except ApiError as err:
            await self.send({"type": "error", **err.body()})
            return
        count = 0
        async with gen:
            with anyio.CancelScope() as scope:
                self.current = scope
                try:
                    async for tok in gen:
                        if tok.text:
                            await self.send({"type": "token", "content": tok.text})
                            count += 1
                except MullamaError as exc:
                    self.current = None
                    await self.send({"type": "error", "error": {"message": str(exc), "type": type(exc).__name__}})
                    return
            self.current = None
            reason = gen.finish_reason if not scope.cancelled_caught else "cancelled"
        await self.send({"type": "done", "finish_reason": reason, "tokens": gen.completion_tokens,
                         "pieces": count})


async def websocket_endpoint(ws: WebSocket) -> None:
    service: Service = ws.app.state.service
    await ws.accept()
    session = _Session(ws, service)
    async with anyio.create_task_group() as tg:
        tg.start_soon(session.read_loop, tg.cancel_scope)
        try:
            await session.write_loop()
        except (WebSocketDisconnect, OSError, RuntimeError):
            # the client went away while we were sending
            tg.cancel_scope.cancel()
