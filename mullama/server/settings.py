"""Settings of the HTTP server."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServerSettings"]


@dataclass(frozen=True)
class ServerSettings:
    """What ``mullama serve`` (and :func:`mullama.server.create_app`) is told.

    - ``host``/``port``: where to listen; 127.0.0.1 unless told otherwise.
    - ``api_key``: when set, every endpoint but ``/health`` needs
      ``Authorization: Bearer <api_key>``.
    - ``model_id``: the name ``/v1/models`` reports.
    - ``max_tokens_cap``: a request asking for more tokens gets a 400.
    - ``default_max_tokens``: used when a request names no ``max_tokens``.
    - ``max_body_bytes``: larger request bodies get a 413.
    - ``max_ws_message_bytes``: larger WebSocket messages close the socket (1009).
    - ``stream_timeout_ms``: bound on one generation (0 = none).
    - ``buffer_size``: tokens a stream may hold unread before decoding pauses.
    - ``max_prompt_chars``: longer prompts get a 400 before they are tokenized
      (None: 16 characters per token of the context). A prompt that long could
      not fit anyway, and llama.cpp's tokenizer is slow on huge inputs.
    - ``speculative``: ``"ngram"`` makes every generation verify drafts taken from its
      prompt and output (see :class:`mullama.SamplerParams`); None: off.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    model_id: str = "mullama"
    max_tokens_cap: int = 4096
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    max_ws_message_bytes: int = 1 << 20
    stream_timeout_ms: int = 600_000
    buffer_size: int = 32
    max_prompt_chars: int | None = None
    speculative: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens_cap", "default_max_tokens", "max_body_bytes", "max_ws_message_bytes",
                     "buffer_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within [0, 65535], got {self.port}")
        if self.speculative not in (None, "ngram"):
            raise ValueError(f"speculative must be None or 'ngram', got {self.speculative!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
