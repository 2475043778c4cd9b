"""One generation as the server sees it: a token stream plus its metrics."""

from __future__ import annotations

import time
from typing import AsyncIterator

import anyio

from mullama.async_model import AsyncModel
from mullama.server.errors import ApiError, api_error_from
from mullama.server.metrics import Metrics
from mullama.server.settings import ServerSettings
from mullama.stream import TokenStream
from mullama.stream_config import StreamConfig
from mullama.types import TokenData

__all__ = ["Service", "Generation"]

# generous: real text averages 3-5 characters per token
CHARS_PER_TOKEN_BOUND = 16


class Generation:
    """A started generation. Iterate it for tokens; ``aclose()`` (or leaving
    ``async with``) cancels it if it is still running — the engine stops
    within one decode step and frees the sequence.
    """

    def __init__(self, service: "Service", stream: TokenStream, endpoint: str) -> None:
        self._service = service
        self.stream = stream
        self.endpoint = endpoint
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self._last: float | None = None
        self._closed = False
        service.metrics.active += 1
        service.metrics.prompt_tokens.inc(stream.prompt_tokens)

    @property
    def prompt_tokens(self) -> int:
        return self.stream.prompt_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason

    async def __aiter__(self) -> AsyncIterator[TokenData]:
        metrics = self._service.metrics
        async for tok in self.stream:
            now = time.monotonic()
            if self._last is None:
                self.first_token_at = now
                metrics.ttft.observe(now - self.started)
            else:
                metrics.inter_token.observe(now - self._last)
            self._last = now
            if tok.token_id >= 0:
                self.completion_tokens += 1
                metrics.generated_tokens.inc()
            yield tok

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stream.cancel()  # no-op when it already ended; stops the decoder otherwise
        metrics = self._service.metrics
        metrics.active -= 1
        metrics.streams.inc(endpoint=self.endpoint, finish_reason=self.stream.finish_reason or "cancelled")
        with anyio.CancelScope(shield=True):  # runs inside a cancelled response task, too
            await self.stream.aclose()

    async def __aenter__(self) -> "Generation":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Service:
    """The model behind the endpoints and the metrics they share."""

    def __init__(self, model: AsyncModel, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.metrics.add_gauge("mullama_queue_depth", "Generations waiting for a free sequence slot.",
                               lambda: model.waiting_streams)
        self.metrics.add_gauge("mullama_slots", "Sequence slots of the model (streams decoded together).",
                               lambda: model.n_parallel)
        self.metrics.add_gauge("mullama_slots_in_use",
                               "Slots holding KV cells now, read from llama.cpp's memory API.",
                               lambda: sum(1 for p in model.kv_positions() if p >= 0))
        self.metrics.add_gauge("mullama_engine_streams", "Streams the engine is running now.",
                               lambda: model.active_streams)
        self.metrics.add_gauge("mullama_decode_calls", "llama_decode calls so far.", lambda: model.n_decode_calls)

    @property
    def max_prompt_chars(self) -> int:
        return self.settings.max_prompt_chars or CHARS_PER_TOKEN_BOUND * self.model.n_ctx

    async def start(self, prompt: str | list[int], config: StreamConfig, endpoint: str) -> Generation:
        """Start a generation, or raise the :class:`ApiError` that explains why not."""
        limit = self.max_prompt_chars
        if isinstance(prompt, str) and len(prompt) > limit:
            raise ApiError(400, f"the prompt has {len(prompt)} characters; this server takes at most {limit} "
                                f"(its context holds {self.model.n_ctx} tokens)",
                           param="prompt", code="context_length_exceeded")
        try:
            stream = await self.model.generate_stream(prompt, config)
        except Exception as exc:  # noqa: BLE001 - each kind maps to an HTTP answer
            raise api_error_from(exc) from None
        return Generation(self, stream, endpoint)
