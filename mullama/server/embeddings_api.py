"""``POST /v1/embeddings`` in OpenAI's shape (``client.embeddings.create`` works unchanged).

Texts are embedded on the model's embedding context (mean pooling, unit L2
norm), apart from the generation engine, in a worker thread.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import anyio
import numpy as np

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mullama.embeddings import MAX_EMBED_TEXTS
from mullama.errors import MullamaError
from mullama.server.body import read_json
from mullama.server.errors import ApiError, api_error_from, error_response
from mullama.server.scoring_api import text_inputs
from mullama.server.service import Service

__all__ = ["embeddings"]


def _inputs(body: dict[str, Any], service: Service) -> list[str | list[int]]:
    items = text_inputs(body, "input", MAX_EMBED_TEXTS, service.model.model.n_vocab)
    for item in items:
        if isinstance(item, str):
            service._check_prompt(item)
    return items


async def embeddings(request: Request) -> Response:
    service: Service = request.app.state.service
    model = service.model.model
    try:
        body = await read_json(request, service.settings.max_body_bytes)
        items = _inputs(body, service)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dims = body.get("dimensions")
        if dims is not None and dims != model.n_embd:
            raise ApiError(400, f"'dimensions' is not supported: this model's embeddings have {model.n_embd} "
                                "dimensions", param="dimensions")
    except ApiError as err:
        return error_response(err)

    def work() -> tuple[np.ndarray, int]:
        vectors = model.embed(items, pooling="mean", normalize=True, n_threads=service.model.n_threads)
        n_tokens = sum(len(model.tokenize(t, add_special=True, parse_special=True)) if isinstance(t, str)
                       else len(t) for t in items)
        return vectors, n_tokens

    try:
        vectors, n_tokens = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
    except (MullamaError, ValueError, TypeError) as exc:
        return error_response(api_error_from(exc))
    data = []
    for i, vec in enumerate(vectors):
        value: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode() if fmt == "base64" else vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse({"object": "list", "data": data, "model": service.settings.model_id, "created": int(time.time()),
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
