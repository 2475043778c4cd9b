"""``Model.embed``: text embeddings from a context made for them.

The embedding context (``_engine/_embed.pyx``) is separate from every
generation context: embeddings on, pooling fixed at creation, one unified KV
stream and a micro-batch as large as the context. One is kept per model and
pooling, and replaced by a larger one when a longer text comes. "rank" pooling
runs the model's classifier head on the pooled vector (a cross-encoder's
relevance scores, see ``mullama.rerank``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np

from mullama import errors

if TYPE_CHECKING:
    from mullama.model import Model

__all__ = ["embed", "Pooling", "MAX_EMBED_TEXTS"]

Pooling = Literal["mean", "last", "cls", "rank"] | None
MAX_EMBED_TEXTS = 4096     # texts in one call
_MIN_CTX = 512
_SEQS = 64                 # texts per decode at most
_lock = threading.Lock()   # guards the per-model embedders (each decodes on one thread at a time)


def _token_lists(model: "Model", texts: Any) -> list[np.ndarray]:
    from mullama.model import as_token_array

    if isinstance(texts, (str, bytes)):
        texts = [texts]
    elif isinstance(texts, Iterable) and not isinstance(texts, np.ndarray):
        texts = list(texts)
    else:
        raise TypeError(f"texts must be a string or a list of strings or token-id lists, got {type(texts).__name__}")
    if not texts:
        raise ValueError("texts is empty: nothing to embed")
    if len(texts) > MAX_EMBED_TEXTS:
        raise ValueError(f"{len(texts)} texts; at most {MAX_EMBED_TEXTS} are embedded in one call")
    out = []
    for i, text in enumerate(texts):
        if isinstance(text, (str, bytes)):
            if not text:
                raise ValueError(f"texts[{i}] is empty")
            ids = np.asarray(model.tokenize(text, add_special=True, parse_special=True), dtype=np.int32)
        else:
            try:
                ids = as_token_array(text, model.n_vocab, f"texts[{i}]")
            except IndexError as exc:
                raise errors.TokenIdError(str(exc)) from None
            if ids.size == 0:
                raise ValueError(f"texts[{i}] is empty")
        out.append(ids)
    return out


class _Held:
    """An embedding context as the model sees it: closing the model closes it, after the
    decode running on it (if any) has finished."""

    def __init__(self, emb: Any) -> None:
        self.emb = emb

    def close(self) -> None:
        with _lock:
            self.emb.close()


def _embedder(model: "Model", pooling: str, n_tokens: int, n_threads: int) -> Any:
    """The model's embedding context for ``pooling`` with room for ``n_tokens`` in one
    micro-batch (call with ``_lock`` held)."""
    from mullama._engine._embed import Embedder

    cache: dict[str, _Held] = model.__dict__.setdefault("_embedders", {})
    held = cache.get(pooling)
    if held is not None and not held.emb.closed and held.emb.n_ctx >= n_tokens:
        return held.emb
    n_ctx = max(_MIN_CTX, -(-n_tokens // 256) * 256)
    if held is not None:
        n_ctx = max(n_ctx, held.emb.n_ctx)
        held.emb.close()
    emb = Embedder(model._handle, pooling, n_ctx, _SEQS, n_threads)
    cache[pooling] = held = _Held(emb)
    model._register(held)
    return emb


def check_classifier(model: "Model") -> None:
    """Raise UnsupportedModelError unless ``model`` has a classifier head ("rank" pooling)."""
    if not model._has_classifier:
        raise errors.UnsupportedModelError(
            f"{model.name!r} has no classifier head (cls / cls.output tensors): it cannot rerank or "
            "give 'rank' scores; use a cross-encoder (reranker) model")


def embed(model: "Model", texts: Any, pooling: Pooling = "mean", normalize: bool | None = None,
          n_threads: int | None = None) -> Any:
    """See :meth:`Model.embed`."""
    from mullama.context import default_threads

    if pooling not in ("mean", "last", "cls", "rank", None):
        raise ValueError(f"pooling must be 'mean', 'last', 'cls', 'rank' or None, got {pooling!r}")
    if model.closed:
        raise errors.ClosedError("the model is closed")
    if pooling == "rank":
        if normalize:
            raise ValueError("'rank' pooling gives classifier scores, which are not normalized")
        check_classifier(model)
    normalize = pooling != "rank" if normalize is None else normalize
    ids = _token_lists(model, texts)
    longest = max(int(t.size) for t in ids)
    limit = model.n_ctx_train
    if longest > limit:
        raise errors.ContextOverflowError(
            f"a text has {longest} tokens; the model was trained on at most {limit}", n_prompt=longest, n_ctx=limit)
    key = pooling or "none"
    with _lock:
        if model.closed:
            raise errors.ClosedError("the model is closed")
        emb = _embedder(model, key, longest, n_threads or default_threads())
        if pooling is None:
            rows = emb.embed(ids)
        else:
            out = np.empty((len(ids), emb.n_embd), dtype=np.float32)
            emb.embed(ids, out)
            rows = [out]
    if normalize:
        for r in rows:
            norms = np.linalg.norm(r, axis=-1, keepdims=True)
            np.divide(r, norms, out=r, where=norms > 0)
    return rows if pooling is None else rows[0]
