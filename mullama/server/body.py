"""Reading and checking request bodies: size limit, strict JSON, typed fields.

Every failure is an :class:`ApiError` naming the field, so a bad request costs
a 4xx answer and nothing else.
"""

from __future__ import annotations

import json
import math
from contextlib import aclosing
from typing import Any

from starlette.requests import Request

from mullama.params import MAX_STOP_SEQUENCES, SamplerParams
from mullama.server.errors import ApiError
from mullama.server.settings import ServerSettings
from mullama.stream_config import MAX_TOP_LOGPROBS, StreamConfig

__all__ = ["read_json", "parse_json", "Fields"]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes | str) -> dict[str, Any]:
    """A JSON object from a request body or message; NaN/Infinity are refused."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """Read at most ``limit`` bytes of body (413 past that) and parse it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"the body is {declared} bytes; the limit is {limit}")
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
    chunks: list[bytes] = []
    total = 0
    async with aclosing(request.stream()) as body:  # closed at once when we stop early
        async for chunk in body:
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"the body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
    if not total:
        raise ApiError(400, "the request has no body; send a JSON object")
    return parse_json(b"".join(chunks))


class Fields:
    """Typed access to the fields of one JSON request body."""

    def __init__(self, body: dict[str, Any], settings: ServerSettings) -> None:
        self.body = body
        self.settings = settings

    def text(self, name: str, *, required: bool = False, default: str | None = None) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                raise ApiError(400, f"'{name}' is required", param=name)
            return default
        if not isinstance(value, str):
            raise ApiError(400, f"'{name}' must be a string, got {type(value).__name__}", param=name)
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ApiError(400, f"'{name}' must be true or false, got {type(value).__name__}", param=name)
        return value

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, f"'{name}' must be an integer, got {type(value).__name__}", param=name)
        if not low <= value <= high:
            raise ApiError(400, f"'{name}' must be within [{low}, {high}], got {value}", param=name)
        return value

    def number(self, name: str, default: float | None, low: float, high: float) -> float | None:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(400, f"'{name}' must be a number, got {type(value).__name__}", param=name)
        value = float(value)
        if not math.isfinite(value) or not low <= value <= high:
            raise ApiError(400, f"'{name}' must be within [{low}, {high}], got {value}", param=name)
        return value

    def max_tokens(self, *names: str) -> int:
        """The first of ``names`` present (OpenAI has two spellings), checked against the cap."""
        cap = self.settings.max_tokens_cap
        for name in names:
            if self.body.get(name) is not None:
                value = self.integer(name, None, 1, 2**31 - 1)
                assert value is not None
                if value > cap:
                    raise ApiError(400, f"'{name}' is {value}; this server allows at most {cap}",
                                   param=name)
                return value
        return min(self.settings.default_max_tokens, cap)

    def stop(self, name: str = "stop") -> tuple[str, ...]:
        value = self.body.get(name)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ApiError(400, f"'{name}' must be a string or a list of strings", param=name)
        if len(value) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"'{name}' has {len(value)} entries; at most {MAX_STOP_SEQUENCES} are allowed",
                           param=name)
        for item in value:
            if not isinstance(item, str) or not item:
                raise ApiError(400, f"each entry of '{name}' must be a non-empty string", param=name)
        return tuple(value)

    def stream_config(self, *, temperature: float, max_tokens: int, top_logprobs: int = 0,
                      logprobs: bool = False, grammar: str | None = None) -> StreamConfig:
        """The sampling fields every endpoint shares, as a :class:`StreamConfig`;
        ``grammar`` (checked GBNF) constrains the sampler."""
        temp = self.number("temperature", temperature, 0.0, 100.0)
        top_p = self.number("top_p", 0.95, 0.0, 1.0)
        top_k = self.integer("top_k", 40, 0, 1 << 20)
        min_p = self.number("min_p", 0.05, 0.0, 1.0)
        seed = self.integer("seed", None, 0, 2**32 - 2)
        presence = self.number("presence_penalty", 0.0, -2.0, 2.0)
        frequency = self.number("frequency_penalty", 0.0, -2.0, 2.0)
        repeat = self.number("repeat_penalty", 1.0, 0.01, 10.0)
        stop = self.stop()
        sampler = SamplerParams(min_p=min_p, seed=seed, presence_penalty=presence, frequency_penalty=frequency,
                                repeat_penalty=repeat, grammar=grammar)
        try:
            return StreamConfig(max_tokens=max_tokens, temperature=temp, top_k=top_k, top_p=top_p,
                                stop_sequences=stop, buffer_size=self.settings.buffer_size,
                                timeout_ms=self.settings.stream_timeout_ms, sampler=sampler,
                                logprobs=logprobs or top_logprobs > 0,
                                top_logprobs=min(top_logprobs, MAX_TOP_LOGPROBS))
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None
