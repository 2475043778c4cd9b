"""Synchronous generation iterators over a :class:`~mullama.Context`.

``TokenIterator`` yields one :class:`TokenData` per generated token;
``TextStream`` yields only the non-empty text pieces. Both are lazy: nothing
is decoded until the first ``next()``, and each ``next()`` decodes exactly one
token. Leaving the loop, ``close()``, or starting another generation on the
same context stops decoding at once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

import numpy as np

from mullama.errors import StreamingError
from mullama.types import GenerationStats, TokenData

if TYPE_CHECKING:
    from mullama.context import Context

__all__ = ["TokenIterator", "TextStream"]

_FINISH = {1: "stop", 2: "stop", 3: "length", 4: "length", 5: "cancelled"}


class TokenIterator(Iterator[TokenData]):
    """Lazy iterator of :class:`TokenData` for one generation.

    ``finish_reason`` is ``None`` while running, then ``"stop"`` (end-of-
    generation token or stop sequence; ``stop_sequence`` tells which),
    ``"length"`` (``max_tokens`` or the end of the context) or
    ``"cancelled"``. ``stats`` holds counts and timings once finished.
    """

    def __init__(self, context: "Context", prompt: np.ndarray, max_tokens: int, sampler: tuple,
                 stops: list[bytes], logprobs: bool, top_logprobs: int) -> None:
        self._context = context
        self._prompt = prompt
        self._max_tokens = max_tokens
        self._sampler = sampler
        self._stops = stops
        self._logprobs = logprobs
        self._top = top_logprobs
        self._generation: int | None = None
        self._done = False
        self._index = 0
        self._cached = 0
        self._t0: float | None = None
        self._t_first: float | None = None
        self._t_end: float | None = None
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None

    def __iter__(self) -> "TokenIterator":
        return self

    def __next__(self) -> TokenData:
        if self._done:
            raise StopIteration
        ctx = self._context
        with ctx._lock:
            handle = ctx._live_handle()
            if self._generation is None:
                self._start(handle)
                if self._done:
                    raise StopIteration
            elif ctx._generation != self._generation:
                self._done = True
                raise StreamingError("this stream was superseded by a newer generation on the same context")
            try:
                token, raw, finish, logprob, top = handle.step()
            except BaseException:
                self._finish("cancelled")
                raise
        if self._t_first is None:
            self._t_first = time.perf_counter()
        index = self._index
        self._index += 1
        if finish:
            reason = _FINISH[finish]
            if reason == "stop" and finish == 2:
                idx = handle.stop_index
                if idx is not None:
                    self.stop_sequence = self._stops[idx].decode("utf-8", "replace")
            self._finish(reason)
        return TokenData(raw.decode("utf-8", "replace"), token, bool(finish), logprob, top, index)

    def _start(self, handle) -> None:
        ctx = self._context
        self._t0 = time.perf_counter()
        self._generation = ctx._begin_generation()
        if self._max_tokens == 0:
            self._finish("length")
            return
        self._cached = handle.begin(self._prompt, self._max_tokens, self._sampler, self._stops,
                                    self._logprobs, self._top, ctx.reuse_prefix)
        try:
            # chunk by chunk, so Ctrl-C and close() from another thread land between chunks
            while not handle.prefill():
                pass
        except BaseException:
            handle.finish_early()
            self._finish("cancelled")
            raise

    def _finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._context._generation_ended(self._generation)
        self.finish_reason = reason
        self._t_end = time.perf_counter()
        self._context._last_stats = self.stats

    def close(self) -> None:
        """Stop generating now. The tokens decoded so far stay cached for prefix reuse."""
        if self._done:
            return
        ctx = self._context
        with ctx._lock:
            if self._generation is not None and ctx._generation == self._generation and not ctx.closed:
                ctx._handle.finish_early()
            self._finish("cancelled")

    def __enter__(self) -> "TokenIterator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokens_generated(self) -> int:
        return self._index

    @property
    def is_finished(self) -> bool:
        return self._done

    @property
    def stats(self) -> GenerationStats:
        now = self._t_end if self._t_end is not None else time.perf_counter()
        t0 = self._t0 if self._t0 is not None else now
        return GenerationStats(
            prompt_tokens=int(self._prompt.shape[0]),
            cached_tokens=self._cached,
            completion_tokens=self._index,
            time_to_first_token=None if self._t_first is None else self._t_first - t0,
            total_time=now - t0,
            finish_reason=self.finish_reason,
        )


class TextStream(Iterator[str]):
    """Lazy iterator of text pieces: for each token, what it made printable.

    Tokens that print nothing yet (half of a UTF-8 character, a possible start
    of a stop sequence) yield no empty piece; their text arrives with a later
    piece. Every piece is whole UTF-8 and no piece contains a stop sequence.
    """

    def __init__(self, tokens: TokenIterator) -> None:
        self._tokens = tokens

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        while True:
            tok = next(self._tokens)
            if tok.text:
                return tok.text
            if tok.is_final:
                raise StopIteration

    def close(self) -> None:
        self._tokens.close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def finish_reason(self) -> str | None:
        return self._tokens.finish_reason

    @property
    def stop_sequence(self) -> str | None:
        return self._tokens.stop_sequence

    @property
    def tokens_generated(self) -> int:
        return self._tokens.tokens_generated

    @property
    def is_finished(self) -> bool:
        return self._tokens.is_finished

    @property
    def stats(self) -> GenerationStats:
        return self._tokens.stats
