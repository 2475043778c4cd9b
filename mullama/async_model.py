"""``AsyncModel``: a model for trio and asyncio programs (through anyio)."""

from __future__ import annotations

import atexit
import collections
import os
import weakref
from typing import Any, Iterable

import anyio

from mullama._engine._engine import Engine, Request
from mullama._engine._ring import TokenRing
from mullama.context import _FLASH_ATTN, Context, _positive_int, default_threads, prompt_ids
from mullama.errors import ClosedError
from mullama.model import Model
from mullama.params import SamplerParams
from mullama.stream import BlockingTokenStream, TokenStream, _Job
from mullama.stream_config import StreamConfig

__all__ = ["AsyncModel"]

Prompt = str | Iterable[int]

# engines still running at interpreter exit are stopped before the model is freed
_running_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()
_TOKENIZE_OFF_LOOP = 8192  # characters: longer prompts are tokenized in a worker thread


@atexit.register
def _stop_engines() -> None:
    for engine in list(_running_engines):
        engine.close()


class AsyncModel:
    """A loaded model whose generations are token streams, for trio and asyncio.

    With ``batching=True`` (the default) one llama.cpp context holds
    ``n_parallel`` sequences of ``n_ctx`` tokens each, and one engine thread
    decodes every running stream in a single batch per step (continuous
    batching, chunked prefill). Streams beyond ``n_parallel`` wait in a FIFO
    of at most ``max_queue``; past that, ``generate_stream`` raises
    :class:`QueueFullError`. With ``batching=False`` each stream runs on a
    context of its own (up to ``n_parallel`` contexts) and the others wait.
    """

    def __init__(self, model: Model, n_ctx: int = 2048, n_parallel: int = 4, *, batching: bool = True,
                 max_queue: int = 64, prefill_chunk: int = 256, n_threads: int | None = None,
                 n_batch: int = 512, flash_attn: bool | str = "auto", seed: int | None = None,
                 **context_kwargs: Any) -> None:
        n_parallel = _positive_int("n_parallel", n_parallel, 1, 256)
        self._n_ctx = _positive_int("n_ctx", n_ctx, 8, 1 << 20)
        max_queue = _positive_int("max_queue", max_queue, 0, 1 << 20)
        prefill_chunk = _positive_int("prefill_chunk", prefill_chunk, 1, 1 << 16)
        threads = default_threads() if n_threads is None else _positive_int("n_threads", n_threads, 1, 1024)
        n_batch = min(_positive_int("n_batch", n_batch, 1, 1 << 16), self._n_ctx * n_parallel)
        key = flash_attn.lower() if isinstance(flash_attn, str) else flash_attn
        if key not in _FLASH_ATTN:
            raise ValueError(f"flash_attn must be 'auto', True or False, got {flash_attn!r}")
        self._seed = SamplerParams(seed=seed).seed
        self._model = model
        self._n_parallel = n_parallel
        self._closed = False
        self._engine: Engine | None = None
        self._contexts: list[Context] = []
        self._free: list[tuple[Context, _Job | None]] = []
        self._waiters: collections.deque[list] = collections.deque()
        self._live: set[_Job] = set()
        self._context_kwargs = dict(context_kwargs, n_threads=threads, n_batch=n_batch, flash_attn=flash_attn,
                                    seed=seed)
        if batching:
            self._engine = Engine(model._handle, n_parallel, self._n_ctx, n_batch, threads, threads,
                                  _FLASH_ATTN[key], True, max_queue, prefill_chunk)
            self._engine.start()
            _running_engines.add(self._engine)
        else:
            # made now so that bad context settings fail at load time, not at the first stream
            self._contexts.append(Context(model, n_ctx=self._n_ctx, **self._context_kwargs))
            self._free.append((self._contexts[0], None))

    @classmethod
    async def load(cls, path: str | os.PathLike[str], n_gpu_layers: int = -1, n_ctx: int = 2048,
                   n_parallel: int = 4, use_mmap: bool = True, **kwargs: Any) -> "AsyncModel":
        """Load a GGUF file in a worker thread (the event loop keeps running).

        Other keyword arguments are those of ``AsyncModel(...)``: ``batching``,
        ``max_queue``, ``n_threads``, ``n_batch``, ``flash_attn``, ``seed``.
        """
        def work() -> AsyncModel:
            model = Model.load(path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)
            try:
                return cls(model, n_ctx=n_ctx, n_parallel=n_parallel, **kwargs)
            except BaseException:
                model.close()
                raise

        return await anyio.to_thread.run_sync(work)

    # ------------------------------------------------------------ facts

    @property
    def model(self) -> Model:
        """The underlying :class:`Model` (tokenizer, metadata, chat template)."""
        return self._model

    @property
    def n_ctx(self) -> int:
        """Tokens (prompt plus generated) each stream may use."""
        return self._n_ctx

    @property
    def n_parallel(self) -> int:
        return self._n_parallel

    @property
    def batching(self) -> bool:
        return self._engine is not None

    @property
    def active_streams(self) -> int:
        if self._engine is not None:
            return self._engine.n_active
        return len(self._contexts) - len(self._free)

    @property
    def waiting_streams(self) -> int:
        return self._engine.queue_depth if self._engine is not None else len(self._waiters)

    @property
    def n_decode_calls(self) -> int:
        """llama_decode calls so far (one per batch step when batching)."""
        if self._engine is not None:
            return self._engine.n_decode_calls
        return sum(c.n_decode_calls for c in self._contexts)

    def kv_positions(self) -> list[int]:
        """Largest cached position per sequence; -1 everywhere when every KV cell is free."""
        if self._engine is not None:
            return self._engine.used_positions()
        return [pos for c in self._contexts if not c.closed for pos in c.kv_positions()]

    # ------------------------------------------------------------ contexts (batching=False)

    async def _acquire(self) -> Context:
        if self._free:
            ctx, producer = self._free.pop()
        elif len(self._contexts) < self._n_parallel:
            ctx = await anyio.to_thread.run_sync(
                lambda: Context(self._model, n_ctx=self._n_ctx, **self._context_kwargs))
            self._contexts.append(ctx)
            producer = None
        else:
            slot: list = [anyio.Event(), None]
            self._waiters.append(slot)
            try:
                await slot[0].wait()
            except BaseException:
                if slot[1] is not None:
                    self._release(*slot[1])  # handed over as we were cancelled: pass it on
                else:
                    self._waiters.remove(slot)
                raise
            ctx, producer = slot[1]
        if producer is not None:
            # the previous stream was cancelled; its thread ends within one decode step
            with anyio.CancelScope(shield=True):
                await producer.wait()
        return ctx

    def _release(self, ctx: Context, producer: _Job | None) -> None:
        self._live.discard(producer)
        if self._waiters:
            slot = self._waiters.popleft()
            slot[1] = (ctx, producer)
            slot[0].set()
        else:
            self._free.append((ctx, producer))

    # ------------------------------------------------------------ streams

    def _check(self, config: StreamConfig | None) -> StreamConfig:
        if self._closed:
            raise ClosedError("the model is closed")
        if config is None:
            return StreamConfig()
        if not isinstance(config, StreamConfig):
            raise TypeError(f"config must be a StreamConfig, got {type(config).__name__}")
        return config

    def _submit(self, prompt: Prompt, config: StreamConfig) -> tuple[_Job | None, int]:
        ids = prompt_ids(self._model, prompt, self._n_ctx)
        if config.max_tokens == 0:
            return None, int(ids.size)
        sampler = config.sampler_params().native(self._model.n_vocab, self._seed)
        request = Request(ids, config.max_tokens, sampler, list(config._stops), config.logprobs,
                          self._n_ctx, TokenRing(config.buffer_size), self._model.n_vocab, config.top_logprobs)
        self._engine.submit(request)
        return _Job(request), int(ids.size)

    async def generate_stream(self, prompt: Prompt, config: StreamConfig | None = None) -> TokenStream:
        """Start generating and return the :class:`TokenStream` of its tokens.

        The prompt is checked and tokenized here: a prompt that does not fit
        ``n_ctx`` raises :class:`ContextOverflowError`. Prompt processing and
        decoding happen off the event loop.
        """
        config = self._check(config)
        if isinstance(prompt, (str, bytes)) and len(prompt) > _TOKENIZE_OFF_LOOP:
            # tokenizing a long text takes a while: not on the event loop's thread
            prompt = await anyio.to_thread.run_sync(prompt_ids, self._model, prompt, self._n_ctx)
        if self._engine is not None:
            job, n_prompt = self._submit(prompt, config)
            return TokenStream(config, job, None, n_prompt)
        ctx = await self._acquire()
        try:
            ids = ctx._prompt_ids(prompt)
            if config.max_tokens == 0:
                return TokenStream(config, None, lambda: self._release(ctx, None), int(ids.size))
            sampler = config.sampler_params().native(self._model.n_vocab, ctx.seed)
            with ctx._lock:
                ctx._begin_generation()
                request = ctx._request(ids, config.max_tokens, sampler, list(config._stops), config.logprobs,
                                       config.top_logprobs, config.buffer_size)
            producer = _Job(request, ctx)
            self._live.add(producer)
            producer.start()
        except BaseException:
            self._release(ctx, None)
            raise
        return TokenStream(config, producer, lambda: self._release(ctx, producer), int(ids.size))

    def stream_blocking(self, prompt: Prompt, config: StreamConfig | None = None) -> BlockingTokenStream:
        """The same stream for plain threads (batching mode only); thread-safe."""
        config = self._check(config)
        if self._engine is None:
            raise RuntimeError("stream_blocking needs batching=True (use Context for threads otherwise)")
        job, n_prompt = self._submit(prompt, config)
        return BlockingTokenStream(config, job, None, n_prompt)

    async def generate(self, prompt: Prompt, config: StreamConfig | None = None) -> str:
        """The whole generated text of one stream."""
        async with await self.generate_stream(prompt, config) as stream:
            return "".join([tok.text async for tok in stream])

    # ------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Stop every running stream, wait for them to let go, and free the model."""
        self._closed = True
        producers = list(self._live)
        for producer in producers:
            producer.stop()
        with anyio.CancelScope(shield=True):
            for producer in producers:
                await producer.wait()
        self.close()

    def close(self) -> None:
        """Like :meth:`aclose`, blocking this thread for at most one decode step."""
        self._closed = True
        if self._engine is not None:
            self._engine.close()
        for producer in list(self._live):
            producer.stop()
        self._model.close()  # takes each context's lock, i.e. waits for its producer

    async def __aenter__(self) -> "AsyncModel":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
