"""Synchronous generation iterators over a :class:`~mullama.Context`.

``TokenIterator`` yields one :class:`TokenData` per generated token;
``TextStream`` yields only the non-empty text pieces. Both are lazy: nothing
is decoded until the first ``next()``, and each ``next()`` decodes exactly one
token. Leaving the loop, ``close()``, or starting another generation on the
same context stops decoding at once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from mullama._engine._engine import Request
from mullama._engine._ring import CLOSED, EMPTY
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
                 stops: list[bytes], logprobs: bool, top_logprobs: int, grammar: Any = None) -> None:
        self._context = context
        self._grammar = grammar
        self._prompt = prompt
        self._max_tokens = max_tokens
        self._sampler = sampler
        self._stops = stops
        self._logprobs = logprobs
        self._top = top_logprobs
        self._generation: int | None = None
        self._request: Request | None = None
        self._done = False
        self._index = 0
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
            engine = ctx._live_engine()
            if self._generation is None:
                self._start()
                if self._done:
                    raise StopIteration
            elif ctx._generation != self._generation:
                self._done = True
                raise StreamingError("this stream was superseded by a newer generation on the same context")
            try:
                record = self._next_record(engine)
            except BaseException:
                # Ctrl-C or another exception between two steps: the generation ends here
                ctx._abandon(self._request)
                self._finish("cancelled")
                raise
        if record is CLOSED:
            self._finish("cancelled")
            err = self._request.error()
            if err is not None:
                raise err
            raise StopIteration
        token, raw, finish, logprob, top = record
        if self._t_first is None:
            self._t_first = time.perf_counter()
        index = self._index
        self._index += 1
        if finish:
            reason = _FINISH[finish]
            if reason == "stop" and finish == 2:
                idx = self._request.stop_index
                if idx is not None:
                    self.stop_sequence = self._stops[idx].decode("utf-8", "replace")
            self._finish(reason)
        return TokenData(raw.decode("utf-8", "replace"), token, bool(finish),
                         logprob if self._logprobs else None, top, index)

    def _next_record(self, engine: Any) -> Any:
        """Step the engine on this thread until this generation's next token is out: one
        prompt chunk per step (Ctrl-C lands between chunks), then one token per step."""
        ring = self._request.ring
        idle = 0
        while True:
            record = ring.pop(False)
            if record is not EMPTY:
                return record
            if engine.step() == 0:
                idle += 1
                if idle > 1:  # pragma: no cover - a bug, never a hang
                    raise RuntimeError("the engine made no progress on this generation")

    def _start(self) -> None:
        ctx = self._context
        self._t0 = time.perf_counter()
        self._generation = ctx._begin_generation()
        if self._max_tokens == 0:
            self._finish("length")
            return
        # one record per token; a step that verifies a draft can hand out 1 + draft_max
        draft_max = self._sampler[11][0] if len(self._sampler) > 11 else 0
        self._request = ctx._request(self._prompt, self._max_tokens, self._sampler, self._stops,
                                     self._logprobs, self._top, buffer_size=1 + draft_max, grammar=self._grammar)

    def _finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self.finish_reason = reason
        self._t_end = time.perf_counter()
        self._context._last_stats = self.stats

    def close(self) -> None:
        """Stop generating now. With ``reuse_prefix`` the tokens decoded so far stay cached."""
        if self._done:
            return
        ctx = self._context
        with ctx._lock:
            if self._request is not None and ctx._generation == self._generation:
                ctx._abandon(self._request)
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
            cached_tokens=self._request.n_reused if self._request is not None else 0,
            completion_tokens=self._index,
            time_to_first_token=None if self._t_first is None else self._t_first - t0,
            total_time=now - t0,
            finish_reason=self.finish_reason,
            **(_spec_counts(self._request) if self._request is not None else {}),
        )


def _spec_counts(request: Any) -> dict[str, int]:
    """GenerationStats' speculation fields from an engine request."""
    spec = request.spec_stats
    return {"draft_tokens": spec["drafted"], "accepted_tokens": spec["accepted"]}


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
