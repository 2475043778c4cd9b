"""``Context``: a llama.cpp context (KV cache, batch, sampler) on a Model."""

from __future__ import annotations

import os
import threading
from typing import Any, Iterable

import numpy as np

from mullama import errors
from mullama._engine._engine import Engine, Request
from mullama._engine._ring import TokenRing
from mullama._generation import TextStream, TokenIterator
from mullama.model import Model, as_token_array
from mullama.params import SamplerParams, check_max_tokens, normalize_stop
from mullama import scoring
from mullama.scoring import PerplexityResult, ScoreResult
from mullama.state import SequenceState
from mullama.types import GenerationStats

__all__ = ["Context", "default_threads", "prompt_ids"]

_FLASH_ATTN = {"auto": -1, False: 0, "off": 0, "disabled": 0, True: 1, "on": 1, "enabled": 1}
MAX_TOP_LOGPROBS = 64
MAX_N_CTX = 1 << 20
# SamplerParams.native() of plain greedy decoding
GREEDY = (0.0, 0, 1.0, 0.0, 1.0, 1.0, 0, 0.0, 0.0, 0, ())

Prompt = str | bytes | Iterable[int] | np.ndarray


def default_threads() -> int:
    """CPUs this process may run on (what llama.cpp's tools use on this kind of machine)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _positive_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be within [{low}, {high}], got {value}")
    return value


def prompt_ids(model: Model, prompt: Prompt, n_ctx: int) -> np.ndarray:
    """The prompt as int32 token ids, checked against the vocabulary and ``n_ctx``.

    Text is tokenized with the model's BOS and with special-token text (such
    as a chat template's markers) parsed as special tokens.
    """
    if isinstance(prompt, (str, bytes)):
        ids = model.tokenize(prompt, add_special=True, parse_special=True)
        bos = model.bos_token_id
        # a chat template that writes <bos> itself plus the tokenizer's BOS would double it
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        arr = np.asarray(ids, dtype=np.int32)
    else:
        arr = as_token_array(prompt, model.n_vocab, "prompt token ids")
    if arr.size == 0:
        raise ValueError("the prompt is empty")
    if arr.size >= n_ctx:
        raise errors.ContextOverflowError(
            f"the prompt has {arr.size} tokens but the context holds {n_ctx} tokens "
            f"(prompt and generated tokens together); shorten the prompt or raise n_ctx",
            n_prompt=int(arr.size), n_ctx=n_ctx)
    return arr


class Context:
    """A context window on a :class:`Model`: where prompts are evaluated and text generated.

    ``n_ctx`` is the total number of tokens (prompt plus generated) one
    generation may use; llama.cpp may round its cache up, but mullama keeps to
    the number given.

    By default every generation evaluates its prompt from scratch, so a
    reused context gives bit-for-bit the result of a fresh one. With
    ``reuse_prefix=True`` the context keeps the tokens of its last generation
    and evaluates only what follows the longest common prefix of the next
    prompt: much faster for chat turns, but llama.cpp's CPU kernels round
    differently for different batch shapes, so logits may differ in the last
    bits from a fresh evaluation (enough to flip a near-tie in greedy
    decoding).

    One generation runs at a time. ``generate`` calls from several threads
    run one after another; each decode step holds the context's lock with the
    GIL released while llama.cpp works. Starting a new stream while another
    is unfinished ends the older one, whose iterator then raises
    :class:`StreamingError` (use one context per concurrent stream).
    """

    def __new__(cls, model: Model, *args: Any, **kwargs: Any) -> Any:
        from mullama.rpc_model import RpcContext, RpcModel

        if cls is Context and isinstance(model, RpcModel):
            # the model lives in its child process: so does the context
            return RpcContext(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model: Model,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        flash_attn: bool | str = "auto",
        seed: int | None = None,
        n_threads_batch: int | None = None,
        swa_full: bool = True,
        reuse_prefix: bool = False,
    ) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"model must be a mullama.Model, got {type(model).__name__}")
        if model.closed:
            raise errors.ClosedError("the model is closed")
        n_ctx = _positive_int("n_ctx", n_ctx, 8, MAX_N_CTX)
        n_batch = _positive_int("n_batch", n_batch, 1, 1 << 16)
        n_batch = min(n_batch, n_ctx)
        threads = default_threads() if n_threads is None else _positive_int("n_threads", n_threads, 1, 1024)
        threads_batch = threads if n_threads_batch is None else _positive_int(
            "n_threads_batch", n_threads_batch, 1, 1024)
        key = flash_attn.lower() if isinstance(flash_attn, str) else flash_attn
        if key not in _FLASH_ATTN:
            raise ValueError(f"flash_attn must be 'auto', True or False, got {flash_attn!r}")
        if seed is not None:
            seed = SamplerParams(seed=seed).seed
        self._model = model
        self._seed = seed
        self._n_ctx = n_ctx
        self.reuse_prefix = bool(reuse_prefix)
        self._lock = threading.RLock()
        self._generation = 0
        self._current: Request | None = None
        self._reuse_once = False  # load_state(): the next generation continues from it
        self._last_stats: GenerationStats | None = None
        # the one engine with a single sequence, stepped on the caller's thread
        self._engine = Engine(model._handle, 1, n_ctx, n_batch, threads, threads_batch, _FLASH_ATTN[key],
                              bool(swa_full), 4, n_batch)
        model._register(self)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free the context. Safe to call twice; waits for a running decode step."""
        with self._lock:
            self._generation += 1
            self._engine.close()

    @property
    def closed(self) -> bool:
        return self._engine.closed

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live_engine(self) -> Engine:
        if self._engine.closed:
            raise errors.ClosedError("the context is closed")
        if self._model.closed:
            raise errors.ClosedError("the model of this context is closed")
        return self._engine

    def _begin_generation(self) -> int:
        """A new generation supersedes the unfinished one (its request ends now).
        Call with the lock held."""
        self._generation += 1
        current, self._current = self._current, None
        if current is not None and not current.done:
            current.cancel()
            self._engine.reap()
        return self._generation

    def _abandon(self, request: Request) -> None:
        """End ``request`` now (lock held): an interrupted or closed iterator."""
        if not request.done and not self._engine.closed:
            request.cancel()
            self._engine.reap()

    def _request(self, ids: np.ndarray, max_tokens: int, sampler: tuple, stops: list[bytes], logprobs: bool,
                 top: int, buffer_size: int = 1, logits_out: np.ndarray | None = None,
                 state: SequenceState | None = None, grammar: Any = None) -> Request:
        """Queue a generation on this context's engine (lock held): it starts at the next step."""
        reuse = self.reuse_prefix or self._reuse_once
        self._reuse_once = False
        request = Request(ids, max_tokens, sampler, stops, logprobs, self._n_ctx, TokenRing(buffer_size),
                          self._model.n_vocab, top, reuse, self.reuse_prefix, logits_out,
                          state.data if state is not None else None, state.n_cached if state is not None else 0,
                          grammar)
        self._live_engine().submit(request)
        self._current = request
        return request

    # ------------------------------------------------------------ facts

    @property
    def model(self) -> Model:
        return self._model

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_batch(self) -> int:
        return self._engine.n_batch

    @property
    def n_threads(self) -> int:
        return self._engine.n_threads

    @property
    def seed(self) -> int | None:
        return self._seed

    @property
    def n_decode_calls(self) -> int:
        """How many times llama_decode ran on this context (a counter for tests and tuning)."""
        return self._engine.n_decode_calls

    @property
    def n_cached(self) -> int:
        """Tokens whose keys and values are in the cache (reusable as a prompt prefix)."""
        return self._engine.n_cached(0)

    def cached_tokens(self) -> list[int]:
        """The token ids whose keys and values are in the cache, by position."""
        return self._engine.cached_tokens(0)

    def save_state(self) -> SequenceState:
        """A snapshot of the context's sequence: while a stream runs, everything it has
        decoded plus the token it sampled last; otherwise the cached tokens (kept after a
        generation with ``reuse_prefix=True``, or loaded with :meth:`load_state`)."""
        with self._lock:
            engine = self._live_engine()
            current = self._current
            if current is not None and not current.done:
                engine.command(current, 1)
                engine.run_commands()
                if current.command_status != 1:
                    raise errors.StateError("llama.cpp could not copy the sequence's state")
                parts = current.take_snapshot()
            else:
                if engine.n_cached(0) == 0:
                    raise errors.StateError(
                        "the context holds no cached tokens: snapshot a running stream, or keep a "
                        "finished generation's tokens with reuse_prefix=True")
                parts = engine.snapshot_slot(0)
        return SequenceState._from_engine(parts, self._model, 1)

    def load_state(self, state: SequenceState) -> None:
        """Replace the context's cache with a snapshot's cells. The next generation whose
        prompt starts with ``state.tokens`` (``state.prompt(model, more)`` builds one)
        evaluates only what follows its cached tokens, even without ``reuse_prefix``."""
        if not isinstance(state, SequenceState):
            raise TypeError(f"state must be a SequenceState, got {type(state).__name__}")
        state.check_model(self._model)
        state.check_layout(1, self._n_ctx)
        with self._lock:
            self._begin_generation()
            engine = self._live_engine()
            engine.restore_slot(0, state.data, state.token_array, state.n_cached)
            self._reuse_once = True

    @property
    def prefix_stats(self) -> dict[str, int]:
        """Generations that reused cached tokens (``hits``) and the prompt tokens they skipped."""
        return self._engine.prefix_stats

    @property
    def grammar_stats(self) -> dict[str, int]:
        """Constrained generation so far: ``tokens`` chosen under a grammar, ``rejected`` (the
        first choice broke the grammar and was replaced), ``full_passes`` (of those, the ones
        that needed the grammar over the whole vocabulary)."""
        return self._engine.grammar_stats

    @property
    def spec_stats(self) -> dict[str, int]:
        """Speculation so far: ``drafted`` tokens verified and ``accepted`` ones."""
        return self._engine.spec_stats

    def kv_positions(self) -> list[int]:
        """Largest cached position of the context's sequence (``[-1]`` when every KV cell is free)."""
        return self._engine.used_positions()

    @property
    def last_stats(self) -> GenerationStats | None:
        """Statistics of the most recently finished generation."""
        return self._last_stats

    def clear_cache(self) -> None:
        """Forget every cached token; the next prompt is evaluated from scratch."""
        with self._lock:
            self._begin_generation()
            self._live_engine().clear()

    # ------------------------------------------------------------ generation

    def _prompt_ids(self, prompt: Prompt) -> np.ndarray:
        return prompt_ids(self._model, prompt, self.n_ctx)

    def stream_tokens(
        self,
        prompt: Prompt,
        max_tokens: int = 256,
        params: SamplerParams | None = None,
        stop: str | Iterable[str] | None = None,
        *,
        logprobs: bool = True,
        top_logprobs: int = 0,
    ) -> TokenIterator:
        """Lazy iterator of :class:`TokenData`, one per generated token.

        Each record carries the token id, the text it made printable, the
        log-probability of the token (``logprobs=True``) and, with
        ``top_logprobs=k``, the k most likely alternatives. The prompt is
        checked and tokenized now; decoding starts at the first ``next()``.
        Raises :class:`ContextOverflowError` if the prompt leaves no room.
        """
        if params is None:
            params = SamplerParams()
        elif not isinstance(params, SamplerParams):
            raise TypeError(f"params must be a SamplerParams, got {type(params).__name__}")
        max_tokens = check_max_tokens(max_tokens)
        stops = normalize_stop(stop)
        top = _positive_int("top_logprobs", top_logprobs, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        self._live_engine()
        ids = self._prompt_ids(prompt)
        sampler = params.native(self._model.n_vocab, self._seed)
        grammar = self._model.grammar_for(params)
        return TokenIterator(self, ids, max_tokens, sampler, stops, bool(logprobs), top, grammar)

    def generate_stream(
        self,
        prompt: Prompt,
        max_tokens: int = 256,
        params: SamplerParams | None = None,
        stop: str | Iterable[str] | None = None,
    ) -> TextStream:
        """Lazy iterator of text pieces as they are generated.

        Each piece is what one decode step made printable: whole UTF-8, never
        part of a stop sequence. Breaking out of the loop or calling
        ``close()`` stops decoding at once. After the loop, ``finish_reason``
        and ``stats`` tell how it ended.
        """
        return TextStream(self.stream_tokens(prompt, max_tokens, params, stop, logprobs=False))

    def generate(
        self,
        prompt: Prompt,
        max_tokens: int = 256,
        params: SamplerParams | None = None,
        stop: str | Iterable[str] | None = None,
    ) -> str:
        """The whole generated text (the join of :meth:`generate_stream`).

        Holds the context for the whole generation, so calls from several
        threads run one after another.
        """
        stream = self.generate_stream(prompt, max_tokens, params, stop)
        with self._lock:
            return "".join(stream)

    def logits(self, prompt: Prompt) -> np.ndarray:
        """Next-token logits after ``prompt`` as a float32 array of ``n_vocab`` values."""
        ids = self._prompt_ids(prompt)
        out = np.empty(self._model.n_vocab, dtype=np.float32)
        with self._lock:
            self._begin_generation()
            request = self._request(ids, 1, GREEDY, [], False, 0, logits_out=out)
            self._step_until_done(request)
        err = request.error()
        if err is not None:
            raise err
        return out

    def _step_until_done(self, request: Request) -> None:
        """Step the engine on this thread until ``request`` ends (lock held); an interruption
        (Ctrl-C, an exception) ends the request before it propagates."""
        try:
            while not request.done:
                self._engine.step()
        except BaseException:
            self._abandon(request)
            raise

    # ------------------------------------------------------------ scoring

    def _run_scores(self, jobs: list[tuple[np.ndarray, int, int]]) -> list[ScoreResult]:
        """Score each ``(ids, first, top)`` in turn on this context's engine (this thread)."""
        out = []
        with self._lock:
            self._begin_generation()
            for ids, first, top in jobs:
                request = scoring.make_request(self._model, ids, first, top, self._n_ctx)
                self._live_engine().submit(request)
                self._current = request
                self._step_until_done(request)
                out.append(scoring.result_of(request, ids, first))
        return out

    def score(self, text: Prompt, top_logprobs: int = 0) -> ScoreResult:
        """The log-probability of every token of ``text`` given the tokens before it.

        Text is tokenized with the model's BOS; token ids are scored as given.
        The first token has no log-probability (NaN). With ``top_logprobs=k``
        the result also holds each position's k most likely tokens. The whole
        text is evaluated in chunks of ``n_batch`` tokens; each logits row is
        reduced as it is computed, so memory does not grow with the text.
        Blocks this thread; the context's cached tokens are replaced.
        """
        top = scoring.check_top(top_logprobs)
        ids = scoring.score_ids(self._model, text, self._n_ctx)
        return self._run_scores([(ids, 1, top)])[0]

    def loglikelihood(self, context: Prompt, continuation: Prompt, *, add_bos: bool = True) -> tuple[float, bool]:
        """(sum of the continuation tokens' log-probabilities given the context, whether each
        of them is the model's greedy choice): what multiple-choice evaluations compare.

        Text pairs are tokenized as evaluation harnesses do (whitespace at the end of the
        context belongs to the continuation; the continuation's tokens are those that
        follow the context's in the tokenized whole; ``add_bos=False`` leaves out the BOS,
        as lm-evaluation-harness's remote tokenizer does); token-id pairs are used as given.
        """
        ids, n_context = scoring.pair_ids(self._model, context, continuation, self._n_ctx, bool(add_bos))
        res = self._run_scores([(ids, n_context, 0)])[0]
        return res.total_logprob, bool(res.greedy[n_context:].all())

    def perplexity(self, text: str, n_ctx: int = 512) -> PerplexityResult:
        """Perplexity of ``text`` by llama.cpp's ``llama-perplexity`` method, so that the
        figures compare: the text is tokenized once and cut into whole chunks of ``n_ctx``
        tokens (the rest is dropped), each chunk starts with BOS and is evaluated on its
        own, and only the tokens of each chunk's second half are scored. Needs at least
        two chunks of text and a context of at least ``n_ctx`` tokens."""
        if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > self._n_ctx:
            raise ValueError(f"n_ctx={n_ctx} is larger than this context ({self._n_ctx} tokens)")
        chunks = scoring.perplexity_chunks(self._model, text, n_ctx)
        results = self._run_scores([(chunk, n_ctx // 2 + 1, 0) for chunk in chunks])
        return scoring.perplexity_of(results, n_ctx)
