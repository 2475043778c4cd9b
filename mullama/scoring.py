"""Scoring given text: per-token log-probabilities, log-likelihoods, perplexity.

A scoring request asks the engine for the logits rows of the prompt positions
it scores; each row is reduced as it comes (log-sum-exp, the argmax, the top-k
alternatives) on the decode threads, so no more than one decode's rows exist
at a time. The helpers here check and tokenize inputs and build the requests;
:class:`~mullama.Context` and :class:`~mullama.AsyncModel` run them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from mullama import errors
from mullama._engine._engine import Request
from mullama._engine._ring import TokenRing
from mullama.model import Model, as_token_array

__all__ = ["ScoreResult", "PerplexityResult", "MAX_SCORE_TOP", "MAX_SCORE_BATCH"]

MAX_SCORE_TOP = 64        # alternatives per scored token
MAX_SCORE_BATCH = 4096    # texts (or pairs) in one call
FIN_SCORED = 3            # a scoring request's finish code (max_tokens, zero, reached)
# SamplerParams.native() of plain greedy decoding (a scoring request samples nothing)
_GREEDY = (0.0, 0, 1.0, 0.0, 1.0, 1.0, 0, 0.0, 0.0, 0, ())

Text = str | bytes | Sequence[int] | np.ndarray


@dataclass(frozen=True, eq=False)
class ScoreResult:
    """Log-probabilities of a token sequence, each token given the ones before it.

    Arrays have one entry per token. Tokens before ``first`` (always the
    first token: nothing predicts it) are not scored: their ``logprobs`` are
    NaN, ``argmax`` -1, ``top_ids`` -1 and ``top_logprobs`` NaN.
    """

    tokens: np.ndarray          # int32 (n,)
    logprobs: np.ndarray        # float64 (n,)
    argmax: np.ndarray          # int32 (n,): the most likely token at each position
    top_ids: np.ndarray         # int32 (n, k)
    top_logprobs: np.ndarray    # float32 (n, k)
    first: int                  # index of the first scored token

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_scored(self) -> int:
        return len(self) - self.first

    @property
    def greedy(self) -> np.ndarray:
        """bool (n,): the token is the model's most likely one (False where not scored)."""
        return self.tokens == self.argmax

    @property
    def total_logprob(self) -> float:
        """The sum of the scored tokens' log-probabilities."""
        return float(np.sum(self.logprobs[self.first:], dtype=np.float64))

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-probability) of the scored tokens (NaN when none is)."""
        if self.n_scored <= 0:
            return math.nan
        return math.exp(-self.total_logprob / self.n_scored)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity by llama.cpp's ``llama-perplexity`` method (see ``Context.perplexity``)."""

    perplexity: float
    nll: float                  # mean negative log-likelihood per scored token
    stderr: float               # standard error of the perplexity, as llama-perplexity reports it
    n_tokens: int               # tokens scored
    n_chunks: int
    n_ctx: int
    chunk_perplexities: tuple[float, ...]   # running estimate after each chunk, like its log


def check_top(top_logprobs: Any) -> int:
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, (int, np.integer)):
        raise TypeError(f"top_logprobs must be an integer, got {type(top_logprobs).__name__}")
    top = int(top_logprobs)
    if not 0 <= top <= MAX_SCORE_TOP:
        raise ValueError(f"top_logprobs must be within [0, {MAX_SCORE_TOP}], got {top}")
    return top


def check_batch(items: Any, what: str) -> list[Any]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{what} must be a list")
    out = list(items)
    if not out:
        raise ValueError(f"{what} is empty")
    if len(out) > MAX_SCORE_BATCH:
        raise ValueError(f"{what} has {len(out)} entries; at most {MAX_SCORE_BATCH} are scored in one call")
    return out


def _ids(model: Model, value: Text, what: str, add_bos: bool) -> np.ndarray:
    if isinstance(value, (str, bytes)):
        return np.asarray(model.tokenize(value, add_special=add_bos, parse_special=True), dtype=np.int32)
    try:
        return as_token_array(value, model.n_vocab, what)
    except IndexError as exc:
        raise errors.TokenIdError(str(exc)) from None


def _fits(n: int, n_ctx: int, what: str) -> None:
    if n > n_ctx:
        raise errors.ContextOverflowError(
            f"{what} has {n} tokens but the context holds {n_ctx}; shorten it or raise n_ctx",
            n_prompt=n, n_ctx=n_ctx)


def score_ids(model: Model, text: Text, n_ctx: int) -> np.ndarray:
    """The token ids to score: text with the model's BOS, or ids as given."""
    ids = _ids(model, text, "token ids", True)
    if ids.size == 0 or (isinstance(text, (str, bytes)) and not text):
        raise ValueError("the text to score is empty")
    _fits(int(ids.size), n_ctx, "the text")
    return ids


def pair_ids(model: Model, context: Text, continuation: Text, n_ctx: int,
             add_bos: bool = True) -> tuple[np.ndarray, int]:
    """(ids, n_context) of a context/continuation pair.

    Text pairs are split as evaluation harnesses do: trailing whitespace of
    the context moves to the continuation, the whole text is tokenized (with
    BOS unless ``add_bos`` is False) and the continuation is what follows the
    context's own tokens, so a word is tokenized as it would be in running
    text. Id pairs are taken as they are.
    """
    if isinstance(context, (str, bytes)) != isinstance(continuation, (str, bytes)):
        raise TypeError("context and continuation must both be text or both be token ids")
    if isinstance(context, (str, bytes)):
        if isinstance(context, bytes) or isinstance(continuation, bytes):
            context = context.decode("utf-8") if isinstance(context, bytes) else context
            continuation = continuation.decode("utf-8") if isinstance(continuation, bytes) else continuation
        if not continuation:
            raise ValueError("the continuation is empty")
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        context = stripped
        ctx_ids = _ids(model, context, "context", add_bos)
        whole = _ids(model, context + continuation, "text", add_bos)
        n_context = int(ctx_ids.size)
        if n_context == 0 or whole.size <= n_context:
            raise ValueError("the context has no tokens (a model without BOS needs a non-empty context)"
                             if n_context == 0 else "the continuation has no tokens of its own")
        ids = whole
    else:
        ctx_ids = _ids(model, context, "context token ids", False)
        cont_ids = _ids(model, continuation, "continuation token ids", False)
        if ctx_ids.size == 0:
            raise ValueError("the context is empty: at least one token must precede the continuation")
        if cont_ids.size == 0:
            raise ValueError("the continuation is empty")
        ids = np.concatenate([ctx_ids, cont_ids])
        n_context = int(ctx_ids.size)
    _fits(int(ids.size), n_ctx, "the context and continuation")
    return ids, n_context


def perplexity_chunks(model: Model, text: str, n_ctx: int) -> list[np.ndarray]:
    """llama-perplexity's chunks: the text tokenized once (BOS, special-token text kept
    as text), cut into whole chunks of ``n_ctx`` tokens, each starting with BOS."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or not 4 <= n_ctx <= 1 << 20:
        raise ValueError(f"n_ctx must be an integer within [4, {1 << 20}], got {n_ctx!r}")
    ids = np.asarray(model.tokenize(text, add_special=True, parse_special=False), dtype=np.int32)
    if ids.size < 2 * n_ctx:
        raise ValueError(f"the text has {ids.size} tokens; perplexity with n_ctx={n_ctx} needs at least "
                         f"{2 * n_ctx} (two chunks)")
    bos = model.bos_token_id
    chunks = []
    for i in range(ids.size // n_ctx):
        chunk = ids[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos is not None and model._info.get("add_bos", True):
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


def perplexity_of(results: list[ScoreResult], n_ctx: int) -> PerplexityResult:
    """Combine the chunks' scores as llama-perplexity does (double sums, its stderr)."""
    nll = nll2 = 0.0
    count = 0
    running = []
    for res in results:
        lp = res.logprobs[res.first:].astype(np.float64)
        nll -= float(lp.sum())
        nll2 += float((lp * lp).sum())
        count += int(lp.size)
        running.append(math.exp(nll / count))
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    stderr = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else math.nan
    return PerplexityResult(ppl, mean, stderr, count, len(results), n_ctx, tuple(running))


def make_request(model: Model, ids: np.ndarray, first: int, top: int, n_ctx: int, reuse: bool = False,
                 keep: bool = False) -> Request:
    """A request that only scores the tokens from index ``first`` (>= 1) on: nothing is generated."""
    request = Request(ids, 0, _GREEDY, [], False, n_ctx, TokenRing(1), model.n_vocab, 0, reuse, keep, None)
    request.want_scores(first - 1, top)
    return request


def result_of(request: Request, ids: np.ndarray, first: int) -> ScoreResult:
    """The finished request's scores, or its error raised."""
    err = request.error()
    if err is not None:
        raise err
    if request.finish_code != FIN_SCORED:
        raise errors.GenerationError("the scoring request was cancelled before its text was evaluated "
                                     "(the model or context was closed)")
    logprob, argmax, top_ids, top_vals = request.scores()
    return ScoreResult(ids, logprob, argmax, top_ids, top_vals, first)
