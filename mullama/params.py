"""Sampling parameters and their validation.

Everything is checked in Python before it reaches llama.cpp, where a bad value
could trip an assertion and kill the process. Messages name the parameter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Mapping

__all__ = ["SamplerParams", "check_max_tokens", "normalize_stop", "schema_grammar"]

_UINT32 = 0xFFFFFFFF
MAX_STOP_SEQUENCES = 64
MAX_STOP_BYTES = 1024


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    return int(value)


SPECULATIVE_KINDS = (None, "ngram")
MAX_DRAFT = 32  # include/mullama/mll_draft.h: MLL_DRAFT_MAX
MAX_NGRAM = 16


@dataclass(frozen=True)
class SamplerParams:
    """How the next token is chosen.

    ``temperature=0`` is greedy decoding (deterministic). With a positive
    temperature the chain is: logit bias, repetition penalties, top-k,
    typical-p, top-p, min-p, temperature, then a seeded random draw. ``seed``
    of None means a fresh random seed for every generation (unless the context
    has a seed of its own).

    Constraints (at most one of the two):

    - ``grammar``: GBNF text (start rule ``root``) every generated text must follow;
    - ``json_schema``: a JSON Schema (dict, or ``True`` for any JSON value) the output
      must be an instance of; it becomes a grammar here, and a keyword outside the
      supported subset raises ``ValueError`` naming it.

    The stream's own choice is checked against the grammar and replaced only when
    the grammar rejects it; generation can end only where the grammar may end.
    Reported log-probabilities stay the model's own, unconstrained ones.
    ``grammar_triggers`` (regex patterns, ECMAScript syntax) makes the grammar lazy:
    the text is free until a pattern is found in the output (anywhere; one written
    ``^...$`` must match all of it), and from the pattern's first non-empty capture
    group (else the whole match) on the grammar holds: tool calls that the model
    may or may not make.

    Speculation (``speculative="ngram"``): each step may also verify a draft of up
    to ``draft_max`` tokens, the tokens that followed the latest earlier occurrence
    of the sequence's last ``ngram`` tokens (in the prompt or the output so far),
    in the same pass. The stream's own sampler decides each position, so the output
    is what it would be without speculation (greedy: the same argmax tokens up to
    rounding near ties of the batched pass; sampled: the same distribution). Draft
    lengths follow the measured pass costs and the stream's recent acceptance, and
    drafting stops by itself on text that does not repeat. ``draft_min`` verifies
    at least that many drafted tokens whenever a draft exists (0: the cost model
    alone decides).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: str | None = None
    json_schema: Mapping[str, Any] | bool | None = None
    grammar_triggers: tuple[str, ...] = ()
    speculative: str | None = None
    draft_max: int = 32
    ngram: int = 3
    draft_min: int = 0
    _gbnf: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        t = _finite("temperature", self.temperature)
        if t < 0:
            raise ValueError(f"temperature must be >= 0, got {t}")
        k = _integer("top_k", self.top_k)
        if k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {k}")
        for name in ("top_p", "min_p", "typical_p"):
            v = _finite(name, getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {v}")
        rp = _finite("repeat_penalty", self.repeat_penalty)
        if rp <= 0:
            raise ValueError(f"repeat_penalty must be > 0 (1.0 disables it), got {rp}")
        n = _integer("repeat_last_n", self.repeat_last_n)
        if n < -1:
            raise ValueError(f"repeat_last_n must be >= -1 (-1 = whole context), got {n}")
        _finite("frequency_penalty", self.frequency_penalty)
        _finite("presence_penalty", self.presence_penalty)
        if self.seed is not None:
            s = _integer("seed", self.seed)
            if not 0 <= s < _UINT32:
                raise ValueError(f"seed must be within [0, {_UINT32 - 1}], got {s}")
        if not isinstance(self.logit_bias, Mapping):
            raise TypeError("logit_bias must be a mapping of token id to bias")
        for tok, bias in self.logit_bias.items():
            _integer("logit_bias token id", tok)
            b = float(bias)
            if math.isnan(b):
                raise ValueError(f"logit_bias for token {tok} is NaN")
        if self.speculative not in SPECULATIVE_KINDS:
            raise ValueError(f"speculative must be one of {SPECULATIVE_KINDS}, got {self.speculative!r}")
        d = _integer("draft_max", self.draft_max)
        if not 1 <= d <= MAX_DRAFT:
            raise ValueError(f"draft_max must be within [1, {MAX_DRAFT}], got {d}")
        g = _integer("ngram", self.ngram)
        if not 1 <= g <= MAX_NGRAM:
            raise ValueError(f"ngram must be within [1, {MAX_NGRAM}], got {g}")
        m = _integer("draft_min", self.draft_min)
        if not 0 <= m <= d:
            raise ValueError(f"draft_min must be within [0, draft_max={d}], got {m}")
        object.__setattr__(self, "_gbnf", self._constraint())

    def _constraint(self) -> str | None:
        if self.grammar is not None and self.json_schema is not None:
            raise ValueError("give either grammar or json_schema, not both")
        if isinstance(self.grammar_triggers, str) or not isinstance(self.grammar_triggers, (tuple, list)):
            raise TypeError("grammar_triggers must be a tuple of regex strings")
        object.__setattr__(self, "grammar_triggers", tuple(self.grammar_triggers))
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                raise TypeError(f"grammar must be GBNF text (str), got {type(self.grammar).__name__}")
            if not self.grammar.strip():
                raise ValueError("grammar is empty")
            return self.grammar
        if self.json_schema is not None:
            if not isinstance(self.json_schema, (Mapping, bool)):
                raise TypeError(f"json_schema must be a dict (or a bool), got {type(self.json_schema).__name__}")
            return schema_grammar(self.json_schema)
        if self.grammar_triggers:
            raise ValueError("grammar_triggers needs a grammar or json_schema")
        return None

    @property
    def grammar_text(self) -> str | None:
        """The GBNF every generated text must follow (from ``grammar`` or ``json_schema``), or None."""
        return self._gbnf

    def replace(self, **changes: Any) -> "SamplerParams":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def native(self, n_vocab: int, seed: int | None) -> tuple:
        """The tuple the engine takes; checks logit-bias ids against the vocabulary."""
        biases = []
        for tok, bias in self.logit_bias.items():
            tok = int(tok)
            if not 0 <= tok < n_vocab:
                raise ValueError(f"logit_bias token id {tok} is outside the vocabulary [0, {n_vocab})")
            biases.append((tok, float(bias)))
        chosen = self.seed if self.seed is not None else seed
        if chosen is None:
            import secrets

            chosen = secrets.randbelow(_UINT32)
        return (
            float(self.temperature), int(self.top_k), float(self.top_p), float(self.min_p),
            float(self.typical_p), float(self.repeat_penalty), int(self.repeat_last_n),
            float(self.frequency_penalty), float(self.presence_penalty), int(chosen), tuple(biases),
            (int(self.draft_max), int(self.ngram), int(self.draft_min)) if self.speculative else (0, 0, 0),
        )


def check_max_tokens(max_tokens: Any) -> int:
    """max_tokens must be a non-negative integer; 0 generates nothing."""
    n = _integer("max_tokens", max_tokens)
    if n < 0:
        raise ValueError(f"max_tokens must be >= 0, got {n}")
    if n > 0x7FFFFFFF:
        raise ValueError(f"max_tokens is too large: {n}")
    return n


def normalize_stop(stop: Any) -> list[bytes]:
    """Stop sequences as UTF-8 bytes: None, one string, or an iterable of strings."""
    if stop is None:
        return []
    if isinstance(stop, (str, bytes)):
        stop = [stop]
    out: list[bytes] = []
    for s in stop:
        if isinstance(s, str):
            b = s.encode("utf-8")
        elif isinstance(s, bytes):
            b = s
        else:
            raise TypeError(f"stop sequences must be str, got {type(s).__name__}")
        if not b:
            raise ValueError("stop sequences must not be empty strings")
        if len(b) > MAX_STOP_BYTES:
            raise ValueError(f"a stop sequence is longer than {MAX_STOP_BYTES} bytes")
        if b not in out:
            out.append(b)
    if len(out) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(out)}")
    return out


def schema_grammar(schema: Mapping[str, Any] | bool) -> str:
    """The GBNF for a JSON Schema (converted once per distinct schema)."""
    try:
        key = json.dumps(schema, allow_nan=False)   # key order kept: properties come out in it
    except (TypeError, ValueError) as exc:
        raise ValueError(f"json_schema is not JSON: {exc}") from None
    return _schema_grammar(key)


@lru_cache(maxsize=64)
def _schema_grammar(key: str) -> str:
    from mullama.grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.loads(key))
