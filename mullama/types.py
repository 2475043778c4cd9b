"""Records that generation hands back."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TokenData", "GenerationStats", "FINISH_REASONS"]

# finish_reason values: "stop" (end-of-generation token or a stop sequence),
# "length" (max_tokens or the end of the context), "cancelled" (the consumer
# stopped early or cancelled).
FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True, slots=True)
class TokenData:
    """One generated token.

    ``text`` is what this token made printable: it may be empty (bytes held
    back as the start of a multi-byte character or of a possible stop
    sequence) or hold text of earlier tokens released now. Joined, the texts
    are the generated text. ``logprob`` is the natural-log probability of the
    chosen token under the model's raw distribution at that step (before
    temperature and penalties), or None when not requested. ``top_logprobs``
    holds the ``(token_id, logprob)`` pairs of the most likely tokens, best
    first, when asked for. ``token_id`` is -1 on the record that closes a
    cancelled stream.
    """

    text: str
    token_id: int
    is_final: bool
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    index: int = 0


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """Counts and timings of one generation (seconds, monotonic clock).

    With speculation, ``draft_tokens`` drafted tokens were verified and
    ``accepted_tokens`` of them were accepted (both 0 without it)."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    time_to_first_token: float | None
    total_time: float
    finish_reason: str | None
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed after the first token (the first one includes the prompt)."""
        if self.time_to_first_token is None or self.completion_tokens < 2:
            return 0.0
        span = self.total_time - self.time_to_first_token
        return (self.completion_tokens - 1) / span if span > 0 else 0.0
