"""The ASGI application: routes, API-key check, request counting, JSON errors."""

from __future__ import annotations

import hmac
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mullama.async_model import AsyncModel
from mullama.server.errors import ApiError, error_response
from mullama.server.metrics import Metrics
from mullama.server.openai_api import chat_completions, completions, list_models
from mullama.server.embeddings_api import embeddings
from mullama.server.rerank_api import rerank
from mullama.server.scoring_api import detokenize, tokenize, tokenizer_info
from mullama.server.service import Service
from mullama.server.settings import ServerSettings
from mullama.server.tutorial_api import stream_endpoint, websocket_endpoint

__all__ = ["create_app"]

OPEN_PATHS = ("/health",)


class GateMiddleware:
    """Checks the API key (all paths but ``/health``) and counts answers by path and status."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics, known: set[str]) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.metrics = metrics
        self.known = known

    def _authorized(self, scope: Scope) -> bool:
        if self.key is None or scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.known else "other"
        if not self._authorized(scope):
            self.metrics.requests.inc(path=path, status="401")
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong API key"})
                return
            err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error_response(err)(scope, receive, send)
            return
        if scope["type"] == "websocket":
            self.metrics.requests.inc(path=path, status="101")
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.inc(path=path, status=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(ApiError(exc.status_code, exc.detail or "error", headers=exc.headers))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))


async def _health(request: Request) -> Response:
    service: Service = request.app.state.service
    model = service.model
    return JSONResponse({"status": "ok", "model": service.settings.model_id, "slots": model.n_parallel,
                         "active_streams": model.active_streams, "queue_depth": model.waiting_streams,
                         "prefix_cache": model.prefix_cache_stats()["enabled"]})


async def _metrics(request: Request) -> Response:
    service: Service = request.app.state.service
    return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")


def _page_html() -> str:
    return resources.files("mullama.server").joinpath("page.html").read_text(encoding="utf-8")


async def _page(request: Request) -> Response:
    return HTMLResponse(request.app.state.page)


def create_app(model: AsyncModel, settings: ServerSettings | None = None) -> Starlette:
    """An ASGI app serving ``model`` (an :class:`AsyncModel`, best with batching).

    The app does not own the model: close it after the server stops.
    """
    settings = settings or ServerSettings()
    service = Service(model, settings)
    routes: list[Any] = [
        Route("/", _page, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/stream", stream_endpoint, methods=["POST"]),
        WebSocketRoute("/ws", websocket_endpoint),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/rerank", rerank, methods=["POST"]),
        Route("/rerank", rerank, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        HTTPException: _http_error, ApiError: _api_error, Exception: _internal_error})
    app.state.service = service
    app.state.page = _page_html()
    known = {r.path for r in routes}
    app.add_middleware(GateMiddleware, api_key=settings.api_key, metrics=service.metrics, known=known)
    return app
