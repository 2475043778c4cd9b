"""``StreamConfig``: the settings of one async token stream."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from mullama.params import SamplerParams, check_max_tokens, normalize_stop

__all__ = ["StreamConfig"]

MAX_BUFFER = 1 << 16
MAX_TOP_LOGPROBS = 20  # what one ring record has room for


@dataclass(frozen=True)
class StreamConfig:
    """How a :class:`TokenStream` generates and hands out tokens. Immutable.

    - ``max_tokens``: most tokens to generate (256).
    - ``temperature``, ``top_k``, ``top_p``: sampling (0.8, 40, 0.95); a
      temperature of 0 is greedy.
    - ``stop_sequences``: texts that end the stream; they are never emitted.
    - ``stream_delay_ms``: a pause before each token is handed out (0).
    - ``buffer_size``: most generated tokens waiting unread (32); when that
      many wait, decoding pauses until the consumer reads.
    - ``timeout_ms``: bound on the whole stream (30000; 0 = none); on expiry
      decoding stops and the stream raises :class:`StreamingError`.
    - ``sampler``: any other :class:`SamplerParams` settings (min_p,
      penalties, seed, logit bias); the three fields above override its own.
    - ``logprobs``: compute each token's log-probability (True).
    - ``top_logprobs``: also report this many most likely alternatives with
      each token, best first (0; at most 20; needs ``logprobs``).
    - ``grammar`` / ``json_schema``: constrain the output to GBNF text or to
      instances of a JSON Schema (see :class:`SamplerParams`); set here or in
      ``sampler``, not both.
    - ``speculative``: ``"ngram"`` verifies drafts taken from the prompt and output
      so far (see :class:`SamplerParams`); None keeps the sampler's own setting.

    Derive a changed copy with ``config.replace(max_tokens=100)``.
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    stop_sequences: tuple[str, ...] = ()
    stream_delay_ms: int = 0
    buffer_size: int = 32
    timeout_ms: int = 30000
    sampler: SamplerParams | None = None
    logprobs: bool = True
    top_logprobs: int = 0
    grammar: str | None = None
    json_schema: Any = None
    speculative: str | None = None
    _stops: list[bytes] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_max_tokens(self.max_tokens)
        if isinstance(self.stop_sequences, str):
            object.__setattr__(self, "stop_sequences", (self.stop_sequences,))
        else:
            object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences))
        try:
            object.__setattr__(self, "_stops", normalize_stop(self.stop_sequences))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"stop_sequences: {exc}") from None
        for name, low, high in (("stream_delay_ms", 0, 3_600_000), ("buffer_size", 1, MAX_BUFFER),
                                ("timeout_ms", 0, 2**40), ("top_logprobs", 0, MAX_TOP_LOGPROBS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
            if not low <= value <= high:
                raise ValueError(f"{name} must be within [{low}, {high}], got {value}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        if self.sampler is not None and not isinstance(self.sampler, SamplerParams):
            raise TypeError("sampler must be a SamplerParams")
        self.sampler_params()  # validates temperature, top_k and top_p

    def replace(self, **changes: Any) -> "StreamConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def sampler_params(self) -> SamplerParams:
        base = self.sampler or SamplerParams()
        changes: dict[str, Any] = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        if self.speculative is not None:
            changes["speculative"] = self.speculative
        if self.grammar is not None or self.json_schema is not None:
            if base.grammar is not None or base.json_schema is not None:
                raise ValueError("the constraint is set twice: in StreamConfig and in its sampler")
            changes.update(grammar=self.grammar, json_schema=self.json_schema)
        return base.replace(**changes)

    @property
    def timeout(self) -> float:
        """The timeout in seconds (math.inf when there is none)."""
        return self.timeout_ms / 1000 if self.timeout_ms else math.inf
