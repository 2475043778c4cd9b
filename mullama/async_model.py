"""``AsyncModel``: a model for trio and asyncio programs (through anyio)."""

from __future__ import annotations

import atexit
import collections
import os
import weakref
from typing import Any, Iterable, Literal, overload

import numpy as np

import anyio

from mullama._engine._engine import Engine, Request
from mullama._engine._ring import CLOSED, EMPTY, TokenRing
from mullama import scoring
from mullama.context import _FLASH_ATTN, Context, _positive_int, default_threads, prompt_ids
from mullama.errors import ClosedError, ContextOverflowError, QueueFullError
from mullama.model import Model
from mullama.params import SamplerParams
from mullama.stream import BlockingTokenStream, TokenStream, _Job
from mullama.state import SequenceState
from mullama.scoring import PerplexityResult, ScoreResult
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

    With ``prefix_cache=True`` (the default) a finished stream's KV cells stay
    in its slot, and a new stream starts in the slot whose cached tokens share
    the longest prefix with its prompt, evaluating only the rest (a chat's next
    turn evaluates only the new message). Slots are given up least recently
    used first. ``kv_positions()`` reports the cells streams hold;
    ``prefix_cache_stats()`` the cache's own.

    ``swa_full=True`` (the default) gives sliding-window layers (Gemma 3) a
    full-size cache: faster here, and any cached prefix can be reused. With
    ``False`` their cache holds only the window, and a prefix is reused only
    while the window behind it is intact.
    """

    def __init__(self, model: Model, n_ctx: int = 2048, n_parallel: int = 4, *, batching: bool = True,
                 max_queue: int = 64, prefill_chunk: int = 256, n_threads: int | None = None,
                 n_batch: int = 512, flash_attn: bool | str = "auto", seed: int | None = None,
                 prefix_cache: bool = True, swa_full: bool = True, **context_kwargs: Any) -> None:
        if getattr(model, "rpc_servers", None) is not None:
            raise TypeError("AsyncModel runs its engine in this process: load an RPC-backed model with "
                            "Model.load(..., rpc_servers=..., in_process=True)")
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
        self._prefix_cache = bool(prefix_cache)
        context_kwargs.setdefault("reuse_prefix", self._prefix_cache)
        context_kwargs.setdefault("swa_full", bool(swa_full))
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
                                  _FLASH_ATTN[key], bool(swa_full), max_queue, prefill_chunk)
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
    def closed(self) -> bool:
        """True once :meth:`close` or :meth:`aclose` has been called."""
        return self._closed

    @property
    def n_parallel(self) -> int:
        return self._n_parallel

    @property
    def n_threads(self) -> int:
        """Decode threads (the engine's, and embedding's and reranking's too)."""
        return self._context_kwargs["n_threads"]

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

    @property
    def n_decoded_tokens(self) -> int:
        """Tokens evaluated so far (prompt tokens and generated ones), all streams together."""
        if self._engine is not None:
            return self._engine.n_decoded_tokens
        return sum(c._engine.n_decoded_tokens for c in self._contexts if not c.closed)

    def kv_positions(self) -> list[int]:
        """Largest position each sequence's stream holds in the KV cache; -1 where no stream
        runs (the cells an idle slot keeps for the prefix cache are not counted here)."""
        if self._engine is not None:
            return self._engine.held_positions()
        return [pos for c in self._contexts if not c.closed for pos in c._engine.held_positions()]

    def prefix_cache_stats(self) -> dict[str, Any]:
        """The prefix cache: ``hits`` (streams that reused cached tokens), ``reused_tokens``
        (prompt tokens not evaluated thanks to it) and ``cached_tokens`` per slot."""
        engines = [self._engine] if self._engine is not None else [c._engine for c in self._contexts
                                                                    if not c.closed]
        stats = [e.prefix_stats for e in engines]
        return {"enabled": self._prefix_cache,
                "hits": sum(s["hits"] for s in stats),
                "reused_tokens": sum(s["reused_tokens"] for s in stats),
                "cached_tokens": [e.n_cached(i) for e in engines for i in range(e.n_slots)]}

    def grammar_stats(self) -> dict[str, int]:
        """Constrained generation so far: ``tokens`` chosen under a grammar, ``rejected``
        (the stream's first choice broke the grammar and was replaced) and ``full_passes``
        (of those, the ones that needed the grammar over the whole vocabulary)."""
        engines = [self._engine] if self._engine is not None else [c._engine for c in self._contexts
                                                                    if not c.closed]
        stats = [e.grammar_stats for e in engines]
        return {k: sum(s[k] for s in stats) for k in ("tokens", "rejected", "full_passes")}

    def spec_stats(self) -> dict[str, int]:
        """Speculation so far, all streams: ``drafted`` tokens verified and ``accepted`` ones."""
        engines = [self._engine] if self._engine is not None else [c._engine for c in self._contexts
                                                                    if not c.closed]
        stats = [e.spec_stats for e in engines]
        return {k: sum(s[k] for s in stats) for k in ("drafted", "accepted")}

    def clear_cache(self) -> None:
        """Free the cells idle slots keep for the prefix cache (running streams keep theirs).
        Blocks for at most one decode step."""
        if self._engine is not None:
            self._engine.clear_idle()
        for ctx, job in list(self._free):
            if job is None or job.finished:
                ctx.clear_cache()

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

    def _ids(self, prompt: Prompt | None, state: SequenceState | None) -> np.ndarray:
        if state is None:
            if prompt is None:
                raise TypeError("generate_stream needs a prompt (or a state to continue)")
            return prompt_ids(self._model, prompt, self._n_ctx)
        if not isinstance(state, SequenceState):
            raise TypeError(f"state must be a SequenceState, got {type(state).__name__}")
        state.check_model(self._model)
        state.check_layout(self._n_parallel if self._engine is not None else 1, self._n_ctx)
        ids = state.prompt(self._model, prompt)
        if ids.size >= self._n_ctx:
            raise ContextOverflowError(
                f"the snapshot and prompt have {ids.size} tokens but a stream holds {self._n_ctx}",
                n_prompt=int(ids.size), n_ctx=self._n_ctx)
        return ids

    def _request(self, ids: np.ndarray, config: StreamConfig, state: SequenceState | None, seed_offset: int = 0,
                 n_ctx: int | None = None) -> Request:
        params = config.sampler_params()
        if seed_offset and params.seed is not None:
            params = params.replace(seed=(params.seed + seed_offset) % (1 << 32))
        sampler = params.native(self._model.n_vocab, self._seed)
        return Request(ids, config.max_tokens, sampler, list(config._stops), config.logprobs,
                       n_ctx or self._n_ctx, TokenRing(config.buffer_size), self._model.n_vocab,
                       config.top_logprobs, self._prefix_cache, self._prefix_cache, None,
                       state.data if state is not None else None, state.n_cached if state is not None else 0,
                       self._model.grammar_for(params))

    def _submit(self, prompt: Prompt | None, config: StreamConfig, n: int = 1,
                state: SequenceState | None = None) -> tuple[list[_Job] | None, int]:
        ids = self._ids(prompt, state)
        if config.max_tokens == 0:
            return None, int(ids.size)
        request = self._request(ids, config, state)
        # n > 1: the prompt is evaluated once; each branch copies its cells and samples on its own
        for i in range(1, n):
            request.add_branch(self._request(ids, config, None, seed_offset=i))
        self._engine.submit(request)
        jobs = [_Job(r, engine=self._engine, model=self._model, prompt=ids, seed=self._seed)
                for r in [request] + request.branches]
        return jobs, int(ids.size)

    def _check_n(self, n: int) -> int:
        n = _positive_int("n", n, 1, self._n_parallel)
        if n > 1 and self._engine is None:
            raise ValueError("n > 1 needs batching=True (the branches share one context)")
        return n

    @overload
    async def generate_stream(self, prompt: Prompt | None, config: StreamConfig | None = None, *,
                              n: Literal[1] = 1, state: SequenceState | None = None) -> TokenStream: ...

    @overload
    async def generate_stream(self, prompt: Prompt | None, config: StreamConfig | None = None, *,
                              n: int, state: SequenceState | None = None) -> TokenStream | list[TokenStream]: ...

    async def generate_stream(self, prompt: Prompt | None, config: StreamConfig | None = None, *, n: int = 1,
                              state: SequenceState | None = None) -> TokenStream | list[TokenStream]:
        """Start generating and return the :class:`TokenStream` of its tokens.

        The prompt is checked and tokenized here: a prompt that does not fit
        ``n_ctx`` raises :class:`ContextOverflowError`. Prompt processing and
        decoding happen off the event loop.

        ``n > 1`` (batching only) returns a list of ``n`` streams that share one
        evaluation of the prompt: each continues from a copy of its KV cells
        with its own sampler (seeds ``seed``, ``seed + 1``, ...). ``state``
        continues from a :class:`SequenceState`: the prompt is then the
        snapshot's tokens followed by ``prompt`` (text without BOS, ids, or None),
        and only what follows its cached tokens is evaluated.
        """
        config = self._check(config)
        n = self._check_n(n)
        if isinstance(prompt, (str, bytes)) and len(prompt) > _TOKENIZE_OFF_LOOP and state is None:
            # tokenizing a long text takes a while: not on the event loop's thread
            prompt = await anyio.to_thread.run_sync(prompt_ids, self._model, prompt, self._n_ctx)
        if self._engine is not None:
            jobs, n_prompt = self._submit(prompt, config, n, state)
            streams = [TokenStream(config, job, None, n_prompt) for job in (jobs or [None] * n)]
            return streams[0] if n == 1 else streams
        ctx = await self._acquire()
        try:
            ids = self._ids(prompt, state)
            if config.max_tokens == 0:
                return TokenStream(config, None, lambda: self._release(ctx, None), int(ids.size))
            params = config.sampler_params()
            sampler = params.native(self._model.n_vocab, ctx.seed)
            grammar = self._model.grammar_for(params)
            with ctx._lock:
                ctx._begin_generation()
                request = ctx._request(ids, config.max_tokens, sampler, list(config._stops), config.logprobs,
                                       config.top_logprobs, config.buffer_size, state=state, grammar=grammar)
            producer = _Job(request, ctx, prompt=ids, seed=ctx.seed)
            self._live.add(producer)
            producer.start()
        except BaseException:
            self._release(ctx, None)
            raise
        return TokenStream(config, producer, lambda: self._release(ctx, producer), int(ids.size))

    def stream_blocking(self, prompt: Prompt | None, config: StreamConfig | None = None, *,
                        state: SequenceState | None = None) -> BlockingTokenStream:
        """The same stream for plain threads (batching mode only); thread-safe."""
        config = self._check(config)
        if self._engine is None:
            raise RuntimeError("stream_blocking needs batching=True (use Context for threads otherwise)")
        jobs, n_prompt = self._submit(prompt, config, 1, state)
        return BlockingTokenStream(config, jobs[0] if jobs else None, None, n_prompt)

    async def generate(self, prompt: Prompt, config: StreamConfig | None = None) -> str:
        """The whole generated text of one stream."""
        async with await self.generate_stream(prompt, config) as stream:
            return "".join([tok.text async for tok in stream])

    # ------------------------------------------------------------ scoring

    async def _score_one(self, ids: np.ndarray, first: int, top: int) -> ScoreResult:
        """Run one scoring request; a cancelled wait cancels it (the engine drops it within
        one step)."""
        if self._engine is not None:
            request = scoring.make_request(self._model, ids, first, top, self._n_ctx, self._prefix_cache,
                                           self._prefix_cache)
            while True:
                try:
                    self._engine.submit(request)
                    break
                except QueueFullError:
                    await anyio.sleep(0.005)  # the queue is shared with streams: wait for room
            try:
                await _wait_closed(request.ring)
                while not request.done:   # set just after the ring closes
                    await anyio.sleep(0)
            except BaseException:
                request.cancel()
                raise
            return scoring.result_of(request, ids, first)
        ctx = await self._acquire()
        producer = None
        try:
            request = scoring.make_request(self._model, ids, first, top, self._n_ctx)
            with ctx._lock:
                ctx._begin_generation()
                ctx._live_engine().submit(request)
                ctx._current = request
            producer = _Job(request, ctx)
            self._live.add(producer)
            producer.start()
            try:
                await _wait_closed(request.ring)
            except BaseException:
                producer.stop()
                with anyio.CancelScope(shield=True):
                    await producer.wait()
                raise
            await producer.wait()
            if producer.failure is not None:
                raise producer.failure
            return scoring.result_of(request, ids, first)
        finally:
            self._release(ctx, producer)

    async def _score_all(self, jobs: list[tuple[np.ndarray, int, int]]) -> list[ScoreResult]:
        """Score every job, at most two per slot in flight (the rest wait here, not in the
        engine's queue). The first failure cancels the others and is raised."""
        if self._closed:
            raise ClosedError("the model is closed")
        results: list[ScoreResult | None] = [None] * len(jobs)
        failures: list[BaseException] = []
        window = anyio.Semaphore(2 * self._n_parallel)

        async def one(i: int, job: tuple[np.ndarray, int, int]) -> None:
            try:
                results[i] = await self._score_one(*job)
            except Exception as exc:  # noqa: BLE001 - raised below, outside the task group
                failures.append(exc)
                tg.cancel_scope.cancel()
            finally:
                window.release()

        async with anyio.create_task_group() as tg:
            for i, job in enumerate(jobs):
                await window.acquire()
                if failures:
                    window.release()
                    break
                tg.start_soon(one, i, job)
        if failures:
            raise failures[0]
        return results  # type: ignore[return-value]

    @overload
    async def score(self, texts: scoring.Text, top_logprobs: int = 0) -> ScoreResult: ...

    @overload
    async def score(self, texts: list[scoring.Text], top_logprobs: int = 0) -> list[ScoreResult]: ...

    async def score(self, texts: Any, top_logprobs: int = 0) -> ScoreResult | list[ScoreResult]:
        """:meth:`Context.score` for one text (a string, or token ids) or a list of them.

        A list runs through the engine together: its texts share decode steps (one per
        slot), each logits row reduced on the decode threads as it comes. At most two
        requests per slot are in flight; the rest wait their turn here, so a long list
        holds no more memory than its results. Cancelling the call cancels every request
        still running.
        """
        top = scoring.check_top(top_logprobs)
        single = _is_single_text(texts)
        items = [texts] if single else scoring.check_batch(texts, "texts")
        ids = await anyio.to_thread.run_sync(
            lambda: [scoring.score_ids(self._model, t, self._n_ctx) for t in items])
        results = await self._score_all([(i, 1, top) for i in ids])
        return results[0] if single else results

    async def loglikelihood(self, requests: Iterable[tuple[Any, Any]]) -> list[tuple[float, bool]]:
        """:meth:`Context.loglikelihood` of each ``(context, continuation)`` pair, run through
        the engine together (see :meth:`score`). Pairs that share a context reuse its cached
        tokens when the prefix cache is on."""
        pairs = scoring.check_batch(requests, "requests")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"requests[{i}] must be a (context, continuation) pair")
        encoded = await anyio.to_thread.run_sync(
            lambda: [scoring.pair_ids(self._model, c, x, self._n_ctx) for c, x in pairs])
        results = await self._score_all([(ids, n, 0) for ids, n in encoded])
        return [(r.total_logprob, bool(r.greedy[r.first:].all())) for r in results]

    async def perplexity(self, text: str, n_ctx: int = 512) -> PerplexityResult:
        """:meth:`Context.perplexity`, its chunks evaluated side by side in the slots."""
        if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > self._n_ctx:
            raise ValueError(f"n_ctx={n_ctx} is larger than a slot's context ({self._n_ctx} tokens)")
        chunks = await anyio.to_thread.run_sync(scoring.perplexity_chunks, self._model, text, n_ctx)
        results = await self._score_all([(chunk, n_ctx // 2 + 1, 0) for chunk in chunks])
        return scoring.perplexity_of(results, n_ctx)

    async def embed(self, texts: Any, pooling: str | None = "mean", normalize: bool | None = None) -> Any:
        """:meth:`Model.embed` in a worker thread (the event loop keeps running). Embedding
        runs on the model's embedding context, not on the generation engine; a cancelled
        call returns at once while the running decode finishes in its thread."""
        if self._closed:
            raise ClosedError("the model is closed")
        return await anyio.to_thread.run_sync(self._model.embed, texts, pooling, normalize, self.n_threads,
                                              abandon_on_cancel=True)

    async def rerank(self, query: str, documents: Any) -> Any:
        """:meth:`Model.rerank` in a worker thread, like :meth:`embed`."""
        if self._closed:
            raise ClosedError("the model is closed")
        return await anyio.to_thread.run_sync(self._model.rerank, query, documents, self.n_threads,
                                              abandon_on_cancel=True)

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


def _is_single_text(value: Any) -> bool:
    """One text (str, bytes, an id array, a list of ints) rather than a list of texts."""
    if isinstance(value, (str, bytes, np.ndarray)):
        return True
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    return False


async def _wait_closed(ring: TokenRing) -> None:
    """Wait (without blocking the event loop) until the engine closes a scoring request's ring."""
    while True:
        record = ring.pop(True)
        if record is CLOSED:
            return
        if record is EMPTY:
            await anyio.wait_readable(ring.fileno())
            ring.drain_wake()
