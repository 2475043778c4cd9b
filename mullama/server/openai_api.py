"""OpenAI-compatible endpoints: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Shapes follow OpenAI's API reference, so the official ``openai`` client works
unchanged (streaming and not). One choice per request (``n`` must be 1).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

import anyio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mullama.errors import MullamaError
from mullama.server.body import Fields, read_json
from mullama.server.errors import ApiError, api_error_from, error_response
from mullama.server.service import Generation, Service
from mullama.server.tutorial_api import SSE_HEADERS
from mullama.types import TokenData

__all__ = ["completions", "chat_completions", "list_models"]

MAX_COMPLETION_LOGPROBS = 5   # OpenAI's limit for the legacy completions API
MAX_CHAT_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _piece(service: Service, token_id: int) -> bytes:
    return service.model.model.token_to_piece(token_id, special=True)


def _usage(gen: Generation) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _completion_prompt(fields: Fields, n_vocab: int) -> str | list[int]:
    value = fields.body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ApiError(400, "'prompt' must not be empty", param="prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        bad = [t for t in value if not 0 <= t < n_vocab]
        if bad:
            raise ApiError(400, f"'prompt' has token id {bad[0]} outside the vocabulary [0, {n_vocab})",
                           param="prompt")
        return list(value)
    if value is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    raise ApiError(400, "'prompt' must be a string, a list with one string, or a list of token ids",
                   param="prompt")


def _messages(fields: Fields) -> list[dict[str, str]]:
    value = fields.body.get("messages")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", param="messages")
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param="messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _check_n(fields: Fields) -> None:
    if fields.integer("n", 1, 1, 128) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")


def _stream_options(fields: Fields) -> bool:
    opts = fields.body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return bool(opts.get("include_usage", False))


class _Chat:
    """Chat-format logprobs of one token."""

    @staticmethod
    def logprob_entry(service: Service, tok: TokenData) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            raw = _piece(service, token_id)
            return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

        entry = one(tok.token_id, tok.logprob if tok.logprob is not None else 0.0)
        entry["top_logprobs"] = [one(i, lp) for i, lp in (tok.top_logprobs or ())]
        return entry


class _Legacy:
    """Completions-format logprobs, accumulated token by token."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top: list[dict[str, float]] = []
        self.offsets: list[int] = []
        self.offset = 0

    def add(self, service: Service, tok: TokenData) -> None:
        text = _piece(service, tok.token_id).decode("utf-8", "replace")
        self.tokens.append(text)
        self.token_logprobs.append(tok.logprob if tok.logprob is not None else 0.0)
        self.top.append({_piece(service, i).decode("utf-8", "replace"): lp for i, lp in (tok.top_logprobs or ())})
        self.offsets.append(self.offset)
        self.offset += len(text)

    def payload(self, start: int = 0) -> dict[str, Any]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top[start:], "text_offset": self.offsets[start:]}


async def _sse(chunks: AsyncIterator[dict[str, Any]], gen: Generation) -> AsyncIterator[str]:
    async with gen:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except MullamaError as exc:
            err = api_error_from(exc)
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"


async def _consume(request: Request, gen: Generation, take: Callable[[TokenData], None]) -> Response | None:
    """Run a non-streaming generation to its end, feeding each token to ``take``.

    Returns None when it completed, else the response to send: an error, or
    nothing useful when the client disconnected meanwhile (that cancels the
    generation at once instead of decoding for nobody).
    """
    gone = False
    async with gen, anyio.create_task_group() as tg:
        async def watch() -> None:
            nonlocal gone
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            async for tok in gen:
                take(tok)
        except MullamaError as exc:
            tg.cancel_scope.cancel()
            return error_response(api_error_from(exc))
        tg.cancel_scope.cancel()
    return Response(status_code=499) if gone else None


async def completions(request: Request) -> Response:
    service: Service = request.app.state.service
    try:
        fields = Fields(await read_json(request, service.settings.max_body_bytes), service.settings)
        prompt = _completion_prompt(fields, service.model.model.n_vocab)
        _check_n(fields)
        n_logprobs = fields.integer("logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
        stream = fields.boolean("stream")
        include_usage = _stream_options(fields)
        echo = fields.boolean("echo")
        if echo and isinstance(prompt, list):
            raise ApiError(400, "'echo' needs a text prompt", param="echo")
        config = fields.stream_config(temperature=1.0, max_tokens=fields.max_tokens("max_tokens"),
                                      logprobs=n_logprobs is not None, top_logprobs=n_logprobs or 0)
        gen = await service.start(prompt, config, "completions")
    except ApiError as err:
        return error_response(err)
    ident = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model_id = service.settings.model_id
    prefix = prompt if echo and isinstance(prompt, str) else ""
    want_lp = n_logprobs is not None

    def chunk(text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {"id": ident, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}

    if stream:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            if prefix:
                yield chunk(prefix, None, None)
            async for tok in gen:
                lp = None
                if want_lp and tok.token_id >= 0:
                    one = _Legacy()
                    one.add(service, tok)
                    lp = one.payload()
                if tok.text or lp:
                    yield chunk(tok.text, lp, None)
            yield chunk("", None, _finish(gen.finish_reason))
            if include_usage:
                yield {"id": ident, "object": "text_completion", "created": created, "model": model_id,
                       "choices": [], "usage": _usage(gen)}

        return StreamingResponse(_sse(chunks(), gen), media_type="text/event-stream", headers=SSE_HEADERS)

    legacy = _Legacy()
    parts = [prefix]

    def take(tok: TokenData) -> None:
        parts.append(tok.text)
        if want_lp and tok.token_id >= 0:
            legacy.add(service, tok)

    failed = await _consume(request, gen, take)
    if failed is not None:
        return failed
    body = chunk("".join(parts), legacy.payload() if want_lp else None, _finish(gen.finish_reason))
    body["usage"] = _usage(gen)
    return JSONResponse(body)


async def chat_completions(request: Request) -> Response:
    service: Service = request.app.state.service
    try:
        fields = Fields(await read_json(request, service.settings.max_body_bytes), service.settings)
        messages = _messages(fields)
        _check_n(fields)
        want_lp = fields.boolean("logprobs")
        n_top = fields.integer("top_logprobs", 0, 0, MAX_CHAT_TOP_LOGPROBS)
        if n_top and not want_lp:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        stream = fields.boolean("stream")
        include_usage = _stream_options(fields)
        max_tokens = fields.max_tokens("max_completion_tokens", "max_tokens")
        config = fields.stream_config(temperature=1.0, max_tokens=max_tokens, logprobs=want_lp,
                                      top_logprobs=n_top or 0)
        try:
            prompt = service.model.model.apply_chat_template(messages, add_generation_prompt=True)
        except (MullamaError, ValueError, TypeError) as exc:
            raise ApiError(400, f"the chat template could not render the messages: {exc}",
                           param="messages") from None
        gen = await service.start(prompt, config, "chat")
    except ApiError as err:
        return error_response(err)
    ident = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model_id = service.settings.model_id

    def chunk(delta: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    if stream:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            yield chunk({"role": "assistant", "content": ""}, None, None)
            async for tok in gen:
                lp = None
                if want_lp and tok.token_id >= 0:
                    lp = {"content": [_Chat.logprob_entry(service, tok)]}
                if tok.text or lp:
                    yield chunk({"content": tok.text}, lp, None)
            yield chunk({}, None, _finish(gen.finish_reason))
            if include_usage:
                yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_id,
                       "choices": [], "usage": _usage(gen)}

        return StreamingResponse(_sse(chunks(), gen), media_type="text/event-stream", headers=SSE_HEADERS)

    parts: list[str] = []
    entries: list[dict[str, Any]] = []

    def take(tok: TokenData) -> None:
        parts.append(tok.text)
        if want_lp and tok.token_id >= 0:
            entries.append(_Chat.logprob_entry(service, tok))

    failed = await _consume(request, gen, take)
    if failed is not None:
        return failed
    return JSONResponse({
        "id": ident, "object": "chat.completion", "created": created, "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                     "logprobs": {"content": entries} if want_lp else None,
                     "finish_reason": _finish(gen.finish_reason)}],
        "usage": _usage(gen),
    })


async def list_models(request: Request) -> Response:
    service: Service = request.app.state.service
    model = service.model.model
    return JSONResponse({"object": "list", "data": [{
        "id": service.settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "mullama",
        "meta": {"n_ctx": service.model.n_ctx, "n_parallel": service.model.n_parallel,
                 "n_vocab": model.n_vocab, "n_params": model.n_params, "size": model.size,
                 "description": model.description},
    }]})
