"""``Model.rerank``: relevance scores of query/document pairs from a cross-encoder.

A reranker is an encoder with a classifier head; llama.cpp runs the head under
"rank" pooling. Each pair becomes one text of the embedding context (see
``mullama.embeddings``), so all pairs of a call share its decodes. The pair is
joined the way llama.cpp's server joins it, so that scores agree with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from mullama import errors
from mullama.embeddings import MAX_EMBED_TEXTS, check_classifier, embed

if TYPE_CHECKING:
    from mullama.model import Model

__all__ = ["rerank", "pair_tokens"]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} is empty")
    return value


def pair_tokens(model: "Model", query: str, document: str) -> np.ndarray:
    """The token ids of one (query, document) pair as the model's head expects them: its
    "rerank" template with ``{query}`` and ``{document}`` filled in, else
    ``[BOS] query [EOS] [SEP] document [EOS]`` with the special tokens the vocabulary adds
    (EOS falling back to SEP)."""
    template = model._handle.chat_template("rerank")
    if template is not None:
        text = template.replace("{query}", query).replace("{document}", document)
        return np.asarray(model.tokenize(text, add_special=False, parse_special=True), dtype=np.int32)
    info = model._info
    eos = info["eos"] if info["eos"] >= 0 else info["sep"]
    ids: list[int] = []
    if info["add_bos"] and info["bos"] >= 0:
        ids.append(info["bos"])
    ids += model.tokenize(query, add_special=False)
    if info["add_eos"] and eos >= 0:
        ids.append(eos)
    if info["add_sep"] and info["sep"] >= 0:
        ids.append(info["sep"])
    ids += model.tokenize(document, add_special=False)
    if info["add_eos"] and eos >= 0:
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def pairs(model: "Model", query: Any, documents: Any) -> list[np.ndarray]:
    """Validated token ids of every (query, document) pair."""
    query = _text(query, "query")
    if isinstance(documents, str):
        documents = [documents]
    elif not isinstance(documents, Sequence):
        raise TypeError(f"documents must be a string or a list of strings, got {type(documents).__name__}")
    if not documents:
        raise ValueError("documents is empty: nothing to rerank")
    if len(documents) > MAX_EMBED_TEXTS:
        raise ValueError(f"{len(documents)} documents; at most {MAX_EMBED_TEXTS} are reranked in one call")
    return [pair_tokens(model, query, _text(doc, f"documents[{i}]")) for i, doc in enumerate(documents)]


def rerank(model: "Model", query: Any, documents: Any, n_threads: int | None = None) -> np.ndarray:
    """See :meth:`Model.rerank`."""
    if model.closed:
        raise errors.ClosedError("the model is closed")
    check_classifier(model)
    scores = embed(model, pairs(model, query, documents), pooling="rank", normalize=False, n_threads=n_threads)
    return np.ascontiguousarray(scores[:, 0])
