"""OpenAI-compatible endpoints: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Shapes follow OpenAI's API reference, so the official ``openai`` client works
unchanged (streaming and not). ``n`` choices (at most the model's slots) share
one evaluation of the prompt; with a ``seed``, choice ``i`` samples with
``seed + i``, so the choices differ and a request is reproducible.
``response_format``, ``grammar`` and ``json_schema`` constrain the output
(:mod:`mullama.server.structured`).
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
from mullama.scoring import ScoreResult
from mullama.server.body import Fields, read_json
from mullama.server.errors import ApiError, api_error_from, error_response
from mullama.server.scoring_api import LegacyLogprobs, completion_prompts, prompt_token_ids, scored_completions
from mullama.server.service import Choices, Service
from mullama.server.structured import request_grammar
from mullama.server.tutorial_api import SSE_HEADERS
from mullama.server.tool_calls import ToolRequest, tool_message_fields
from mullama.types import TokenData

__all__ = ["completions", "chat_completions", "list_models"]

MAX_COMPLETION_LOGPROBS = 5   # OpenAI's limit for the legacy completions API
MAX_CHAT_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _piece(service: Service, token_id: int) -> bytes:
    return service.model.model.token_to_piece(token_id, special=True)


def _usage(choices: Choices) -> dict[str, int]:
    """The prompt counts once however many choices share it."""
    return {"prompt_tokens": choices.prompt_tokens, "completion_tokens": choices.completion_tokens,
            "total_tokens": choices.prompt_tokens + choices.completion_tokens}


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


def _messages(fields: Fields) -> list[dict[str, Any]]:
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
        out.append({"role": "system" if role == "developer" else role, "content": content,
                    **tool_message_fields(msg, i)})
    return out


def _n(fields: Fields, service: Service) -> int:
    n = fields.integer("n", 1, 1, 2**31 - 1)
    assert n is not None
    service.check_n(n)
    return n


def _stream_options(fields: Fields) -> bool:
    opts = fields.body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return bool(opts.get("include_usage", False))


def _chat_logprob_entry(service: Service, tok: TokenData) -> dict[str, Any]:
    """Chat-format logprobs of one token."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        raw = _piece(service, token_id)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    entry = one(tok.token_id, tok.logprob if tok.logprob is not None else 0.0)
    entry["top_logprobs"] = [one(i, lp) for i, lp in (tok.top_logprobs or ())]
    return entry


class _Shape:
    """How one endpoint writes its choices; ``_answer`` does the rest for both.

    Streamed: ``opening`` (or nothing), a ``delta`` per token (None: nothing to
    send), ``closing`` with the finish reason. Whole: ``take`` each token, then
    ``choice``. Every method gets the choice's index.
    """

    endpoint = ""          # the metrics label
    id_prefix = ""
    object = ""            # of a whole answer
    chunk_object = ""      # of a streamed chunk

    def __init__(self, service: Service, n: int, want_lp: bool) -> None:
        self.service = service
        self.want_lp = want_lp
        self.parts: list[list[str]] = [[] for _ in range(n)]

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def delta(self, index: int, tok: TokenData) -> dict[str, Any] | None:
        raise NotImplementedError

    def closing(self, index: int, finish: str) -> dict[str, Any]:
        raise NotImplementedError

    def take(self, index: int, tok: TokenData) -> None:
        self.parts[index].append(tok.text)

    def choice(self, index: int, finish: str) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionShape(_Shape):
    endpoint, id_prefix, object, chunk_object = "completions", "cmpl", "text_completion", "text_completion"

    def __init__(self, service: Service, n: int, want_lp: bool, echo: str,
                 prompt_scores: ScoreResult | None = None) -> None:
        super().__init__(service, n, want_lp)
        self.echo = echo
        self.logprobs = [LegacyLogprobs(service) for _ in range(n)]
        self.prompt_scored = prompt_scores is not None
        for lp in self.logprobs:
            if prompt_scores is not None:
                lp.add_prompt(prompt_scores)
            lp.offset = len(echo)

    @staticmethod
    def _choice(index: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}

    def opening(self, index: int) -> dict[str, Any] | None:
        if not self.echo:
            return None
        return self._choice(index, self.echo, self.logprobs[index].payload() if self.prompt_scored else None, None)

    def _add(self, index: int, tok: TokenData) -> None:
        self.logprobs[index].add(tok.token_id, tok.logprob, tok.top_logprobs or ())

    def delta(self, index: int, tok: TokenData) -> dict[str, Any] | None:
        lp = None
        if self.want_lp and tok.token_id >= 0:
            start = len(self.logprobs[index].tokens)
            self._add(index, tok)
            lp = self.logprobs[index].payload(start)
        return self._choice(index, tok.text, lp, None) if tok.text or lp else None

    def closing(self, index: int, finish: str) -> dict[str, Any]:
        return self._choice(index, "", None, finish)

    def take(self, index: int, tok: TokenData) -> None:
        super().take(index, tok)
        if self.want_lp and tok.token_id >= 0:
            self._add(index, tok)

    def choice(self, index: int, finish: str) -> dict[str, Any]:
        return self._choice(index, self.echo + "".join(self.parts[index]),
                            self.logprobs[index].payload() if self.want_lp else None, finish)


class _ChatShape(_Shape):
    endpoint, id_prefix, object, chunk_object = "chat", "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, service: Service, n: int, want_lp: bool) -> None:
        super().__init__(service, n, want_lp)
        self.entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]

    @staticmethod
    def _chunk(index: int, delta: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def opening(self, index: int) -> dict[str, Any] | None:
        return self._chunk(index, {"role": "assistant", "content": ""}, None, None)

    def delta(self, index: int, tok: TokenData) -> dict[str, Any] | None:
        lp = None
        if self.want_lp and tok.token_id >= 0:
            lp = {"content": [_chat_logprob_entry(self.service, tok)]}
        return self._chunk(index, {"content": tok.text}, lp, None) if tok.text or lp else None

    def closing(self, index: int, finish: str) -> dict[str, Any]:
        return self._chunk(index, {}, None, finish)

    def take(self, index: int, tok: TokenData) -> None:
        super().take(index, tok)
        if self.want_lp and tok.token_id >= 0:
            self.entries[index].append(_chat_logprob_entry(self.service, tok))

    def choice(self, index: int, finish: str) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": "".join(self.parts[index])},
                "logprobs": {"content": self.entries[index]} if self.want_lp else None,
                "finish_reason": finish}


async def _sse(chunks: AsyncIterator[dict[str, Any]], choices: Choices) -> AsyncIterator[str]:
    async with choices:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except MullamaError as exc:
            err = api_error_from(exc)
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"


async def _consume(request: Request, choices: Choices,
                   take: Callable[[int, TokenData], None]) -> Response | None:
    """Run a non-streaming request's choices to their end, feeding each token to ``take``.

    Returns None when they completed, else the response to send: an error, or
    nothing useful when the client disconnected meanwhile (that cancels every
    choice at once instead of decoding for nobody).
    """
    service: Service = request.app.state.service
    async with choices, service.watch_disconnect(request) as seen:
        try:
            while not choices.finished:
                for index, tok in await choices.step():
                    if tok is not None:
                        take(index, tok)
        except MullamaError as exc:
            return error_response(api_error_from(exc))
    return Response(status_code=499) if seen.gone else None


async def _answer(request: Request, shape: _Shape, choices: Choices, stream: bool,
                  include_usage: bool) -> Response:
    """The response of a started request: SSE chunks, or one JSON body once all choices ended."""
    service: Service = request.app.state.service
    head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": service.settings.model_id}

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        return {**head, "object": shape.chunk_object, "choices": [choice]}

    if stream:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            for index in range(len(choices)):
                if (opening := shape.opening(index)) is not None:
                    yield chunk(opening)
            while not choices.finished:
                for index, tok in await choices.step():
                    # a shape may answer one token with several chunks (a list)
                    out = shape.closing(index, _finish(choices.finish_reason(index))) if tok is None \
                        else shape.delta(index, tok)
                    if out is not None:
                        for piece in out if isinstance(out, list) else [out]:
                            yield chunk(piece)
            if include_usage:
                yield {**head, "object": shape.chunk_object, "choices": [], "usage": _usage(choices)}

        return StreamingResponse(_sse(chunks(), choices), media_type="text/event-stream", headers=SSE_HEADERS)

    failed = await _consume(request, choices, shape.take)
    if failed is not None:
        return failed
    return JSONResponse({**head, "object": shape.object,
                         "choices": [shape.choice(i, _finish(choices.finish_reason(i))) for i in range(len(choices))],
                         "usage": _usage(choices)})


_GONE: Any = object()


async def _prompt_scores(request: Request, service: Service, prompt: str | list[int],
                         n_logprobs: int) -> ScoreResult:
    """The log-probabilities of a streamed echo's prompt (its first chunk carries them),
    scored by the engine before the generation starts; ``_GONE`` if the client left."""
    ids = await anyio.to_thread.run_sync(prompt_token_ids, service, prompt)
    async with service.watch_disconnect(request) as watch:
        (scores,) = await service.model.score([ids], top_logprobs=n_logprobs)
    return _GONE if watch.gone else scores


async def completions(request: Request) -> Response:
    service: Service = request.app.state.service
    try:
        fields = Fields(await read_json(request, service.settings.max_body_bytes), service.settings)
        prompts = completion_prompts(fields.body, service.model.model.n_vocab)
        n_logprobs = fields.integer("logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
        stream = fields.boolean("stream")
        echo = fields.boolean("echo")
        grammar = request_grammar(fields.body, service.model.model, service.grammars)
        if not stream and (echo or len(prompts) > 1):
            # prompt log-probabilities and batches: scored by the engine, then generated
            n = fields.integer("n", 1, 1, 2**31 - 1)
            assert n is not None
            zero = fields.body.get("max_tokens")
            if isinstance(zero, int) and not isinstance(zero, bool) and zero == 0:
                config = None
            else:
                config = fields.stream_config(temperature=1.0, max_tokens=fields.max_tokens("max_tokens"),
                                              logprobs=n_logprobs is not None, top_logprobs=n_logprobs or 0,
                                              grammar=grammar)
            head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": service.settings.model_id}
            return await scored_completions(request, service, prompts, n, n_logprobs, echo, config, head)
        if len(prompts) > 1:
            raise ApiError(400, "a streamed completion takes one prompt", param="prompt")
        prompt = _completion_prompt(fields, service.model.model.n_vocab)
        n = _n(fields, service)
        include_usage = _stream_options(fields)
        if echo and isinstance(prompt, list):
            raise ApiError(400, "a streamed 'echo' needs a text prompt", param="echo")
        config = fields.stream_config(temperature=1.0, max_tokens=fields.max_tokens("max_tokens"),
                                      logprobs=n_logprobs is not None, top_logprobs=n_logprobs or 0,
                                      grammar=grammar)
        scores = await _prompt_scores(request, service, prompt, n_logprobs) if echo and n_logprobs is not None \
            else None
        if scores is _GONE:
            return Response(status_code=499)
        shape = _CompletionShape(service, n, n_logprobs is not None,
                                 prompt if echo and isinstance(prompt, str) else "", scores)
        choices = await service.start_choices(prompt, config, shape.endpoint, n)
    except ApiError as err:
        return error_response(err)
    except (MullamaError, ValueError) as exc:
        return error_response(api_error_from(exc))
    return await _answer(request, shape, choices, stream, include_usage)


async def chat_completions(request: Request) -> Response:
    service: Service = request.app.state.service
    try:
        fields = Fields(await read_json(request, service.settings.max_body_bytes), service.settings)
        messages = _messages(fields)
        tools = ToolRequest.from_body(fields.body, service.model.model)
        n = _n(fields, service)
        want_lp = fields.boolean("logprobs")
        n_top = fields.integer("top_logprobs", 0, 0, MAX_CHAT_TOP_LOGPROBS)
        if n_top and not want_lp:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        stream = fields.boolean("stream")
        include_usage = _stream_options(fields)
        max_tokens = fields.max_tokens("max_completion_tokens", "max_tokens")
        grammar = request_grammar(fields.body, service.model.model, service.grammars)
        config = fields.stream_config(temperature=1.0, max_tokens=max_tokens, logprobs=want_lp,
                                      top_logprobs=n_top or 0, grammar=grammar)
        try:
            prompt = service.model.model.apply_chat_template(messages, add_generation_prompt=True,
                                                             **(tools.template_args() if tools else {}))
        except (MullamaError, ValueError, TypeError) as exc:
            raise ApiError(400, f"the chat template could not render the messages: {exc}",
                           param="messages") from None
        shape = _ChatShape(service, n, want_lp)
        if tools is not None:
            config, shape = tools.constrain(config), tools.shape(shape)
        choices = await service.start_choices(prompt, config, shape.endpoint, n)
    except ApiError as err:
        return error_response(err)
    return await _answer(request, shape, choices, stream, include_usage)


async def list_models(request: Request) -> Response:
    service: Service = request.app.state.service
    model = service.model.model
    return JSONResponse({"object": "list", "data": [{
        "id": service.settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "mullama",
        "meta": {"n_ctx": service.model.n_ctx, "n_parallel": service.model.n_parallel,
                 "n_vocab": model.n_vocab, "n_params": model.n_params, "size": model.size,
                 "description": model.description,
                 "prefix_cache": service.model.prefix_cache_stats()["enabled"]},
    }]})
