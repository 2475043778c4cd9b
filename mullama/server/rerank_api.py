"""``POST /v1/rerank`` (also ``/rerank``): relevance of documents to a query, in the shape
Jina's and Cohere's rerank APIs and llama.cpp's server share.

Request: ``{"query": str, "documents": [str | {"text": str}, ...], "top_n": int,
"return_documents": bool}``. Response: ``{"object": "list", "model", "results":
[{"index", "relevance_score", "document": {"text"}?}, ...], "usage"}`` with the
results sorted by ``relevance_score``, highest first, at most ``top_n`` of them.
Scores are the model's classifier output (see :meth:`mullama.Model.rerank`); a
model without a classifier head answers 400.
"""

from __future__ import annotations

from typing import Any

import anyio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mullama import rerank as _rerank
from mullama.embeddings import MAX_EMBED_TEXTS, check_classifier, embed
from mullama.errors import MullamaError
from mullama.server.body import read_json
from mullama.server.errors import ApiError, api_error_from, error_response
from mullama.server.service import Service

__all__ = ["rerank"]


def _documents(body: dict[str, Any], service: Service) -> list[str]:
    value = body.get("documents")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'documents' must be a non-empty list of strings", param="documents")
    if len(value) > MAX_EMBED_TEXTS:
        raise ApiError(400, f"'documents' has {len(value)} entries; at most {MAX_EMBED_TEXTS} are reranked in "
                            "one request", param="documents")
    out = []
    for i, doc in enumerate(value):
        if isinstance(doc, dict) and set(doc) == {"text"}:
            doc = doc["text"]
        if not isinstance(doc, str) or not doc:
            raise ApiError(400, f"documents[{i}] must be a non-empty string (or {{\"text\": string}})",
                           param="documents")
        service._check_prompt(doc)
        out.append(doc)
    return out


def _request(body: dict[str, Any], service: Service) -> tuple[str, list[str], int, bool]:
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise ApiError(400, "'query' must be a non-empty string", param="query")
    service._check_prompt(query)
    documents = _documents(body, service)
    top_n = body.get("top_n", len(documents))
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ApiError(400, "'top_n' must be a positive integer", param="top_n")
    return_documents = body.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise ApiError(400, "'return_documents' must be true or false", param="return_documents")
    return query, documents, top_n, return_documents


async def rerank(request: Request) -> Response:
    service: Service = request.app.state.service
    model = service.model.model
    try:
        body = await read_json(request, service.settings.max_body_bytes)
        query, documents, top_n, return_documents = _request(body, service)
        check_classifier(model)
    except (ApiError, MullamaError) as exc:
        return error_response(api_error_from(exc))

    def work() -> tuple[list[float], int]:
        ids = _rerank.pairs(model, query, documents)
        scores = embed(model, ids, pooling="rank", normalize=False, n_threads=service.model.n_threads)[:, 0]
        return scores.tolist(), sum(int(t.size) for t in ids)

    try:
        scores, n_tokens = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
    except (MullamaError, ValueError, TypeError) as exc:
        return error_response(api_error_from(exc))
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[:top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if return_documents:
            item["document"] = {"text": documents[i]}
        results.append(item)
    return JSONResponse({"object": "list", "model": body.get("model") or service.settings.model_id,
                         "results": results, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
