"""Errors the server answers with, in OpenAI's JSON error shape."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from mullama import errors

__all__ = ["ApiError", "error_response", "api_error_from"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "overloaded_error"}


class ApiError(Exception):
    """A request that cannot be served; becomes a JSON error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def api_error_from(exc: BaseException) -> ApiError:
    """The HTTP answer for an exception raised while starting a generation."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, errors.ContextOverflowError):
        return ApiError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, errors.QueueFullError):
        return ApiError(503, str(exc), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, errors.ClosedError):
        return ApiError(503, "the server is shutting down", code="unavailable")
    if isinstance(exc, (ValueError, TypeError, errors.TemplateError)):
        return ApiError(400, str(exc))
    return ApiError(500, f"{type(exc).__name__}: {exc}", code="internal_error")
