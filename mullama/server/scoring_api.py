"""Scoring over HTTP: ``/v1/completions`` with ``echo`` (legacy logprobs of the prompt's
tokens), prompt batches, and the tokenizer endpoints evaluation harnesses probe
(``/tokenize``, ``/detokenize``, ``/tokenizer_info``).

A non-streamed completion that echoes its prompt or has several prompts comes
here: each prompt is scored by the engine (log-probabilities of its tokens,
reduced row by row on the decode threads), then its ``n`` choices are
generated; with the prefix cache on, the generation starts from the prompt
the scoring request left in its slot.
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mullama import scoring
from mullama.errors import MullamaError
from mullama.server.body import Fields, read_json
from mullama.server.errors import ApiError, api_error_from, error_response
from mullama.server.service import Service
from mullama.stream_config import StreamConfig

__all__ = ["completion_prompts", "scored_completions", "tokenize", "detokenize", "tokenizer_info",
           "LegacyLogprobs", "prompt_token_ids", "MAX_PROMPTS"]

MAX_PROMPTS = 1024        # prompts in one completions request


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _check_ids(ids: list[int], n_vocab: int, where: str, param: str = "prompt") -> list[int]:
    if not ids:
        raise ApiError(400, f"{where} is an empty list of token ids", param=param)
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise ApiError(400, f"{where} has token id {bad[0]} outside the vocabulary [0, {n_vocab})",
                       param=param)
    return ids


def text_inputs(body: dict[str, Any], param: str, limit: int, n_vocab: int) -> list[str | list[int]]:
    """The texts of ``body[param]``: a string, a list of token ids, or a non-empty list of
    either (a batch), at most ``limit`` of them; each non-empty, every id in the vocabulary.
    The one parser of the endpoints that take text or token ids (completions, embeddings)."""
    value = body.get(param)
    if value is None:
        raise ApiError(400, f"'{param}' is required", param=param)
    if isinstance(value, str) or (_is_ids(value) and value):
        items: list[Any] = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise ApiError(400, f"'{param}' must be a string, a list of token ids, or a non-empty list of either",
                       param=param)
    if len(items) > limit:
        raise ApiError(400, f"'{param}' has {len(items)} entries; this server takes at most {limit} "
                            "in one request", param=param)
    out: list[str | list[int]] = []
    for i, item in enumerate(items):
        where = f"'{param}'" if len(items) == 1 else f"{param}[{i}]"
        if isinstance(item, str):
            if not item:
                raise ApiError(400, f"{where} must not be empty", param=param)
            out.append(item)
        elif _is_ids(item):
            out.append(_check_ids(item, n_vocab, where, param))
        else:
            raise ApiError(400, f"{where} must be a string or a list of token ids", param=param)
    return out


def completion_prompts(body: dict[str, Any], n_vocab: int) -> list[str | list[int]]:
    """The prompts of a completions request (one choice per prompt)."""
    return text_inputs(body, "prompt", MAX_PROMPTS, n_vocab)


class LegacyLogprobs:
    """Legacy (completions) logprobs of one choice: prompt tokens, then generated ones;
    ``text_offset`` counts characters from the start of the choice's text."""

    def __init__(self, service: Service) -> None:
        self.model = service.model.model
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top: list[dict[str, float] | None] = []
        self.offsets: list[int] = []
        self.offset = 0

    def _text(self, token_id: int, special: bool) -> str:
        return self.model.token_to_piece(token_id, special=special).decode("utf-8", "replace")

    def add(self, token_id: int, logprob: float | None, top: Any) -> None:
        self.tokens.append(self._text(token_id, True))
        # float32 like the alternatives, so a greedy token's value equals its row's best
        self.token_logprobs.append(None if logprob is None else float(np.float32(logprob)))
        self.top.append(None if top is None else {self._text(int(i), True): float(v) for i, v in top})
        self.offsets.append(self.offset)
        self.offset += len(self._text(token_id, False))

    def add_prompt(self, res: scoring.ScoreResult) -> None:
        for i, tok in enumerate(res.tokens.tolist()):
            if i < res.first:
                self.add(tok, None, None)
            else:
                k = res.top_ids.shape[1]
                top = zip(res.top_ids[i].tolist(), res.top_logprobs[i].tolist()) if k else ()
                self.add(tok, float(res.logprobs[i]), top)

    def payload(self, start: int = 0) -> dict[str, Any]:
        """The entries from the ``start``-th token on (a streamed chunk sends only its own)."""
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top[start:], "text_offset": self.offsets[start:]}


def prompt_token_ids(service: Service, prompt: str | list[int]) -> np.ndarray:
    if isinstance(prompt, str):
        service._check_prompt(prompt)
    return scoring.score_ids(service.model.model, prompt, service.model.n_ctx)


async def _generate(request: Request, service: Service, ids: np.ndarray, config: StreamConfig, n: int,
                    out: list[dict[str, Any]], base: int, n_logprobs: int | None) -> None:
    """Generate the ``n`` choices of one prompt into ``out[base:base + n]``."""
    choices = await service.start_choices(ids.tolist(), config, "completions", n)
    async with choices:
        while not choices.finished:
            for index, tok in await choices.step():
                slot = out[base + index]
                if tok is None:
                    slot["finish_reason"] = "length" if choices.finish_reason(index) == "length" else "stop"
                    continue
                slot["parts"].append(tok.text)
                if n_logprobs is not None and tok.token_id >= 0:
                    slot["lp"].add(tok.token_id, tok.logprob, tok.top_logprobs or ())
    out[base]["usage"] = (choices.prompt_tokens, choices.completion_tokens)


async def scored_completions(request: Request, service: Service, prompts: list[str | list[int]], n: int,
                             n_logprobs: int | None, echo: bool, config: StreamConfig | None,
                             head: dict[str, Any]) -> Response:
    """A non-streamed completion with ``echo`` or several prompts (see the module doc).
    ``config`` is None for ``max_tokens: 0`` (score only)."""
    model = service.model
    try:
        ids = await anyio.to_thread.run_sync(lambda: [prompt_token_ids(service, p) for p in prompts])
    except (ValueError, TypeError, MullamaError) as exc:
        return error_response(api_error_from(exc))
    if config is not None:
        service.check_n(n)
    out: list[dict[str, Any]] = []
    for p, prompt_ids in zip(prompts, ids):
        echo_text = (p if isinstance(p, str) else model.model.detokenize(prompt_ids)) if echo else ""
        for _ in range(n):
            lp = LegacyLogprobs(service)
            out.append({"echo": echo_text, "parts": [], "lp": lp, "finish_reason": "length", "usage": None})
    failure: BaseException | None = None
    async with service.watch_disconnect(request) as seen:
        try:
            if echo and n_logprobs is not None:
                scored = await model.score(ids, top_logprobs=n_logprobs)
                for pi, res in enumerate(scored):
                    for k in range(n):
                        out[pi * n + k]["lp"].add_prompt(res)
                        out[pi * n + k]["lp"].offset = len(out[pi * n + k]["echo"])
            elif echo:
                for slot in out:
                    slot["lp"].offset = len(slot["echo"])
            if config is not None:
                limit = anyio.Semaphore(max(1, model.n_parallel // n))
                async with anyio.create_task_group() as gen:
                    for pi, prompt_ids in enumerate(ids):
                        await limit.acquire()
                        if failure is not None:
                            break

                        async def one(pi: int = pi, prompt_ids: np.ndarray = prompt_ids) -> None:
                            nonlocal failure
                            try:
                                await _generate(request, service, prompt_ids, config, n, out, pi * n, n_logprobs)
                            except (MullamaError, ApiError, ValueError) as exc:
                                failure = failure or exc
                                gen.cancel_scope.cancel()
                            finally:
                                limit.release()

                        gen.start_soon(one)
        except (MullamaError, ApiError, ValueError) as exc:
            failure = exc
    if seen.gone:
        return Response(status_code=499)
    if failure is not None:
        return error_response(api_error_from(failure))
    prompt_tokens = sum(int(i.size) for i in ids)
    completion_tokens = sum(slot["usage"][1] for slot in out if slot["usage"] is not None)
    choices = [{"text": slot["echo"] + "".join(slot["parts"]), "index": i,
                "logprobs": slot["lp"].payload() if n_logprobs is not None else None,
                "finish_reason": slot["finish_reason"]} for i, slot in enumerate(out)]
    return JSONResponse({**head, "object": "text_completion", "choices": choices,
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens}})


# ---------------------------------------------------------------- tokenizer endpoints

async def tokenize(request: Request) -> Response:
    """``{"prompt" | "content": text, "add_special_tokens": true}`` -> ``{"tokens": [...]}``.
    Special-token text (``<start_of_turn>``) becomes the special token."""
    service: Service = request.app.state.service
    try:
        fields = Fields(await read_json(request, service.settings.max_body_bytes), service.settings)
        name = "prompt" if "prompt" in fields.body else "content"
        text = fields.text(name, required=True)
        assert text is not None
        service._check_prompt(text)
        add = fields.boolean("add_special_tokens", True)
    except ApiError as err:
        return error_response(err)
    model = service.model
    tokens = await anyio.to_thread.run_sync(
        lambda: model.model.tokenize(text, add_special=add, parse_special=True))
    return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": model.n_ctx})


async def detokenize(request: Request) -> Response:
    """``{"tokens": [...]}`` -> ``{"prompt": text}`` (special tokens written as their text)."""
    service: Service = request.app.state.service
    try:
        body = await read_json(request, service.settings.max_body_bytes)
        tokens = body.get("tokens")
        if not _is_ids(tokens):
            raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")
        if tokens:
            _check_ids(tokens, service.model.model.n_vocab, "'tokens'")
    except ApiError as err:
        return error_response(err)
    text = service.model.model.detokenize(tokens, special=True) if tokens else ""
    return JSONResponse({"prompt": text})


async def tokenizer_info(request: Request) -> Response:
    """What a remote tokenizer client needs: special tokens, chat template, context size."""
    service: Service = request.app.state.service
    model = service.model.model

    def text(token: int | None) -> str | None:
        return None if token is None else model.token_to_piece(token, special=True).decode("utf-8", "replace")

    return JSONResponse({"tokenizer_class": "mullama", "bos_token": text(model.bos_token_id),
                         "eos_token": text(model.eos_token_id), "pad_token": None,
                         "add_bos_token": bool(model._info.get("add_bos", False)),
                         "chat_template": model.chat_template, "model_max_length": service.model.n_ctx,
                         "vocab_size": model.n_vocab})
