"""``AsyncModel``: a model for trio and asyncio programs (through anyio)."""

from __future__ import annotations

import collections
import os
from typing import Any, Iterable

import anyio

from mullama._ring import TokenRing
from mullama.context import Context
from mullama.errors import ClosedError
from mullama.model import Model
from mullama.stream import TokenStream, _Producer
from mullama.stream_config import StreamConfig

__all__ = ["AsyncModel"]


class AsyncModel:
    """A loaded model whose generations are async token streams.

    Streams run on up to ``n_parallel`` contexts of ``n_ctx`` tokens each;
    further streams wait, first come first served, for a context to free up.
    Use one ``AsyncModel`` from one event loop at a time.
    """

    def __init__(self, model: Model, n_ctx: int = 2048, n_parallel: int = 1, **context_kwargs: Any) -> None:
        if isinstance(n_parallel, bool) or not isinstance(n_parallel, int) or n_parallel < 1:
            raise ValueError(f"n_parallel must be an integer >= 1, got {n_parallel!r}")
        self._model = model
        self._n_ctx = n_ctx
        self._n_parallel = n_parallel
        self._context_kwargs = context_kwargs
        self._contexts: list[Context] = []
        self._free: list[tuple[Context, _Producer | None]] = []
        self._waiters: collections.deque[list] = collections.deque()
        self._closed = False
        self._live: set[_Producer] = set()
        # created now so that bad context settings fail at load time, not at the first stream
        self._contexts.append(Context(model, n_ctx=n_ctx, **context_kwargs))
        self._free.append((self._contexts[0], None))

    @classmethod
    async def load(cls, path: str | os.PathLike[str], n_gpu_layers: int = -1, n_ctx: int = 2048,
                   n_parallel: int = 1, use_mmap: bool = True, **context_kwargs: Any) -> "AsyncModel":
        """Load a GGUF file in a worker thread (the event loop keeps running).

        ``context_kwargs`` go to :class:`Context` (``n_threads``, ``n_batch``,
        ``flash_attn``, ``seed``, ...).
        """
        def work() -> AsyncModel:
            model = Model.load(path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)
            try:
                return cls(model, n_ctx=n_ctx, n_parallel=n_parallel, **context_kwargs)
            except BaseException:
                model.close()
                raise

        return await anyio.to_thread.run_sync(work)

    @property
    def model(self) -> Model:
        """The underlying :class:`Model` (tokenizer, metadata, chat template)."""
        return self._model

    @property
    def n_parallel(self) -> int:
        return self._n_parallel

    @property
    def active_streams(self) -> int:
        return len(self._contexts) - len(self._free)

    @property
    def waiting_streams(self) -> int:
        return len(self._waiters)

    # ------------------------------------------------------------ contexts

    async def _acquire(self) -> Context:
        if self._closed:
            raise ClosedError("the model is closed")
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

    def _release(self, ctx: Context, producer: _Producer | None) -> None:
        self._live.discard(producer)
        if self._waiters:
            slot = self._waiters.popleft()
            slot[1] = (ctx, producer)
            slot[0].set()
        else:
            self._free.append((ctx, producer))

    # ------------------------------------------------------------ streams

    async def generate_stream(self, prompt: str | Iterable[int], config: StreamConfig | None = None) -> TokenStream:
        """Start generating and return the :class:`TokenStream` of its tokens.

        Waits for a free context when ``n_parallel`` streams are running. The
        prompt is checked and tokenized here: a prompt that does not fit
        raises :class:`ContextOverflowError`. Prompt processing happens on the
        producer thread, not on the event loop.
        """
        if config is None:
            config = StreamConfig()
        elif not isinstance(config, StreamConfig):
            raise TypeError(f"config must be a StreamConfig, got {type(config).__name__}")
        ctx = await self._acquire()
        try:
            ids = ctx._prompt_ids(prompt)
            sampler = config.sampler_params().native(self._model.n_vocab, ctx.seed)
            handle = ctx._live_handle()
            if config.max_tokens == 0:
                return TokenStream(config, ctx, None, self._release, int(ids.size))
            ring = TokenRing(config.buffer_size)
            with ctx._lock:
                ctx._begin_generation()
                handle.begin(ids, config.max_tokens, sampler, list(config._stops), config.logprobs, 0,
                             ctx.reuse_prefix)
            producer = _Producer(ctx, handle, ring)
            self._live.add(producer)
            producer.start()
        except BaseException:
            self._release(ctx, None)
            raise
        return TokenStream(config, ctx, producer, self._release, int(ids.size))

    async def generate(self, prompt: str | Iterable[int], config: StreamConfig | None = None) -> str:
        """The whole generated text of one stream."""
        async with await self.generate_stream(prompt, config) as stream:
            return "".join([tok.text async for tok in stream])

    # ------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Stop every running stream, wait for their producers, and free the model."""
        self._closed = True
        producers = list(self._live)
        for producer in producers:
            producer.stop()
        with anyio.CancelScope(shield=True):
            for producer in producers:
                await producer.wait()
        self._model.close()

    def close(self) -> None:
        """Like :meth:`aclose`, blocking this thread for at most one decode step per stream."""
        self._closed = True
        for producer in list(self._live):
            producer.stop()
        self._model.close()  # takes each context's lock, i.e. waits for its producer

    async def __aenter__(self) -> "AsyncModel":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
