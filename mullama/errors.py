"""mullama's exceptions, and the one place where llama.cpp's status codes and
NULL results become Python exceptions.

User mistakes (bad parameters, a prompt that does not fit) are ``ValueError``
subclasses; faults of the engine or the model file are ``RuntimeError`` /
``OSError`` subclasses. Cancellation is never wrapped: it is always the
runtime's own exception (``KeyboardInterrupt``, ``trio.Cancelled``,
``asyncio.CancelledError``).
"""

from __future__ import annotations

__all__ = [
    "MullamaError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ContextOverflowError",
    "GenerationError",
    "StreamingError",
    "TemplateError",
    "GrammarError",
    "SchemaError",
    "ToolError",
    "TokenizerError",
    "StateError",
    "TokenIdError",
    "UnsupportedModelError",
    "QueueFullError",
    "DefaultModelMissingError",
    "ClosedError",
    "DownloadError",
    "raise_for_decode",
]


class MullamaError(Exception):
    """Base class of every error mullama raises on its own."""


class ModelLoadError(MullamaError, ValueError):
    """A model file could not be loaded: missing, not GGUF, truncated or unsupported."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model file does not exist."""


class ContextOverflowError(MullamaError, ValueError):
    """The prompt does not fit into the context window."""

    def __init__(self, message: str, n_prompt: int, n_ctx: int) -> None:
        super().__init__(message)
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx


class GenerationError(MullamaError, RuntimeError):
    """llama.cpp failed while evaluating tokens; ``code`` is llama_decode's status."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class StreamingError(MullamaError, RuntimeError):
    """A stream ended abnormally (timeout, broken hand-off, superseded generation)."""


class QueueFullError(MullamaError, RuntimeError):
    """Too many streams are waiting for a slot; the request was not queued."""


class TemplateError(MullamaError, ValueError):
    """A chat template could not be applied."""


class GrammarError(MullamaError, ValueError):
    """A grammar (GBNF text, or one made from a JSON Schema) was refused: the parser's
    message says where and why."""


class SchemaError(GrammarError):
    """A JSON Schema (or a ``pattern`` in it) that cannot become a grammar: a keyword outside
    the supported subset, a contradiction, a ``$ref`` cycle with no base case, a size limit.

    ``pointer`` is the JSON pointer of the offending part of the schema ("" for the root).
    """

    def __init__(self, message: str, pointer: str | None = None) -> None:
        if pointer is not None:
            message += f" (at {pointer})" if pointer else " (at the schema root)"
        super().__init__(message)
        self.pointer = pointer


class ToolError(MullamaError, ValueError):
    """Tools or a tool choice that cannot be used; ``param`` names the request field."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param


class TokenizerError(MullamaError, RuntimeError):
    """The model's tokenizer failed inside llama.cpp, e.g. a SentencePiece vocabulary
    without the byte token (``<0x0A>``, ...) that the text needs. A fault of the model
    file, not of the text: the same text tokenizes with a complete vocabulary."""


class StateError(MullamaError, ValueError):
    """A sequence snapshot does not fit this model or context (or its file is not one)."""


class TokenIdError(MullamaError, ValueError, IndexError):
    """A token id outside the model's vocabulary."""


class UnsupportedModelError(MullamaError, ValueError):
    """The model cannot do what was asked, e.g. reranking with a model that has no
    classifier head."""


class DefaultModelMissingError(MullamaError, LookupError):
    """The default model package is not installed."""


class ClosedError(MullamaError, RuntimeError):
    """A model or context was used after ``close()``."""


class DownloadError(MullamaError, OSError):
    """A model download failed: network, HTTP status, checksum, disk or a bad file."""

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


_DECODE_MESSAGES = {
    1: "no free KV-cache slot for the batch (the context is full)",
    2: "evaluation was aborted",
    -1: "llama.cpp rejected the batch as invalid",
}


def raise_for_decode(code: int, what: str = "decode") -> None:
    """Raise the exception for a non-zero ``llama_decode`` status."""
    if code == 0:
        return
    detail = _DECODE_MESSAGES.get(code, "fatal error inside llama.cpp")
    raise GenerationError(f"{what} failed with status {code}: {detail}", code=code)


def model_load_error(path: str, detail: str | None) -> ModelLoadError:
    """The exception for a NULL from ``llama_model_load_from_file``."""
    msg = f"failed to load model from {path!r}"
    if detail:
        msg += f": {detail}"
    return ModelLoadError(msg, path=path)


def context_create_error(detail: str | None) -> MullamaError:
    """The exception for a NULL from ``llama_init_from_model``."""
    msg = "failed to create a llama.cpp context"
    if detail:
        msg += f": {detail}"
    return MullamaError(msg)


def cxx_exception(what: str, detail: str, cls: type[MullamaError] = MullamaError,
                  hint: str = "") -> MullamaError:
    """The exception for a C++ exception that mll_guard caught inside llama.cpp.

    ``what`` names the operation ("tokenize", ...); ``detail`` is the guard's
    message (the C++ exception's type and ``what()``).
    """
    msg = f"{what} failed: llama.cpp threw {detail or 'an unknown C++ exception'}"
    if hint:
        msg += f" ({hint})"
    return cls(msg)
