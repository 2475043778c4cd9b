"""Generations as the server sees them: token streams plus their metrics."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import anyio
from starlette.requests import Request

from mullama.async_model import AsyncModel
from mullama.server.errors import ApiError, api_error_from
from mullama.server.metrics import Metrics
from mullama.server.settings import ServerSettings
from mullama.server.structured import GrammarCache
from mullama.stream import TokenStream
from mullama.stream_config import StreamConfig
from mullama.types import TokenData

__all__ = ["Service", "Generation", "Choices", "Disconnect"]

# generous: real text averages 3-5 characters per token
CHARS_PER_TOKEN_BOUND = 16


class Generation:
    """A started generation. Iterate it for tokens; ``aclose()`` (or leaving
    ``async with``) cancels it if it is still running — the engine stops
    within one decode step and frees the sequence.
    """

    def __init__(self, service: "Service", stream: TokenStream, endpoint: str, *,
                 count_prompt: bool = True) -> None:
        self._service = service
        self.stream = stream
        self.endpoint = endpoint
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self._last: float | None = None
        self._closed = False
        service.metrics.active += 1
        if count_prompt:
            service.metrics.prompt_tokens.inc(stream.prompt_tokens)

    @property
    def prompt_tokens(self) -> int:
        return self.stream.prompt_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason

    async def next(self) -> TokenData | None:
        """The next token, or None at the end. Waits; cancelling the wait cancels the stream."""
        tok = await self.stream.next()
        if tok is None:
            return None
        metrics = self._service.metrics
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
        return tok

    async def __aiter__(self) -> AsyncIterator[TokenData]:
        while (tok := await self.next()) is not None:
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


class Choices:
    """The ``n`` generations of one request, branches of one prompt evaluation.

    The prompt's tokens count once in the metrics; ``completion_tokens`` sums
    the branches. ``aclose()`` (or leaving ``async with``) cancels every branch
    still running, each within one decode step.
    """

    def __init__(self, service: "Service", streams: list[TokenStream], endpoint: str) -> None:
        self.branches = [Generation(service, s, endpoint, count_prompt=i == 0) for i, s in enumerate(streams)]
        self._running = list(range(len(streams)))

    def __len__(self) -> int:
        return len(self.branches)

    @property
    def prompt_tokens(self) -> int:
        return self.branches[0].prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.branches)

    def finish_reason(self, index: int) -> str | None:
        return self.branches[index].finish_reason

    @property
    def finished(self) -> bool:
        return not self._running

    async def step(self) -> list[tuple[int, TokenData | None]]:
        """One token of each running branch, in index order: ``(index, token)``, and
        ``(index, None)`` once for a branch that has just ended. Empty when all ended.

        Lock-step reading needs no task group (so it is safe inside an async
        generator) and costs no latency: the engine decodes every branch in the
        same step, so their tokens arrive together. Waits for each branch in
        turn; a cancelled wait cancels that branch (``aclose()`` the others).
        """
        out: list[tuple[int, TokenData | None]] = []
        for index in list(self._running):
            tok = await self.branches[index].next()
            if tok is not None:
                out.append((index, tok))
            if tok is None or tok.is_final:
                self._running.remove(index)
                out.append((index, None))
        return out

    async def aclose(self) -> None:
        for gen in self.branches:  # each cancels first, then waits (shielded) for its producer
            gen.stream.cancel()
        for gen in self.branches:
            await gen.aclose()

    async def __aenter__(self) -> "Choices":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Disconnect:
    """What :meth:`Service.watch_disconnect` saw: ``gone`` once the client has left."""

    gone = False


class Service:
    """The model behind the endpoints and the metrics they share."""

    def __init__(self, model: AsyncModel, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.grammars = GrammarCache()  # request constraints, converted and parsed once per text
        self.metrics.add_gauge("mullama_queue_depth", "Generations waiting for a free sequence slot.",
                               lambda: model.waiting_streams)
        self.metrics.add_gauge("mullama_slots", "Sequence slots of the model (streams decoded together).",
                               lambda: model.n_parallel)
        self.metrics.add_gauge("mullama_slots_in_use",
                               "Slots whose KV cells a running stream holds now (cells idle slots keep "
                               "for the prefix cache are not counted).",
                               lambda: sum(1 for p in model.kv_positions() if p >= 0))
        self.metrics.add_gauge("mullama_engine_streams", "Streams the engine is running now.",
                               lambda: model.active_streams)
        self.metrics.add_gauge("mullama_decode_calls", "llama_decode calls so far.", lambda: model.n_decode_calls)
        self.metrics.add_gauge("mullama_prefix_cache_hits",
                               "Streams that started from tokens cached in an idle slot, so far.",
                               lambda: model.prefix_cache_stats()["hits"])
        self.metrics.add_gauge("mullama_prefix_cache_reused_tokens",
                               "Prompt tokens not evaluated thanks to the prefix cache, so far.",
                               lambda: model.prefix_cache_stats()["reused_tokens"])
        self.metrics.add_gauge("mullama_grammar_tokens", "Tokens chosen under a grammar or JSON Schema, so far.",
                               lambda: model.grammar_stats()["tokens"])
        self.metrics.add_gauge("mullama_grammar_rejected_tokens",
                               "Of those, tokens whose first choice the grammar rejected, so far.",
                               lambda: model.grammar_stats()["rejected"])
        self.metrics.add_gauge("mullama_grammar_full_passes",
                               "Of those, tokens that needed the grammar over the whole vocabulary, so far.",
                               lambda: model.grammar_stats()["full_passes"])
        self.metrics.add_gauge("mullama_spec_drafted_tokens",
                               "Drafted tokens verified by speculative decoding, so far.",
                               lambda: model.spec_stats()["drafted"])
        self.metrics.add_gauge("mullama_spec_accepted_tokens",
                               "Of those, drafted tokens accepted (handed out without a pass of their own), so far.",
                               lambda: model.spec_stats()["accepted"])
        self.metrics.add_gauge("mullama_prefix_cache_tokens",
                               "Tokens whose KV cells idle slots keep now for the prefix cache.",
                               lambda: sum(model.prefix_cache_stats()["cached_tokens"]))
        self.metrics.add_gauge("mullama_grammar_cache_hits",
                               "Request constraints (schemas, grammars) found already converted and parsed.",
                               lambda: self.grammars.hits)
        self.metrics.add_gauge("mullama_grammar_cache_misses",
                               "Schemas converted to GBNF and grammars parsed, so far (each distinct text once "
                               "while it stays in the cache).",
                               lambda: self.grammars.misses)

    @property
    def max_prompt_chars(self) -> int:
        return self.settings.max_prompt_chars or CHARS_PER_TOKEN_BOUND * self.model.n_ctx

    def _check_prompt(self, prompt: str | list[int]) -> None:
        limit = self.max_prompt_chars
        if isinstance(prompt, str) and len(prompt) > limit:
            raise ApiError(400, f"the prompt has {len(prompt)} characters; this server takes at most {limit} "
                                f"(its context holds {self.model.n_ctx} tokens)",
                           param="prompt", code="context_length_exceeded")

    def check_n(self, n: int) -> None:
        """Raise the :class:`ApiError` (naming ``n``) for a number of choices this model cannot run."""
        if n > 1 and not self.model.batching:
            raise ApiError(400, f"'n' is {n}; this server's model runs each stream on its own context "
                                "and can only give n=1", param="n")
        if n > self.model.n_parallel:
            raise ApiError(400, f"'n' is {n}; this server runs at most {self.model.n_parallel} streams "
                                "together (its slots)", param="n")

    def _configured(self, config: StreamConfig) -> StreamConfig:
        """The server's own settings applied to a request's stream configuration."""
        if self.settings.speculative and config.speculative is None:
            return config.replace(speculative=self.settings.speculative)
        return config

    async def start(self, prompt: str | list[int], config: StreamConfig, endpoint: str) -> Generation:
        """Start a generation, or raise the :class:`ApiError` that explains why not."""
        self._check_prompt(prompt)
        config = self._configured(config)
        try:
            stream = await self.model.generate_stream(prompt, config)
        except Exception as exc:  # noqa: BLE001 - each kind maps to an HTTP answer
            raise api_error_from(exc) from None
        return Generation(self, stream, endpoint)

    async def start_choices(self, prompt: str | list[int], config: StreamConfig, endpoint: str,
                            n: int = 1) -> Choices:
        """Start ``n`` generations sharing one evaluation of ``prompt`` (seeds ``seed``,
        ``seed + 1``, ...), or raise the :class:`ApiError` that explains why not."""
        self._check_prompt(prompt)
        self.check_n(n)
        config = self._configured(config)
        try:
            streams = await self.model.generate_stream(prompt, config, n=n)
        except Exception as exc:  # noqa: BLE001 - each kind maps to an HTTP answer
            raise api_error_from(exc) from None
        return Choices(self, streams if isinstance(streams, list) else [streams], endpoint)

    @asynccontextmanager
    async def watch_disconnect(self, request: Request) -> AsyncIterator[Disconnect]:
        """Run the body of ``async with`` while watching the client: when it disconnects,
        the body is cancelled (whatever it awaits stops, e.g. the engine's requests) and
        ``gone`` is set, so that nothing is decoded for nobody. For responses sent whole
        (a streamed response notices the disconnect when it writes)."""
        seen = Disconnect()
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                seen.gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                yield seen
            finally:
                tg.cancel_scope.cancel()
